"""Codec micro-benchmarks: REST adapters, binary framing and record size.

The REST adapters are timed for each record shape the targets name (a
typical completed run with and without ``HH:MM``, a running run, a failed
run): ``from_rest`` beside ``json_format.ParseDict`` and the keyword floor
(the same message from literal keywords), ``to_rest`` beside
``json_format.MessageToDict``, beside the previous ``to_rest`` (its general
path alone), and beside the alternatives tried for it: one ``ListFields()``
call, one ``operator.attrgetter`` call, ``dict(compress(zip(...)))``, a cache
keyed by ``SerializeToString()`` (hits only), and decoding the wire bytes in
Python. Two floors bound what any ``to_rest`` reading through protobuf's
Python API can reach: the "upb floor" (only the protobuf reads and presence
checks the record needs, no dict built) and the "dict floor" (the same calls
and one dict literal of the values, with nothing spent on finding out which
fields are set).

Run ``python bench/bench_codec.py`` (full run, exit status 1 if a target is
missed) or ``python bench/bench_codec.py --quick`` (CI smoke: short samples,
targets printed but not enforced, exit status 0).

Method, in short (docs/benchmarks.md has the long form). Candidates that are
compared with each other run in the same process, interleaved round-robin (the
order rotates every round), in many short samples (~2 ms each, the call count
calibrated per candidate) timed with ``time.perf_counter_ns``, with the cyclic
garbage collector disabled while samples run. A sample during which the
process was descheduled (wall time above 1.02 x the thread's CPU time) is
discarded and taken again. Each candidate's cost is the *minimum* over its
samples: noise on a shared machine only ever adds time, so the minimum is the
least disturbed estimate, and the ratio of two minima measured side by side is
stable where absolute figures are not. Beside it, the median over rounds of
the ratio of the two samples taken in the same round (milliseconds apart) is
printed as a check; a check where the two disagree by more than 10 % is
marked noisy.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import itertools
import json
import operator
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.internal import api_implementation

import shellinfo_grpc
import shellinfo_grpc.rest as rest_module
from shellinfo_grpc import ProtectionShellInfo, from_rest, to_rest
from shellinfo_grpc.rest import rest_names

# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

#: A typical completed run as the newest producers (SDK 1.16+) send it: a
#: 5-digit job run id, 16-digit start/end times in microseconds about an hour
#: apart (2026-11-27 14:00:00 UTC to 15:00:12 UTC), kRegular, kSuccess, and the
#: "HH:MM" keys.
TYPICAL: dict[str, Any] = {
    "jobRunId": 48213,
    "startTimeUsecs": 1795788000123456,
    "endTimeUsecs": 1795791612654321,
    "runType": "kRegular",
    "status": "kSuccess",
    "startTimeHhmm": "14:00",
    "endTimeHhmm": "15:00",
}

#: The same run from an older producer (before SDK 1.16): no "HH:MM" keys.
OLDER: dict[str, Any] = {k: v for k, v in TYPICAL.items() if k not in ("startTimeHhmm", "endTimeHhmm")}

#: A run still in progress: no end time, no endTimeHhmm.
RUNNING: dict[str, Any] = {
    "jobRunId": 48214,
    "startTimeUsecs": 1795791600087512,
    "runType": "kRegular",
    "status": "kRunning",
    "startTimeHhmm": "15:00",
}

#: A failed run with an error string of typical length (105 characters).
FAILED: dict[str, Any] = {
    "jobRunId": 48215,
    "startTimeUsecs": 1795795200045120,
    "endTimeUsecs": 1795797012311877,
    "runType": "kRegular",
    "status": "kFailure",
    "error": (
        "Failed to backup 1 of 12 objects. sql-prod-04: snapshot creation timed out after 1800 seconds (kTimeout)."
    ),
    "startTimeHhmm": "16:00",
    "endTimeHhmm": "16:30",
}

#: A typical completed run from a newer cluster that sends two keys this schema
#: version does not know (kept in ``unrecognized`` and written back).
UNKNOWN_KEYS: dict[str, Any] = {**TYPICAL, "timezone": "Europe/Berlin", "durationUsecs": 3612530865}

#: The typical run as the official SDK's ``APIHelper.to_dictionary`` writes it:
#: every key, ``None`` for the unset ``error``.
SDK_NULLS: dict[str, Any] = {
    "endTimeUsecs": TYPICAL["endTimeUsecs"],
    "error": None,
    "jobRunId": TYPICAL["jobRunId"],
    "runType": TYPICAL["runType"],
    "startTimeUsecs": TYPICAL["startTimeUsecs"],
    "status": TYPICAL["status"],
    "endTimeHhmm": TYPICAL["endTimeHhmm"],
    "startTimeHhmm": TYPICAL["startTimeHhmm"],
}


def _enum_rewrite() -> dict[str, dict[str, str]]:
    """REST key -> {REST spelling -> proto value name}, from the descriptors."""
    rewrite: dict[str, dict[str, str]] = {}
    for fd in ProtectionShellInfo.DESCRIPTOR.fields:
        if fd.enum_type is None:
            continue
        by_number = fd.enum_type.values_by_number
        rewrite[fd.json_name] = {rest: by_number[number].name for number, rest in rest_names(fd.enum_type).items()}
    return rewrite


_REWRITE = _enum_rewrite()


def proto_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a REST dict with enum spellings rewritten to proto names, for ParseDict."""
    return {k: _REWRITE[k].get(v, v) if k in _REWRITE and isinstance(v, str) else v for k, v in data.items()}


def keyword_floor(_data: object) -> ProtectionShellInfo:
    """The floor: the typical message built from literal constants, no lookups, no checks."""
    return ProtectionShellInfo(
        job_run_id=48213,
        start_time_usecs=1795788000123456,
        end_time_usecs=1795791612654321,
        run_type=1,  # type: ignore[arg-type]  # RUN_TYPE_REGULAR, as a literal
        status=5,  # type: ignore[arg-type]  # RUN_STATUS_SUCCESS, as a literal
        start_time_hhmm="14:00",
        end_time_hhmm="15:00",
    )


def stream_records(count: int) -> list[dict[str, Any]]:
    """``count`` varied REST records for the framing bench (deterministic).

    The mix: 90 % completed runs of the typical shape, 5 % failed runs with an
    error string, 5 % running runs; ids and times vary record to record.
    """
    rng = random.Random(20261128)
    out: list[dict[str, Any]] = []
    for i in range(count):
        start = 1795788000000000 + i * 600_000_000 + rng.randrange(1_000_000)
        end = start + 3_000_000_000 + rng.randrange(1_200_000_000)
        hh, mm = divmod((start // 60_000_000) % 1440, 60)
        eh, em = divmod((end // 60_000_000) % 1440, 60)
        shape = i % 20
        record: dict[str, Any] = {
            "jobRunId": 40_000 + i,
            "startTimeUsecs": start,
            "runType": "kRegular",
            "status": "kSuccess",
            "startTimeHhmm": f"{hh:02d}:{mm:02d}",
        }
        if shape == 19:  # running
            record["status"] = "kRunning"
        else:
            record["endTimeUsecs"] = end
            record["endTimeHhmm"] = f"{eh:02d}:{em:02d}"
        if shape == 9:  # failed
            record["status"] = "kFailure"
            record["error"] = FAILED["error"]
        out.append(record)
    return out


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long and how often to time each candidate."""

    samples: int  # rounds (one sample of each candidate per round), at least
    sample_ns: int  # the target duration of one sample
    records: int  # records per framing pass
    framing_samples: int  # passes per framing candidate (a pass lasts 30-70 ms, not sample_ns)


#: A sample whose wall time exceeds the thread's CPU time by more than this
#: factor was descheduled part of the time (another process had the core): it
#: is discarded and taken again.
PREEMPTED: Final = 1.02
#: Tries per candidate and round; if all were preempted, the last one is kept
#: and marked as disturbed.
ATTEMPTS: Final = 3
#: Rounds go on past ``Settings.samples`` (up to three times as many) until
#: every candidate has at least this many undisturbed samples.
MIN_CLEAN: Final = 10
#: A check whose two ratio estimates (of the minima, median of the per-round
#: ratios) differ by more than this fraction is marked noisy.
DISAGREE: Final = 0.10


@dataclass
class Candidate:
    """One thing to time: ``fn(arg)``, called ``iterations`` times per sample.

    ``iterations`` is calibrated so that one sample lasts about
    ``Settings.sample_ns``. With ``batch`` > 1, one call of ``fn`` does
    ``batch`` operations (a pass over a stream of records) and is the whole
    sample; per-op figures divide by ``batch``.
    """

    name: str
    fn: Callable[[Any], object]
    arg: Any
    batch: int = 1
    iterations: int = 1
    times: list[float] = field(default_factory=list)  # ns per op, one sample per round
    clean: list[bool] = field(default_factory=list)  # per round: the sample was not preempted
    retries: int = 0  # preempted samples discarded and taken again

    @property
    def n_clean(self) -> int:
        return sum(self.clean)

    @property
    def kept(self) -> list[float]:
        """The undisturbed samples, or all of them if none was."""
        return [t for t, ok in zip(self.times, self.clean, strict=True) if ok] or self.times

    @property
    def best(self) -> float:
        return min(self.kept)

    @property
    def median(self) -> float:
        return statistics.median(self.kept)


def _run(candidate: Candidate) -> tuple[int, int]:
    """Call the candidate ``iterations`` times; return (wall ns, thread CPU ns)."""
    fn = candidate.fn
    args = itertools.repeat(candidate.arg, candidate.iterations)
    cpu = time.thread_time_ns()
    start = time.perf_counter_ns()
    for arg in args:
        fn(arg)
    wall = time.perf_counter_ns() - start
    return wall, time.thread_time_ns() - cpu


def _calibrate(candidate: Candidate, sample_ns: int) -> None:
    """Warm the candidate up and choose ``iterations`` for samples of ``sample_ns``."""
    candidate.iterations = 1
    if candidate.batch > 1:
        _run(candidate)
        return
    while True:
        _, cpu = _run(candidate)  # CPU time: a preemption must not shrink the count
        if cpu >= sample_ns // 8 or candidate.iterations >= 1 << 24:
            break
        candidate.iterations *= 2
    candidate.iterations = max(1, round(candidate.iterations * sample_ns / max(cpu, 1)))


def _sample(candidate: Candidate) -> None:
    per_op = candidate.iterations * candidate.batch
    for attempt in range(ATTEMPTS):
        wall, cpu = _run(candidate)
        if wall <= cpu * PREEMPTED:
            candidate.times.append(wall / per_op)
            candidate.clean.append(True)
            return
        if attempt < ATTEMPTS - 1:
            candidate.retries += 1
    candidate.times.append(wall / per_op)
    candidate.clean.append(False)


def measure(candidates: list[Candidate], settings: Settings) -> None:
    """Time the candidates in rounds, one sample of each per round, rotating the order.

    Timing is ``time.perf_counter_ns``; the thread's CPU time is read beside it
    only to detect a sample during which the process was descheduled. The
    cyclic garbage collector is off while samples are taken (reference counting
    still frees every message) and runs between rounds.
    """
    rounds = settings.framing_samples if candidates[0].batch > 1 else settings.samples
    want = min(MIN_CLEAN, rounds)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for candidate in candidates:
            _calibrate(candidate, settings.sample_ns)
        gc.collect()
        round_no = 0
        while round_no < rounds or (round_no < 3 * rounds and any(c.n_clean < want for c in candidates)):
            shift = round_no % len(candidates)
            for candidate in candidates[shift:] + candidates[:shift]:
                _sample(candidate)
            gc.collect()  # between rounds, outside the timed region
            round_no += 1
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


@dataclass
class Check:
    """A ratio of two candidates' costs, with an optional target."""

    label: str  # what the ratio means, e.g. "ParseDict / from_rest"
    num: Candidate
    den: Candidate
    minimum: float | None = None  # the ratio must be >= this
    maximum: float | None = None  # the ratio must be <= this

    @property
    def ratio(self) -> float:
        """The ratio of the two minima: the figure that is reported and checked."""
        return self.num.best / self.den.best

    @property
    def ratio_paired(self) -> float:
        """The median over rounds of the ratio of the two samples taken in that round.

        Two samples of the same round are taken milliseconds apart, so a burst
        of load that slows both cancels out: a check on the minima.
        """
        pairs = zip(self.num.times, self.num.clean, self.den.times, self.den.clean, strict=True)
        ratios = [a / b for a, a_ok, b, b_ok in pairs if a_ok and b_ok]
        return statistics.median(ratios or [a / b for a, b in zip(self.num.times, self.den.times, strict=True)])

    @property
    def noisy(self) -> bool:
        return abs(self.ratio / self.ratio_paired - 1) > DISAGREE

    @property
    def target(self) -> str:
        if self.minimum is not None:
            return f">= {self.minimum:g}x"
        if self.maximum is not None:
            return f"<= {self.maximum:g}x"
        return "-"

    @property
    def passed(self) -> bool | None:
        if self.minimum is not None:
            return self.ratio >= self.minimum
        if self.maximum is not None:
            return self.ratio <= self.maximum
        return None


def _print_candidates(
    title: str, candidates: Iterable[Candidate], *, throughput: dict[str, float] | None = None
) -> None:
    print(f"\n## {title}\n")
    cols = f"{'candidate':<58} {'ns/op min':>11} {'ns/op med':>11} {'calls':>7} {'clean':>6} {'retried':>7}"
    if throughput is not None:
        cols += f" {'records/s':>12} {'MB/s':>8}"
    print(cols)
    print("-" * len(cols))
    for c in candidates:
        clean = f"{c.n_clean}/{len(c.times)}"
        line = f"{c.name:<58} {c.best:>11.1f} {c.median:>11.1f} {c.iterations * c.batch:>7} {clean:>6} {c.retries:>7}"
        if throughput is not None:
            per_record = throughput[c.name]
            line += f" {1e9 / c.best:>12,.0f} {per_record * 1e3 / c.best:>8.1f}"
        print(line)


def _print_checks(checks: Iterable[Check]) -> None:
    cols = f"{'ratio':<58} {'of mins':>8} {'paired':>8} {'target':>8} {'result':>7}"
    print()
    print(cols)
    print("-" * len(cols))
    for ch in checks:
        result = {True: "PASS", False: "FAIL", None: "info"}[ch.passed] + ("*" if ch.noisy else "")
        print(f"{ch.label:<58} {ch.ratio:>7.2f}x {ch.ratio_paired:>7.2f}x {ch.target:>8} {result:>7}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_environment() -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print("# shellinfo-grpc codec benchmark")
    print(f"date:      {now}")
    print(f"python:    {platform.python_implementation()} {platform.python_version()}")
    print(f"protobuf:  {_version('protobuf')} (backend: {api_implementation.Type()})")
    print(f"grpcio:    {_version('grpcio')}")
    print(f"package:   shellinfo-grpc {shellinfo_grpc.__version__}")
    print(f"platform:  {platform.platform()}")
    print(f"cpu:       {_cpu_model()}, nproc {affinity}")


# --------------------------------------------------------------------------
# The benches
# --------------------------------------------------------------------------

_parse_dict = json_format.ParseDict
_message_to_dict = json_format.MessageToDict


def _parse(data: dict[str, Any]) -> ProtectionShellInfo:
    return _parse_dict(data, ProtectionShellInfo())


def _parse_ignoring_unknown(data: dict[str, Any]) -> ProtectionShellInfo:
    return _parse_dict(data, ProtectionShellInfo(), ignore_unknown_fields=True)


def _empty(_data: object) -> None:
    return None


#: The record shapes the codec targets apply to: (name, REST dict).
SHAPES: Final = (
    ("typical completed", TYPICAL),
    ("completed, no HH:MM", OLDER),
    ("running", RUNNING),
    ("failed", FAILED),
)


def keyword_floor_for(data: Mapping[str, Any]) -> Callable[[object], ProtectionShellInfo]:
    """The floor of ``from_rest`` for one record: the message built from literal keywords.

    Compiled for the record (``ProtectionShellInfo(job_run_id=48213, ...)``
    with the enum numbers as literal ints), so that the floor does no lookups
    and no checks at all. :func:`keyword_floor` is the same for ``TYPICAL``,
    written out.
    """
    msg = from_rest(data)
    args = ", ".join(f"{fd.name}={value!r}" for fd, value in msg.ListFields())
    namespace: dict[str, Any] = {"ProtectionShellInfo": ProtectionShellInfo}
    exec(f"def floor(_data):\n    return ProtectionShellInfo({args})\n", namespace)
    floor: Callable[[object], ProtectionShellInfo] = namespace["floor"]
    assert floor(None) == msg, "the keyword floor is not the same message"
    return floor


def bench_from_rest(settings: Settings) -> list[Check]:
    """from_rest against ParseDict and the keyword floor, for each record shape, in one set of rounds."""
    candidates: list[Candidate] = []
    checks: list[Check] = []
    for name, record in SHAPES:
        d = dict(record)
        d2 = proto_json(d)
        assert _parse(d2) == from_rest(d), "ParseDict disagrees with from_rest"
        sub = Candidate(f"from_rest  [{name}]", from_rest, d)
        ref = Candidate(f"json_format.ParseDict  [{name}]", _parse, d2)
        floor = Candidate(f"ProtectionShellInfo(<literal keywords>)  [{name}, floor]", keyword_floor_for(d), None)
        candidates += [sub, ref, floor]
        checks.append(Check(f"from_rest / keyword floor  [{name}]", sub, floor, maximum=2.5))
        checks.append(Check(f"ParseDict / from_rest  [{name}]", ref, sub, minimum=8 if record is TYPICAL else None))
    candidates.append(Candidate("empty function call  [loop + call overhead]", _empty, None))
    measure(candidates, settings)
    _print_candidates("1. from_rest, by record shape", candidates)
    _print_checks(checks)
    return checks


# --- to_rest alternatives, timed beside it (issue 11.4) ---------------------------------

_FIELD_KEY: Final = {fd: fd.json_name for fd in ProtectionShellInfo.DESCRIPTOR.fields}
_SPELLING: Final = {
    fd.json_name: rest_names(fd.enum_type) for fd in ProtectionShellInfo.DESCRIPTOR.fields if fd.enum_type is not None
}
_has_field = ProtectionShellInfo.HasField


def to_rest_list_fields(msg: ProtectionShellInfo) -> dict[str, Any]:
    """Alternative: one ``ListFields()`` call instead of a read and presence check per field.

    Same output as ``to_rest`` for records without unknown keys (checked before timing).
    """
    out = {}
    for fd, value in msg.ListFields():
        key = _FIELD_KEY[fd]
        names = _SPELLING.get(key)
        if names is None:
            out[key] = value
        elif value:
            out[key] = names.get(value, value)
    return out


def to_rest_from_wire(data: bytes) -> dict[str, Any]:
    """Alternative: decode the REST dict straight from the wire bytes a store holds, in Python.

    Handles what the benchmark records hold (varint fields 1-5, string fields
    6-8); the point is its cost, not completeness.
    """
    out: dict[str, Any] = {}
    i, n = 0, len(data)
    while i < n:
        tag = data[i]
        i += 1
        value = 0
        shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        field = tag >> 3
        if tag & 7 == 2:
            text = data[i : i + value].decode()
            i += value
            out[_WIRE_KEYS[field]] = text
        elif field <= 3:
            out[_WIRE_KEYS[field]] = value - (1 << 64) if value >> 63 else value
        else:
            out[_WIRE_KEYS[field]] = _SPELLING[_WIRE_KEYS[field]].get(value, value)
    return out


_WIRE_KEYS: Final = {fd.number: fd.json_name for fd in ProtectionShellInfo.DESCRIPTOR.fields}


def upb_floor_for(msg: ProtectionShellInfo) -> Callable[[ProtectionShellInfo], object]:
    """The protobuf calls any attribute-reading ``to_rest`` must make for this record, and nothing else.

    A read of each set field and a ``HasField`` for each unset one (and for
    ``unrecognized``), results discarded: what is left of ``to_rest`` beyond
    this is Python work. Compiled per record as straight-line code.
    """
    lines = ["def upb_floor(msg):"]
    for fd in ProtectionShellInfo.DESCRIPTOR.fields:
        if fd.name == "unrecognized" or not msg.HasField(fd.name):  # type: ignore[arg-type]
            lines.append(f"    _has(msg, {fd.name!r})")
        else:
            lines.append(f"    msg.{fd.name}")
    namespace: dict[str, Any] = {"_has": _has_field}
    exec("\n".join(lines) + "\n", namespace)
    floor: Callable[[ProtectionShellInfo], object] = namespace["upb_floor"]
    return floor


def dict_floor_for(msg: ProtectionShellInfo) -> Callable[[ProtectionShellInfo], dict[str, Any]]:
    """The least any ``to_rest`` reading through protobuf's Python API can cost for this record.

    The upb floor's calls (a read of each set field, ``HasField`` for each
    unset one and for ``unrecognized``) and one dict literal of the values
    with the enum spellings looked up: the right dict, with none of the work
    that finds out which fields are set (the code knows it in advance).
    """
    lines = ["def dict_floor(msg):"]
    items = []
    for fd in ProtectionShellInfo.DESCRIPTOR.fields:
        if fd.name == "unrecognized" or not msg.HasField(fd.name):  # type: ignore[arg-type]
            lines.append(f"    _has(msg, {fd.name!r})")
            continue
        lines.append(f"    {fd.name} = msg.{fd.name}")
        value = f"_spell[{fd.json_name!r}][{fd.name}]" if fd.enum_type is not None else fd.name
        items.append(f"{fd.json_name!r}: {value}")
    lines.append("    return {" + ", ".join(items) + "}")
    namespace: dict[str, Any] = {"_has": _has_field, "_spell": _SPELLING}
    exec("\n".join(lines) + "\n", namespace)
    floor: Callable[[ProtectionShellInfo], dict[str, Any]] = namespace["dict_floor"]
    return floor


def _previous_to_rest() -> Callable[[ProtectionShellInfo], dict[str, Any]]:
    """``to_rest`` as it was before its fast path: the general path alone, with the public signature."""
    source = rest_module._to_rest_general_source().replace(
        "def _to_rest_general(msg, include_nulls):", "def previous_to_rest(msg, *, include_nulls=False):"
    )
    namespace: dict[str, Any] = {}
    exec(source, vars(rest_module), namespace)
    previous: Callable[[ProtectionShellInfo], dict[str, Any]] = namespace["previous_to_rest"]
    return previous


_NAMES: Final = tuple(fd.name for fd in ProtectionShellInfo.DESCRIPTOR.fields if fd.name != "unrecognized")
_KEYS: Final = tuple(_FIELD_KEY[ProtectionShellInfo.DESCRIPTOR.fields_by_name[name]] for name in _NAMES)
_read_all = operator.attrgetter(*_NAMES)
_run_types: Final = _SPELLING["runType"]
_statuses: Final = _SPELLING["status"]


def to_rest_attrgetter(msg: ProtectionShellInfo) -> dict[str, Any]:
    """Alternative: all eight fields read by one ``operator.attrgetter`` call (one C call, a tuple).

    ``HasField`` only where a value is falsy (a non-zero value proves
    presence), then one store per set field. Records without unknown keys.
    """
    job_run_id, start, end, run_type, status, error, start_hhmm, end_hhmm = _read_all(msg)
    out: dict[str, Any] = {}
    if job_run_id or _has_field(msg, "job_run_id"):
        out["jobRunId"] = job_run_id
    if start or _has_field(msg, "start_time_usecs"):
        out["startTimeUsecs"] = start
    if end or _has_field(msg, "end_time_usecs"):
        out["endTimeUsecs"] = end
    if run_type:
        out["runType"] = _run_types.get(run_type, run_type)
    if status:
        out["status"] = _statuses.get(status, status)
    if error or _has_field(msg, "error"):
        out["error"] = error
    if start_hhmm or _has_field(msg, "start_time_hhmm"):
        out["startTimeHhmm"] = start_hhmm
    if end_hhmm or _has_field(msg, "end_time_hhmm"):
        out["endTimeHhmm"] = end_hhmm
    _has_field(msg, "unrecognized")
    return out


def to_rest_compress(msg: ProtectionShellInfo) -> dict[str, Any]:
    """Alternative: ``dict(compress(zip(keys, values), mask))`` instead of one insert per field.

    The values from one ``attrgetter`` call, the presence mask from their
    truth and ``HasField`` where they are falsy. Records without unknown keys.
    """
    values = _read_all(msg)
    job_run_id, start, end, run_type, status, error, start_hhmm, end_hhmm = values
    mask = (
        job_run_id or _has_field(msg, "job_run_id"),
        start or _has_field(msg, "start_time_usecs"),
        end or _has_field(msg, "end_time_usecs"),
        run_type,
        status,
        error or _has_field(msg, "error"),
        start_hhmm or _has_field(msg, "start_time_hhmm"),
        end_hhmm or _has_field(msg, "end_time_hhmm"),
    )
    if run_type or status:
        values = (
            job_run_id,
            start,
            end,
            _run_types.get(run_type, run_type),
            _statuses.get(status, status),
            error,
            start_hhmm,
            end_hhmm,
        )
    _has_field(msg, "unrecognized")
    return dict(itertools.compress(zip(_KEYS, values, strict=True), mask))


_CACHE: dict[bytes, dict[str, Any]] = {}


def to_rest_cached(msg: ProtectionShellInfo) -> dict[str, Any]:
    """Alternative: ``SerializeToString()`` as the key of a cache of REST dicts (timed on hits only).

    Each call serializes the message, looks the bytes up and copies the cached
    dict (the caller owns what it gets). The bench calls it with the same
    message over and over, so every call is a hit: this is the idea's best
    case, not what a stream of distinct records would see.
    """
    key = msg.SerializeToString()
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) >= 1024:
            _CACHE.clear()
        found = _CACHE[key] = to_rest(msg)
    return found.copy()


def _byte_size(msg: ProtectionShellInfo) -> int:
    return msg.ByteSize()


def _has_error(msg: ProtectionShellInfo) -> bool:
    return _has_field(msg, "error")


def bench_to_rest(settings: Settings) -> list[Check]:
    """to_rest against MessageToDict for each record shape, with the previous to_rest and the alternatives tried."""
    candidates: list[Candidate] = []
    checks: list[Check] = []
    alternatives: list[Check] = []
    previous_to_rest = _previous_to_rest()
    for name, record in SHAPES:
        msg = from_rest(record)
        assert to_rest(msg) == record, "to_rest does not give the REST dict back"
        wire = msg.SerializeToString()
        floor_fn = dict_floor_for(msg)
        for alternative in (previous_to_rest, floor_fn, to_rest_list_fields, to_rest_attrgetter, to_rest_compress):
            got = alternative(msg)
            assert list(got.items()) == list(record.items()), f"{alternative.__name__} disagrees with to_rest"
        assert to_rest_from_wire(wire) == record, "the wire alternative disagrees"
        assert to_rest_cached(msg) == record, "the cache alternative disagrees"
        sub = Candidate(f"to_rest  [{name}]", to_rest, msg)
        ref = Candidate(f"json_format.MessageToDict  [{name}]", _message_to_dict, msg)
        previous = Candidate(f"previous to_rest (general path only)  [{name}]", previous_to_rest, msg)
        floor = Candidate(f"protobuf calls + dict literal  [{name}, dict floor]", floor_fn, msg)
        upb = Candidate(f"protobuf calls only  [{name}, upb floor]", upb_floor_for(msg), msg)
        listed = Candidate(f"ListFields() alternative  [{name}]", to_rest_list_fields, msg)
        getter = Candidate(f"attrgetter alternative  [{name}]", to_rest_attrgetter, msg)
        compressed = Candidate(f"dict(compress(zip())) alternative  [{name}]", to_rest_compress, msg)
        cached = Candidate(f"SerializeToString + cache, hits only  [{name}]", to_rest_cached, msg)
        from_wire = Candidate(f"decode wire bytes in Python  [{name}]", to_rest_from_wire, wire)
        candidates += [sub, ref, previous, floor, upb, listed, getter, compressed, cached, from_wire]
        checks.append(Check(f"MessageToDict / to_rest  [{name}]", ref, sub, minimum=10))
        alternatives += [
            Check(f"previous to_rest / to_rest  [{name}]", previous, sub),
            Check(f"to_rest / dict floor  [{name}]", sub, floor),
            Check(f"MessageToDict / previous to_rest  [{name}]", ref, previous),
            Check(f"MessageToDict / dict floor  (ceiling)  [{name}]", ref, floor),
            Check(f"MessageToDict / upb floor  [{name}]", ref, upb),
            Check(f"MessageToDict / ListFields alternative  [{name}]", ref, listed),
            Check(f"MessageToDict / attrgetter alternative  [{name}]", ref, getter),
            Check(f"MessageToDict / compress alternative  [{name}]", ref, compressed),
            Check(f"MessageToDict / serialize+cache (hits)  [{name}]", ref, cached),
            Check(f"MessageToDict / wire-bytes alternative  [{name}]", ref, from_wire),
        ]
    typical = from_rest(TYPICAL)
    size = Candidate("msg.ByteSize()  [typical]", _byte_size, typical)
    has = Candidate("ProtectionShellInfo.HasField(msg, 'error')  [typical]", _has_error, typical)
    candidates += [size, has]
    alternatives.append(Check("ByteSize() / one HasField  [typical]", size, has))
    measure(candidates, settings)
    _print_candidates("2. to_rest, by record shape, and the alternatives tried", candidates)
    _print_checks(checks + alternatives)
    return checks + alternatives


def bench_other_shapes(settings: Settings) -> list[Check]:
    failed_msg = from_rest(FAILED)
    unknown_msg = from_rest(UNKNOWN_KEYS)
    assert _parse(proto_json(FAILED)) == failed_msg
    assert to_rest(unknown_msg) == UNKNOWN_KEYS, "unknown keys are not written back"
    assert from_rest(SDK_NULLS) == from_rest(TYPICAL)

    typical_from = Candidate("from_rest(typical)", from_rest, dict(TYPICAL))
    typical_to = Candidate("to_rest(typical)", to_rest, from_rest(TYPICAL))
    failed_from = Candidate("from_rest(failed)", from_rest, dict(FAILED))
    failed_parse = Candidate("ParseDict(failed)", _parse, proto_json(FAILED))
    failed_to = Candidate("to_rest(failed)", to_rest, failed_msg)
    failed_m2d = Candidate("MessageToDict(failed)", _message_to_dict, failed_msg)
    unknown_from = Candidate("from_rest(unknown keys)", from_rest, dict(UNKNOWN_KEYS))
    unknown_parse = Candidate(
        "ParseDict(unknown keys, ignore_unknown_fields=True)",
        _parse_ignoring_unknown,
        proto_json(UNKNOWN_KEYS),
    )
    unknown_to = Candidate("to_rest(unknown keys)", to_rest, unknown_msg)
    unknown_m2d = Candidate("MessageToDict(unknown keys)  [nested unrecognized]", _message_to_dict, unknown_msg)
    sdk_from = Candidate("from_rest(SDK to_dictionary form, error: null)", from_rest, dict(SDK_NULLS))
    candidates = [
        typical_from,
        typical_to,
        failed_from,
        failed_parse,
        failed_to,
        failed_m2d,
        unknown_from,
        unknown_parse,
        unknown_to,
        unknown_m2d,
        sdk_from,
    ]
    measure(candidates, settings)
    _print_candidates("Other record shapes (information, no target)", candidates)
    checks = [
        Check("failed: ParseDict / from_rest", failed_parse, failed_from),
        Check("failed: MessageToDict / to_rest", failed_m2d, failed_to),
        Check("unknown keys: ParseDict(ignoring them) / from_rest", unknown_parse, unknown_from),
        Check("unknown keys: MessageToDict / to_rest", unknown_m2d, unknown_to),
        Check("unknown keys: from_rest / from_rest(typical)", unknown_from, typical_from),
        Check("unknown keys: to_rest / to_rest(typical)", unknown_to, typical_to),
        Check("SDK form with null: from_rest / from_rest(typical)", sdk_from, typical_from),
    ]
    _print_checks(checks)
    return checks


def bench_framing(settings: Settings) -> list[Check]:
    records = settings.records
    from shellinfo_grpc.framing import encode_delimited, iter_delimited, write_delimited

    messages = [from_rest(r) for r in stream_records(records)]
    blobs = [m.SerializeToString() for m in messages]
    framed = io.BytesIO()
    assert write_delimited(framed, messages) == records
    data = framed.getvalue()
    assert data == b"".join(encode_delimited(m) for m in messages)
    decoded = list(iter_delimited(data))
    assert decoded == messages, "iter_delimited does not give the written records back"
    assert list(iter_delimited(io.BytesIO(data))) == messages
    raw_bytes = sum(len(b) for b in blobs)
    from_string = ProtectionShellInfo.FromString

    def encode_reference(msgs: list[ProtectionShellInfo]) -> None:
        out = io.BytesIO()
        write = out.write
        for m in msgs:
            write(m.SerializeToString())

    def encode_framed(msgs: list[ProtectionShellInfo]) -> None:
        write_delimited(io.BytesIO(), msgs)

    def encode_one_by_one(msgs: list[ProtectionShellInfo]) -> None:
        out = io.BytesIO()
        write = out.write
        for m in msgs:
            write(encode_delimited(m))

    def decode_reference(items: list[bytes]) -> None:
        for b in items:
            from_string(b)

    def decode_framed(source: bytes) -> None:
        for _ in iter_delimited(source):
            pass

    def decode_framed_stream(source: bytes) -> None:
        for _ in iter_delimited(io.BytesIO(source)):
            pass

    enc_ref = Candidate("SerializeToString loop -> BytesIO  [reference]", encode_reference, messages, records)
    enc = Candidate("write_delimited(BytesIO, messages)", encode_framed, messages, records)
    enc_one = Candidate("encode_delimited loop -> BytesIO", encode_one_by_one, messages, records)
    dec_ref = Candidate("FromString loop over pre-split bytes  [reference]", decode_reference, blobs, records)
    dec = Candidate("iter_delimited(bytes)", decode_framed, data, records)
    dec_stream = Candidate("iter_delimited(BytesIO)", decode_framed_stream, data, records)
    candidates = [enc_ref, enc, enc_one, dec_ref, dec, dec_stream]
    measure(candidates, settings)
    per_record = {c.name: len(data) / records for c in candidates}
    per_record[enc_ref.name] = per_record[dec_ref.name] = raw_bytes / records
    print(f"\n(framing: {records:,} records, {len(data):,} bytes framed, {raw_bytes:,} bytes unframed)")
    _print_candidates(f"3. Framing throughput, {records:,} records per pass", candidates, throughput=per_record)
    checks = [
        Check("encode: write_delimited / SerializeToString loop", enc, enc_ref),
        Check("encode: encode_delimited loop / SerializeToString loop", enc_one, enc_ref),
        Check("decode: iter_delimited(bytes) / FromString loop", dec, dec_ref),
        Check("decode: iter_delimited(BytesIO) / FromString loop", dec_stream, dec_ref),
    ]
    _print_checks(checks)
    return checks


@dataclass
class SizeRow:
    shape: str
    binary: int
    framed: int
    compact_json: int
    target: float | None = None  # binary / compact JSON must be <= this

    @property
    def ratio(self) -> float:
        return self.binary / self.compact_json

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def bench_size() -> list[SizeRow]:
    shapes: list[tuple[str, dict[str, Any], float | None]] = [
        ("typical completed run (SDK 1.16+, with HH:MM)", TYPICAL, 0.25),
        ("completed run, older producer (no HH:MM)", OLDER, None),
        ("running run", RUNNING, None),
        ("failed run with error", FAILED, None),
        ("completed run + 2 unknown keys", UNKNOWN_KEYS, None),
    ]
    rows: list[SizeRow] = []
    for name, d, target in shapes:
        binary = len(from_rest(d).SerializeToString())
        compact = len(json.dumps(d, separators=(",", ":")).encode("utf-8"))
        rows.append(SizeRow(name, binary, binary + _varint_len(binary), compact, target))
    print("\n## 4. Size per record: binary vs compact REST JSON\n")
    cols = f"{'record shape':<48} {'binary':>6} {'framed':>6} {'JSON':>5} {'bin/JSON':>8} {'target':>8} {'result':>6}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        target_text = "-" if r.target is None else f"<= {r.target:.0%}"
        result = {True: "PASS", False: "FAIL", None: "info"}[r.passed]
        print(
            f"{r.shape:<48} {r.binary:>6} {r.framed:>6} {r.compact_json:>5} "
            f"{r.ratio:>8.1%} {target_text:>8} {result:>6}"
        )
    print("(bytes per record; framed = binary + its varint length prefix; JSON = json.dumps(d, separators=(',', ':')))")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="CI smoke: short samples, targets not enforced, exit 0")
    parser.add_argument("--samples", type=int, help="samples per candidate (default 41, quick 3)")
    parser.add_argument("--sample-ms", type=float, help="duration of one sample in ms (default 2, quick 1)")
    parser.add_argument("--records", type=int, help="records per framing pass (default 100000, quick 2000)")
    args = parser.parse_args(argv)
    samples = args.samples or (3 if args.quick else 41)
    settings = Settings(
        samples=samples,
        sample_ns=round((args.sample_ms or (1 if args.quick else 2)) * 1e6),
        records=args.records or (2_000 if args.quick else 100_000),
        framing_samples=max(3, samples // 3),
    )

    print_environment()
    mode = "quick (smoke test, targets not enforced)" if args.quick else "full"
    print(f"mode:      {mode}")
    print(
        f"method:    {settings.samples} samples of ~{settings.sample_ns / 1e6:g} ms per candidate "
        f"(framing: {settings.framing_samples} passes of {settings.records:,} records), "
        "round-robin with the order rotating;\n"
        f"           ratio of the minima, beside the median of per-round ratios as a check; gc disabled while timing;\n"
        f"           a sample with wall time > {PREEMPTED} x thread CPU time was preempted: "
        f"discarded and retaken (up to {ATTEMPTS} tries; more rounds until {MIN_CLEAN} clean samples)"
    )

    checks: list[Check] = []
    checks += bench_from_rest(settings)
    checks += bench_to_rest(settings)
    checks += bench_other_shapes(settings)
    try:
        checks += bench_framing(settings)
    except ImportError as exc:
        print(f"\n## 3. Framing throughput: SKIPPED ({exc})")
    sizes = bench_size()

    want = min(MIN_CLEAN, settings.framing_samples)
    noisy = sorted({c.name for ch in checks for c in (ch.num, ch.den) if c.n_clean < want})
    failed = [c.label for c in checks if c.passed is False] + [r.shape for r in sizes if r.passed is False]
    print()
    if any(ch.noisy for ch in checks):
        print(f"* noisy: the ratio of the minima and the paired median differ by more than {DISAGREE:.0%}")
    if noisy:
        print(f"WARNING: fewer than {want} undisturbed samples for: " + "; ".join(noisy))
    if failed:
        print("MISSED TARGETS: " + "; ".join(failed))
    else:
        print("all targets met")
    if args.quick:
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
