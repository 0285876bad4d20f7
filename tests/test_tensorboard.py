"""TensorBoard event files: CRC, framing, protobuf decoding, damage, live following.

The recorded files under tests/data/tensorboard are copies of the event files the real
kohya sd-scripts and diffusers runs wrote (see ../shared/recordings/*/README.md); the
exact values below were read once with TensorBoard's own ``EventAccumulator``
(tensorboard 2.21.0, in a throwaway venv), and ``test_matches_tensorboard_itself``
repeats that comparison wherever tensorboard is importable.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path

import anyio
import pytest

from lorasup.supervisor import tensorboard
from lorasup.supervisor.events import Scalar
from lorasup.supervisor.tensorboard import (
    DecodeError,
    EventFileFollower,
    EventFileReader,
    ScalarRecord,
    crc32c,
    decode_event,
    find_event_files,
    follow_event_files,
    masked_crc32c,
)
from tests import tb_writer as tbw

DATA = Path(__file__).resolve().parent / "data" / "tensorboard"

KOHYA_TAGS = {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/group1"}
# recording -> last step (the recordings' README "last step" column); runs that finished
# their epoch also wrote ``loss/epoch_average`` at step 1 (the epoch number).
KOHYA_LAST_STEP = {
    "normal": 12, "normal_unbuffered": 12, "save_every": 12, "save_every_unbuffered": 12,
    "cache_latents_unbuffered": 12, "console_log_simple_unbuffered": 12,
    "accelerate_normal": 12, "sigint_ignored": 40,
    "sigint": 9, "sigint_unbuffered": 14, "sigterm": 7, "sigterm_unbuffered": 13,
    "accelerate_sigint": 7, "accelerate_sigterm": 6, "workers_sigint": 5,
}
KOHYA_FINISHED = {"normal", "normal_unbuffered", "save_every", "save_every_unbuffered",
                  "cache_latents_unbuffered", "console_log_simple_unbuffered",
                  "accelerate_normal", "sigint_ignored"}
DIFFUSERS_LAST_STEP = {"diffusers_normal": 10, "diffusers_sigterm": 5}
KOHYA_NORMAL = DATA / "kohya/normal/events.out.tfevents.1795815850.vm.21758.0"


def read_all(path: Path, **kwargs: int) -> list[ScalarRecord]:
    reader = EventFileReader(path, **kwargs)
    records = reader.read_new()
    assert reader.corrupt_records == 0
    assert reader.read_new() == []
    return records


def by_tag(records: list[ScalarRecord]) -> dict[str, list[ScalarRecord]]:
    out: dict[str, list[ScalarRecord]] = defaultdict(list)
    for r in records:
        out[r.tag].append(r)
    return dict(out)


def record_offsets(raw: bytes) -> list[int]:
    """Start offsets of the TFRecords in ``raw`` (trusting the lengths)."""
    offsets, pos = [], 0
    while pos < len(raw):
        offsets.append(pos)
        (length,) = struct.unpack_from("<Q", raw, pos)
        pos += 12 + length + 4
    assert pos == len(raw)
    return offsets


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---------------------------------------------------------------------------- CRC


def test_crc32c_known_vectors() -> None:
    # RFC 3720 B.4 and the usual check value
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283
    for data in (b"", b"x", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tbw.masked_crc32c(data)


# ---------------------------------------------------------------------------- recordings


def test_recorded_files_are_all_here() -> None:
    files = find_event_files(DATA)
    assert len(files) == len(KOHYA_LAST_STEP) + 2 * len(DIFFUSERS_LAST_STEP)
    assert {p.parent.name for p in find_event_files(DATA / "kohya")} == set(KOHYA_LAST_STEP)


@pytest.mark.parametrize("name", sorted(KOHYA_LAST_STEP))
def test_kohya_recordings(name: str) -> None:
    (path,) = find_event_files(DATA / "kohya" / name)
    records = read_all(path)
    tags = by_tag(records)
    last = KOHYA_LAST_STEP[name]
    expected_tags = KOHYA_TAGS | ({"loss/epoch_average"} if name in KOHYA_FINISHED else set())
    assert set(tags) == expected_tags
    for tag in KOHYA_TAGS:
        assert [r.step for r in tags[tag]] == list(range(1, last + 1))
        assert all(r.wall_time > 1.7e9 for r in tags[tag])
    assert all(r.value == f32(1e-4) for r in tags["lr/unet"] + tags["lr/textencoder"])
    # kohya's loss/average is the running mean of loss/current, written as float32: an
    # independent check that every value decoded to the exact float32 that was written
    current = [r.value for r in tags["loss/current"]]
    average = [r.value for r in tags["loss/average"]]
    assert average == [f32(sum(current[: i + 1]) / (i + 1)) for i in range(last)]
    if name in KOHYA_FINISHED:
        (epoch,) = tags["loss/epoch_average"]
        assert (epoch.step, epoch.value) == (1, average[-1])
        assert records[-1] == epoch  # written after the last step's scalars


def test_kohya_exact_values_from_tensorboard() -> None:
    tags = by_tag(read_all(KOHYA_NORMAL))
    assert tags["loss/current"][0] == ScalarRecord(
        "loss/current", 1, 1.1833412647247314, 1795815853.220038)
    assert tags["loss/current"][-1] == ScalarRecord(
        "loss/current", 12, 1.1213593482971191, 1795815870.3638752)
    assert tags["loss/average"][-1] == ScalarRecord(
        "loss/average", 12, 1.0830658674240112, 1795815870.3639734)
    assert tags["lr/unet"][0] == ScalarRecord(
        "lr/unet", 1, 9.999999747378752e-05, 1795815853.2201436)
    assert tags["loss/epoch_average"] == [ScalarRecord(
        "loss/epoch_average", 1, 1.0830658674240112, 1795815870.3643565)]
    (ignored,) = find_event_files(DATA / "kohya/sigint_ignored")
    tags = by_tag(read_all(ignored))
    assert tags["loss/current"][-1] == ScalarRecord(
        "loss/current", 40, 1.1283851861953735, 1795815551.5240924)
    assert tags["loss/average"][-1].value == 1.0785242319107056


@pytest.mark.parametrize("name", sorted(DIFFUSERS_LAST_STEP))
def test_diffusers_recordings(name: str) -> None:
    scalars, hparams = sorted(find_event_files(DATA / "diffusers" / name),
                              key=lambda p: len(p.parts))
    # the hparams file (in a timestamped subfolder) holds plugin metadata, no scalars
    reader = EventFileReader(scalars)
    records = reader.read_new()
    assert EventFileReader(hparams).read_new() == []
    assert reader.file_version == "brain.Event:2"
    assert {r.tag for r in records} == {"train_loss"}
    assert [r.step for r in records] == list(range(1, DIFFUSERS_LAST_STEP[name] + 1))
    # the same seed gives the same first losses in both runs
    assert records[0] == ScalarRecord("train_loss", 1, 1.1332950592041016,
                                      records[0].wall_time)
    assert records[4].value == 1.1698112487792969
    if name == "diffusers_normal":
        assert records[-1] == ScalarRecord("train_loss", 10, 1.1239806413650513,
                                           1795813937.2635095)
    else:
        assert records[-1].wall_time == 1795813989.705568


def test_matches_tensorboard_itself() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for path in find_event_files(DATA):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0},
                                      purge_orphaned_data=False)
            acc.Reload()
        theirs = {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
                  for tag in acc.Tags()["scalars"]}
        ours = {tag: [(r.step, r.value, r.wall_time) for r in rs]
                for tag, rs in by_tag(read_all(path)).items()}
        assert ours == theirs, path


@pytest.mark.parametrize("chunk_bytes", [1, 7, 13, 64])
def test_small_chunks_read_the_same(chunk_bytes: int) -> None:
    assert read_all(KOHYA_NORMAL, chunk_bytes=chunk_bytes) == read_all(KOHYA_NORMAL)


# ---------------------------------------------------------------------------- damage


def test_truncated_at_every_offset_of_the_last_record(tmp_path: Path) -> None:
    raw = KOHYA_NORMAL.read_bytes()
    everything = read_all(KOHYA_NORMAL)
    last_start = record_offsets(raw)[-1]
    path = tmp_path / "events.out.tfevents.1.cut"
    for cut in range(last_start, len(raw)):
        path.write_bytes(raw[:cut])
        reader = EventFileReader(path)
        assert reader.read_new() == everything[:-1]
        assert reader.offset == last_start
        assert reader.read_new() == []
        with path.open("ab") as fh:
            fh.write(raw[cut:])
        assert reader.read_new() == everything[-1:]
        assert reader.read_new() == []
        assert reader.corrupt_records == 0


def test_file_growing_byte_by_byte(tmp_path: Path) -> None:
    raw = KOHYA_NORMAL.read_bytes()
    path = tmp_path / "events.out.tfevents.2.grow"
    path.write_bytes(b"")
    reader = EventFileReader(path)
    seen: list[ScalarRecord] = []
    ends = {start - 1 for start in record_offsets(raw)[1:]} | {len(raw) - 1}
    with path.open("ab", buffering=0) as fh:
        for i in range(len(raw)):
            fh.write(raw[i : i + 1])
            new = reader.read_new()
            if i not in ends:
                assert new == []
            seen.extend(new)
    assert seen == read_all(KOHYA_NORMAL)
    assert reader.corrupt_records == 0


def corrupt_copy(tmp_path: Path, record: int, byte_in_record: int) -> tuple[Path, int]:
    raw = bytearray(KOHYA_NORMAL.read_bytes())
    start = record_offsets(bytes(raw))[record]
    raw[start + byte_in_record] ^= 0x40
    path = tmp_path / f"events.out.tfevents.{record}.{byte_in_record}"
    path.write_bytes(bytes(raw))
    return path, start


@pytest.mark.parametrize("where", ["data", "data_crc"])
def test_bad_data_crc_skips_that_record(tmp_path: Path, where: str) -> None:
    # record 11 is step 3's loss/current (record 0 is the file_version event)
    raw_len = len(struct.pack("<Q", 0)) + 4
    data_len = struct.unpack_from("<Q", KOHYA_NORMAL.read_bytes(),
                                  record_offsets(KOHYA_NORMAL.read_bytes())[11])[0]
    byte = raw_len + 20 if where == "data" else raw_len + data_len + 1
    path, _ = corrupt_copy(tmp_path, 11, byte)
    reader = EventFileReader(path)
    records = reader.read_new()
    everything = read_all(KOHYA_NORMAL)
    assert records == everything[:10] + everything[11:]
    assert everything[10].tag == "loss/current"
    assert everything[10].step == 3
    assert reader.corrupt_records == 1
    assert reader.read_new() == []
    assert reader.corrupt_records == 1


@pytest.mark.parametrize("byte_in_record", [0, 3, 7, 9])
def test_bad_length_crc_resyncs_at_the_next_record(tmp_path: Path, byte_in_record: int) -> None:
    path, _ = corrupt_copy(tmp_path, 20, byte_in_record)
    reader = EventFileReader(path)
    everything = read_all(KOHYA_NORMAL)
    assert reader.read_new() == everything[:19] + everything[20:]
    assert reader.corrupt_records == 1
    assert reader.read_new() == []


def test_bad_length_crc_waits_for_a_whole_record_after_it(tmp_path: Path) -> None:
    raw = KOHYA_NORMAL.read_bytes()
    offsets = record_offsets(raw)
    damaged = bytearray(raw[: offsets[31] + 5])  # record 30 damaged, record 31 cut off
    damaged[offsets[30] + 2] ^= 0x01
    path = tmp_path / "events.out.tfevents.3.damaged"
    path.write_bytes(bytes(damaged))
    reader = EventFileReader(path)
    everything = read_all(KOHYA_NORMAL)
    assert reader.read_new() == everything[:29]
    assert reader.offset == offsets[30]
    assert reader.corrupt_records == 0  # not yet known to be more than a torn write
    with path.open("ab") as fh:
        fh.write(raw[offsets[31] + 5 :])
    assert reader.read_new() == everything[30:]
    assert reader.corrupt_records == 1


def test_torn_header_that_becomes_valid_is_not_corrupt(tmp_path: Path) -> None:
    """Some network filesystems show a file's new size before its bytes (zeros)."""
    raw = KOHYA_NORMAL.read_bytes()
    last = record_offsets(raw)[-1]
    path = tmp_path / "events.out.tfevents.4.torn"
    path.write_bytes(raw[:last] + bytes(len(raw) - last))
    reader = EventFileReader(path)
    everything = read_all(KOHYA_NORMAL)
    assert reader.read_new() == everything[:-1]
    assert reader.read_new() == []
    path.write_bytes(raw)  # the real bytes arrive
    assert reader.read_new() == everything[-1:]
    assert reader.corrupt_records == 0


def test_undecodable_event_with_valid_crc_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.5.bad"
    with path.open("wb") as fh:
        tbw.write_scalar_event(fh, "a", 1, 1.0, 100.0)
        tbw.write_record(fh, tbw.f_bytes(5, b"\x0a\x7f"))  # summary value longer than it
        tbw.write_record(fh, b"\x0f")  # wire type 7
        tbw.write_scalar_event(fh, "a", 2, 2.0, 101.0)
    reader = EventFileReader(path)
    assert [r.step for r in reader.read_new()] == [1, 2]
    assert reader.corrupt_records == 2
    assert reader.records_read == 2


def test_oversized_record_is_skipped_unread(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.6.big"
    big = tbw.frame(tbw.event(wall_time=1.0, step=1, values=[tbw.scalar_value("x" * 300, 1.0)]))
    with path.open("wb") as fh:
        tbw.write_scalar_event(fh, "a", 1, 1.0, 100.0)
        fh.write(big[:100])
    reader = EventFileReader(path, max_record_bytes=128, chunk_bytes=16)
    assert [r.tag for r in reader.read_new()] == ["a"]
    assert reader.oversized_records == 0  # not all there yet: wait
    with path.open("ab") as fh:
        fh.write(big[100:])
        tbw.write_scalar_event(fh, "a", 2, 2.0, 101.0)
    assert [r.step for r in reader.read_new()] == [2]
    assert (reader.oversized_records, reader.corrupt_records) == (1, 0)


def test_missing_and_shrunk_files(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.7.gone"
    reader = EventFileReader(path)
    assert reader.read_new() == []
    with path.open("wb") as fh:
        tbw.write_scalar_event(fh, "a", 1, 1.0, 100.0)
    assert len(reader.read_new()) == 1
    path.write_bytes(b"")
    assert reader.read_new() == []  # rewritten, not appended: never read twice
    with pytest.raises(ValueError):
        EventFileReader(path, max_record_bytes=0)


# ---------------------------------------------------------------------------- protobuf


def one_value(value: bytes) -> tuple[tuple[str, float], ...]:
    return decode_event(tbw.event(wall_time=1.0, step=1, values=[value])).scalars


def bf16_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0] >> 16


TENSOR_CASES = [
    (tbw.DT_FLOAT, {"float_val": [0.5]}, 0.5),
    (tbw.DT_FLOAT, {"float_val": [0.1], "packed": False}, f32(0.1)),
    (tbw.DT_FLOAT, {"float_val": [0.1], "shape": [1]}, f32(0.1)),
    (tbw.DT_FLOAT, {"float_val": [2.0], "shape": [1, 1]}, 2.0),
    (tbw.DT_DOUBLE, {"double_val": [0.1]}, 0.1),
    (tbw.DT_DOUBLE, {"double_val": [-1e300], "packed": False}, -1e300),
    (tbw.DT_INT32, {"int_val": [-7]}, -7.0),
    (tbw.DT_INT32, {"int_val": [5], "packed": False}, 5.0),
    (tbw.DT_INT64, {"int64_val": [2**40]}, float(2**40)),
    (tbw.DT_INT64, {"int64_val": [-3]}, -3.0),
    (tbw.DT_HALF, {"half_val": [0x3E00]}, 1.5),
    (tbw.DT_BFLOAT16, {"half_val": [bf16_bits(3.140625)]}, 3.140625),
    (tbw.DT_FLOAT, {"content": struct.pack("<f", 0.25)}, 0.25),
    (tbw.DT_FLOAT, {"content": struct.pack("<f", 0.75), "float_val": [9.0]}, 0.75),
    (tbw.DT_DOUBLE, {"content": struct.pack("<d", 0.1)}, 0.1),
    (tbw.DT_INT32, {"content": struct.pack("<i", -5)}, -5.0),
    (tbw.DT_INT64, {"content": struct.pack("<q", -(2**50))}, float(-(2**50))),
    (tbw.DT_HALF, {"content": struct.pack("<e", -2.5)}, -2.5),
    (tbw.DT_BFLOAT16, {"content": struct.pack("<H", bf16_bits(1.0))}, 1.0),
]


@pytest.mark.parametrize(("dtype", "fields", "expected"), TENSOR_CASES)
def test_scalar_tensor_forms(dtype: int, fields: dict, expected: float) -> None:
    assert one_value(tbw.tensor_value("t", tbw.tensor_proto(dtype, **fields))) == (
        ("t", expected),)
    # old-style writers leave the metadata out
    assert one_value(tbw.tensor_value("t", tbw.tensor_proto(dtype, **fields),
                                      plugin_name=None)) == (("t", expected),)


def test_tensor_forms_match_tensorboard() -> None:
    """Our encoder and decoder against TensorBoard's protobuf and ``make_ndarray``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
        tensor_util = pytest.importorskip("tensorboard.util.tensor_util")
    for dtype, fields, expected in TENSOR_CASES:
        if dtype == tbw.DT_BFLOAT16:
            continue  # TensorBoard's numpy-only compat layer has no bfloat16
        data = tbw.event(wall_time=1.0, step=1,
                         values=[tbw.tensor_value("t", tbw.tensor_proto(dtype, **fields))])
        (value,) = event_pb2.Event.FromString(data).summary.value
        assert tensor_util.make_ndarray(value.tensor).item() == expected, (dtype, fields)


@pytest.mark.parametrize(
    "value",
    [
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT)),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, shape=[2], float_val=[1, 2])),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, shape=[0])),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, shape=[-1], float_val=[1])),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, float_val=[1],
                                               extra=tbw.f_bytes(2, tbw.f_varint(3, 1)))),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_STRING, string_val=[b"hi"])),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, content=b"\x00\x00\x80")),
        tbw.tensor_value("t", tbw.tensor_proto(tbw.DT_FLOAT, float_val=[1]), plugin_name="text"),
        tbw.f_bytes(1, "image") + tbw.f_bytes(4, tbw.f_varint(1, 8)),
        tbw.f_bytes(1, "meta-only") + tbw.f_bytes(9, tbw.f_bytes(1, tbw.f_bytes(1, "hparams"))),
    ],
    ids=["no-values", "vector", "empty", "unknown-size", "unknown-rank", "string", "short-content",
         "text-plugin", "image", "metadata-only"],
)
def test_non_scalar_values_are_ignored(value: bytes) -> None:
    assert one_value(value) == ()


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    tensor = tbw.tensor_proto(tbw.DT_DOUBLE, double_val=[0.5], extra=tbw.unknown_fields())
    values = [
        tbw.scalar_value("a", 1.5, extra=tbw.unknown_fields()),
        tbw.tensor_value("b", tensor) + tbw.unknown_fields(),
    ]
    summary = b"".join(tbw.f_bytes(1, v) for v in values) + tbw.unknown_fields()
    data = (tbw.unknown_fields(40) + tbw.f_double(1, 12.5) + tbw.f_varint(2, 7)
            + tbw.f_bytes(5, summary) + tbw.f_bytes(10, b"\x0a\x03src") + tbw.unknown_fields())
    event = decode_event(data)
    assert (event.wall_time, event.step, event.scalars) == (12.5, 7, (("a", 1.5), ("b", 0.5)))


def test_event_fields() -> None:
    event = decode_event(tbw.event(wall_time=5.25, step=-3, file_version="brain.Event:2",
                                   values=[tbw.scalar_value("ü/loss", float("nan"))]))
    assert (event.wall_time, event.step, event.file_version) == (5.25, -3, "brain.Event:2")
    ((tag, value),) = event.scalars
    assert tag == "ü/loss"
    assert value != value  # NaN survives; the event layer spells it out in JSON
    assert decode_event(tbw.event(wall_time=1.0, step=2**40)).step == 2**40
    # the oneof's last member wins, as in protobuf
    both = tbw.scalar_value("t", 1.0) + tbw.f_bytes(8, tbw.tensor_proto(
        tbw.DT_FLOAT, float_val=[2.0]))
    assert one_value(both) == (("t", 2.0),)
    assert one_value(both + tbw.f_float(2, 3.0)) == (("t", 3.0),)


@pytest.mark.parametrize(
    "data",
    [b"\x09\x00\x00", b"\x10\xff", b"\x2a\x05\x0a\x10", b"\x0b\x08\x01", b"\x0c", b"\x0e",
     b"\x10" + b"\xff" * 11, b"\x2a\x02\x0a\x05"],
    ids=["short-double", "short-varint", "short-summary", "open-group", "end-group",
         "wire-6", "long-varint", "value-past-summary"],
)
def test_malformed_events_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_event(data)


# ---------------------------------------------------------------------------- a folder


def test_find_event_files(tmp_path: Path) -> None:
    assert find_event_files(tmp_path / "missing") == []
    names = ["b/2/events.out.tfevents.2.host", "a/events.out.tfevents.1.host",
             "b/10/events.out.tfevents.3.host", "events.out.tfevents.0.host"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a/events.out.tfevents").write_bytes(b"")
    (tmp_path / "a/hparams.yml").write_bytes(b"")
    (tmp_path / "a/events.out.tfevents.dir").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in find_event_files(tmp_path)]
    assert found == ["a/events.out.tfevents.1.host", "b/10/events.out.tfevents.3.host",
                     "b/2/events.out.tfevents.2.host", "events.out.tfevents.0.host"]


def test_follower_sees_files_and_records_as_they_appear(tmp_path: Path) -> None:
    follower = EventFileFollower(tmp_path / "logs")
    assert follower.poll() == []
    run_dir = tmp_path / "logs/20260101000000/network_train"
    run_dir.mkdir(parents=True)
    path = run_dir / "events.out.tfevents.1795815850.vm.1.0"
    expected: list[Scalar] = []
    got: list[Scalar] = []
    with path.open("ab", buffering=0) as fh:
        pieces = tbw.frame(tbw.event(wall_time=99.0, file_version="brain.Event:2"))
        for step in range(1, 4):
            for tag, value in (("loss/current", 1.0 / step), ("lr/unet", 1e-4)):
                wall = 100.0 + step
                pieces += tbw.frame(tbw.event(wall_time=wall, step=step,
                                              values=[tbw.scalar_value(tag, value)]))
                expected.append(Scalar(tag=tag, step=step, value=f32(value),
                                       source="tensorboard", wall_time=wall))
        for i in range(0, len(pieces), 11):
            fh.write(pieces[i : i + 11])
            got.extend(follower.poll())
    assert got == expected
    assert follower.files == [path]
    # a second run folder appears later; it is read from the start
    other = tmp_path / "logs/20260101000100/network_train/events.out.tfevents.2.vm.2.0"
    other.parent.mkdir(parents=True)
    with other.open("wb") as fh:
        tbw.write_file_version(fh)
        tbw.write_scalar_event(fh, "loss/current", 1, 0.5, 200.0)
    assert follower.poll() == [Scalar(tag="loss/current", step=1, value=0.5,
                                      source="tensorboard", wall_time=200.0)]
    assert follower.files == [path, other]
    assert follower.poll() == []
    assert follower.corrupt_records == 0


def write_steps(path: Path, steps: range) -> None:
    with path.open("ab") as fh:
        for step in steps:
            tbw.write_scalar_event(fh, "loss", step, float(step), 1000.0 + step)


def test_run_makes_a_final_sweep_when_stopped(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.host"
    batches: list[list[Scalar]] = []

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(follow_event_files, tmp_path, batches.append,
                                  interval=0.01, stop=stop))
            for first in range(1, 30, 10):
                write_steps(path, range(first, first + 10))
                await anyio.sleep(0.03)
            write_steps(path, range(31, 36))  # written just before the trainer exits
            stop.set()

    anyio.run(main)
    assert [s.step for batch in batches for s in batch] == list(range(1, 36))
    assert all(batches)
    assert len(batches) >= 2


def test_run_makes_a_final_sweep_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.host"
    batches: list[list[Scalar]] = []

    async def main() -> None:
        follower = EventFileFollower(tmp_path)
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(follower.run, batches.append, interval=0.01))
            write_steps(path, range(1, 6))
            await anyio.sleep(0.05)
            write_steps(path, range(6, 9))
            tg.cancel_scope.cancel()
        assert follower.poll() == []  # the engine's extra poll finds nothing left

    anyio.run(main)
    assert [s.step for batch in batches for s in batch] == list(range(1, 9))
    with pytest.raises(ValueError):
        anyio.run(partial(EventFileFollower(tmp_path).run, batches.append, interval=0))


@pytest.mark.parametrize("step", [0, 1, 127, 128, 2**40, -3])
@pytest.mark.parametrize("tag_len", [0, 1, 111, 112, 300])
def test_fast_and_general_decoding_agree(step: int, tag_len: int) -> None:
    tag = "t" * tag_len
    plain = tbw.event(wall_time=3.5, step=step, values=[tbw.scalar_value(tag, 0.25)])
    general = plain + tbw.f_varint(99, 1)  # an unknown field: not the writer's layout
    expected = (3.5, step, ((tag, 0.25),))
    for data in (plain, general):
        event = decode_event(data)
        assert (event.wall_time, event.step, event.scalars) == expected


def test_read_new_max_records(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.8.cap"
    path.write_bytes(KOHYA_NORMAL.read_bytes())
    reader = EventFileReader(path, chunk_bytes=100)
    batches = []
    while True:
        batch = reader.read_new(max_records=7)
        batches.append(batch)
        if not reader.more_pending:
            break
    assert [r for b in batches for r in b] == read_all(KOHYA_NORMAL)
    assert len(batches) == 9  # 62 records (the file_version one has no scalar)
    assert all(len(b) == 7 for b in batches[1:-1])


def test_follower_ignores_files_older_than_the_run(tmp_path: Path) -> None:
    old = tmp_path / "logs/20250101000000/network_train/events.out.tfevents.1.vm.1.0"
    new = tmp_path / "logs/20260101000000/network_train/events.out.tfevents.2.vm.2.0"
    for path, step in ((old, 1), (new, 2)):
        path.parent.mkdir(parents=True)
        write_steps(path, range(step, step + 1))
    os.utime(old, (1000.0, 1000.0))
    follower = EventFileFollower(tmp_path, not_before=2000.0)
    assert [s.step for s in follower.poll()] == [2]
    write_steps(old, range(5, 6))
    assert follower.poll() == []
    assert follower.files == [new]


def test_run_reads_a_backlog_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorboard.follow, "SWEEP_RECORDS", 7)
    write_steps(tmp_path / "events.out.tfevents.1.host", range(1, 51))
    batches: list[list[Scalar]] = []

    async def main() -> None:
        stop = anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(follow_event_files, tmp_path, batches.append,
                                      interval=10.0, stop=stop))
                await anyio.sleep(0.2)  # far less than the interval: all came at once
                assert sum(map(len, batches)) == 50
                stop.set()

    anyio.run(main)
    assert [s.step for batch in batches for s in batch] == list(range(1, 51))
    assert max(map(len, batches)) == 7


class _FailingOnce(EventFileFollower):
    """A poll that fails once (as an odd file could make it), then reads on."""

    failed = False

    def poll(self, max_records_per_file: int | None = None) -> list[Scalar]:
        if not self.failed:
            self.failed = True
            self.more_pending = True  # must not make the final sweep loop forever
            raise ValueError("odd file")
        return super().poll(max_records_per_file)


def test_run_awaits_an_async_emit_and_goes_on_after_an_error(tmp_path: Path) -> None:
    """The engine's use: ``emit`` is async (a bounded stream's send, awaited), and a poll
    that raises is reported to ``on_error`` without ending the follower."""
    write_steps(tmp_path / "events.out.tfevents.1.host", range(1, 4))
    follower = _FailingOnce(tmp_path)
    errors: list[Exception] = []
    got: list[int] = []

    async def main() -> None:
        send, receive = anyio.create_memory_object_stream[list[Scalar]](1)

        async def emit(scalars: list[Scalar]) -> None:
            await send.send(scalars)  # blocks until the consumer takes it

        async def consume() -> None:
            async with receive:
                async for batch in receive:
                    got.extend(s.step for s in batch)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                async with anyio.create_task_group() as inner:
                    inner.start_soon(partial(follower.run, emit, interval=0.05,
                                             on_error=errors.append))
                    while len(got) < 3:
                        await anyio.sleep(0.01)
                    write_steps(tmp_path / "events.out.tfevents.2.host", range(4, 6))
                    inner.cancel_scope.cancel()  # the final sweep reads the new file
                await send.aclose()

    anyio.run(main)
    assert [str(e) for e in errors] == ["odd file"]
    assert got == [1, 2, 3, 4, 5]


def test_run_without_on_error_raises() -> None:
    follower = _FailingOnce(Path("/nonexistent"))

    async def main() -> None:
        await follower.run(lambda scalars: None, interval=0.05)

    with pytest.raises(ValueError, match="odd file"):
        anyio.run(main)
