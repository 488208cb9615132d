"""Hostile inputs for every entry point, and the properties each must keep.

Shared by ``tests/test_robustness.py`` (a bounded number of examples in CI)
and ``bench/fuzz.py`` (a million). Each ``check_*`` function takes one
generated input and raises ``AssertionError`` (or lets an unexpected exception
through) when the entry point broke its contract; it returns normally
otherwise. Keeping the properties here, next to their generators, means the
fuzzer checks exactly what the tests check.

The generators lean towards the classes of input issue 7 names: huge
integers, deep nesting, cycles, NaN and infinities, lone surrogates,
non-string keys, long strings, hostile mappings; enum numbers without a
spelling and hostile ``unrecognized`` contents in messages; truncated and
corrupt delimited streams; and request bytes that are almost valid.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from shellinfo_grpc import REST_KEYS, ProtectionShellInfo, RestDecodeError, RunStatus, RunType, from_rest, to_rest
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc._jsonvalue import canonical
from shellinfo_grpc.cli import main as cli_main
from shellinfo_grpc.errors import FramingError, RunRejected
from shellinfo_grpc.framing import encode_delimited, iter_delimited
from shellinfo_grpc.rest import rest_names
from shellinfo_grpc.rules import FINAL_STATUSES, check_storable, is_final

__all__ = [
    "CLI_FORMATS",
    "FINAL_SPELLINGS",
    "KNOWN_OPEN",
    "MAX_MESSAGE_CHARS",
    "check_cli",
    "check_framing",
    "check_from_rest",
    "check_message_line",
    "check_to_rest",
    "cli_inputs",
    "delimited_streams",
    "hostile_values",
    "int64s",
    "json_texts",
    "messages",
    "publish_runs",
    "python_records",
    "request_bytes",
    "rest_like_records",
    "sources",
    "storable_json_value",
]

#: Classes of failure that are known and open (each has a strict xfail test of
#: its own in test_robustness.py); the generic properties step around them so
#: that they keep guarding everything else. Remove an entry once its fix lands.
KNOWN_OPEN: set[str] = set()

#: The longest error message any entry point may produce, in characters.
MAX_MESSAGE_CHARS: Final = 1000
#: The formats of ``shellinfo convert`` / ``validate``.
CLI_FORMATS: Final = ("json", "jsonl", "binary")

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
STATUS_SPELLINGS: Final = tuple(rest_names(RunStatus.DESCRIPTOR).values())
RUN_TYPE_SPELLINGS: Final = tuple(rest_names(RunType.DESCRIPTOR).values())
FINAL_SPELLINGS: Final = frozenset({"kSuccess", "kFailure", "kWarning", "kCanceled", "kMissed"})

# --- building blocks ------------------------------------------------------------------


def _power(exponent: int) -> int:
    """Plus or minus 10**|exponent| (hypothesis never prints the number itself: 10**5000 has no str())."""
    power: int = 10 ** abs(exponent)
    return power if exponent > 0 else -power


def _encodable(text: str) -> bool:
    """Whether protobuf can hold ``text`` in a string field (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


int64s = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 1])
int32s = st.integers(INT32_MIN, INT32_MAX) | st.sampled_from([INT32_MIN, INT32_MAX, 0, 11, 12, 99, -1])
huge_ints = st.sampled_from([63, 64, 100, 400, 5000, -5000]).map(_power)
surrogate_texts = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=8)
control_texts = st.text(st.characters(max_codepoint=0x9F) | st.sampled_from("\u2028\u2029\ufeff\x7f\\\"'"), max_size=24)
long_texts = st.sampled_from([100, 1000, 70_000, 1 << 20]).map(lambda n: "x\n" * (n // 2))
#: Text protobuf can hold (no lone surrogates), with control characters and line breaks.
texts = st.text(max_size=24) | control_texts
#: Text of any kind, lone surrogates and very long strings included.
any_texts = texts | surrogate_texts | long_texts
sources = st.sampled_from(["", "agent-1", "b", "\u00e9t\u00e9", "x" * 300]) | st.text(max_size=12)


def _deep_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _deep_dict(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = {"a": value}
    return value


def _cycle(kind: str) -> Any:
    if kind == "list":
        items: list[Any] = [1]
        items.append(items)
        return items
    table: dict[str, Any] = {"k": 1}
    table["self"] = {"up": table}
    return table


class _StrSub(str):
    """A ``str`` subclass whose methods lie: its ``__eq__`` and ``__hash__`` are not a string's."""

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 7


class _Raises:
    """An object every conversion of which raises."""

    def __repr__(self) -> str:
        raise RuntimeError("repr refused")

    def __str__(self) -> str:
        raise RuntimeError("str refused")

    def __hash__(self) -> int:
        return 3

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq refused")


class HostileMapping(Mapping[Any, Any]):
    """A mapping whose ``items``, ``get`` or ``len`` fail or disagree with each other."""

    def __init__(self, data: dict[Any, Any], fail: str) -> None:
        self._data = data
        self._fail = fail

    def __getitem__(self, key: Any) -> Any:
        if self._fail == "getitem":
            raise KeyError(key)
        return self._data[key]

    def get(self, key: Any, default: Any = None) -> Any:
        if self._fail == "get":
            raise RuntimeError("get refused")
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[Any]:
        if self._fail == "iter":
            raise RuntimeError("iteration refused")
        return iter(self._data)

    def __len__(self) -> int:
        if self._fail == "len":
            return 10**30  # Python refuses: OverflowError
        if self._fail == "lie":
            return 0
        return len(self._data)

    def __repr__(self) -> str:
        return f"HostileMapping({self._fail})"


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats()  # NaN and infinities included
    | any_texts
    | st.binary(max_size=8)
    | st.complex_numbers(max_magnitude=10)
    | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, _StrSub("status"), ()])
    | st.builds(_Raises)
    | st.builds(object)
)
odd_keys = (
    st.sampled_from(REST_KEYS)
    | any_texts
    | st.integers()
    | st.sampled_from([None, 1.5, math.nan, True, (1, "a"), b"status", frozenset({1}), _StrSub("jobRunId")])
    | st.builds(_StrSub, st.sampled_from([*REST_KEYS, "extra", ""]))
)
specials = st.sampled_from(["deep-list", "deep-dict", "cycle-list", "cycle-dict"]).map(
    lambda kind: {
        "deep-list": lambda: _deep_list(10_000),
        "deep-dict": lambda: _deep_dict(10_000),
        "cycle-list": lambda: _cycle("list"),
        "cycle-dict": lambda: _cycle("dict"),
    }[kind]()
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(odd_keys, children, max_size=4)
        | st.builds(
            HostileMapping,
            st.dictionaries(st.sampled_from(REST_KEYS) | texts, children, max_size=3),
            st.sampled_from(["getitem", "get", "iter", "len", "lie", "none"]),
        )
    )


#: Any Python value: JSON-like, JSON-unlike and hostile.
hostile_values = st.recursive(scalars | specials, _containers, max_leaves=10)

_KNOWN_VALUES: Final[dict[str, st.SearchStrategy[Any]]] = {
    "jobRunId": int64s,
    "startTimeUsecs": int64s,
    "endTimeUsecs": int64s,
    "runType": st.sampled_from(RUN_TYPE_SPELLINGS) | int32s,
    "status": st.sampled_from(STATUS_SPELLINGS) | int32s,
    "error": texts,
    "startTimeHhmm": st.sampled_from(["00:00", "23:59", "12:30"]),
    "endTimeHhmm": st.sampled_from(["00:00", "23:59", "07:05"]),
}


@st.composite
def python_records(draw: st.DrawFn) -> Any:
    """Something ``from_rest`` may be given: mostly a dict of REST keys with good and bad values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(hostile_values)
    record: dict[Any, Any] = {}
    for known in draw(st.lists(st.sampled_from(REST_KEYS), unique=True)):
        record[known] = draw(_KNOWN_VALUES[known] if draw(st.booleans()) else hostile_values)
    for key, value in draw(st.lists(st.tuples(odd_keys | st.builds(_Raises), hostile_values), max_size=3)):
        try:
            record[key] = value
        except Exception:  # a key that cannot be hashed or compared
            continue
    if draw(st.integers(0, 5)) == 0:
        return HostileMapping(record, draw(st.sampled_from(["getitem", "get", "iter", "len", "lie", "none"])))
    return record


# --- JSON texts (json_value contents, CLI input) ---------------------------------------

_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    _json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
_odd_json = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1 2",
        "[1,]",
        '{"a":1,"a":2}',
        "",
        " ",
        "01",
        "-0",
        "1E-7",
        "1" * 101,
        "[" * 65 + "]" * 65,
        "[" * 64 + "]" * 64,
        '"\\ud800"',
        '"\\udc00x"',
        '"\x01"',
        '{"b":1,"a":[1.0,2e2,-0.0]}',
        "true false",
        "nul",
        '"unterminated',
        "[1] trailing",
        "\ufeff1",
        "0x10",
        "1e-07",
        "1.5e+300",
        '"\\u0000"',
        '{"\\ud834\\udd1e":1}',
        "[" * 10_000,
    ]
)


@st.composite
def rest_like_records(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object as a REST producer may send it: known keys, good or wrong values; unknown keys, any JSON."""
    record = {key: draw(values | json_values) for key, values in _KNOWN_VALUES.items() if draw(st.booleans())}
    for key in draw(st.lists(st.text(max_size=6), max_size=3)):
        record[key] = draw(json_values | st.sampled_from([10**99, 10**100, -(10**120), 1e308]))
    return record


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """A JSON text: valid (compact or spaced), or broken in one of the ways readers meet."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(_odd_json)
    text = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    if kind == 1:
        return text
    if kind == 2 and text:  # cut or extended
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from(["", "x", "]", "}", ",", " 1", "\x00", "\ud800"]))
    return draw(st.text(max_size=20))


# --- messages --------------------------------------------------------------------------


@st.composite
def _unrecognized(draw: st.DrawFn) -> pb.UnrecognizedRest:
    spellings = st.sampled_from([*STATUS_SPELLINGS, *RUN_TYPE_SPELLINGS, "kNewThing", ""]) | texts
    out = pb.UnrecognizedRest()
    if draw(st.booleans()):
        out.status = draw(spellings)
    if draw(st.booleans()):
        out.run_type = draw(spellings)
    keys = st.sampled_from([*REST_KEYS, "extra", "extra", "", "x\ny"]) | texts
    for key, value in draw(
        st.lists(
            st.tuples(keys, json_texts().filter(_encodable) | st.builds(canonical_or_text, json_values)), max_size=3
        )
    ):
        out.extra_keys.add(key=key, json_value=value)
    return out


def canonical_or_text(value: Any) -> str:
    """The canonical JSON text of a JSON value (its plain ``json.dumps`` text where canonical refuses it)."""
    text = json.dumps(value)
    try:
        return canonical(text)
    except RestDecodeError:
        return text


_UNKNOWN_FIELDS: Final = (
    b"",
    b"\xc8\x06\x01",  # field 105, varint 1
    b"\xfa\x06\x03abc",  # field 111, bytes
    b"\x7a\x02\x08\x01",  # unrecognized (15) holding an unknown field 1 as varint: wrong wire type for a string
)


_HHMM_LIKE: Final = st.sampled_from(["00:00", "23:59", "24:00", "1:00", ""]) | texts
#: The fields of a message besides jobRunId and unrecognized, and what they may hold (enums: any int32).
_MESSAGE_FIELDS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "start_time_usecs": int64s,
    "end_time_usecs": int64s,
    "run_type": st.integers(0, 5) | int32s,
    "status": st.integers(0, 11) | int32s,
    "error": texts,
    "start_time_hhmm": _HHMM_LIKE,
    "end_time_hhmm": _HHMM_LIKE,
}


@st.composite
def messages(draw: st.DrawFn, *, job_run_id: bool = False) -> ProtectionShellInfo:
    """A ``ProtectionShellInfo`` as a newer, older or hostile producer may write it.

    Enum numbers are any int32 (0 set explicitly, numbers without a spelling);
    ``unrecognized`` may repeat known keys and spellings and hold any text as
    ``json_value``; the bytes may carry fields this schema does not know.
    """
    msg = ProtectionShellInfo()
    if job_run_id or draw(st.booleans()):
        msg.job_run_id = draw(int64s)
    for name, values in _MESSAGE_FIELDS.items():
        if draw(st.booleans()):
            setattr(msg, name, draw(values))
    if draw(st.integers(0, 2)) == 0:
        msg.unrecognized.CopyFrom(draw(_unrecognized()))
    extra = draw(st.sampled_from(_UNKNOWN_FIELDS))
    if extra:
        with contextlib.suppress(DecodeError):
            msg.MergeFromString(extra)
    return msg


@st.composite
def publish_runs(draw: st.DrawFn) -> ProtectionShellInfo:
    """A run to publish: mostly storable ones (so that many are accepted), some hostile."""
    if draw(st.integers(0, 2)) == 0:
        return draw(messages(job_run_id=True))
    record = {key: draw(values) for key, values in _KNOWN_VALUES.items() if draw(st.booleans())}
    record["jobRunId"] = draw(st.integers(0, 40))
    record.pop("endTimeUsecs", None)
    for key in draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda k: k not in REST_KEYS), max_size=2)):
        record[key] = draw(json_values)
    if draw(st.booleans()):
        record["status"] = draw(st.sampled_from(["kRunning", "kAccepted", "kNewStatus", "kFinalizing"]))
    return from_rest(record)


# --- byte streams ---------------------------------------------------------------------


@st.composite
def delimited_streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A delimited stream: ``(bytes, number of valid records it starts with)``.

    Valid records followed by nothing, by arbitrary bytes, by a truncated
    record, a 10+ byte varint or a huge length; or arbitrary bytes alone.
    """
    records = draw(st.lists(messages(), max_size=4))
    good = b"".join(encode_delimited(m) for m in records)
    tail_kind = draw(st.integers(0, 5))
    if tail_kind == 0:
        tail = b""
    elif tail_kind == 1:
        tail = draw(st.binary(max_size=40))
    elif tail_kind == 2 and records:  # the last record cut short
        last = encode_delimited(records[-1])
        return good[: len(good) - len(last) + draw(st.integers(0, len(last) - 1))], len(records) - 1
    elif tail_kind == 3:
        tail = b"\xff" * draw(st.integers(1, 12)) + b"\x01"
    elif tail_kind == 4:
        tail = b"\xff\xff\xff\xff\x0f" + draw(st.binary(max_size=8))
    else:
        tail = draw(st.binary(max_size=400))
        return tail, 0
    return good + tail, len(records)


@st.composite
def cli_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    """``(format, standard input)`` for ``shellinfo convert``/``validate``: plausible or garbage."""
    form = draw(st.sampled_from(CLI_FORMATS))
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return form, draw(st.binary(max_size=200))
    if form == "binary" or kind == 1:
        return form, draw(delimited_streams())[0]
    records: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            msg = draw(messages())
            try:
                records.append(to_rest(msg))
            except RestDecodeError:
                records.append({"jobRunId": 1})
        elif choice == 1:
            records.append(draw(json_values))
        else:
            records.append({k: draw(v) for k, v in _KNOWN_VALUES.items() if draw(st.booleans())})
    if form == "json":
        text = json.dumps(records) if draw(st.booleans()) else json.dumps(records, indent=1)
    else:
        lines = [json.dumps(r) for r in records]
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), draw(json_texts()))
        text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n", "\n\n", " "]))
    data = text.encode("utf-8", "surrogatepass")
    if kind == 4 and data:  # one corrupt byte, or a BOM
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xef\xbb\xbf"])) + data[at + 1 :]
    elif draw(st.integers(0, 9)) == 0:
        data = b"\xef\xbb\xbf" + data
    return form, data


# --- requests -------------------------------------------------------------------------

#: The request message of every method, by method name.
REQUEST_TYPES: Final[dict[str, type[Any]]] = {
    "PublishRun": svc.PublishRunRequest,
    "PublishRuns": svc.PublishRunsRequest,
    "GetRun": svc.GetRunRequest,
    "ListRuns": svc.ListRunsRequest,
    "WatchRuns": svc.WatchRunsRequest,
}

_BAD_UTF8: Final = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80")


@st.composite
def _request_message(draw: st.DrawFn, method: str) -> Any:
    if method in ("PublishRun", "PublishRuns"):
        request = REQUEST_TYPES[method](source=draw(sources))
        if draw(st.integers(0, 4)):
            request.run.CopyFrom(draw(publish_runs()))
        return request
    if method == "GetRun":
        return svc.GetRunRequest(source=draw(sources), job_run_id=draw(int64s))
    flt = svc.RunFilter(  # enum numbers: any int32 on purpose
        sources=draw(st.lists(sources, max_size=2)),
        job_run_ids=draw(st.lists(int64s, max_size=2)),
        statuses=draw(st.lists(st.integers(0, 12) | int32s, max_size=2)),  # type: ignore[arg-type]
        run_types=draw(st.lists(st.integers(0, 5) | int32s, max_size=2)),  # type: ignore[arg-type]
    )
    if method == "ListRuns":
        token = draw(st.sampled_from(["", "!!", "e30", "W10"]) | st.text(max_size=20) | page_token_texts())
        return svc.ListRunsRequest(filter=flt, page_size=draw(int32s), page_token=token)
    return svc.WatchRunsRequest(
        filter=flt,
        start_revision=draw(st.integers(-1, 3) | int64s),
        include_snapshot=draw(st.booleans()),
        progress_interval_ms=draw(st.integers(-1, 100) | int32s),
    )


@st.composite
def page_token_texts(draw: st.DrawFn) -> str:
    """A page token as a client could forge one: base64url of any JSON text, deep nesting included."""
    import base64

    inner = draw(
        st.sampled_from(
            [
                '["a",1,"x"]',
                '["a",99999999999999999999999,""]',
                '["a",1e400,""]',
                "[" * 100_000,
                '{"a":1}',
                '["\\ud800",1,""]',
                "[1,2,3]",
                '["a",-1,""]',
                '["a",true,""]',
            ]
        )
        | json_texts()
    )
    return base64.urlsafe_b64encode(inner.encode("utf-8", "surrogatepass")).decode().rstrip("=")


@st.composite
def request_bytes(draw: st.DrawFn, method: str) -> bytes:
    """Bytes for ``method``'s request: a serialized request, mutated or not, or arbitrary bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=64))
    data: bytes = draw(_request_message(method)).SerializeToString()
    if kind == 1 and data:  # flip a byte
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == 2:  # invalid UTF-8 in a string field (field 1 is a string in GetRun and Publish*)
        bad = draw(st.sampled_from(_BAD_UTF8))
        field = b"\x0a" if method in ("PublishRun", "PublishRuns", "GetRun") else b"\x1a"
        return data + field + bytes([len(bad)]) + bad
    if kind == 3 and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


# --- properties -------------------------------------------------------------------------


def check_message_line(text: str) -> None:
    """An error message must be one printable line of bounded length."""
    assert text, "empty error message"
    assert text.isprintable(), f"error message is not one printable line: {text[:200]!r}"
    assert len(text) <= MAX_MESSAGE_CHARS, f"error message of {len(text)} characters: {text[:200]!r}..."


def storable_json_value(msg: ProtectionShellInfo) -> ProtectionShellInfo:
    """``msg`` with each ``json_value`` in canonical form: what from_rest gives back for a storable run."""
    out = ProtectionShellInfo()
    out.CopyFrom(msg)
    if out.HasField("unrecognized"):
        for extra in out.unrecognized.extra_keys:
            extra.json_value = canonical(extra.json_value)
    return out


def check_from_rest(value: Any, strict: bool = False) -> None:
    """from_rest raises only RestDecodeError with a one-line message; what it accepts is storable and round trips."""
    try:
        msg = from_rest(value, strict=strict)
    except RestDecodeError as exc:
        check_message_line(str(exc))
        if exc.field is not None:
            check_message_line(exc.field)
        return
    assert isinstance(msg, ProtectionShellInfo)
    check_storable(msg)  # what REST gave is what REST can show again
    back = to_rest(msg)
    assert from_rest(back, strict=strict) == msg
    json.dumps(back, allow_nan=False)


def _shows_final(shown: Any) -> bool:
    """Whether a REST ``status`` value is final: a final spelling, or a number from_rest reads as a final status."""
    if isinstance(shown, str):
        return shown in FINAL_SPELLINGS
    if type(shown) is int and INT32_MIN <= shown <= INT32_MAX:
        return from_rest({"status": shown}).status in FINAL_STATUSES
    return False


def check_to_rest(msg: ProtectionShellInfo) -> None:
    """to_rest raises only RestDecodeError; a storable message round trips; is_final agrees with the shown status."""
    try:
        storable = True
        check_storable(msg)
    except RunRejected as exc:
        storable = False
        check_message_line(str(exc))
    refused: RestDecodeError | None = None
    try:
        out = to_rest(msg)
    except RestDecodeError as exc:
        refused = exc
    if refused is not None:
        check_message_line(str(refused))
        assert not storable, f"to_rest refused a storable message: {refused}"
        return
    json.dumps(out, allow_nan=False)
    shown = out.get("status")
    assert is_final(msg) == _shows_final(shown), f"is_final says {is_final(msg)} but to_rest shows status {shown!r}"
    if storable:
        back = from_rest(out)
        assert back == storable_json_value(msg), (back, msg)
        assert to_rest(back) == out


class _Trickle:
    """A stream that hands out at most ``step`` bytes per read, as a pipe may."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def read(self, size: int = -1, /) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


def _read_all(source: Any) -> tuple[list[ProtectionShellInfo], FramingError | None]:
    out: list[ProtectionShellInfo] = []
    try:
        for msg in iter_delimited(source):
            out.append(msg)
    except FramingError as exc:
        return out, exc
    return out, None


def check_framing(stream: tuple[bytes, int], step: int = 3) -> None:
    """The delimited reader raises only FramingError, after delivering every record before the bad one."""
    data, valid = stream
    whole, error = _read_all(data)
    trickled, error2 = _read_all(_Trickle(data, step))
    assert whole == trickled, "bytes and a trickling stream read differently"
    assert (error is None) == (error2 is None)
    assert len(whole) >= valid, f"only {len(whole)} of the {valid} valid leading records were delivered"
    if error is not None:
        assert error2 is not None
        assert error.index == len(whole) == error2.index, (error.index, len(whole))
        assert (error.offset, error.reason) == (error2.offset, error2.reason)
        check_message_line(str(error))


_VALIDATE_SUMMARY: Final = re.compile(r"(\d+) of (\d+) records invalid")


def _run_cli(args: list[str], data: bytes) -> tuple[int, bytes, list[str]]:
    out = io.BytesIO()
    err = io.StringIO()
    code = cli_main(args, stdin=io.BytesIO(data), stdout=out, stderr=err)
    lines = err.getvalue().splitlines()
    assert "Traceback" not in err.getvalue(), err.getvalue()
    for line in lines:
        check_message_line(line)
    assert err.getvalue().endswith("\n") or not lines
    return code, out.getvalue(), lines


def check_cli(case: tuple[str, bytes], to: str = "jsonl") -> None:
    """convert and validate exit 0 or 2, say one line per problem, and agree with each other."""
    form, data = case
    code, out, lines = _run_cli(["convert", "--from", form, "--to", to], data)
    assert code in (0, 2), (code, lines)
    if code == 2:
        assert len(lines) == 1, lines
    vcode, _, vlines = _run_cli(["validate", "--from", form], data)
    assert vcode in (0, 2), (vcode, vlines)
    assert vcode == code, f"convert exits {code} ({lines}) but validate exits {vcode} ({vlines})"
    if vlines and (match := _VALIDATE_SUMMARY.fullmatch(vlines[-1])):
        assert int(match[1]) == len(vlines) - 1, vlines
    if code == 0:  # what convert wrote reads back, and binary loses nothing
        back, again, _ = _run_cli(["convert", "--from", to, "--to", "binary"], out)
        assert back == 0, f"convert --from {form} --to {to} accepted input that --from {to} refuses"
        code3, via_binary, _ = _run_cli(["convert", "--from", "binary", "--to", to], again)
        assert code3 == 0
        assert via_binary == out


# --- the server target ------------------------------------------------------------------

SERVICE: Final = "/shellinfo.v1.RunUpdateService/"
#: Status codes a request may never end with: they mean the server did not handle it.
UNHANDLED: Final = frozenset({"UNKNOWN", "INTERNAL"})


class ServerThread:
    """A real server on 127.0.0.1:0 on an event loop of its own thread, with a raw channel to it.

    The raw channel has identity serializers, so any bytes reach the
    server's request parsing; ``stub`` is a typed stub for the follow-up reads.
    """

    def __init__(self, store_url: str = "memory://") -> None:
        import asyncio
        import threading

        import grpc

        from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc
        from shellinfo_grpc.server import create_server
        from shellinfo_grpc.stores._registry import open_store

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="robustness-server", daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(
            create_server("127.0.0.1:0", open_store(store_url)), self.loop
        ).result(30)
        self.address = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = svc_grpc.RunUpdateServiceStub(self.channel)
        self._grpc = grpc

    def raw(self, method: str, data: list[bytes], timeout: float = 5.0) -> tuple[str, str, list[bytes]]:
        """Send ``data`` (one request, or a stream of them for PublishRuns) as is; return (code, details, responses)."""
        grpc = self._grpc
        path = SERVICE + method
        responses: list[bytes] = []
        try:
            if method == "PublishRuns":
                call = self.channel.stream_stream(path, None, None)
                responses.extend(call(iter(data), timeout=timeout))
            elif method == "WatchRuns":
                stream = self.channel.unary_stream(path, None, None)(data[0], timeout=0.2)
                responses.extend(stream)
            else:
                responses.append(self.channel.unary_unary(path, None, None)(data[0], timeout=timeout))
        except grpc.RpcError as exc:
            code = exc.code()
            if method == "WatchRuns" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "OK", "", responses
            return code.name, exc.details() or "", responses
        return "OK", "", responses

    def close(self) -> None:
        import asyncio

        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _parses(method: str, data: list[bytes]) -> bool:
    try:
        for item in data:
            REQUEST_TYPES[method].FromString(item)
    except DecodeError:
        return False
    return True


def check_request(server: ServerThread, method: str, data: list[bytes]) -> None:
    """Whatever the bytes, the call ends with a status the service chose: never UNKNOWN or INTERNAL."""
    code, details, _ = server.raw(method, data)
    assert code not in UNHANDLED, f"{method} ended {code}: {details!r} for request bytes {[d.hex() for d in data]}"
    if code != "OK":
        assert details, code
        assert details.isprintable(), (code, details)


def check_published(server: ServerThread, source: str, run: ProtectionShellInfo) -> None:
    """An accepted run is readable back through GetRun, ListRuns and WatchRuns, and its REST form round trips."""
    grpc = server._grpc
    refused: Any = None
    try:
        ack = server.stub.PublishRun(svc.PublishRunRequest(source=source, run=run), timeout=5)
    except grpc.RpcError as exc:
        refused = exc
    if refused is not None:  # refused for its form, or a final run changed
        assert refused.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), refused
        check_message_line(refused.details())
        return
    got = server.stub.GetRun(svc.GetRunRequest(source=source, job_run_id=run.job_run_id), timeout=5).update
    assert got.source == source
    stored = got.run
    if ack.changed:
        assert got.revision == ack.revision
        assert stored == storable_json_value(run) or stored == run, (stored, run)
    check_storable(stored)
    assert from_rest(to_rest(stored)) == storable_json_value(stored)
    flt = svc.RunFilter(sources=[source], job_run_ids=[run.job_run_id])
    page = server.stub.ListRuns(svc.ListRunsRequest(filter=flt), timeout=5)
    assert [u.revision for u in page.updates] == [got.revision]
    watch: Any = server.stub.WatchRuns(svc.WatchRunsRequest(filter=flt, start_revision=got.revision), timeout=5)
    try:
        first = next(iter(watch))
    finally:
        watch.cancel()
    assert first.updates
    assert first.updates[0].revision == got.revision
    assert first.updates[0].run == stored
