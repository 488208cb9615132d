"""Write tests/golden/conformance.json, the language-neutral conformance vectors.

Run it by hand (``python tests/golden/build_conformance.py``) after adding a
case here; never to make a failing implementation pass. The expected values
are written out by hand from docs/contract.md: every expected message is built
field by field below (never through ``from_rest``), its bytes come from the
protobuf runtime's serializer, and every expected REST text and canonical
``json_value`` is typed in, so the file records the contract, not what the
codec under test happens to do.

The format is described in tests/golden/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shellinfo_grpc import ProtectionShellInfo
from shellinfo_grpc._gen.shellinfo.v1.protection_job_pb2 import ProtectionJob, UniversalId

HERE = Path(__file__).parent
OUT = HERE / "conformance.json"
LEGACY = HERE / "vectors.json"

U64_BIG = "18446744073709551617"  # 2**64 + 1: beyond int64 and beyond a double
NEG_BIG = "-1180591620717411303424"  # -(2**70)


def _extra(key: str, json_value: str) -> dict[str, str]:
    return {"key": key, "json_value": json_value}


def _hex(fields: dict[str, Any]) -> str:
    return ProtectionShellInfo(**fields).SerializeToString().hex()


# --- decode: REST text -> message bytes -> REST text ------------------------------------------
# (name, rule, rest_text, strict, message fields, rest_out)
DECODE: list[tuple[str, str, str, bool, dict[str, Any], str]] = [
    ("null-means-unset", "presence", '{"jobRunId":null,"status":null,"error":null}', True, {}, "{}"),
    (
        "zero-and-empty-are-values",
        "presence",
        '{"jobRunId":0,"startTimeUsecs":0,"endTimeUsecs":0,"error":""}',
        True,
        {"job_run_id": 0, "start_time_usecs": 0, "end_time_usecs": 0, "error": ""},
        '{"jobRunId":0,"startTimeUsecs":0,"endTimeUsecs":0,"error":""}',
    ),
    (
        "negative-zero-integer",
        "integers",
        '{"jobRunId":-0}',
        True,
        {"job_run_id": 0},
        '{"jobRunId":0}',
    ),
    (
        "int64-bounds",
        "integers",
        '{"jobRunId":-9223372036854775808,"startTimeUsecs":9223372036854775807,"endTimeUsecs":-1}',
        True,
        {"job_run_id": -(2**63), "start_time_usecs": 2**63 - 1, "end_time_usecs": -1},
        '{"jobRunId":-9223372036854775808,"startTimeUsecs":9223372036854775807,"endTimeUsecs":-1}',
    ),
    (
        "integer-beyond-2-53-exact",
        "integers",
        '{"jobRunId":9007199254740993}',
        True,
        {"job_run_id": 2**53 + 1},
        '{"jobRunId":9007199254740993}',
    ),
    (
        "key-order-in-input-does-not-matter",
        "presence",
        '{"status":"kRunning","jobRunId":7,"runType":"kFull"}',
        True,
        {"job_run_id": 7, "run_type": 2, "status": 2},
        '{"jobRunId":7,"runType":"kFull","status":"kRunning"}',
    ),
    (
        "hhmm-bounds",
        "hhmm",
        '{"startTimeHhmm":"00:00","endTimeHhmm":"23:59"}',
        True,
        {"start_time_hhmm": "00:00", "end_time_hhmm": "23:59"},
        '{"startTimeHhmm":"00:00","endTimeHhmm":"23:59"}',
    ),
    (
        "error-text-with-escapes",
        "strings",
        '{"error":"line1\\nline2\\t\\"q\\" \\\\ \\/ \\u00e9 \\ud83d\\ude00 \\u0001"}',
        True,
        {"error": 'line1\nline2\t"q" \\ / é 😀 \x01'},
        '{"error":"line1\\nline2\\t\\"q\\" \\\\ / é 😀 \\u0001"}',
    ),
    (
        "unknown-status-spelling",
        "unknown-spellings",
        '{"jobRunId":7,"status":"kReplicating"}',
        False,
        {"job_run_id": 7, "unrecognized": {"status": "kReplicating"}},
        '{"jobRunId":7,"status":"kReplicating"}',
    ),
    (
        "unknown-run-type-spelling",
        "unknown-spellings",
        '{"runType":"kHyperFull","status":"kWarning"}',
        False,
        {"status": 7, "unrecognized": {"run_type": "kHyperFull"}},
        '{"runType":"kHyperFull","status":"kWarning"}',
    ),
    (
        "spelling-is-case-sensitive",
        "unknown-spellings",
        '{"status":"ksuccess"}',
        False,
        {"unrecognized": {"status": "ksuccess"}},
        '{"status":"ksuccess"}',
    ),
    (
        "unknown-keys-kept-in-order",
        "unknown-keys",
        '{"jobRunId":1,"zeta":1,"alpha":"a","JobRunId":2,"nothing":null}',
        False,
        {
            "job_run_id": 1,
            "unrecognized": {
                "extra_keys": [
                    _extra("zeta", "1"),
                    _extra("alpha", '"a"'),
                    _extra("JobRunId", "2"),
                    _extra("nothing", "null"),
                ]
            },
        },
        '{"jobRunId":1,"zeta":1,"alpha":"a","JobRunId":2,"nothing":null}',
    ),
    (
        "unknown-keys-before-known-keys",
        "unknown-keys",
        '{"timezone":"Europe/Berlin","jobRunId":3}',
        False,
        {"job_run_id": 3, "unrecognized": {"extra_keys": [_extra("timezone", '"Europe/Berlin"')]}},
        '{"jobRunId":3,"timezone":"Europe/Berlin"}',
    ),
    (
        "unknown-key-big-integers-exact",
        "unknown-keys",
        f'{{"jobRunId":2,"big":{U64_BIG},"neg":{NEG_BIG},"beyond53":9007199254740993}}',
        False,
        {
            "job_run_id": 2,
            "unrecognized": {
                "extra_keys": [
                    _extra("big", U64_BIG),
                    _extra("neg", NEG_BIG),
                    _extra("beyond53", "9007199254740993"),
                ]
            },
        },
        f'{{"jobRunId":2,"big":{U64_BIG},"neg":{NEG_BIG},"beyond53":9007199254740993}}',
    ),
    (
        "unknown-key-floats-canonical",
        "json-value",
        '{"tiny":1E-07,"ratio":2.50,"hundred":1e2,"huge":1e21,"negzero":-0.0,"third":0.333333333333333314829616256247}',
        False,
        {
            "unrecognized": {
                "extra_keys": [
                    _extra("tiny", "1e-7"),
                    _extra("ratio", "2.5"),
                    _extra("hundred", "100"),
                    _extra("huge", "1e+21"),
                    _extra("negzero", "0"),
                    _extra("third", "0.3333333333333333"),
                ]
            }
        },
        '{"tiny":1e-7,"ratio":2.5,"hundred":100,"huge":1e+21,"negzero":0,"third":0.3333333333333333}',
    ),
    (
        "unknown-key-float-beyond-2-53-is-a-double",
        "json-value",
        '{"asFloat":9007199254740993.0,"asInteger":9007199254740993}',
        False,
        {
            "unrecognized": {
                "extra_keys": [_extra("asFloat", "9007199254740992"), _extra("asInteger", "9007199254740993")]
            }
        },
        '{"asFloat":9007199254740992,"asInteger":9007199254740993}',
    ),
    (
        "unknown-key-object-members-sorted",
        "json-value",
        '{"copyTasks":[{"target":"archive","ok":true,"ratio":2.5,"note":null}],"m":{"b":{"d":1,"c":2},"a":[]}}',
        False,
        {
            "unrecognized": {
                "extra_keys": [
                    _extra("copyTasks", '[{"note":null,"ok":true,"ratio":2.5,"target":"archive"}]'),
                    _extra("m", '{"a":[],"b":{"c":2,"d":1}}'),
                ]
            }
        },
        '{"copyTasks":[{"note":null,"ok":true,"ratio":2.5,"target":"archive"}],"m":{"a":[],"b":{"c":2,"d":1}}}',
    ),
    (
        "unknown-key-members-sorted-by-utf16",
        "json-value",
        '{"u":{"\\ufb00":2,"\\ud83d\\ude00":3,"\\u00e9":1,"z":0}}',
        False,
        {"unrecognized": {"extra_keys": [_extra("u", '{"z":0,"é":1,"😀":3,"ﬀ":2}')]}},
        '{"u":{"z":0,"é":1,"😀":3,"ﬀ":2}}',
    ),
    (
        "unknown-key-strings-canonical",
        "json-value",
        '{"s":"\\u0041\\/\\u007f\\u2028\\u001f\\b\\f\\n\\r\\t","unicode":"Z\\u00fcrich \\u2713"}',
        False,
        {
            "unrecognized": {
                "extra_keys": [
                    _extra("s", '"A/\x7f\u2028\\u001f\\b\\f\\n\\r\\t"'),
                    _extra("unicode", '"Zürich ✓"'),
                ]
            }
        },
        '{"s":"A/\x7f\u2028\\u001f\\b\\f\\n\\r\\t","unicode":"Zürich ✓"}',
    ),
    (
        "enum-number-without-spelling",
        "enum-numbers",
        '{"jobRunId":9,"status":42,"runType":99}',
        False,
        {"job_run_id": 9, "status": 42, "run_type": 99},
        '{"jobRunId":9,"runType":99,"status":42}',
    ),
    (
        "enum-number-known-reads-as-value",
        "enum-numbers",
        '{"status":5,"runType":1}',
        True,
        {"status": 5, "run_type": 1},
        '{"runType":"kRegular","status":"kSuccess"}',
    ),
    (
        "enum-number-negative-int32",
        "enum-numbers",
        '{"status":-2147483648}',
        False,
        {"status": -(2**31)},
        '{"status":-2147483648}',
    ),
    (
        "enum-number-int32-max",
        "enum-numbers",
        '{"runType":2147483647}',
        False,
        {"run_type": 2**31 - 1},
        '{"runType":2147483647}',
    ),
    (
        "enum-number-zero-reads-as-unset",
        "enum-numbers",
        '{"status":0}',
        False,
        {},
        "{}",
    ),
]

# --- encode: message bytes -> REST text -------------------------------------------------------
# (name, rule, message fields, rest_out)
ENCODE: list[tuple[str, str, dict[str, Any], str]] = [
    ("empty-message", "presence", {}, "{}"),
    (
        "unspecified-enum-writes-as-unset",
        "enum-spellings",
        {"job_run_id": 1, "run_type": 0, "status": 0},
        '{"jobRunId":1}',
    ),
    ("unknown-status-number", "enum-numbers", {"status": 11}, '{"status":11}'),
    ("unknown-run-type-number", "enum-numbers", {"run_type": 5, "status": 5}, '{"runType":5,"status":"kSuccess"}'),
    (
        "unrecognized-spellings",
        "unknown-spellings",
        {"unrecognized": {"status": "kNew", "run_type": "kNewer"}},
        '{"runType":"kNewer","status":"kNew"}',
    ),
    (
        "non-canonical-json-value-written-canonically",
        "json-value",
        {
            "job_run_id": 4,
            "unrecognized": {
                "extra_keys": [
                    _extra("tiny", "1e-07"),
                    _extra("obj", ' { "b" : 1 , "a" : [ 1.0 , "\\u0041" ] } '),
                    _extra("big", "123456789012345678901234567890"),
                ]
            },
        },
        '{"jobRunId":4,"tiny":1e-7,"obj":{"a":[1,"A"],"b":1},"big":123456789012345678901234567890}',
    ),
    (
        "extra-keys-after-known-keys",
        "unknown-keys",
        {"job_run_id": 8, "status": 2, "unrecognized": {"extra_keys": [_extra("a", "true")]}},
        '{"jobRunId":8,"status":"kRunning","a":true}',
    ),
]

# --- reject: REST text that is refused, with the REST key the error names ---------------------
# (name, rule, rest_text, strict, field)  field None = the record as a whole
REJECT: list[tuple[str, str, str, bool, str | None]] = [
    ("not-an-object-array", "record", "[]", False, None),
    ("not-an-object-string", "record", '"jobRunId"', False, None),
    ("not-an-object-null", "record", "null", False, None),
    ("integer-as-string", "integers", '{"jobRunId":"48211"}', False, "jobRunId"),
    ("integer-with-fraction", "integers", '{"jobRunId":1.0}', False, "jobRunId"),
    ("integer-with-exponent", "integers", '{"startTimeUsecs":1e3}', False, "startTimeUsecs"),
    ("integer-as-boolean", "integers", '{"endTimeUsecs":true}', False, "endTimeUsecs"),
    ("integer-above-int64", "integers", '{"jobRunId":9223372036854775808}', False, "jobRunId"),
    ("integer-below-int64", "integers", '{"startTimeUsecs":-9223372036854775809}', False, "startTimeUsecs"),
    ("integer-as-array", "integers", '{"jobRunId":[1]}', False, "jobRunId"),
    ("string-as-number", "strings", '{"error":42}', False, "error"),
    ("string-as-object", "strings", '{"error":{}}', False, "error"),
    ("hhmm-hour-24", "hhmm", '{"startTimeHhmm":"24:00"}', False, "startTimeHhmm"),
    ("hhmm-minute-60", "hhmm", '{"endTimeHhmm":"12:60"}', False, "endTimeHhmm"),
    ("hhmm-one-digit-hour", "hhmm", '{"startTimeHhmm":"7:05"}', False, "startTimeHhmm"),
    ("hhmm-seconds", "hhmm", '{"startTimeHhmm":"07:05:00"}', False, "startTimeHhmm"),
    ("hhmm-fullwidth-digits", "hhmm", '{"startTimeHhmm":"\\uff10\\uff17:05"}', False, "startTimeHhmm"),
    ("hhmm-padded", "hhmm", '{"endTimeHhmm":" 07:05"}', False, "endTimeHhmm"),
    ("hhmm-as-number", "hhmm", '{"endTimeHhmm":705}', False, "endTimeHhmm"),
    ("enum-as-boolean", "enum-spellings", '{"status":true}', False, "status"),
    ("enum-as-float", "enum-numbers", '{"status":5.0}', False, "status"),
    ("enum-as-object", "enum-spellings", '{"runType":{"k":1}}', False, "runType"),
    ("enum-number-above-int32", "enum-numbers", '{"status":2147483648}', False, "status"),
    ("enum-number-below-int32", "enum-numbers", '{"runType":-2147483649}', False, "runType"),
    ("lone-surrogate-in-error", "strings", '{"error":"\\ud800"}', False, "error"),
    ("lone-surrogate-in-unknown-value", "json-value", '{"note":"a\\udc00"}', False, "note"),
    ("unknown-value-too-deep", "json-value", '{"deep":' + "[" * 65 + "]" * 65 + "}", False, "deep"),
    ("unknown-value-number-too-long", "json-value", '{"long":1' + "0" * 100 + "}", False, "long"),
    ("unknown-value-float-overflow", "json-value", '{"inf":1e400}', False, "inf"),
    ("strict-unknown-key", "strict", '{"jobRunId":1,"timezone":"UTC"}', True, "timezone"),
    ("strict-unknown-status-spelling", "strict", '{"status":"kReplicating"}', True, "status"),
    ("strict-unknown-run-type-spelling", "strict", '{"runType":"kHyperFull"}', True, "runType"),
    ("strict-status-number-without-spelling", "strict", '{"status":42}', True, "status"),
    ("strict-run-type-number-without-spelling", "strict", '{"runType":99}', True, "runType"),
    ("strict-zero-enum-number", "strict", '{"status":0}', True, "status"),
    ("strict-unknown-null-key", "strict", '{"nothing":null}', True, "nothing"),
]

# --- json_value: text -> canonical text, or invalid -----------------------------------------
# (name, input, canonical or None, reason when invalid)
DEPTH_64 = "[" * 64 + "]" * 64
DEPTH_65 = "[" * 65 + "]" * 65
JSON_VALUE: list[tuple[str, str, str | None, str]] = [
    ("whitespace-removed", ' { "b" : 1 ,\n\t"a" : [ true , false , null ] } ', '{"a":[true,false,null],"b":1}', ""),
    ("literals", "[true,false,null]", "[true,false,null]", ""),
    ("empty-containers", '{"a":{},"b":[]}', '{"a":{},"b":[]}', ""),
    ("empty-key-sorts-first", '{"a":1,"":2}', '{"":2,"a":1}', ""),
    ("nested-sort", '{"b":{"d":1,"c":2},"a":[{"z":1,"y":2}]}', '{"a":[{"y":2,"z":1}],"b":{"c":2,"d":1}}', ""),
    ("utf16-key-order", '{"\\ufb00":2,"\\ud83d\\ude00":3,"\\u00e9":1}', '{"é":1,"😀":3,"ﬀ":2}', ""),
    ("integer-exact-beyond-double", "123456789012345678901234567890", "123456789012345678901234567890", ""),
    ("integer-negative-big", NEG_BIG, NEG_BIG, ""),
    ("integer-negative-zero", "-0", "0", ""),
    ("integer-100-characters", "-" + "9" * 99, "-" + "9" * 99, ""),
    ("float-exponent-lowercase", "1e-07", "1e-7", ""),
    ("float-exponent-uppercase", "1E-7", "1e-7", ""),
    ("float-plain-small", "0.0000001", "1e-7", ""),
    ("float-small-threshold", "0.000001", "0.000001", ""),
    ("float-exponent-integral", "1e2", "100", ""),
    ("float-fraction-zero", "100.0", "100", ""),
    ("float-fraction", "1.50", "1.5", ""),
    ("float-1e21", "1e21", "1e+21", ""),
    ("float-below-1e21", "123456789012345678901.0", "123456789012345680000", ""),
    ("float-negative-zero", "-0.0", "0", ""),
    ("float-shortest-digits", "0.1000000000000000055511151231257827", "0.1", ""),
    ("float-beyond-2-53", "9007199254740993.0", "9007199254740992", ""),
    ("float-large-exponent", "123e300", "1.23e+302", ""),
    ("float-max", "1.7976931348623157e308", "1.7976931348623157e+308", ""),
    ("float-min-subnormal", "5e-324", "5e-324", ""),
    ("float-underflow-to-zero", "1e-400", "0", ""),
    ("float-negative", "-1.5e-300", "-1.5e-300", ""),
    ("string-escapes-kept", '"\\"\\\\\\b\\f\\n\\r\\t"', '"\\"\\\\\\b\\f\\n\\r\\t"', ""),
    ("string-unicode-escapes-resolved", '"\\u0041\\u00e9\\u2713"', '"Aé✓"', ""),
    ("string-solidus-unescaped", '"a\\/b"', '"a/b"', ""),
    ("string-control-lowercase-hex", '"\\u001F\\u0000"', '"\\u001f\\u0000"', ""),
    ("string-del-and-separators-literal", '"\\u007f\\u2028\\u2029"', '"\x7f\u2028\u2029"', ""),
    ("string-surrogate-pair", '"\\uD83D\\uDE00"', '"😀"', ""),
    ("string-literal-non-ascii", '"Zürich 😀"', '"Zürich 😀"', ""),
    ("depth-64", DEPTH_64, DEPTH_64, ""),
    ("empty-text", "", None, "not one JSON value"),
    ("only-whitespace", "  ", None, "not one JSON value"),
    ("trailing-data", "1 2", None, "trailing data after the value"),
    ("trailing-comma", "[1,]", None, "not one JSON value"),
    ("leading-zero", "01", None, "not one JSON value"),
    ("leading-plus", "+1", None, "not one JSON value"),
    ("bare-fraction", ".5", None, "not one JSON value"),
    ("dot-without-digits", "1.", None, "not one JSON value"),
    ("nan", "NaN", None, "not one JSON value"),
    ("infinity", "Infinity", None, "not one JSON value"),
    ("float-overflow", "1e400", None, "number is not finite as a binary64"),
    ("negative-float-overflow", "-1.8e308", None, "number is not finite as a binary64"),
    ("duplicate-member", '{"a":1,"a":1}', None, "duplicate member name"),
    ("duplicate-member-nested", '[{"b":{"x":1,"x":2}}]', None, "duplicate member name"),
    ("duplicate-after-unescaping", '{"a":1,"\\u0061":2}', None, "duplicate member name"),
    ("unpaired-high-surrogate", '"\\ud800"', None, "unpaired surrogate"),
    ("unpaired-low-surrogate", '"x\\udc00y"', None, "unpaired surrogate"),
    ("unpaired-surrogate-in-key", '{"\\ud800":1}', None, "unpaired surrogate"),
    ("raw-control-character", '"a\x01b"', None, "not one JSON value"),
    ("bad-escape", '"\\x41"', None, "not one JSON value"),
    ("single-quotes", "'a'", None, "not one JSON value"),
    ("depth-65", DEPTH_65, None, "nesting deeper than 64"),
    ("depth-65-objects", '{"a":' * 65 + "1" + "}" * 65, None, "nesting deeper than 64"),
    ("integer-101-characters", "1" * 101, None, "number token longer than 100 characters"),
    ("float-101-characters", "0." + "1" * 99, None, "number token longer than 100 characters"),
]


# --- run_instance: a ProtectionRunInstance -> (run bytes, job bytes) -> job REST text -------------
# (name, rest_text, run fields, job fields or None for no job, job rest_out or None)
_UID_7 = {"job_uid": UniversalId(cluster_id=1, cluster_incarnation_id=2, id=7)}
RUN_INSTANCE: list[tuple[str, str, dict[str, Any], dict[str, Any] | None, str | None]] = [
    (
        "full-instance-other-keys-ignored",
        '{"jobId":7,"jobName":"vm-daily","jobUid":{"clusterId":1,"clusterIncarnationId":2,"id":7},'
        '"protectionShellInfo":{"jobRunId":9,"status":"kRunning"},"backupRun":{"x":1},"viewBoxId":5}',
        {"job_run_id": 9, "status": 2},
        {"job_id": 7, "job_name": "vm-daily", **_UID_7},
        '{"jobId":7,"jobName":"vm-daily","jobUid":{"clusterId":1,"clusterIncarnationId":2,"id":7}}',
    ),
    ("no-job-keys", '{"protectionShellInfo":{"jobRunId":1}}', {"job_run_id": 1}, None, None),
    (
        "null-job-keys-mean-unset",
        '{"jobId":null,"jobName":null,"jobUid":null,"protectionShellInfo":{"jobRunId":1}}',
        {"job_run_id": 1},
        None,
        None,
    ),
    (
        "name-only",
        '{"jobName":"_DELETED_vm-daily","protectionShellInfo":{}}',
        {},
        {"job_name": "_DELETED_vm-daily"},
        '{"jobName":"_DELETED_vm-daily"}',
    ),
    (
        "int64-extremes-and-partial-uid",
        '{"jobId":9223372036854775807,"jobUid":{"clusterIncarnationId":-9223372036854775808},'
        '"protectionShellInfo":{"jobRunId":2}}',
        {"job_run_id": 2},
        {"job_id": 2**63 - 1, "job_uid": UniversalId(cluster_incarnation_id=-(2**63))},
        '{"jobId":9223372036854775807,"jobUid":{"clusterIncarnationId":-9223372036854775808}}',
    ),
    (
        "empty-uid-is-present",
        '{"jobUid":{},"protectionShellInfo":{"jobRunId":3}}',
        {"job_run_id": 3},
        {"job_uid": UniversalId()},
        '{"jobUid":{}}',
    ),
    (
        "zero-id-and-empty-name-are-values",
        '{"jobId":0,"jobName":"","protectionShellInfo":{"jobRunId":4}}',
        {"job_run_id": 4},
        {"job_id": 0, "job_name": ""},
        '{"jobId":0,"jobName":""}',
    ),
    (
        "unicode-name",
        '{"jobId":8,"jobName":"sauvegarde \\u00e9t\\u00e9 \\ud83d\\ude00","protectionShellInfo":{"jobRunId":5}}',
        {"job_run_id": 5},
        {"job_id": 8, "job_name": "sauvegarde \u00e9t\u00e9 \U0001f600"},
        '{"jobId":8,"jobName":"sauvegarde \u00e9t\u00e9 \U0001f600"}',
    ),
]

# (name, rest_text, field)
RUN_INSTANCE_REJECT: list[tuple[str, str, str | None]] = [
    ("job-id-string", '{"jobId":"7","protectionShellInfo":{"jobRunId":1}}', "jobId"),
    ("job-id-fraction", '{"jobId":1.5,"protectionShellInfo":{"jobRunId":1}}', "jobId"),
    ("job-id-beyond-int64", '{"jobId":9223372036854775808,"protectionShellInfo":{"jobRunId":1}}', "jobId"),
    ("job-id-boolean", '{"jobId":true,"protectionShellInfo":{"jobRunId":1}}', "jobId"),
    ("job-name-number", '{"jobName":5,"protectionShellInfo":{"jobRunId":1}}', "jobName"),
    ("job-uid-not-object", '{"jobUid":[1,2,3],"protectionShellInfo":{"jobRunId":1}}', "jobUid"),
    ("job-uid-member-string", '{"jobUid":{"clusterId":"1"},"protectionShellInfo":{"jobRunId":1}}', "jobUid.clusterId"),
    ("no-shell-info", '{"jobId":7}', "protectionShellInfo"),
    ("shell-info-not-object", '{"jobId":7,"protectionShellInfo":[]}', "protectionShellInfo"),
    ("bad-key-inside-shell-info", '{"jobId":7,"protectionShellInfo":{"jobRunId":"x"}}', "jobRunId"),
    ("not-an-object", "[]", None),
]

# --- job_filter: RunFilter.job_ids against RunUpdate.job -------------------------------------------
# (name, job_ids, the update's job as REST text or None for no job, matches)
JOB_FILTER: list[tuple[str, list[int], str | None, bool]] = [
    ("empty-list-matches-every-run", [], None, True),
    ("empty-list-matches-a-run-with-a-job", [], '{"jobId":7}', True),
    ("id-in-list", [3, 7], '{"jobId":7,"jobName":"vm"}', True),
    ("id-not-in-list", [3], '{"jobId":7}', False),
    ("no-job-matches-none", [7], None, False),
    ("job-without-id-matches-none", [0, 7], '{"jobName":"vm"}', False),
    ("zero-id-is-an-id", [0], '{"jobId":0}', True),
]


def _job_hex(fields: dict[str, Any] | None) -> str | None:
    return None if fields is None else ProtectionJob(**fields).SerializeToString().hex()


def build() -> dict[str, Any]:
    """The whole vector file as a JSON-ready dictionary."""
    decode = [
        {"name": n, "rule": r, "rest_text": t, "strict": s, "hex": _hex(f), "rest_out": o}
        for n, r, t, s, f, o in DECODE
    ]
    # The cases of the older vectors.json, as decode vectors (exact REST in,
    # the same REST out). Their bytes are rebuilt from explicit fields here.
    for case in json.loads(LEGACY.read_text(encoding="utf-8")):
        if case["name"] in {"unknown-status-and-unknown-keys", "unknown-run-type"}:
            continue  # restated above with canonical json_value
        text = json.dumps(case["rest"], ensure_ascii=False, separators=(",", ":"))
        decode.append(
            {"name": f"legacy-{case['name']}", "rule": "schema", "rest_text": text, "strict": True}
            | {"hex": case["hex"], "rest_out": text}
        )
    return {
        "format": "shellinfo-conformance",
        "version": 1,
        "spec": "docs/contract.md",
        "readme": "tests/golden/README.md",
        "decode": decode,
        "encode": [{"name": n, "rule": r, "hex": _hex(f), "rest_out": o} for n, r, f, o in ENCODE],
        "reject": [{"name": n, "rule": r, "rest_text": t, "strict": s, "field": f} for n, r, t, s, f in REJECT],
        "json_value": [
            {"name": n, "input": i, "canonical": c} if c is not None else {"name": n, "input": i, "invalid": why}
            for n, i, c, why in JSON_VALUE
        ],
        "run_instance": [
            {"name": n, "rule": "run-instance", "rest_text": t, "hex": _hex(r), "job_hex": _job_hex(j), "job_out": o}
            for n, t, r, j, o in RUN_INSTANCE
        ],
        "run_instance_reject": [
            {"name": n, "rule": "run-instance", "rest_text": t, "field": f} for n, t, f in RUN_INSTANCE_REJECT
        ],
        "job_filter": [
            {"name": n, "rule": "job-filter", "job_ids": ids, "job": j, "matches": m} for n, ids, j, m in JOB_FILTER
        ],
    }


def main() -> None:
    """Write the file (UTF-8, one vector a line is not needed: indent 1 keeps diffs readable)."""
    text = json.dumps(build(), ensure_ascii=False, indent=1) + "\n"
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
