"""Tests of shellinfo_grpc.framing: length-delimited streams of ProtectionShellInfo."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor_pb2 import UninterpretedOption
from hypothesis import given
from hypothesis import strategies as st
from samples import COMPLETED

from shellinfo_grpc import (
    DEFAULT_MAX_RECORD_SIZE,
    ExtraRestKey,
    FramingError,
    ProtectionShellInfo,
    RunStatus,
    RunType,
    encode_delimited,
    from_rest,
    iter_delimited,
    iter_frames,
    read_delimited,
    write_delimited,
)
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import UnrecognizedRest


def _records() -> list[ProtectionShellInfo]:
    """Records of every shape: empty, full, long (2- and 3-byte prefixes), unknown keys kept."""
    return [
        ProtectionShellInfo(),
        ProtectionShellInfo(job_run_id=1, status=RunStatus.RUN_STATUS_SUCCESS),
        from_rest(COMPLETED),
        ProtectionShellInfo(job_run_id=0, error="", start_time_usecs=-1),
        ProtectionShellInfo(status=RunStatus.RUN_STATUS_FAILURE, error="disk full on /var — ünïcode " * 8),
        ProtectionShellInfo(run_type=RunType.RUN_TYPE_LOG, error="x" * 20000),
        ProtectionShellInfo(
            job_run_id=2**63 - 1,
            unrecognized=UnrecognizedRest(status="kBrandNew", extra_keys=[ExtraRestKey(key="tz", json_value='"UTC"')]),
        ),
        ProtectionShellInfo(job_run_id=7),
    ]


def _oracle(msg: ProtectionShellInfo) -> bytes:
    """The delimited form computed by protobuf itself, independently of framing.py.

    A ``bytes`` field is encoded as tag, varint length, bytes: exactly the
    delimited form of its content once the one-byte tag is dropped. (A proto2
    field, so that an empty value is written too: field 7, wire type 2.)
    """
    wrapped = UninterpretedOption(string_value=msg.SerializeToString()).SerializeToString()
    assert wrapped[:1] == b"\x3a"
    return wrapped[1:]


def _boundaries(msgs: list[ProtectionShellInfo]) -> list[int]:
    """Byte offsets at which each record starts, plus the end of the stream."""
    offsets = [0]
    for msg in msgs:
        offsets.append(offsets[-1] + len(encode_delimited(msg)))
    return offsets


class Dribble:
    """A real binary stream that hands out at most ``step`` bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, step: int = 1) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self.reads = 0
        self.sizes: list[int] = []

    def read(self, size: int = -1, /) -> bytes:
        self.reads += 1
        self.sizes.append(size)
        n = self._step if size < 0 else min(size, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


# --- exact bytes ---------------------------------------------------------------


def test_one_byte_prefix_exact_bytes() -> None:
    msg = ProtectionShellInfo(job_run_id=1, status=RunStatus.RUN_STATUS_SUCCESS)
    # field 1 varint (tag 0x08) = 1; field 5 varint (tag 0x28) = 5; 4 bytes -> prefix 0x04
    assert encode_delimited(msg) == b"\x04\x08\x01\x28\x05"


def test_two_byte_prefix_exact_bytes() -> None:
    msg = ProtectionShellInfo(error="e" * 200)
    # field 6 length-delimited (tag 0x32), length 200 = varint c8 01, then 200 bytes: 203 in all.
    # 203 = 0b1_1001011 -> low group 0x4b with the continuation bit (0xcb), then 0x01.
    assert encode_delimited(msg) == b"\xcb\x01" + b"\x32\xc8\x01" + b"e" * 200


def test_three_byte_prefix_exact_bytes() -> None:
    msg = ProtectionShellInfo(error="e" * 20000)
    # 20000 = 1*16384 + 28*128 + 32 -> a0 9c 01; the payload is 1 + 3 + 20000 = 20004 = ... + 36 -> a4 9c 01
    assert encode_delimited(msg) == b"\xa4\x9c\x01" + b"\x32\xa0\x9c\x01" + b"e" * 20000


def test_boundary_lengths_127_and_128() -> None:
    # tag + 1-byte length + n bytes: n = 125 makes a 127-byte payload, n = 126 a 128-byte one
    assert encode_delimited(ProtectionShellInfo(error="a" * 125))[:1] == b"\x7f"
    assert encode_delimited(ProtectionShellInfo(error="a" * 126))[:2] == b"\x80\x01"


def test_empty_message_is_a_zero_length_record() -> None:
    assert encode_delimited(ProtectionShellInfo()) == b"\x00"
    assert read_delimited(b"\x00\x00") == [ProtectionShellInfo(), ProtectionShellInfo()]


@pytest.mark.parametrize("msg", _records(), ids=lambda m: f"{m.ByteSize()}B")
def test_encoding_matches_protobuf(msg: ProtectionShellInfo) -> None:
    assert encode_delimited(msg) == _oracle(msg)


@given(st.binary(max_size=70000).map(lambda b: b.decode("latin-1")))
def test_encoding_matches_protobuf_for_any_length(text: str) -> None:
    msg = ProtectionShellInfo(error=text)
    data = encode_delimited(msg)
    assert data == _oracle(msg)
    assert read_delimited(data) == [msg]


# --- round trips ---------------------------------------------------------------


def test_round_trip_many_records() -> None:
    msgs = _records() * 500
    out = io.BytesIO()
    assert write_delimited(out, msgs) == len(msgs)
    data = out.getvalue()
    assert data == b"".join(_oracle(m) for m in msgs)
    assert read_delimited(data) == msgs
    assert list(iter_delimited(io.BytesIO(data))) == msgs
    assert read_delimited(bytearray(data)) == msgs
    assert read_delimited(memoryview(data)) == msgs


def test_round_trip_through_a_slow_stream() -> None:
    msgs = _records()
    data = b"".join(map(encode_delimited, msgs))
    for step in (1, 2, 3, 7, 100, 4096):
        assert list(iter_delimited(Dribble(data, step))) == msgs


def test_unknown_fields_survive_a_round_trip() -> None:
    # field 16 (varint), unknown to this schema: a newer producer's record
    payload = b"\x08\x01" + b"\x80\x01\x05"
    (msg,) = read_delimited(bytes([len(payload)]) + payload)
    assert msg.job_run_id == 1
    assert encode_delimited(msg) == bytes([len(payload)]) + payload


def test_empty_stream() -> None:
    assert read_delimited(b"") == []
    assert list(iter_delimited(io.BytesIO())) == []
    assert list(iter_frames(b"")) == []
    assert write_delimited(io.BytesIO(), []) == 0


def test_write_delimited_keeps_records_taken_before_an_error() -> None:
    msgs = _records()

    def produce() -> Iterator[ProtectionShellInfo]:
        yield from msgs[:3]
        raise ValueError("the fourth record is bad")

    out = io.BytesIO()
    with pytest.raises(ValueError, match="fourth"):
        write_delimited(out, produce())
    assert out.getvalue() == b"".join(map(encode_delimited, msgs[:3]))


def test_write_delimited_batches_large_outputs() -> None:
    class CountingSink(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.writes += 1
            return super().write(data)

    msgs = [ProtectionShellInfo(job_run_id=i) for i in range(100000)]
    sink = CountingSink()
    assert write_delimited(sink, msgs) == len(msgs)
    assert sink.writes < 100
    assert read_delimited(sink.getvalue()) == msgs


def test_write_delimited_finishes_partial_writes_of_a_raw_stream() -> None:
    class Trickle(io.RawIOBase):
        """A raw stream that takes at most 1000 bytes per write, as a raw pipe may."""

        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            taken = bytes(b[:1000])
            self.data += taken
            return len(taken)

    msgs = _records() * 20
    sink = Trickle()
    write_delimited(sink, msgs)  # type: ignore[arg-type]
    assert bytes(sink.data) == b"".join(map(encode_delimited, msgs))


# --- truncation ----------------------------------------------------------------


def _cut_everywhere(source_of: type | None) -> None:
    msgs = _records()[:6]  # up to a 20004-byte record with a 3-byte prefix
    msgs = [msgs[4], msgs[1], msgs[0], msgs[2], msgs[5], msgs[3]]
    data = b"".join(map(encode_delimited, msgs))
    bounds = _boundaries(msgs)
    # every offset in the small records, and around each boundary of the large one
    cuts = set(range(bounds[4] + 8)) | set(range(bounds[5] - 8, len(data) + 1))
    for cut in sorted(cuts):
        chunk = data[:cut]
        source = chunk if source_of is None else source_of(chunk)
        got: list[ProtectionShellInfo] = []
        if cut in bounds:
            got.extend(iter_delimited(source))
            assert got == msgs[: bounds.index(cut)], cut
            continue
        with pytest.raises(FramingError) as info:
            got.extend(iter_delimited(source))
        index = max(i for i, b in enumerate(bounds) if b < cut)
        assert info.value.index == index, cut
        assert info.value.offset == bounds[index], cut
        assert "stream ends inside" in info.value.reason
        assert got == msgs[:index], cut


def test_truncation_at_every_offset_of_bytes() -> None:
    _cut_everywhere(None)


def test_truncation_at_every_offset_of_a_stream() -> None:
    _cut_everywhere(io.BytesIO)


def test_truncation_at_every_offset_of_a_byte_by_byte_stream() -> None:
    _cut_everywhere(Dribble)


def test_truncation_messages() -> None:
    with pytest.raises(FramingError, match=r"length is 5 bytes but only 2 follow"):
        read_delimited(b"\x05\x08\x01")
    with pytest.raises(FramingError, match=r"inside the length prefix"):
        read_delimited(b"\x02\x08\x01\xcb")


# --- corrupt input -------------------------------------------------------------


def test_oversized_length_is_refused_before_reading_the_record() -> None:
    good = encode_delimited(ProtectionShellInfo(job_run_id=1))
    # 0x40 << 21 = 128 MiB, over the 64 MiB default
    with pytest.raises(FramingError) as info:
        read_delimited(good + b"\x80\x80\x80\x40")
    assert (info.value.index, info.value.offset) == (1, len(good))
    assert "exceeds the limit of 67108864 bytes" in info.value.reason
    assert DEFAULT_MAX_RECORD_SIZE == 64 * 1024 * 1024

    # A stream claiming a 4 GiB record: refused without asking it for the bytes.
    stream = Dribble(b"\xff\xff\xff\xff\x0f" + b"\x00" * 100, step=5)
    with pytest.raises(FramingError, match="exceeds"):
        list(iter_delimited(stream))
    assert stream.reads == 1


def test_a_large_claimed_length_is_read_step_by_step() -> None:
    # 30 << 21 = 60 MiB, under the limit; the stream has 3 bytes of it.
    stream = Dribble(b"\x80\x80\x80\x1e" + b"abc", step=1 << 30)
    with pytest.raises(FramingError, match="length is 62914560 bytes but only 3 follow"):
        list(iter_delimited(stream))
    assert max(stream.sizes) <= 1024 * 1024  # nothing near 60 MiB was asked for (or allocated) at once


def test_max_record_size_is_inclusive() -> None:
    msg = ProtectionShellInfo(error="y" * 98)  # a 100-byte payload
    data = encode_delimited(msg) * 2
    assert read_delimited(data, max_record_size=100) == [msg, msg]
    got: list[ProtectionShellInfo] = []
    with pytest.raises(FramingError) as info:
        got.extend(iter_delimited(data, max_record_size=99))
    assert (info.value.index, info.value.offset, got) == (0, 0, [])


def test_varint_longer_than_ten_bytes() -> None:
    good = encode_delimited(ProtectionShellInfo(job_run_id=1))
    for source in (good + b"\x80" * 10 + b"\x00", io.BytesIO(good + b"\x80" * 11)):
        got: list[ProtectionShellInfo] = []
        with pytest.raises(FramingError) as info:
            got.extend(iter_delimited(source))
        assert (info.value.index, info.value.offset) == (1, len(good))
        assert "longer than 10 bytes" in info.value.reason
        assert got == [ProtectionShellInfo(job_run_id=1)]


def test_ten_byte_varint_is_accepted_as_java_accepts_it() -> None:
    # 0 written in ten bytes (non-minimal, but a valid varint): an empty record
    assert read_delimited(b"\x80" * 9 + b"\x00") == [ProtectionShellInfo()]
    # the largest ten-byte value is far over any limit
    with pytest.raises(FramingError, match="exceeds"):
        read_delimited(b"\xff" * 9 + b"\x01")


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"\xff\xff", "corrupt"),  # field 31, wire type 7: no such wire type
        (b"\x08", "corrupt"),  # a tag whose value is missing
        (b"\x32\x02\xc3\x28", "UTF-8"),  # error field holding invalid UTF-8
        (b"\x00", "corrupt"),  # field number 0
    ],
)
def test_corrupt_payload(payload: bytes, detail: str) -> None:
    first = encode_delimited(ProtectionShellInfo(job_run_id=1))
    data = first + bytes([len(payload)]) + payload + first
    got: list[ProtectionShellInfo] = []
    with pytest.raises(FramingError) as info:
        got.extend(iter_delimited(data))
    assert (info.value.index, info.value.offset) == (1, len(first))
    assert f"{len(payload)}-byte payload is not a valid ProtectionShellInfo" in info.value.reason
    assert detail in info.value.reason
    assert got == [ProtectionShellInfo(job_run_id=1)]
    assert str(info.value).startswith(f"record 1 (byte offset {len(first)}): ")


def test_iter_frames_goes_on_past_a_corrupt_payload() -> None:
    first = encode_delimited(ProtectionShellInfo(job_run_id=1))
    last = encode_delimited(ProtectionShellInfo(job_run_id=3))
    frames = list(iter_frames(first + b"\x02\xff\xff" + last))
    assert [(f.index, f.offset) for f in frames] == [(0, 0), (1, len(first)), (2, len(first) + 3)]
    assert frames[0].decode().job_run_id == 1
    with pytest.raises(FramingError) as info:
        frames[1].decode()
    assert (info.value.index, info.value.offset) == (1, len(first))
    assert frames[2].decode().job_run_id == 3
    assert frames[1].payload == b"\xff\xff"


def test_bad_arguments_fail_at_once() -> None:
    with pytest.raises(ValueError, match="max_record_size"):
        iter_delimited(b"", max_record_size=-1)
    with pytest.raises(TypeError, match="bytes or a binary stream"):
        iter_delimited("\x00")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary stream"):
        list(iter_delimited(io.StringIO("\x00")))  # type: ignore[arg-type]


def test_error_survives_pickling() -> None:
    import pickle

    with pytest.raises(FramingError) as info:
        read_delimited(b"\x05")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.index, copy.offset, copy.reason) == (0, 0, info.value.reason)


# --- incremental reading -------------------------------------------------------


def test_reading_a_file_is_incremental(tmp_path: Path) -> None:
    path = tmp_path / "runs.bin"
    msgs = [ProtectionShellInfo(job_run_id=i, error="e" * 200) for i in range(20000)]  # about 4 MB
    with path.open("wb") as out:
        assert write_delimited(out, msgs) == len(msgs)
    size = path.stat().st_size
    assert size > 4_000_000
    with path.open("rb") as stream:
        records = iter_delimited(stream)
        assert next(records) == msgs[0]
        assert stream.tell() <= 64 * 1024 + 8192  # one chunk, not the whole file
        assert next(records) == msgs[1]
        assert list(records) == msgs[2:]
        assert stream.tell() == size


def test_offsets_count_from_where_reading_began() -> None:
    first = encode_delimited(ProtectionShellInfo(job_run_id=1))
    stream = io.BytesIO(first + first + b"\x03\x08")
    stream.seek(len(first))
    with pytest.raises(FramingError) as info:
        list(iter_delimited(stream))
    assert (info.value.index, info.value.offset) == (1, len(first))


def test_records_of_a_live_pipe_arrive_before_it_ends() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "rb") as reader, os.fdopen(w, "wb", buffering=0) as writer:
        records = iter_delimited(reader)
        got: list[ProtectionShellInfo] = []
        writer.write(encode_delimited(ProtectionShellInfo(job_run_id=1)))
        # the writer stays open: a reader that waits for a whole chunk would block here
        thread = threading.Thread(target=lambda: got.append(next(records)), daemon=True)
        thread.start()
        thread.join(10)
        alive = thread.is_alive()
        writer.write(encode_delimited(ProtectionShellInfo(job_run_id=2)))
        writer.close()
        thread.join(10)
        assert not alive, "the first record was not delivered while the pipe stayed open"
        assert got == [ProtectionShellInfo(job_run_id=1)]
        assert list(records) == [ProtectionShellInfo(job_run_id=2)]
