"""The adapter protocol: everything lorasup knows about one trainer program.

The engine drives any trainer through :class:`AdapterBase` only: the argv to run (with the
step limit injected), how to read its lines, whether it stops by itself at the limit,
which signals stop it gracefully, and what its TensorBoard tags and missing series mean.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from lorasup.supervisor.events import Event, Problem, Step
from lorasup.supervisor.numbers import read_count, read_float, read_step


class UsageError(ValueError):
    """The job cannot be run as given; nothing was started (exit code 2)."""


@dataclass(frozen=True, slots=True)
class TrainerJob:
    """What an adapter needs to build the command: the resolved job, nothing else."""

    steps: int
    argv: tuple[str, ...]
    run_dir: str
    options: tuple[tuple[str, str], ...] = ()
    #: the job file's ``[parse]`` table (key, regex), only for adapters that set
    #: ``accepts_parse_table``; the adapter checks it in ``command()`` (UsageError)
    parse: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)


@dataclass(frozen=True, slots=True)
class Resume:
    """How one attempt continues the state an earlier attempt of the same job saved.

    ``AdapterBase.resume`` answers it, for ``lorasup start --resume-from`` and for the
    daemon's retries alike (one resume logic): the trainer args and step limit of the new
    attempt, so that the job ends at its requested total step, however often it was cut.
    """

    #: the user's trainer args for the attempt (a resume flag added, a "new" flag dropped)
    argv: tuple[str, ...]
    #: the attempt's step limit; None: the job's own (the trainer counts on from its save)
    steps: int | None = None
    #: job options set for the attempt, on top of the job's (``mode = "continue"``)
    options: tuple[tuple[str, str], ...] = ()
    #: what it continues from (a state file, a checkpoint folder), for the log and report
    point: str = ""
    #: the step that save holds, where the trainer's own files tell it
    step: int | None = None


#: the series a TensorBoard scalar tag can feed (``scalar_tags`` values)
SERIES_KINDS = frozenset({"loss", "avg_loss", "epoch_loss", "lr"})


class AdapterBase:
    """What the engine must know of one trainer program, declared by its adapter.

    The engine asks the adapter and never names a trainer: the argv with the step limit
    (and a resume point) injected, how to read its lines, whether it stops by itself, its
    graceful stop signals, which TensorBoard tags hold which series, what to tell a user
    about a series it leaves out, and which lines after lorasup's own SIGINT are the stop.
    Subclass it; override ``resolve_steps``, ``command`` and ``parse`` at least.
    """

    name: ClassVar[str] = ""
    #: whether the program ends by itself at the injected step limit (then lorasup waits
    #: for its final save instead of stopping it at step N)
    stops_by_itself: ClassVar[bool] = False
    #: the graceful ladder before SIGKILL, in order
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    #: substrings at least one of which is in every line ``parse`` gets anything from; lets
    #: the reader skip whole chunks of chatter. () = every line matters
    needles: tuple[str, ...] = ()
    #: bar frames starting with this are redrawn whole: only the last of a run counts
    redraw_prefix: ClassVar[str | None] = None
    #: a bytes pattern for whole bar-frame lines (supervisor/fastbars.py), or None
    fast_bar: ClassVar[re.Pattern[bytes] | None] = None
    #: lines starting with this are the trainer's messages to lorasup (a line protocol),
    #: not for people: the terminal echo of its output leaves them out
    protocol_prefix: ClassVar[bytes | None] = None
    #: True when the adapter reads the user's regexes (``TrainerJob.parse``, a job file's
    #: ``[parse]`` table); a ``[parse]`` table for any other adapter is refused
    accepts_parse_table: ClassVar[bool] = False
    #: TensorBoard scalar tag -> the series it feeds (one of :data:`SERIES_KINDS`); a tag
    #: ``lr/<group>`` is always a learning rate per group
    scalar_tags: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: series name ("loss", "avg_loss", "lr") -> what a person needs to know when this
    #: trainer leaves it out (e.g. where the trainer writes it instead)
    missing_hints: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def resolve_steps(self, steps: int | None, argv: Sequence[str]) -> int:
        """The step count to enforce; raise UsageError when none can be known."""
        raise NotImplementedError

    def command(self, job: TrainerJob) -> list[str]:
        """The argv to spawn (never a shell string), step limit injected."""
        raise NotImplementedError

    def parse(self, line: str) -> Iterable[Event]:
        """One decoded line in, zero or more events out. Pure, fast, never raises."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Extra environment for the child (on top of lorasup's own)."""
        return {}

    def argv_for(self, job: TrainerJob, steps: int | None = None,
                 resume: str | None = None) -> list[str]:
        """The argv to spawn for ``job``, with ``steps`` (default: the job's) as the step
        limit and ``resume`` (a checkpoint the trainer continues from) injected."""
        if steps is not None and steps != job.steps:
            job = dataclasses.replace(job, steps=steps)
        if resume is not None:
            job = dataclasses.replace(job, argv=tuple(self.resume_argv(job.argv, resume)))
        return self.command(job)

    def resume_argv(self, argv: Sequence[str], resume: str) -> list[str]:
        """The trainer's own argv continuing from ``resume``; UsageError when it can't."""
        raise UsageError(f"--trainer {self.name or 'this trainer'} cannot resume from a "
                         "checkpoint")

    def resume(self, job: TrainerJob, *, target_step: int, saved_step: int,
               output_dirs: Sequence[str], cwd: Path) -> Resume | None:
        """How an attempt of ``job`` continues what earlier attempts saved, so that the
        job ends at ``target_step`` in total; None when there is nothing to continue from
        (nothing saved yet, or a trainer that cannot resume): the attempt starts fresh.

        ``saved_step`` is the newest save lorasup recorded (0: none); ``output_dirs`` are
        absolute. May read the trainer's output folders (blocking, small).
        """
        return None

    def preflight(self, job: TrainerJob, cwd: Path) -> None:
        """Check the trainer's inputs (dataset, output folder, resume state) before anything
        is started, raising UsageError with one line for the user. ``cwd`` is where the
        trainer will run. Called after ``command`` and before the run directory is made;
        must not write anything."""

    def output_dirs(self, job: TrainerJob) -> list[str]:
        """The folders the trainer writes its model files to (looked up after the run)."""
        return []

    def tensorboard_dir(self, job: TrainerJob) -> str | None:
        """Where the trainer writes TensorBoard event files, or None when it writes none."""
        return None

    def expected_exit(self, problem: str, line: str) -> bool | None:
        """After lorasup's own SIGINT, is this problem line the trainer being stopped?

        True: yes (a Python trainer's ``KeyboardInterrupt``); None: cannot tell yet (a
        traceback's first line: its exception line will say); False: a problem. The one
        rule for the live log (supervisor/outcome.py) and the report (report/problems.py).
        """
        if problem == "traceback":
            return None
        return problem == "exception" and line.startswith("KeyboardInterrupt")

    def missing_hint(self, series: str, argv: Sequence[str] | None) -> str | None:
        """What to tell a user about ``series`` missing from a run of ``argv``, or None."""
        return self.missing_hints.get(series)


#: the adapter type the engine holds
Adapter = AdapterBase


@dataclass(frozen=True, slots=True)
class ProblemPattern:
    """A failure signature as data: a cheap substring test, then an optional regex."""

    problem: str
    needle: str
    regex: re.Pattern[str] | None = None

    def match(self, line: str) -> Problem | None:
        if self.needle not in line:
            return None
        if self.regex is not None and self.regex.search(line) is None:
            return None
        return Problem(problem=self.problem, line=line.strip()[:500])


#: signatures common to Python/PyTorch trainers
PYTHON_PROBLEMS: tuple[ProblemPattern, ...] = (
    ProblemPattern(
        "cuda_out_of_memory", "out of memory", re.compile(r"CUDA (?:error: )?out of memory")
    ),
    ProblemPattern("cuda_out_of_memory", "OutOfMemoryError"),
    ProblemPattern("traceback", "Traceback (most recent call last)"),
    # argparse refusing the command line: "prog: error: unrecognized arguments: --x",
    # "prog: error: argument --x: invalid int value: 'a'", "... arguments are required: ..."
    ProblemPattern("bad_arguments", ": error: ", re.compile(
        r"^\S+: error: (?:unrecognized arguments|argument |the following arguments are "
        r"required|one of the arguments |ambiguous option|expected )")),
)


#: substrings without which ``python_problems`` finds nothing in a line
PYTHON_PROBLEM_NEEDLES = ("rror", "Traceback", "memory", "No data", "Interrupt")

#: the last line of a Python traceback: ``OSError: ...``, ``torch.OutOfMemoryError: ...``
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b(?::|$)")


#: the prefix torchrun (``--tee``, ``--local-ranks-filter``) and accelerate put before each
#: line of a worker: ``[rank0]: ``, ``[default3]: ``, ``[rank1]:[W ...]``
_RANK_PREFIX = re.compile(r"^\s*\[(?:rank|default)\d{1,6}\]:\s?")


def python_problems(line: str, patterns: Iterable[ProblemPattern] = PYTHON_PROBLEMS) -> list[Event]:
    """Problems in a line of a Python trainer's output; cheap for the common clean line.

    A worker's rank prefix is not part of its exception line: ``[rank0]: KeyboardInterrupt``
    is recorded as ``KeyboardInterrupt``, so the stop rules read it as the plain line.
    """
    if not any(needle in line for needle in PYTHON_PROBLEM_NEEDLES):
        return []
    events = match_problems(line, patterns)
    stripped = line.strip()
    if stripped.startswith("[") and (prefix := _RANK_PREFIX.match(stripped)):
        stripped = stripped[prefix.end():].strip()
    if _EXCEPTION_LINE.match(stripped):
        events.append(Problem(problem="exception", line=stripped[:500]))
    return events


def match_problems(line: str, patterns: Iterable[ProblemPattern]) -> list[Event]:
    """All distinct problems a line shows (first pattern per problem name wins)."""
    found: list[Event] = []
    seen: set[str] = set()
    for pattern in patterns:
        if pattern.problem in seen:
            continue
        event = pattern.match(line)
        if event is not None:
            seen.add(pattern.problem)
            found.append(event)
    return found


def drop_flag(argv: Sequence[str], flag: str) -> list[str]:
    """argv without any ``flag`` (``--f=v`` or ``--f v`` forms)."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg == flag:
            skip_next = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def replace_flag(argv: Sequence[str], flag: str, value: str, *, style: str = "=") -> list[str]:
    """argv with every ``flag`` removed and ``flag value`` appended.

    ``style`` "=" appends ``--flag=value``; " " appends ``--flag value``.
    """
    out = drop_flag(argv, flag)
    out.extend([f"{flag}={value}"] if style == "=" else [flag, value])
    return out


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value given for ``flag`` (``--f=v`` or ``--f v``), or None."""
    value: str | None = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def steps_from_flag(steps: int | None, argv: Sequence[str], flag: str, *, why: str = "") -> int:
    """``--steps`` when given, else the value of the trainer's own ``flag`` in its argv."""
    if steps is not None:
        return steps
    given = flag_value(argv, flag)
    if given is None:
        raise UsageError(f"give --steps N (or {flag}=N in the trainer command){why}")
    count = read_count(given)
    if not count:
        raise UsageError(f"{flag}={given!r} is not a positive whole number")
    return count


#: a progress-bar parser: the step a line shows and the text glued after the frame
BarParser = Callable[[str], "tuple[Step, str] | None"]


#: the longest path and file name Linux takes (PATH_MAX, NAME_MAX), in bytes
_PATH_MAX = 4096
_NAME_MAX = 255


def checkpoint_path(text: str) -> str | None:
    """A path a trainer says it saved to, or None when it cannot name a file (empty, a NUL,
    longer than PATH_MAX, a component longer than NAME_MAX): looking such a "path" up later
    would fail with ENAMETOOLONG instead of telling anything."""
    path = text.strip()
    if not path or "\x00" in path:
        return None
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > _PATH_MAX or any(len(part) > _NAME_MAX for part in raw.split(b"/")):
        return None
    return path


def parse_bar_line(line: str, parse_bar: BarParser,
                   parse_text: Callable[[str], list[Event]]) -> list[Event]:
    """A bar frame first; a log record or traceback glued after it is read as text too."""
    bar = parse_bar(line)
    if bar is None:
        return parse_text(line)
    step, rest = bar
    return [step, *parse_text(rest.lstrip())] if len(rest) > 1 else [step]


def tqdm_frame(line: str, desc: str,
               pattern: re.Pattern[str]) -> tuple[int, int | None, str, str] | None:
    """(step, total, postfix, text after the frame) of the ``desc`` tqdm frame in a line.

    ``pattern`` is matched where ``desc`` starts and must capture step, total and the
    bracketed info. A substring find first: most lines are not frames. A count that is not
    a sane step (e.g. 5000 digits) makes the line no frame; an absurd total is left out.
    """
    start = line.find(desc)
    if start < 0:
        return None
    match = pattern.match(line, start)
    if match is None:
        return None
    step_text, total_text, info = match.groups()
    step = read_step(step_text)
    if step is None:
        return None
    return step, read_count(total_text), info, line[match.end():]


def postfix_value(info: str, key: str) -> float | None:
    """``key=value`` from a tqdm postfix (``avr_loss=1.1``, ``lr=0.0001``), as a float."""
    at = info.find(key)
    if at < 0:
        return None
    return read_float(info[at + len(key):].split(",", 1)[0])


def newest_folder(folders: Sequence[str], wanted: Callable[[Path], bool]) -> Path | None:
    """The most recently modified sub-folder of ``folders`` that ``wanted`` accepts (a
    trainer's newest checkpoint or state folder), or None; unreadable folders are skipped."""
    found: list[tuple[float, str]] = []
    for folder in folders:
        try:
            for path in Path(folder).iterdir():
                if path.is_dir() and wanted(path):
                    found.append((path.stat().st_mtime, str(path)))
        except OSError:
            continue
    return Path(max(found)[1]) if found else None
