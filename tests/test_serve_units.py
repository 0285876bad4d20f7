"""The daemon's pure parts, without processes: scheduling, retries, the job file it writes,
the events it reads, process identity, webhook signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor.serve import jobspec, scheduler
from lorasup.supervisor.serve.hooks import body_for, signature
from lorasup.supervisor.serve.procid import Identity, boot_id, start_time
from lorasup.supervisor.serve.runs import EventsFollower, Progress
from lorasup.supervisor.serve.scheduler import Slot, Waiting

CPU = [Slot("cpu0"), Slot("cpu1")]


def test_priority_first_then_fifo() -> None:
    jobs = [Waiting(1, 0, 0), Waiting(2, 5, 0), Waiting(3, 0, 0), Waiting(4, 5, 0)]
    assert [j.id for j in scheduler.order(jobs)] == [2, 4, 1, 3]
    starts = scheduler.assign(jobs, CPU, now=0, gpu_mode=False)
    assert [(job, [s.name for s in slots]) for job, slots in starts] == [
        (2, ["cpu0"]), (4, ["cpu1"])]


def test_no_free_slot_starts_nothing() -> None:
    assert scheduler.assign([Waiting(1, 0, 0)], [], now=0, gpu_mode=False) == []


def test_backing_off_job_lets_the_next_pass_but_a_big_job_holds_the_line() -> None:
    jobs = [Waiting(1, 9, 0, not_before=100.0), Waiting(2, 0, 0)]
    assert [j for j, _ in scheduler.assign(jobs, CPU, now=50, gpu_mode=False)] == [2]
    assert [j for j, _ in scheduler.assign(jobs, CPU, now=100, gpu_mode=False)] == [1, 2]
    gpus = [Slot("gpu0", ("0",))]
    big_first = [Waiting(1, 0, 2), Waiting(2, 0, 1)]
    assert scheduler.assign(big_first, gpus, now=0, gpu_mode=True) == []
    two = [Slot("gpu0", ("0",)), Slot("gpu1", ("1",))]
    ((job, slots),) = scheduler.assign(big_first, two, now=0, gpu_mode=True)
    assert job == 1 and [s.devices for s in slots] == [("0",), ("1",)]


@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2), st.booleans()), max_size=12),
       st.integers(0, 4))
def test_assign_never_hands_out_a_slot_twice(specs, free_count) -> None:
    jobs = [Waiting(i, p, g, 10.0 if late else 0.0) for i, (p, g, late) in enumerate(specs)]
    free = [Slot(f"gpu{i}", (str(i),)) for i in range(free_count)]
    starts = scheduler.assign(jobs, free, now=5.0, gpu_mode=True)
    used = [s.name for _, slots in starts for s in slots]
    assert len(used) == len(set(used)) and set(used) <= {s.name for s in free}
    assert all(jobs[j].not_before <= 5.0 for j, _ in starts)


@pytest.mark.parametrize(("outcome", "transient", "used", "allowed", "expected"), [
    ("stalled", False, 0, 1, True),
    ("timeout", False, 0, 1, True),
    ("interrupted", False, 0, 2, True),
    ("stalled", False, 1, 1, False),          # retries spent
    ("usage", False, 0, 5, False),
    ("diverged", False, 0, 5, False),
    ("trainer_failed", False, 0, 5, False),   # a deterministic crash
    ("trainer_failed", True, 0, 5, True),     # host OOM kill, NCCL timeout
])
def test_retry_only_where_it_can_help(outcome, transient, used, allowed, expected) -> None:
    assert scheduler.should_retry(outcome, transient_failure=transient, retries_used=used,
                                  retries=allowed) is expected


def test_transient_failures() -> None:
    assert scheduler.transient("trainer_failed", -9, False, [])  # the kernel's OOM killer
    assert not scheduler.transient("trainer_failed", -9, True, [])  # lorasup's own SIGKILL
    assert scheduler.transient("trainer_failed", 1, False, [
        "exception: RuntimeError: NCCL communicator was aborted ... Watchdog caught collective "
        "operation timeout"])
    assert not scheduler.transient("trainer_failed", 1, False, ["traceback: ValueError"])
    assert not scheduler.transient("stalled", -9, False, [])


def test_backoff_doubles_and_is_capped() -> None:
    assert [scheduler.backoff(n, 2.0, cap=10.0) for n in (1, 2, 3, 4)] == [2, 4, 8, 10]


_keys = st.from_regex(r"[a-z_][a-z0-9_-]{0,10}", fullmatch=True)
_text = st.text(max_size=30)
_scalars = st.one_of(_text, st.integers(-2**62, 2**62), st.booleans(),
                     st.floats(allow_nan=False), st.lists(_text, max_size=4))


@settings(max_examples=200)
@given(st.dictionaries(_keys, _scalars, max_size=6),
       st.dictionaries(_keys, _text, max_size=4))
def test_job_file_round_trips_through_tomllib(top, options) -> None:
    values = {**top, "options": options}
    assert tomllib.loads(jobspec.to_toml(values)) == values


def test_job_file_refuses_what_toml_cannot_hold() -> None:
    with pytest.raises(jobspec.JobError, match="invalid x"):
        jobspec.to_toml({"x": None})


def _builtin_state(folder: Path, step: int) -> Path:
    """A state file as the builtin trainer writes it (only its metadata matters here)."""
    import json

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lorasup_lora-state.npz"
    meta = json.dumps({"format": "lorasup-builtin-state/1", "step": step}).encode()
    with path.open("wb") as handle:
        np.savez(handle, meta=np.frombuffer(meta, dtype=np.uint8))
    return path


def test_resume_for_the_builtin_trainer_continues_the_remaining_steps(tmp_path: Path) -> None:
    values = {"steps": 100, "trainer_argv": ["--new", "--seed", "3"], "options": {"a": "b"},
              "cwd": str(tmp_path)}
    # nothing saved on disk yet: the attempt starts over (a --continue would be refused)
    assert jobspec.resumed_values(values, "builtin", target_step=100, saved_step=40) is None
    _builtin_state(tmp_path / "lora_output", 40)
    resumed = jobspec.resumed_values(values, "builtin", target_step=100, saved_step=40)
    assert resumed == {"steps": 60, "trainer_argv": ["--seed", "3"], "cwd": str(tmp_path),
                       "options": {"a": "b", "mode": "continue"}}
    # the state file is the truth: a save lorasup did not record (step 45) counts
    _builtin_state(tmp_path / "lora_output", 45)
    resumed = jobspec.resumed_values(values, "builtin", target_step=100, saved_step=40)
    assert resumed is not None and resumed["steps"] == 55
    # nothing recorded as saved by this job: the file is another run's, start over
    assert jobspec.resumed_values(values, "builtin", target_step=100, saved_step=0) is None
    assert jobspec.resumed_values(values, "command", target_step=100, saved_step=40) is None
    # all steps saved already: nothing to continue
    assert jobspec.resumed_values(values, "builtin", target_step=45, saved_step=45) is None


def test_resume_for_hf_and_kohya_picks_the_newest_saved_folder(tmp_path: Path) -> None:
    for name, age in (("checkpoint-100", 2), ("checkpoint-200", 1), ("run-50-state", 2),
                      ("run-150-state", 1)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 - age, 1000 - age))
    hf = jobspec.resumed_values({"trainer_argv": ["train.py"]}, "hf", target_step=300,
                                saved_step=0, output_dirs=(str(tmp_path),))
    assert hf == {"trainer_argv": ["train.py", "--resume_from_checkpoint",
                                   str(tmp_path / "checkpoint-200")]}
    kohya = {"trainer_argv": ["train_network.py", "--save_state"]}
    resumed = jobspec.resumed_values(kohya, "kohya", target_step=300, saved_step=0,
                                     output_dirs=(str(tmp_path),))
    assert resumed is not None
    assert resumed["trainer_argv"][-1] == f"--resume={tmp_path / 'run-150-state'}"
    # without --save_state kohya saved no state to resume from
    assert jobspec.resumed_values({"trainer_argv": ["t.py"]}, "kohya", target_step=300,
                                  saved_step=0, output_dirs=(str(tmp_path),)) is None


def test_notify_table_is_checked() -> None:
    assert jobspec.check_notify({"webhook": "http://127.0.0.1:9/x", "secret": "s"})
    for bad, message in (({"webhook": "ftp://x"}, "not an http"),
                         ({"hook": "http://x"}, "unknown key 'hook'"),
                         ({"webhook": "http://x", "format": "teams"}, "format")):
        with pytest.raises(jobspec.JobError, match=message):
            jobspec.check_notify(bad)


def _parse(tmp_path: Path, values: dict, **kw) -> jobspec.JobSpec:
    return jobspec.parse(values, cwd=str(tmp_path), scratch=tmp_path, **kw)


def test_parse_strips_daemon_keys_and_leaves_nothing_behind(tmp_path: Path) -> None:
    spec = _parse(tmp_path, {"trainer": "builtin", "steps": 3, "name": "n", "priority": 2,
                             "retries": 1, "gpus": 0, "options": {"output_dir": "out"},
                             "notify": {"webhook": "http://127.0.0.1:1/h"}})
    assert spec.name == "n" and spec.priority == 2 and spec.retries == 1
    assert spec.values == {"trainer": "builtin", "steps": 3, "options": {"output_dir": "out"},
                           "cwd": str(tmp_path)}
    assert spec.output_dirs == (str(tmp_path / "out"),)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the scratch run dir is gone


@pytest.mark.parametrize(("values", "message"), [
    ({"trainer": "builtin"}, "--steps is required"),
    ({"trainer": "nope", "steps": 1}, "unknown trainer 'nope'"),
    ({"trainer": "builtin", "steps": 1, "priority": "high"}, "invalid priority"),
    ({"trainer": "builtin", "steps": 1, "retries": -1}, "invalid retries"),
    ({"trainer": "command", "steps": 1, "command": ["/no/such/program"]}, "not found"),
])
def test_parse_refuses_bad_jobs(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(jobspec.JobError, match=message):
        _parse(tmp_path, values)


@settings(max_examples=200)
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.dictionaries(st.sampled_from(["kind", "step", "t", "loss", "pid", "steps_requested",
                                     "outcome", "returncode", "signal", "problem", "line"]),
                    st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=8),
                              st.sampled_from(["step", "started", "outcome", "resumed",
                                               "checkpoint", "exited", "signal", "problem"])),
                    max_size=6).map(lambda d: json.dumps(d).encode())), max_size=20))
def test_events_follower_never_raises(tmp_path_factory, lines) -> None:
    path = tmp_path_factory.mktemp("ev") / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    follower = EventsFollower(path)
    follower.drain()
    assert follower.position == path.stat().st_size


def test_progress_reads_steps_resume_and_outcome() -> None:
    p = Progress()
    for record in ({"kind": "started", "pid": 7, "steps_requested": 10, "t": 0},
                   {"kind": "resumed", "step": 20, "t": 0.1},
                   {"kind": "step", "step": 21, "t": 1.0, "loss": 0.5},
                   {"kind": "step", "step": 25, "t": 3.0, "avg_loss": "nan"},
                   {"kind": "checkpoint", "path": "x", "step": 25},
                   {"kind": "outcome", "outcome": "completed", "exit_code": 0}):
        p.add(record)
    assert (p.trainer_pid, p.offset, p.final, p.step, p.checkpoint_step) == (7, 20, 30, 25, 25)
    assert p.rate == pytest.approx(2.0)
    assert p.loss != p.loss  # the spelled-out nan is kept as a float NaN
    assert p.outcome == {"kind": "outcome", "outcome": "completed", "exit_code": 0}


def test_identity_of_this_process() -> None:
    me = Identity.of(os.getpid())
    assert me.alive() and me.start_time == start_time(os.getpid()) and me.boot_id == boot_id()
    assert not Identity(me.pid, (me.start_time or 0) + 1, me.boot_id).alive()
    assert not Identity(me.pid, me.start_time, "another-boot").alive()


def test_webhook_bodies_and_signature() -> None:
    payload = {"job": 3, "name": "n", "state": "completed", "outcome": "completed",
               "steps": 5, "steps_requested": 5, "final_loss": 0.25}
    body = body_for("json", payload)
    assert json.loads(body) == payload
    assert signature("k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    # the state once (issue 17: "completed — completed"); the outcome where it says more
    assert json.loads(body_for("slack", payload))["text"] == (
        "lorasup job 3 (n) completed: 5/5 steps, final loss 0.25")
    failed = {**payload, "state": "failed", "outcome": "timeout", "reason": "over 60 s"}
    assert json.loads(body_for("slack", failed))["text"] == (
        "lorasup job 3 (n) failed (timeout): 5/5 steps, final loss 0.25 — over 60 s")
    assert "0.25" in json.loads(body_for("discord", payload))["content"]


def test_gpu_slots_from_the_flag() -> None:
    from lorasup.supervisor.serve.gpus import GpuSpecError, slots

    assert slots("none", 3) == ([Slot("cpu0"), Slot("cpu1"), Slot("cpu2")], False)
    assert slots(" 1,3 ", 1)[0][1] == Slot("gpu3", ("3",))
    for bad in ("0,0", "gpu0", ","):
        with pytest.raises(GpuSpecError):
            slots(bad, 1)
    with pytest.raises(GpuSpecError, match="--slots"):
        slots("none", 0)


def _end(outcome, stop=None, used=0, allowed=1, transient=False, returncode=None):
    return scheduler.after_attempt(outcome, "why", stop_request=stop, returncode=returncode,
                                   transient_failure=transient, retries_used=used,
                                   retries=allowed, backoff_base=2.0, now=100.0)


def test_after_an_attempt() -> None:
    assert _end("completed").state == "completed"
    assert _end("interrupted", stop="cancel").fields()["outcome"] == "cancelled"
    assert _end(None, stop="cancel").state == "cancelled"
    requeued = _end("interrupted", stop="daemon_stop", used=1, allowed=1)
    assert (requeued.state, requeued.retries_used, requeued.not_before) == ("queued", 1, 0.0)
    retried = _end("stalled", used=0, allowed=2)
    assert (retried.state, retried.retries_used, retried.not_before) == ("queued", 1, 102.0)
    assert (_end("stalled", used=2, allowed=2).state, _end("diverged").outcome) == (
        "failed", "diverged")
    gone = _end(None, returncode=-9, allowed=0)
    assert (gone.state, gone.outcome) == ("lost", "interrupted") and "-9" in (gone.reason or "")
    assert _end(None, allowed=1).state == "queued"
    assert _end("trainer_failed", transient=True).state == "queued"
    assert _end("trainer_failed").state == "failed"


def test_a_run_supervisor_is_found_by_its_run_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lorasup.supervisor.serve.runs import find_supervisor

    run_dir = tmp_path / "runs" / "job1-a1"
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); "
                              "sys.stdin.read()", "start", "--run-dir", str(run_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    try:
        # (right after exec the kernel may still show an empty command line)
        assert child.stdout.readline() == b"ready\n"
        found = find_supervisor(run_dir)
        assert found is not None and found.pid == child.pid and found.alive()
        assert find_supervisor(tmp_path / "runs" / "other") is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()
    assert find_supervisor(run_dir) is None


@given(st.one_of(st.none(), st.text(max_size=30)))
def test_last_event_id_parser_never_raises(text) -> None:
    from lorasup.supervisor.serve.api import _position

    position = _position(text)
    assert position is None or (position[0] >= 0 and position[1] >= 0)
    assert _position("3:120") == (2, 120) and _position(None) == (0, 0)
    # malformed: refused (400), never read as "from the start"
    for bad in ("junk", "²:1", "1:" + "9" * 30, "1:2:3", " 1:2", "-1:5"):
        assert _position(bad) is None


@given(st.binary(max_size=60))
def test_event_kind_for_sse_is_a_safe_token(line) -> None:
    from lorasup.supervisor.serve.api import _kind

    kind = _kind(line)
    assert kind and b"\n" not in kind and b":" not in kind
    assert _kind(b'{"t":1,"kind":"step","step":2}') == b"step"


def _spec(output: tuple[str, ...] = (), run_dir: str | None = None) -> jobspec.JobSpec:
    return jobspec.JobSpec(values={}, name="n", priority=0, gpus=0, cwd="/", retries=0,
                           notify={}, trainer="builtin", steps=1, grace=1.0, run_dir=run_dir,
                           logs_dir=None, output_dirs=output)


def test_conflicting_output_or_run_directories() -> None:
    others = [("job 1", _spec(("/srv/out/a",), "/srv/runs/x"))]
    assert jobspec.conflict(_spec(("/srv/out/a/",)), others) == (
        "job 1 already writes the output directory /srv/out/a")
    assert "run directory /srv/runs/x" in (jobspec.conflict(
        _spec(("/srv/out/b",), "/srv/runs/./x"), others) or "")
    assert jobspec.conflict(_spec(("/srv/out/b",), "/srv/runs/y"), others) is None


def test_job_from_the_request_body() -> None:
    assert jobspec.values_from_payload({"job": {"steps": 3}}) == {"steps": 3}
    assert jobspec.values_from_payload({"toml": 'trainer = "x"\n[job]\nsteps = 4\n'}) == {
        "trainer": "x", "steps": 4}
    for bad, message in (({"toml": "steps = "}, "cannot read the job"), ({}, "the body"),
                         ({"toml": "job = 3"}, r"\[job\] must be a table")):
        with pytest.raises(jobspec.JobError, match=message):
            jobspec.values_from_payload(bad)


@given(st.text(max_size=30))
def test_a_job_name_is_text_without_control_characters(name: str) -> None:
    import unicodedata

    try:
        assert jobspec.check_name(name) == name
    except jobspec.JobError as exc:
        assert str(exc).startswith("invalid name: ") and "\n" not in str(exc)
        assert any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name)
        return
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name)
    for bad in ("a\x00", "a\nb", "\x1b[31mred", "\x9b", "\ud800"):
        with pytest.raises(jobspec.JobError):
            jobspec.check_name(bad)


def test_a_submit_key_names_one_job_for_24_hours(tmp_path: Path) -> None:
    import contextlib
    import sqlite3
    import time

    from lorasup.supervisor.serve.store import SUBMIT_KEY_SECONDS, Store

    store = Store(tmp_path / "lorasup.db")
    try:
        first, new = store.add_job_once(_spec(), "k1")
        assert new and store.submitted("k1") == first
        assert store.add_job_once(_spec(), "k1") == (first, False)
        assert len(store.jobs()) == 1
        # the key went in with the job: there is no job without its key
        with contextlib.closing(sqlite3.connect(tmp_path / "lorasup.db")) as other:
            assert other.execute("SELECT job_id FROM submits WHERE key = 'k1'").fetchone() == (
                first,)
        # 24 h later the key is forgotten (and purged by the next keyed submit)
        later = time.time() + SUBMIT_KEY_SECONDS + 1
        assert store.submitted("k1", now=later) is None
        store.db.execute("UPDATE submits SET created = created - ?", (SUBMIT_KEY_SECONDS + 1,))
        second, new = store.add_job_once(_spec(), "k1")
        assert new and second != first and len(store.jobs()) == 2
        assert store.db.execute("SELECT COUNT(*) FROM submits").fetchone()[0] == 1
    finally:
        store.close()


@given(st.one_of(
    st.binary(max_size=80),
    st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                 lambda inner: st.one_of(st.lists(inner, max_size=2),
                                         st.dictionaries(st.text(max_size=3), inner,
                                                         max_size=2)),
                 max_leaves=8).map(lambda v: json.dumps({"job": v}).encode()),
    st.integers(1, 3000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}"),
    st.integers(4290, 4310).map(lambda n: b'{"steps":' + b"9" * n + b"}")))
def test_request_body_parser_gives_an_object_or_a_400(body: bytes) -> None:
    from lorasup.supervisor.serve.api import MAX_DEPTH, _depth, parse_body
    from lorasup.supervisor.serve.errors import ApiError

    try:
        payload = parse_body(body)
    except ApiError as exc:
        assert exc.status == 400 and exc.message and "\n" not in exc.message
        return
    assert isinstance(payload, dict) and _depth(payload) <= MAX_DEPTH
