"""Calling the service without proto files, as docs/contract.md section 7 shows.

A real ``shellinfo serve`` (port 0, bearer token, reflection on) is called with
``buf curl --protocol grpc --http2-prior-knowledge`` in proto JSON (int64 as
strings, ``RUN_STATUS_*`` names, ``unrecognized`` nested), and the REST form is
read back with ``shellinfo get``. Also checks what a reflection client builds
its schema from: every field's ``json_name`` and the ``rest_name`` options
(issue 10.5).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TOKEN = "buf-curl-token-9c2e"
# The command line through its console-script entry point, wherever the package keeps it.
LAUNCH = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name='shellinfo'); sys.exit(ep.load()(sys.argv[1:]))"
)


def _buf() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "buf"
    found = str(candidate) if candidate.exists() else shutil.which("buf")
    assert found, "buf is a test dependency (buf-bin)"
    return found


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tokens = tmp_path_factory.mktemp("buf-curl") / "tokens.txt"
    tokens.write_text(TOKEN + "\n", encoding="utf-8")
    log = tokens.with_name("serve.log")
    argv = [sys.executable, "-c", LAUNCH, "serve", "--address", "127.0.0.1:0", "--store", "memory://"]
    with log.open("w", encoding="utf-8") as err:
        server = subprocess.Popen([*argv, "--token-file", str(tokens)], stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving on (127\.0\.0\.1:\d+)", log.read_text(encoding="utf-8"))):
            assert server.poll() is None, f"shellinfo serve exited: {log.read_text(encoding='utf-8')}"
            assert time.monotonic() < deadline, "shellinfo serve did not start in 60 s"
            time.sleep(0.05)
        yield found.group(1)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _curl(address: str, method: str, body: dict[str, object]) -> dict[str, object]:
    header = f"Authorization: Bearer {TOKEN}"
    argv = [_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-H", header]
    argv += ["--reflect-header", header, "-d", json.dumps(body)]
    done = subprocess.run(
        [*argv, f"http://{address}/shellinfo.v1.RunUpdateService/{method}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_buf_curl_publishes_and_reads_proto_json_and_shellinfo_get_shows_rest(address: str) -> None:
    run = {
        "jobRunId": "9007199254740993",
        "startTimeUsecs": "1732780800123456",
        "status": "RUN_STATUS_RUNNING",
        "unrecognized": {"extraKeys": [{"key": "timezone", "jsonValue": '"UTC"'}]},
    }
    assert _curl(address, "PublishRun", {"source": "cluster-a", "run": run}) == {"revision": "1", "changed": True}

    got = _curl(address, "GetRun", {"source": "cluster-a", "jobRunId": "9007199254740993"})
    update = got["update"]
    assert isinstance(update, dict)
    assert update["run"] == run
    assert update["revision"] == "1"

    get = ["get", "9007199254740993", "--source", "cluster-a", "--address", address, "--token", TOKEN]
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, *get],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run"] == {
        "jobRunId": 9007199254740993,
        "startTimeUsecs": 1732780800123456,
        "status": "kRunning",
        "timezone": "UTC",
    }


def test_reflection_serves_json_names_and_rest_name_options(address: str) -> None:
    """What buf curl, grpcurl and protobuf-es build their schema from (issue 10.5)."""
    with grpc.insecure_channel(address) as channel:
        intercepted = grpc.intercept_channel(channel, _BearerToken(TOKEN))
        database = ProtoReflectionDescriptorDatabase(intercepted)
        files = {}
        for name in ("shellinfo/v1/protection_shell_info.proto", "shellinfo/v1/run_update_service.proto"):
            proto = descriptor_pb2.FileDescriptorProto()
            assert database.FindFileByName(name).name == name
            proto.CopyFrom(database.FindFileByName(name))
            files[name] = proto
    missing = [
        f"{message.name}.{field.name}"
        for proto in files.values()
        for message in proto.message_type
        for field in message.field
        if not field.json_name
    ]
    assert missing == [], "fields served without json_name"
    statuses = next(e for e in files["shellinfo/v1/protection_shell_info.proto"].enum_type if e.name == "RunStatus")
    # The rest_name option (50721) travels as an extension of EnumValueOptions.
    assert all(value.options.ByteSize() > 0 for value in statuses.value if value.number != 0)


if TYPE_CHECKING:
    _Unary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _Stream = grpc.StreamStreamClientInterceptor[Any, Any]
else:  # the grpc classes are not generic at run time
    _Unary = grpc.UnaryUnaryClientInterceptor
    _Stream = grpc.StreamStreamClientInterceptor


class _BearerToken(_Unary, _Stream):
    """Adds the bearer token to every call (reflection needs it like the service)."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        replaced: Any = details._replace(metadata=[*(details.metadata or ()), *self._metadata])  # type: ignore[attr-defined]
        return cast(grpc.ClientCallDetails, replaced)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)
