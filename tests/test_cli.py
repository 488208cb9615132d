"""End-to-end tests of the ``shellinfo`` command line (shellinfo_grpc.cli).

Most run the installed console script in a subprocess, exactly as a user
would; a table of garbage inputs also runs in-process through ``main`` with
real in-memory streams, to keep the suite fast.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from samples import COMPLETED

from shellinfo_grpc import (
    ExtraRestKey,
    ProtectionShellInfo,
    __version__,
    encode_delimited,
    from_rest,
    read_delimited,
    to_rest,
)
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import UnrecognizedRest
from shellinfo_grpc.cli import main

SCRIPT = Path(sys.executable).with_name("shellinfo")
LAUNCHERS = {
    "script": [str(SCRIPT)],
    "module": [sys.executable, "-m", "shellinfo_grpc.cli"],
}
FORMATS = ("json", "jsonl", "binary")

RECORDS: list[dict[str, Any]] = [
    dict(COMPLETED),
    {
        "jobRunId": 2**63 - 1,
        "startTimeUsecs": -(2**63),
        "status": "kFailure",
        "error": "disk full on /var — ünïcode 日本",
    },
    {"jobRunId": 0, "error": ""},
    {},
    {"jobRunId": 5, "status": "kBrandNew", "timezone": "Europe/Berlin", "nested": {"a": [1, 12345678901234567890]}},
    {"runType": "kLog", "status": "kFinalizing", "error": "x" * 300},
]
# What every record reads as, once through the codec: the known keys in schema order, then the others.
EXPECTED = [to_rest(from_rest(record)) for record in RECORDS]


def run(*args: str, stdin: bytes = b"", launcher: str = "script") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*LAUNCHERS[launcher], *args], input=stdin, capture_output=True, timeout=120, check=False)


def encode(form: str, records: list[dict[str, Any]]) -> bytes:
    if form == "json":
        return json.dumps(records, ensure_ascii=False, indent=2).encode()
    if form == "jsonl":
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    return b"".join(encode_delimited(from_rest(record)) for record in records)


def decode(form: str, data: bytes) -> list[dict[str, Any]]:
    if form == "json":
        array = json.loads(data)
        assert isinstance(array, list)
        return array
    if form == "jsonl":
        return [json.loads(line) for line in data.splitlines()]
    return [to_rest(msg) for msg in read_delimited(data)]


def exactly(records: list[dict[str, Any]]) -> str:
    """A form in which equal means same keys in the same order, same values of the same JSON types."""
    return json.dumps(records, ensure_ascii=False)


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode().splitlines()


# --- basics --------------------------------------------------------------------


def test_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: is the package installed?"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_version(launcher: str) -> None:
    result = run("--version", launcher=launcher)
    assert result.returncode == 0
    assert result.stdout.decode() == f"shellinfo {__version__}\n"
    assert result.stderr == b""
    assert result.stderr == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("convert", "--to", "json"), "the following arguments are required: --from"),
        (("convert", "--from", "xml", "--to", "json"), "invalid choice: 'xml'"),
        (("validate", "--from", "json", "--to", "json"), "unrecognized arguments: --to json"),
        (("bogus",), "invalid choice: 'bogus'"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    (line,) = stderr_lines(result)  # one line, that says where help is
    assert message in line
    assert line.endswith(" --help)")
    assert "Traceback" not in result.stderr.decode()


def test_importing_the_cli_does_not_import_grpc() -> None:
    code = "import sys, shellinfo_grpc.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    assert result.stdout == b"[]\n"


# --- convert -------------------------------------------------------------------


@pytest.mark.parametrize("source", FORMATS)
@pytest.mark.parametrize("target", FORMATS)
def test_convert_every_pair(source: str, target: str) -> None:
    result = run("convert", "--from", source, "--to", target, stdin=encode(source, RECORDS))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert exactly(decode(target, result.stdout)) == exactly(EXPECTED)
    if target == "binary":
        assert result.stdout == encode("binary", RECORDS)
    elif target == "jsonl":  # compact, one object per line, UTF-8 as is
        expected = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in EXPECTED)
        assert result.stdout.decode() == expected
    if target != "binary":  # integers stay JSON numbers, exact
        assert b'"jobRunId":9223372036854775807' in result.stdout
        assert b'"a":[1,12345678901234567890]' in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_json_to_binary_to_jsonl_to_json_keeps_the_data(launcher: str) -> None:
    original = encode("json", RECORDS)
    data = original
    for source, target in (("json", "binary"), ("binary", "jsonl"), ("jsonl", "json")):
        result = run("convert", "--from", source, "--to", target, stdin=data, launcher=launcher)
        assert result.returncode == 0, result.stderr
        data = result.stdout
    assert exactly(json.loads(data)) == exactly(EXPECTED)
    assert json.loads(data) == json.loads(original)  # the same data (known keys come back in schema order)


EMPTY = [("json", b"[]"), ("json", b""), ("json", b" \r\n\t"), ("jsonl", b""), ("jsonl", b"\n \n"), ("binary", b"")]


@pytest.mark.parametrize(("source", "empty"), EMPTY)
def test_empty_input_is_no_records_in_every_format(source: str, empty: bytes) -> None:
    """Empty input is no records (exit 0) in every format: convert writes an empty document; validate, 0 of 0."""
    expected = {"json": b"[]\n", "jsonl": b"", "binary": b""}
    for target in FORMATS:
        result = convert_in_process(source, target, empty)
        assert result == (0, expected[target], "")
    validate = run("validate", "--from", source, stdin=empty)
    assert (validate.returncode, stderr_lines(validate)) == (0, ["0 of 0 records invalid"])


def test_byte_order_mark_is_accepted() -> None:
    for source in ("json", "jsonl"):
        result = run("convert", "--from", source, "--to", "jsonl", stdin=b"\xef\xbb\xbf" + encode(source, RECORDS[:2]))
        assert result.returncode == 0, result.stderr
        assert exactly(decode("jsonl", result.stdout)) == exactly(EXPECTED[:2])


def test_a_lone_surrogate_is_refused_from_every_format() -> None:
    rest = run("convert", "--from", "jsonl", "--to", "jsonl", stdin=b'{"jobRunId":1,"note":"\\ud800"}\n')
    kept = ExtraRestKey(key="note", json_value='"\\ud800"')
    msg = ProtectionShellInfo(job_run_id=1, unrecognized=UnrecognizedRest(extra_keys=[kept]))
    binary = run("convert", "--from", "binary", "--to", "jsonl", stdin=encode_delimited(msg))
    for result in (rest, binary):
        assert (result.returncode, result.stdout) == (2, b"")
        (line,) = stderr_lines(result)
        assert line.startswith("shellinfo convert: record 1: note: value is not representable as JSON"), line


@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("source", ["json", "jsonl"])
def test_convert_keeps_the_records_before_a_bad_one(source: str, target: str) -> None:
    records = [*RECORDS[:3], {"jobRunId": 4, "status": True}, RECORDS[0]]
    result = run("convert", "--from", source, "--to", target, stdin=encode(source, records))
    assert result.returncode == 2
    line = "shellinfo convert: record 4: status: expected a string or an enum number, got a boolean"
    assert stderr_lines(result) == [line + (" (line 4)" if source == "jsonl" else "")]
    assert exactly(decode(target, result.stdout)) == exactly(EXPECTED[:3])  # json output is a closed, valid array


@pytest.mark.parametrize("target", FORMATS)
def test_convert_keeps_the_records_before_a_truncated_one(target: str) -> None:
    data = encode("binary", RECORDS[:3])
    result = run("convert", "--from", "binary", "--to", target, stdin=data + b"\x05\x08")
    assert result.returncode == 2
    assert stderr_lines(result) == [
        f"shellinfo convert: record 4 (byte offset {len(data)}): stream ends inside the record:"
        " its length is 5 bytes but only 1 follow"
    ]
    assert exactly(decode(target, result.stdout)) == exactly(EXPECTED[:3])


def test_strict_rejects_an_unknown_key() -> None:
    stdin = encode("jsonl", [RECORDS[0], {"jobRunId": 1, "timezone": "UTC"}])
    lenient = run("convert", "--from", "jsonl", "--to", "jsonl", stdin=stdin)
    assert lenient.returncode == 0
    assert decode("jsonl", lenient.stdout)[1] == {"jobRunId": 1, "timezone": "UTC"}
    strict = run("convert", "--from", "jsonl", "--to", "jsonl", "--strict", stdin=stdin)
    assert strict.returncode == 2
    reason = "unknown key (strict mode rejects keys the schema does not know)"
    assert stderr_lines(strict) == [f"shellinfo convert: record 2: timezone: {reason} (line 2)"]
    assert decode("jsonl", strict.stdout) == EXPECTED[:1]


def test_strict_rejects_an_unknown_status() -> None:
    stdin = encode("json", [{"jobRunId": 1, "status": "kBrandNew"}])
    lenient = run("convert", "--from", "json", "--to", "binary", stdin=stdin)
    assert lenient.returncode == 0
    (msg,) = read_delimited(lenient.stdout)
    assert to_rest(msg) == {"jobRunId": 1, "status": "kBrandNew"}
    strict = run("validate", "--from", "json", "--strict", stdin=stdin)
    assert strict.returncode == 2
    assert stderr_lines(strict) == [
        "record 1: status: unknown value 'kBrandNew' (strict mode)",
        "1 of 1 records invalid",
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            ProtectionShellInfo(job_run_id=1, status=99).SerializeToString(),  # type: ignore[arg-type]
            "status: unknown value 99 (strict mode)",
        ),
        (b"\x08\x01\x80\x01\x05", "#16: a field this schema version does not know: REST cannot carry it"),
        (
            ProtectionShellInfo(
                job_run_id=1, unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="tz", json_value='"UTC"')])
            ).SerializeToString(),
            "tz: unknown key (strict mode rejects keys the schema does not know)",
        ),
    ],
    ids=["enum-number", "unknown-field", "kept-key"],
)
def test_strict_binary_rejects_what_the_schema_does_not_know(payload: bytes, message: str) -> None:
    stdin = bytes([len(payload)]) + payload
    lenient = run("convert", "--from", "binary", "--to", "binary", stdin=stdin)
    assert (lenient.returncode, lenient.stdout) == (0, stdin)
    strict = run("convert", "--from", "binary", "--to", "binary", "--strict", stdin=stdin)
    assert strict.returncode == 2
    assert stderr_lines(strict) == [f"shellinfo convert: record 1: {message}"]
    assert strict.stdout == b""


def test_binary_with_a_kept_value_that_is_not_json_is_refused() -> None:
    bad = ProtectionShellInfo(
        job_run_id=1, unrecognized=UnrecognizedRest(extra_keys=[ExtraRestKey(key="tz", json_value="{oops")])
    )
    result = run("convert", "--from", "binary", "--to", "jsonl", stdin=encode_delimited(bad))
    assert result.returncode == 2
    (line,) = stderr_lines(result)
    assert line.startswith("shellinfo convert: record 1: tz: value is not representable as JSON: not valid JSON")


# --- validate ------------------------------------------------------------------


def test_validate_all_good() -> None:
    for source in FORMATS:
        result = run("validate", "--from", source, stdin=encode(source, RECORDS))
        assert (result.returncode, result.stdout) == (0, b"")
        assert stderr_lines(result) == [f"0 of {len(RECORDS)} records invalid"]


def test_validate_jsonl_reports_each_bad_record() -> None:
    lines = [
        '{"jobRunId": 1, "status": "kSuccess"}',
        '{"jobRunId": 2, "status": true}',
        "",
        '{"jobRunId": 3, "startTimeHhmm": "25:00"}',
        '{"jobRunId": 4}',
        '{"jobRunId": ',
        '{"jobRunId": "6"}',
        "[1]",
        '{"jobRunId": 9223372036854775808}',
        '{"jobRunId": 8, "runType": "kFull"}',
    ]
    result = run("validate", "--from", "jsonl", stdin="\n".join(lines).encode())
    assert result.returncode == 2
    assert result.stdout == b""
    assert stderr_lines(result) == [
        "record 2: status: expected a string or an enum number, got a boolean (line 2)",
        "record 3: startTimeHhmm: expected \"HH:MM\" (00:00 to 23:59), got '25:00' (line 4)",
        "record 5: not valid JSON: Expecting value at column 14 (line 6)",
        "record 6: jobRunId: expected an integer, got a string (line 7)",
        "record 7: expected a JSON object, got an array (line 8)",
        "record 8: jobRunId: integer 9223372036854775808 is outside the int64 range (line 9)",
        "6 of 9 records invalid",
    ]


def test_validate_json_reports_each_bad_record() -> None:
    records = [RECORDS[0], {"status": True}, RECORDS[1], "text", {"error": None, "endTimeUsecs": 1.5}, RECORDS[2]]
    result = run("validate", "--from", "json", stdin=json.dumps(records).encode())
    assert result.returncode == 2
    assert stderr_lines(result) == [
        "record 2: status: expected a string or an enum number, got a boolean",
        "record 4: expected a JSON object, got a string",
        "record 5: endTimeUsecs: expected an integer, got a number with a fraction or exponent",
        "3 of 6 records invalid",
    ]


def test_validate_jsonl_reports_a_line_that_is_not_utf8() -> None:
    result = run("validate", "--from", "jsonl", stdin=b'{"jobRunId": 1}\n{"error": "\xff"}\n{"jobRunId": 3}\n')
    assert result.returncode == 2
    assert stderr_lines(result) == [
        "record 2: the line is not valid UTF-8: invalid start byte (byte 0xff at offset 11) (line 2)",
        "1 of 3 records invalid",
    ]


def test_validate_binary_goes_on_past_a_bad_payload_and_stops_at_truncation() -> None:
    first = encode("binary", RECORDS[:2])
    second = first + b"\x02\xff\xff" + encode("binary", RECORDS[2:3])
    result = run("validate", "--from", "binary", stdin=second + b"\x09\x08")
    assert result.returncode == 2
    assert stderr_lines(result) == [
        f"record 3 (byte offset {len(first)}): its 2-byte payload is not a valid ProtectionShellInfo"
        " (Wire format was corrupt)",
        f"record 5 (byte offset {len(second)}): stream ends inside the record: its length is 9 bytes but only 1 follow",
        "2 of 5 records invalid (reading stopped at record 5: the input after it cannot be framed)",
    ]


# --- garbage in, one line out --------------------------------------------------

# (format, input, how many good records come before the bad one)
GARBAGE = [
    ("json", b"not json", 0),
    ("json", b"\xff\xfe\xfd garbage", 0),
    ("json", b'{"jobRunId": 1}', 0),
    ("json", b'"a string"', 0),
    ("json", b"[" * 100000, 0),
    ("json", b"[" + b"9" * 5000 + b"]", 0),
    ("json", b"\x00\x01\x02binary", 0),
    ("json", b'[{"jobRunId": 1}, 2]', 1),
    ("jsonl", b"not json\n", 0),
    ("jsonl", b"\xff\xfe\n", 0),
    ("jsonl", b"[" * 100000, 0),
    ("jsonl", b"9" * 5000, 0),
    ("jsonl", b"{}\n\x00\n", 1),
    ("binary", b"\x05\x08", 0),
    ("binary", b"\xff" * 11, 0),
    ("binary", b"\x80\x80\x80\x40", 0),
    ("binary", b'[{"jobRunId": 1}]', 0),
    ("binary", b"\x00\x02\xff\xff", 1),
]
GARBAGE_IDS = [f"{source}-{i}" for i, (source, _, _) in enumerate(GARBAGE)]


@pytest.mark.parametrize(("source", "data", "good"), GARBAGE, ids=GARBAGE_IDS)
def test_garbage_gives_one_line_and_no_traceback(source: str, data: bytes, good: int) -> None:
    convert = run("convert", "--from", source, "--to", "jsonl", stdin=data)
    assert convert.returncode == 2
    assert "Traceback" not in convert.stderr.decode()
    (line,) = stderr_lines(convert)
    assert line.startswith("shellinfo convert: ")
    assert len(convert.stdout.splitlines()) == good
    validate = run("validate", "--from", source, stdin=data)
    assert validate.returncode == 2
    assert "Traceback" not in validate.stderr.decode()
    assert 1 <= len(stderr_lines(validate)) <= 2


def convert_in_process(source: str, target: str, data: bytes) -> tuple[int, bytes, str]:
    stdout, stderr = io.BytesIO(), io.StringIO()
    args = ["convert", "--from", source, "--to", target]
    status = main(args, stdin=io.BytesIO(data), stdout=stdout, stderr=stderr)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize(("source", "data", "good"), GARBAGE, ids=GARBAGE_IDS)
def test_garbage_in_process_for_every_target(source: str, data: bytes, good: int) -> None:
    for target in FORMATS:
        status, stdout, stderr = convert_in_process(source, target, data)
        assert status == 2
        (line,) = stderr.splitlines()
        assert line.startswith("shellinfo convert: ")
        assert len(decode(target, stdout)) == good  # what came before the bad record, as a valid document


def test_whole_input_errors_name_the_problem() -> None:
    cases = {
        b"not json": "input is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        b'{"jobRunId": 1}': "input is not a JSON array but an object: --from json expects [{...}, ...]"
        " (use --from jsonl for one object per line)",
        b"\xff": "input is not valid UTF-8: invalid start byte (byte 0xff at offset 0)",
        b"[" * 100000: "input is not usable JSON: it is nested too deeply",
    }
    for data, message in cases.items():
        # --to json always writes a valid document: here, the empty array
        assert convert_in_process("json", "json", data) == (2, b"[]\n", f"shellinfo convert: {message}\n")


def test_in_process_success_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_in_process("json", "jsonl", encode("json", RECORDS))[::2] == (0, "")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"shellinfo {__version__}\n"
    assert main(["convert"]) == 2
    assert "required" in capsys.readouterr().err


# --- pipes and signals ---------------------------------------------------------


def _many_records(tmp_path: Path) -> Path:
    path = tmp_path / "many.bin"
    records = (ProtectionShellInfo(job_run_id=i, error="e" * 100) for i in range(50000))
    path.write_bytes(b"".join(map(encode_delimited, records)))
    return path


def test_stdout_closed_early_exits_quietly(tmp_path: Path) -> None:
    args = [str(SCRIPT), "convert", "--from", "binary", "--to", "jsonl"]
    with (
        _many_records(tmp_path).open("rb") as stdin,
        subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc,
    ):
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert json.loads(proc.stdout.readline()) == {"jobRunId": 0, "error": "e" * 100}
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 141
    assert stderr == b""


def _read_until(proc: subprocess.Popen[bytes], end: bytes, timeout: float) -> bytes:
    """The process's output up to ``end``, or what came before ``timeout`` seconds passed without more.

    Reads the pipe's descriptor directly, so that nothing waits unseen in a buffer.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not data.endswith(end) and selector.select(timeout):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("source", "target"), [("jsonl", "jsonl"), ("binary", "jsonl"), ("binary", "json")])
def test_records_of_a_live_pipe_pass_through_and_ctrl_c_exits_130(source: str, target: str) -> None:
    args = [str(SCRIPT), "convert", "--from", source, "--to", target]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            proc.stdin.write(encode(source, RECORDS[:1]))
            proc.stdin.flush()  # the input stays open: the record must come out without waiting for more
            # jsonl: the line is complete; json: the array is open, the record written, the comma still to come
            output = _read_until(proc, b"\n" if target == "jsonl" else b"}", timeout=30)
            assert output, "the record was held back while the input stayed open"
            if target == "json":
                assert output.startswith(b"[\n")
                output = output[2:]
            assert json.loads(output) == EXPECTED[0]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
            assert b"Traceback" not in proc.stderr.read()
            if target == "json":  # what was accepted is kept, as a complete array
                assert proc.stdout.read() == b"\n]\n"
        finally:
            if proc.poll() is None:
                proc.kill()
