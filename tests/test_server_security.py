"""Security of shellinfo_grpc.server: bearer tokens, TLS and mutual TLS, on 127.0.0.1.

Certificates are made by the test (tests/certs.py) into a temporary
directory: a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate, and a rogue CA with a client certificate of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import Pki, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import BUF, aio_test, buf_curl

from shellinfo_grpc import from_rest
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc
from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.server import SERVICE_NAME, RunningServer, ServerConfig, TlsConfig, create_server, load_tokens
from shellinfo_grpc.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(30)

TOKENS = frozenset({"s3cret", "other-token"})
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextlib.asynccontextmanager
async def server(config: ServerConfig, store: MemoryStore | None = None) -> AsyncIterator[RunningServer]:
    running = await create_server("127.0.0.1:0", store or MemoryStore(), config)
    try:
        yield running
    finally:
        await running.stop(grace=0)


@contextlib.asynccontextmanager
async def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> AsyncIterator[grpc.aio.Channel]:
    # Each channel its own connection, so that one test's handshake never
    # reuses another's.
    options = [("grpc.use_local_subchannel_pool", 1)]
    ch = (
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=options)
    )
    try:
        yield ch
    finally:
        await ch.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- calls of each kind, as a client makes them --------------------------------------

Metadata = tuple[tuple[str, str], ...]


async def call_unary(ch: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = svc_grpc.RunUpdateServiceStub(ch)
    await stub.ListRuns(svc.ListRunsRequest(), metadata=metadata, timeout=5)


async def call_server_streaming(ch: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = svc_grpc.RunUpdateServiceStub(ch)
    call = stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True), metadata=metadata, timeout=5)
    try:
        response = await call.read()
        assert response is not grpc.aio.EOF
        assert response.snapshot_complete
    finally:
        call.cancel()


async def call_bidi(ch: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = svc_grpc.RunUpdateServiceStub(ch)
    call = stub.PublishRuns(metadata=metadata, timeout=5)
    await call.write(svc.PublishRunsRequest(source="auth", run=from_rest({"jobRunId": 1, "status": "kRunning"})))
    await call.done_writing()
    acks = []
    while (ack := await call.read()) is not grpc.aio.EOF:
        acks.append(ack)
    assert len(acks) == 1
    assert not acks[0].HasField("error")


async def open_bidi(ch: grpc.aio.Channel, metadata: Metadata) -> None:
    """Open PublishRuns and wait for an answer without writing: a refused call
    ends at once, an accepted one would wait for requests until the deadline.

    Writing a request instead would race the refusal: when the server ends the
    call first, grpc.aio reports the failed send as a local INTERNAL error and
    the server's status is lost.
    """
    stub = svc_grpc.RunUpdateServiceStub(ch)
    call = stub.PublishRuns(metadata=metadata, timeout=3)
    try:
        await call.read()
    finally:
        call.cancel()


#: Calls of each kind that succeed when the server lets them through.
CALLS = {"unary": call_unary, "server-streaming": call_server_streaming, "bidi": call_bidi}
#: Calls of each kind that show how the server refuses them.
REFUSABLE = {"unary": call_unary, "server-streaming": call_server_streaming, "bidi": open_bidi}


async def health_check(ch: grpc.aio.Channel, metadata: Metadata = ()) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), metadata=metadata, timeout=5)
    return response.status


async def expect_code(code: grpc.StatusCode, call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    return caught.value


# --- bearer tokens ---------------------------------------------------------------------

REFUSED_CREDENTIALS = {
    "none": (),
    "wrong-token": (("authorization", "Bearer wrong"),),
    "prefix-of-token": (("authorization", "Bearer s3cre"),),
    "token-with-suffix": (("authorization", "Bearer s3cretX"),),
    "empty-token": (("authorization", "Bearer "),),
    "basic-scheme": (("authorization", "Basic s3cret"),),
    "no-scheme": (("authorization", "s3cret"),),
    "token-in-other-header": (("x-token", "Bearer s3cret"),),
}
ACCEPTED_CREDENTIALS = {
    "bearer": (("authorization", "Bearer s3cret"),),
    "other-token": (("authorization", "Bearer other-token"),),
    "scheme-is-case-insensitive": (("authorization", "bearer s3cret"),),
}


@pytest.mark.parametrize("kind", list(CALLS))
@pytest.mark.parametrize("credentials", list(REFUSED_CREDENTIALS))
@aio_test
async def test_calls_without_a_valid_token_are_unauthenticated(credentials: str, kind: str) -> None:
    async with server(ServerConfig(tokens=TOKENS)) as running, channel(f"127.0.0.1:{running.port}") as ch:
        refused = REFUSABLE[kind](ch, REFUSED_CREDENTIALS[credentials])
        error = await expect_code(grpc.StatusCode.UNAUTHENTICATED, refused)
        assert "bearer" in (error.details() or "").lower()
        assert running.store.head_revision() == 0, "an unauthenticated publish was recorded"


@pytest.mark.parametrize("kind", list(CALLS))
@pytest.mark.parametrize("credentials", list(ACCEPTED_CREDENTIALS))
@aio_test
async def test_calls_with_a_valid_token_succeed(credentials: str, kind: str) -> None:
    async with server(ServerConfig(tokens=TOKENS)) as running, channel(f"127.0.0.1:{running.port}") as ch:
        await CALLS[kind](ch, ACCEPTED_CREDENTIALS[credentials])


@aio_test
async def test_health_needs_no_token() -> None:
    async with server(ServerConfig(tokens=TOKENS)) as running, channel(f"127.0.0.1:{running.port}") as ch:
        assert await health_check(ch) == SERVING
        assert await health_check(ch, (("authorization", "Bearer wrong"),)) == SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert (await watch.read()).status == SERVING
        watch.cancel()


@aio_test
async def test_no_tokens_configured_means_no_authentication() -> None:
    async with server(ServerConfig()) as running, channel(f"127.0.0.1:{running.port}") as ch:
        for call in CALLS.values():
            await call(ch, ())
        await call_unary(ch, (("authorization", "Bearer anything"),))


def test_load_tokens_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# tokens of the agents\n\n  s3cret  \n#disabled-token\n   # indented comment\nother-token\n\n",
        encoding="utf-8",
    )
    assert load_tokens(path) == TOKENS


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n  # here\n"])
def test_load_tokens_refuses_a_file_without_tokens(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError, match="no tokens"):
        load_tokens(path)


def test_load_tokens_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="token file"):
        load_tokens(tmp_path / "missing")


@aio_test
async def test_tokens_from_a_file_protect_the_server(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# one token\nfrom-file\n", encoding="utf-8")
    config = ServerConfig(tokens=load_tokens(path))
    async with server(config) as running, channel(f"127.0.0.1:{running.port}") as ch:
        await call_unary(ch, (("authorization", "Bearer from-file"),))
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, call_unary(ch, (("authorization", "Bearer s3cret"),)))


@pytest.mark.skipif(BUF is None, reason="buf is not installed (pip install buf-bin)")
@aio_test
async def test_buf_curl_with_a_token_header() -> None:
    assert BUF is not None
    async with server(ServerConfig(tokens=TOKENS)) as running:
        url = f"http://127.0.0.1:{running.port}/{SERVICE_NAME}/ListRuns"

        async def curl(*, header: str | None, reflect_header: str | None) -> tuple[int, str]:
            headers = ["-H", header] if header else []
            reflect = ["--reflect-header", reflect_header] if reflect_header else []
            code, out, err = await buf_curl(*headers, *reflect, "-d", "{}", url)
            return code, out + err

        bearer = "Authorization: Bearer s3cret"
        code, output = await curl(header=bearer, reflect_header="*")
        assert code == 0, output
        # The token on reflection but not on the call: the call is refused.
        code, output = await curl(header=None, reflect_header=bearer)
        assert code == grpc.StatusCode.UNAUTHENTICATED.value[0] << 3, output
        # Reflection is not exempt: without a token buf cannot even learn the schema.
        code, output = await curl(header=None, reflect_header=None)
        assert code != 0
        assert SERVICE_NAME in output, output


# --- TLS and mutual TLS ------------------------------------------------------------------


def tls(pki: Pki, *, mutual: bool = False) -> TlsConfig:
    return TlsConfig(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca.cert if mutual else None)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@aio_test
async def test_tls_client_trusting_the_ca_is_served(pki: Pki, host: str) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    async with server(ServerConfig(tls=tls(pki))) as running, channel(f"{host}:{running.port}", credentials) as ch:
        for call in CALLS.values():
            await call(ch, ())
        assert await health_check(ch) == SERVING


@aio_test
async def test_tls_refuses_a_plaintext_client(pki: Pki) -> None:
    async with server(ServerConfig(tls=tls(pki))) as running, channel(f"127.0.0.1:{running.port}") as ch:
        await expect_code(grpc.StatusCode.UNAVAILABLE, call_unary(ch, ()))
        assert running.store.head_revision() == 0


@aio_test
async def test_tls_client_refuses_a_server_signed_by_another_ca(pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.rogue_ca.cert_pem)
    async with server(ServerConfig(tls=tls(pki))) as running, channel(f"127.0.0.1:{running.port}", credentials) as ch:
        await expect_code(grpc.StatusCode.UNAVAILABLE, call_unary(ch, ()))


MTLS_CLIENTS = {
    "no-client-certificate": lambda pki: grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem),
    "certificate-from-rogue-ca": lambda pki: grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=pki.rogue_client.key_pem,
        certificate_chain=pki.rogue_client.cert_pem,
    ),
}


@pytest.mark.parametrize("client", list(MTLS_CLIENTS))
@pytest.mark.parametrize("kind", ["unary", "bidi"])
@aio_test
async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki: Pki, client: str, kind: str) -> None:
    credentials = MTLS_CLIENTS[client](pki)
    async with (
        server(ServerConfig(tls=tls(pki, mutual=True))) as running,
        channel(f"127.0.0.1:{running.port}", credentials) as ch,
    ):
        await expect_code(grpc.StatusCode.UNAVAILABLE, REFUSABLE[kind](ch, ()))
        assert running.store.head_revision() == 0


@aio_test
async def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=pki.client.key_pem,
        certificate_chain=pki.client.cert_pem,
    )
    async with (
        server(ServerConfig(tls=tls(pki, mutual=True))) as running,
        channel(f"localhost:{running.port}", credentials) as ch,
    ):
        for call in CALLS.values():
            await call(ch, ())
        assert running.store.head_revision() == 1


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
@aio_test
async def test_tls_with_tokens(pki: Pki, mutual: bool) -> None:
    if mutual:
        transport = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert_pem,
            private_key=pki.client.key_pem,
            certificate_chain=pki.client.cert_pem,
        )
    else:
        transport = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    with_token = grpc.composite_channel_credentials(transport, grpc.access_token_call_credentials("s3cret"))
    config = ServerConfig(tls=tls(pki, mutual=mutual), tokens=TOKENS)
    async with server(config) as running:
        target = f"127.0.0.1:{running.port}"
        async with channel(target, with_token) as ch:
            for call in CALLS.values():
                await call(ch, ())
        async with channel(target, transport) as ch:
            for call in REFUSABLE.values():
                await expect_code(grpc.StatusCode.UNAUTHENTICATED, call(ch, ()))
            assert await health_check(ch) == SERVING


class _ClosingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


@aio_test
async def test_unreadable_tls_files_are_a_configuration_error(tmp_path: Path, pki: Pki) -> None:
    config = ServerConfig(tls=TlsConfig(cert=tmp_path / "missing.crt", key=pki.server.key))
    with pytest.raises(ConfigurationError, match=r"missing\.crt"):
        await create_server("127.0.0.1:0", MemoryStore(), config)


@aio_test
async def test_a_failed_create_server_closes_the_store(tmp_path: Path, pki: Pki) -> None:
    store = _ClosingStore()
    config = ServerConfig(tls=TlsConfig(cert=tmp_path / "missing.crt", key=pki.server.key))
    with pytest.raises(ConfigurationError):
        await create_server("127.0.0.1:0", store, config)
    # The TLS files are read before the store is opened; a store that was
    # opened must have been closed again.
    assert store.closed or not store.started
