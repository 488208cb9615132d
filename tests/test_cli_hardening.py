"""The command line against classes of bad input (issue 7): generated values, one readable line, no traceback.

* every numeric option refuses out-of-range values (negative, beyond int64,
  nan, infinities, 1e303, not a number) with exit status 2 and one line, and
  accepts every value in its documented range;
* every record format decides the same way (cli.records.record_problem), and
  generated messages, unknown enum numbers and ``unrecognized`` parts
  included, survive every pair of formats through ``convert`` unchanged.

Argument checks run in-process through ``main``; conversions through ``main``
on in-memory streams (the same code the console script runs).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import itertools
import json
import math
import os
import pty
import signal
import sqlite3
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_service import ENV, SCRIPT, ServeFactory, cli, ending, serve, sqlite_url

from shellinfo_grpc import ProtectionShellInfo, encode_delimited, from_rest, read_delimited, to_rest
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ExtraRestKey, UnrecognizedRest
from shellinfo_grpc.cli import build_parser, main
from shellinfo_grpc.cli._io import INT64_MAX, MAX_PAGE_SIZE, MAX_SECONDS
from shellinfo_grpc.cli.records import FORMATS, MAX_RECORD_BYTES, MAX_RECORD_INPUT, record_problem
from shellinfo_grpc.rules import same_run

__all__ = ["serve"]  # the fixture of test_cli_service: real `shellinfo serve` processes

INT64_MIN = -(2**63)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(args: list[str], stdin: bytes = b"") -> tuple[int, bytes, str]:
    """main() in this process: exit status, standard output, and standard error (argparse's included)."""
    out, err = io.BytesIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args, stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    text = err.getvalue()
    assert "Traceback" not in text, text
    return status, out.getvalue(), text


# --- numeric options ---------------------------------------------------------------

# (command and the arguments it needs besides the option, option, attribute, least, most, integer?)
NUMERIC: list[tuple[list[str], str, str, float, float, bool]] = [
    (["serve"], "--retain-updates", "retain_updates", 0, INT64_MAX, True),
    (["serve"], "--retain-seconds", "retain_seconds", 0, MAX_SECONDS, False),
    (["serve"], "--max-watch-queue", "max_watch_queue", 1, INT64_MAX, True),
    (["list"], "--page-size", "page_size", 1, MAX_PAGE_SIZE, True),
    (["list"], "--job-run-id", "job_run_ids", INT64_MIN, INT64_MAX, True),
    (["watch"], "--from-revision", "from_revision", 0, INT64_MAX, True),
    (["watch"], "--count", "count", 1, INT64_MAX, True),
    (["watch"], "--job-run-id", "job_run_ids", INT64_MIN, INT64_MAX, True),
    (["get", "1"], "--timeout", "timeout", 0, MAX_SECONDS, False),
    (["list"], "--timeout", "timeout", 0, MAX_SECONDS, False),
    (["watch"], "--timeout", "timeout", 0, MAX_SECONDS, False),
    (["publish"], "--timeout", "timeout", 0, MAX_SECONDS, False),
]
IDS = [f"{cmd[0]}{opt}" for cmd, opt, *_ in NUMERIC]


def out_of_range(least: float, most: float, integer: bool) -> st.SearchStrategy[str]:
    """Texts that are not a value of the option: beyond either end, not finite, or not a number."""
    below = st.integers(max_value=int(least) - 1).map(str)
    above = st.integers(min_value=int(most) + 1).map(str)
    texts = [
        below,
        above,
        st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e303", "-1e303", "1e400", "", "ten", "0x10", "--"]),
        st.text(alphabet="abcxyz!@#", min_size=1, max_size=8),
    ]
    if integer:
        texts.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)).map(repr))
    else:
        texts.append(st.floats(max_value=math.nextafter(least, -math.inf), allow_nan=False).map(repr))
        texts.append(st.floats(min_value=math.nextafter(most, math.inf)).map(repr))
    return st.one_of(texts)


@pytest.mark.parametrize(("command", "option", "attr", "least", "most", "integer"), NUMERIC, ids=IDS)
def test_numeric_options_refuse_every_value_out_of_range(
    command: list[str], option: str, attr: str, least: float, most: float, integer: bool
) -> None:
    @SETTINGS
    @given(out_of_range(least, most, integer))
    def check(text: str) -> None:
        status, out, err = run([*command, f"{option}={text}"])
        assert (status, out) == (2, b""), err
        lines = err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"shellinfo {command[0]}: argument {option}: expected "), lines

    check()


@pytest.mark.parametrize(("command", "option", "attr", "least", "most", "integer"), NUMERIC, ids=IDS)
def test_numeric_options_accept_every_value_in_range(
    command: list[str], option: str, attr: str, least: float, most: float, integer: bool
) -> None:
    values: st.SearchStrategy[Any] = (
        st.integers(int(least), int(most)) if integer else st.floats(least, most, allow_nan=False)
    )

    @SETTINGS
    @given(values)
    def check(value: float) -> None:
        args = build_parser().parse_args([*command, f"{option}={value!r}"])
        parsed = getattr(args, attr)
        assert (parsed[-1] if isinstance(parsed, list) else parsed) == value

    check()


@SETTINGS
@given(st.one_of(st.integers(min_value=65536).map(str), st.sampled_from(["-1", "http", "", "٣", "80a", "1e3"])))
def test_serve_refuses_every_port_out_of_range(port: str) -> None:
    status, _, err = run(["serve", "--store", "memory://", "--address", f"127.0.0.1:{port}"])
    assert status == 2
    (line,) = err.splitlines()
    assert line.startswith("shellinfo: --address "), line
    assert "port from 0 to 65535" in line, line


# --- one decision for every format --------------------------------------------------

# Unknown keys (never a known REST key), with JSON values of every kind.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
extra_keys = st.dictionaries(st.text(alphabet="abcdefghxyz_", min_size=1, max_size=6).map("x_".__add__), json_values)
int64 = st.integers(INT64_MIN, INT64_MAX)
# Enum numbers within int32: known ones, and numbers a newer producer may send.
enum_numbers = st.integers(-(2**31), 2**31 - 1).filter(bool)


@st.composite
def messages(draw: st.DrawFn) -> ProtectionShellInfo:
    """Valid messages as a newer producer may write them: unknown enum numbers and spellings, unknown keys."""
    rest: dict[str, Any] = {}
    for key in ("jobRunId", "startTimeUsecs", "endTimeUsecs"):
        if draw(st.booleans()):
            rest[key] = draw(int64)
    for key, spellings in (("status", ["kSuccess", "kRunning", "kBrandNew"]), ("runType", ["kFull", "kNewType"])):
        choice = draw(st.sampled_from(["absent", "spelled", "number"]))
        if choice == "spelled":
            rest[key] = draw(st.sampled_from(spellings))
        elif choice == "number":
            rest[key] = draw(enum_numbers)
    if draw(st.booleans()):
        rest["error"] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        rest["startTimeHhmm"] = f"{draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}"
    rest.update(draw(extra_keys))
    return from_rest(rest)


def encode(form: str, msgs: list[ProtectionShellInfo]) -> bytes:
    status, out, err = run(["convert", "--from", "binary", "--to", form], b"".join(map(encode_delimited, msgs)))
    assert status == 0, err
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(messages(), max_size=4), st.sampled_from(FORMATS), st.sampled_from(FORMATS))
def test_generated_messages_round_trip_through_every_pair_of_formats(
    msgs: list[ProtectionShellInfo], source: str, target: str
) -> None:
    data = encode(source, msgs)
    status, out, err = run(["convert", "--from", source, "--to", target], data)
    assert status == 0, err
    status, back, err = run(["convert", "--from", target, "--to", "binary"], out)
    assert status == 0, err
    assert read_delimited(back) == msgs
    for form, text in ((source, data), (target, out)):
        assert run(["validate", "--from", form], text)[::2] == (0, f"0 of {len(msgs)} records invalid\n")


# Binary records that REST cannot carry as they are, or that break a limit.
BAD_BINARY = [
    ProtectionShellInfo(job_run_id=1, status=0),  # type: ignore[arg-type]  # set to _UNSPECIFIED
    ProtectionShellInfo(unrecognized=UnrecognizedRest()),
    ProtectionShellInfo(unrecognized=UnrecognizedRest(status="kSuccess")),
    ProtectionShellInfo(status=1, unrecognized=UnrecognizedRest(status="kNew")),  # type: ignore[arg-type]
    ProtectionShellInfo(unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="jobRunId", json_value="1")])),
    ProtectionShellInfo(unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="x", json_value="[" * 65)])),
    ProtectionShellInfo(unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="x", json_value="NaN")])),
    ProtectionShellInfo(
        unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="x", json_value="1"), ExtraRestKey(key="x")])
    ),
    ProtectionShellInfo(error="e" * (MAX_RECORD_BYTES + 1)),
]


@pytest.mark.parametrize("bad", BAD_BINARY, ids=range(len(BAD_BINARY)))
@pytest.mark.parametrize("strict", [False, True])
def test_validate_convert_and_publish_decide_alike_in_every_format(bad: ProtectionShellInfo, strict: bool) -> None:
    """A binary record that fails has no REST form that passes, and the same record fails in every command."""
    assert record_problem(bad, strict) is not None
    flags = ["--strict"] if strict else []
    data = encode_delimited(bad)
    status, _, err = run(["validate", "--from", "binary", *flags], data)
    assert status == 2, err
    assert err.startswith("record 1: "), err
    status, out, err = run(["convert", "--from", "binary", "--to", "jsonl", *flags], data)
    assert (status, out) == (2, b""), err
    assert err.startswith("shellinfo convert: record 1: "), err
    try:
        rest = to_rest(bad)
    except ValueError:
        return  # REST cannot even write it
    text = json.dumps(rest).encode()
    for form, payload in (("jsonl", text + b"\n"), ("json", b"[" + text + b"]")):
        verdict = run(["validate", "--from", form, *flags], payload)[0]
        # What jsonl reads is a different message, or one that fails as well: never the same one passing.
        if verdict == 0:
            assert from_rest(rest) != bad
    status, _, err = run(["publish", "--address", "127.0.0.1:1", *flags], text)
    if from_rest(rest) == bad:
        assert status == 2, err
        assert "nothing published" in err, err


def test_publish_counts_the_job_in_the_size_limit_before_sending_anything() -> None:
    """A ProtectionRunInstance whose run fits but whose run and job together do not: exit 2, nothing sent."""
    run_part = {"jobRunId": 1, "status": "kRunning", "error": "e" * (MAX_RECORD_BYTES - 300)}
    fits = json.dumps({"protectionShellInfo": run_part, "jobId": 3, "jobName": "n"}).encode()
    too_big = json.dumps({"protectionShellInfo": run_part, "jobId": 3, "jobName": "n" * 600}).encode()
    # No service listens on port 1: a record that passes the checks fails to be sent (exit 1), one
    # that fails them is refused before any connection (exit 2, nothing published).
    status, _, err = run(["publish", "--address", "127.0.0.1:1", "--timeout", "2"], fits)
    assert status == 1, err
    status, _, err = run(["publish", "--address", "127.0.0.1:1"], too_big)
    assert status == 2, err
    assert "(run, source and job)" in err, err
    assert "nothing published" in err, err


# --- consumers and what a store already holds ----------------------------------------


def _extra(*pairs: tuple[str, str]) -> ProtectionShellInfo:
    return ProtectionShellInfo(
        unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key=k, json_value=v) for k, v in pairs])
    )


# Runs REST cannot show, as a store written before the service checked them may hold.
unshowable_runs = st.sampled_from(
    [
        _extra(("tz", "{oops")),
        _extra(("tz", "NaN")),
        _extra(("tz", "[" * 70 + "]" * 70)),
        _extra(("tz", '"\\ud800"')),
        _extra(("tz", "1 2")),
    ]
)


_STORES = itertools.count()


def _plant(path: Path, job: int, bad: ProtectionShellInfo) -> ProtectionShellInfo:
    """Overwrite run ``job`` in the SQLite store file, in its latest state and in its history, with ``bad``."""
    run = ProtectionShellInfo(job_run_id=job)
    run.MergeFrom(bad)
    data = run.SerializeToString()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        assert db.execute("UPDATE runs SET run = ? WHERE job_run_id = ?", (data, job)).rowcount == 1
        # wire NULL: the store encodes the update from run, as for rows of schema version 1.
        assert db.execute("UPDATE updates SET run = ?, wire = NULL WHERE job_run_id = ?", (data, job)).rowcount == 1
    return run


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=unshowable_runs)
def test_consumers_skip_a_stored_run_rest_cannot_show(
    bad: ProtectionShellInfo, serve: ServeFactory, tmp_path: Path
) -> None:
    """get shows it raw, list and watch skip it, each with one line; the other runs are still served."""
    path = tmp_path / f"runs{next(_STORES)}.sqlite3"
    server = serve(sqlite_url(path))
    at = ("--address", server.address)
    assert cli("publish", *at, *(f'{{"jobRunId": {n}, "status": "kRunning"}}' for n in (1, 2, 3))).returncode == 0
    assert server.stop() == 0
    planted = _plant(path, 2, bad)
    server = serve(sqlite_url(path))
    at = ("--address", server.address)

    got = cli("get", *at, "2")
    assert got.returncode == 1
    shown = json.loads(got.stdout)
    assert ProtectionShellInfo.FromString(base64.b64decode(shown["runBase64"])) == planted
    (line,) = got.stderr.decode().splitlines()
    assert line.startswith("shellinfo get: revision 2 (source '', jobRunId 2) cannot be shown as REST: ")
    assert cli("get", *at, "3").returncode == 0

    for form in ("jsonl", "table"):
        listed = cli("list", *at, "--format", form)
        assert listed.returncode == 0
        (line,) = listed.stderr.decode().splitlines()
        assert line.startswith("shellinfo list: skipped revision 2 (source '', jobRunId 2): cannot be shown")
        if form == "jsonl":
            assert [json.loads(text)["run"]["jobRunId"] for text in listed.stdout.splitlines()] == [1, 3]

    watched = cli("watch", *at, "--from-revision", "1", "--count", "2", "--format", "jsonl", "--timeout", "20")
    assert watched.returncode == 0
    assert [json.loads(text)["revision"] for text in watched.stdout.splitlines()] == [1, 3]
    (line,) = watched.stderr.decode().splitlines()
    assert line.startswith("shellinfo watch: skipped revision 2 (source '', jobRunId 2): cannot be shown")


# --- unknown spellings: published with a warning, matched by the filters ----------------


def test_unknown_spellings_are_published_with_a_warning_and_matched_by_filters(serve: ServeFactory) -> None:
    server = serve()
    at = ("--address", server.address)
    runs = [
        '{"jobRunId": 1, "status": "kBrandNew"}',
        '{"jobRunId": 2, "status": "kSuccess"}',
        '{"jobRunId": 3, "status": 77, "runType": "kNewType"}',
        '{"jobRunId": 4, "status": "kRunning"}',
    ]
    published = cli("publish", *at, *runs)
    assert published.returncode == 0
    assert published.stderr.decode().splitlines() == [
        'shellinfo publish: warning: record 1 (jobRunId 1): status "kBrandNew" unknown to this version;'
        " published as it is (--strict refuses it)",
        'shellinfo publish: warning: record 3 (jobRunId 3): status 77 and runType "kNewType" unknown to this version;'
        " published as it is (--strict refuses it)",
    ]
    strict = cli("publish", *at, "--strict", runs[0])
    assert strict.returncode == 2

    def listed(*flags: str) -> list[int]:
        result = cli("list", *at, "--format", "jsonl", *flags)
        assert result.returncode == 0, result.stderr
        return [json.loads(text)["run"]["jobRunId"] for text in result.stdout.splitlines()]

    assert listed("--status", "kBrandNew") == [1]
    assert listed("--status", "kBrandNew", "--status", "kSuccess") == [1, 2]
    assert listed("--status", "77") == [3]
    assert listed("--run-type", "kNewType") == [3]
    assert listed("--status", "kRunning") == [4]  # known spellings alone: the service filters
    assert listed("--status", "kNeverSeen") == []
    result = cli("list", *at, "--status", "kBrandNew")
    assert result.stderr.decode().splitlines() == [
        "shellinfo: --status 'kBrandNew' is not a value this version knows; matching runs that show it as is"
    ]

    watched = cli("watch", *at, "--from-revision", "1", "--status", "kBrandNew", "--status", "kRunning",
                  "--count", "2", "--format", "jsonl")  # fmt: skip
    assert watched.returncode == 0
    assert [json.loads(text)["run"]["jobRunId"] for text in watched.stdout.splitlines()] == [1, 4]


# --- the live table through a server restart -------------------------------------------


class Screen:
    """What a process writes to a pseudo-terminal, read on a thread; ``status()`` is the last status line drawn."""

    def __init__(self, controller: int) -> None:
        self._fd = controller
        self._data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self._data += chunk

    def status(self) -> str:
        with self._lock:
            text = self._data.decode("utf-8", "replace")
        last = text.rpartition("\x1b[H")[2]
        return last.split("\x1b[K", 1)[0]

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if text in status:
                return status
            time.sleep(0.05)
        pytest.fail(f"the status line never said {text!r}; it says {self.status()!r}")


def test_the_live_table_says_reconnecting_then_reconnected_at_once(serve: ServeFactory, tmp_path: Path) -> None:
    """The status line says "reconnecting" while the server is away and "reconnected" as soon as it is back,
    before any update arrives."""
    store = sqlite_url(tmp_path / "runs.sqlite3")
    server = serve(store)
    port = server.port
    assert cli("publish", "--address", server.address, '{"jobRunId": 1, "status": "kRunning"}').returncode == 0
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 10, 160, 0, 0))
    proc = subprocess.Popen(
        [str(SCRIPT), "watch", "--address", server.address, "--from-revision", "1"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    os.close(terminal)
    screen = Screen(controller)
    with ending(proc):
        screen.wait_for("revision 1  1 runs  1 updates")
        assert server.stop() == 0
        assert "reconnecting: UNAVAILABLE" in screen.wait_for("reconnecting")
        serve(store, port=port)
        status = screen.wait_for("reconnected")
        assert "reconnecting" not in status
        assert status.endswith("[reconnected; resuming at revision 2]"), status
        assert "1 updates" in status  # nothing new arrived: it said so at once
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
    assert proc.stderr is not None
    with proc.stderr:
        assert proc.stderr.read() == b""
    os.close(controller)


@st.composite
def binary_records(draw: st.DrawFn) -> ProtectionShellInfo:
    """Messages as any producer may write them in binary, valid or not: REST may not carry them as they are."""
    msg = ProtectionShellInfo()
    if draw(st.booleans()):
        msg.job_run_id = draw(int64)
    if draw(st.booleans()):
        msg.status = draw(st.integers(-3, 12) | enum_numbers)  # type: ignore[assignment]
    if draw(st.booleans()):
        msg.run_type = draw(st.integers(-1, 6))  # type: ignore[assignment]
    if draw(st.booleans()):
        msg.start_time_hhmm = draw(st.sampled_from(["00:00", "23:59", "24:00", "7:05", ""]))
    if draw(st.booleans()):
        unrecognized = msg.unrecognized
        unrecognized.SetInParent()
        if draw(st.booleans()):
            unrecognized.status = draw(st.sampled_from(["kSuccess", "kBrandNew", ""]))
        if draw(st.booleans()):
            unrecognized.run_type = draw(st.sampled_from(["kFull", "kNewType"]))
        keys = st.sampled_from(["tz", "x", "jobRunId", "status", ""])
        texts = st.sampled_from(['"UTC"', "1", "1.0", "1e400", "NaN", "{oops", "[1,2]", '{"a":1,"a":2}', "1 2", " 3 "])
        for _ in range(draw(st.integers(0, 3))):
            unrecognized.extra_keys.add(key=draw(keys), json_value=draw(texts))
    return msg


@settings(max_examples=150, deadline=None)
@given(binary_records(), st.booleans())
def test_a_binary_record_passes_exactly_when_its_rest_form_passes_as_the_same_record(
    msg: ProtectionShellInfo, strict: bool
) -> None:
    """validate --from binary passes a record iff converting it to jsonl gives a record that passes and is the same."""
    flags = ["--strict"] if strict else []
    data = encode_delimited(msg)
    verdict = run(["validate", "--from", "binary", *flags], data)[0]
    assert verdict == (0 if record_problem(msg, strict) is None else 2)
    status, out, _ = run(["convert", "--from", "binary", "--to", "jsonl", *flags], data)
    assert status == verdict
    if verdict == 0:
        assert run(["validate", "--from", "jsonl", *flags], out)[0] == 0
        (back,) = read_delimited(run(["convert", "--from", "jsonl", "--to", "binary", *flags], out)[1])
        assert same_run(back, msg)  # the same record: kept JSON values compare by value (canonical form)
        return
    try:
        text = json.dumps(to_rest(msg)).encode() + b"\n"
    except ValueError:
        return  # REST cannot even write it
    status, back, _ = run(["convert", "--from", "jsonl", "--to", "binary", *flags], text)
    assert status != 0 or read_delimited(back) != [msg]  # never the same record passing


def test_one_records_input_is_bounded_alike_in_jsonl_and_binary() -> None:
    """A JSON line or a binary frame over MAX_RECORD_INPUT is refused; a line over it does not stop jsonl."""
    long_line = b'{"jobRunId": 1, "error": "' + b"e" * MAX_RECORD_INPUT + b'"}\n'
    status, _, err = run(["validate", "--from", "jsonl"], long_line + b'{"jobRunId": 2}\n')
    assert status == 2
    assert err.splitlines() == [
        f"record 1: the line is longer than {MAX_RECORD_INPUT} bytes (line 1)",
        "1 of 2 records invalid",
    ]
    frame = encode_delimited(ProtectionShellInfo(error="e" * (MAX_RECORD_INPUT + 1)))
    status, _, err = run(["validate", "--from", "binary"], frame)
    assert status == 2
    assert err.splitlines()[0].startswith("record 1 (byte offset 0): ")
    # Within the input limit but over the record limit: refused in every format, in the same words.
    big = ProtectionShellInfo(job_run_id=1, error="e" * MAX_RECORD_BYTES)
    for form in FORMATS:
        status, _, err = run(["convert", "--from", "binary", "--to", form], encode_delimited(big))
        assert status == 2
        assert err.startswith(f"shellinfo convert: record 1: the record is {big.ByteSize()} bytes serialized;"), err
    text = json.dumps(to_rest(big)).encode()
    for form, data in (("jsonl", text + b"\n"), ("json", b"[" + text + b"]")):
        status, _, err = run(["validate", "--from", form], data)
        assert status == 2
        assert err.startswith(f"record 1: the record is {big.ByteSize()} bytes serialized;"), err
