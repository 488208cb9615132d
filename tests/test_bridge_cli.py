"""``shellinfo bridge`` and ``shellinfo fake-cluster`` (shellinfo_grpc.cli.bridge): the config file, the
flags, ``--once`` end to end against a FakeCluster and the real service, and both commands as processes of
the ``shellinfo`` command line.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shellinfo_grpc.cli import bridge as bridge_cli
from shellinfo_grpc.cli import build_parser
from shellinfo_grpc.client import AsyncRunUpdateClient
from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.server import create_server

# The one import of a store: the layout change moves it (stores/).
from shellinfo_grpc.stores._registry import open_store
from shellinfo_grpc.testing import API_PREFIX, FakeCluster

pytestmark = pytest.mark.timeout(90)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def aio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(fn(*args, **kwargs), 40)

        asyncio.run(bounded())

    return wrapper


# --- the config file ----------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_lists_clusters_with_defaults_and_secrets_from_files_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.password").write_text("pa55\n", encoding="utf-8")
    monkeypatch.setenv("HELIOS_KEY", "k-1")
    path = write_config(
        tmp_path,
        """
[service]
address = "127.0.0.1:6000"
token_file = "token"

[defaults]
interval = 15
lookback_hours = 48

[[cluster]]
url = "https://a.example"
username = "viewer"
password_file = "a.password"
ca_file = "ca.pem"

[[cluster]]
url = "https://helios.example"
source = "b"
api_key_env = "HELIOS_KEY"
access_cluster_id = "77"
interval = 60
num_runs = 500
""",
    )
    clusters, service = bridge_cli.load_config(path)
    a, b = clusters
    assert (a.name, a.interval, a.lookback, a.ca_file) == ("a.example", 15.0, 48 * 3600.0, tmp_path / "ca.pem")
    assert (a.credentials.username, a.credentials.password, a.credentials.domain) == ("viewer", "pa55", "LOCAL")
    assert (b.name, b.interval, b.num_runs) == ("b", 60.0, 500)
    assert (b.credentials.api_key, b.credentials.access_cluster_id) == ("k-1", "77")
    assert service == {"address": "127.0.0.1:6000", "token_file": str(tmp_path / "token")}


_SCALARS = st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.floats(allow_nan=False))
_KEYS = sorted(bridge_cli._CLUSTER_KEYS)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # TOML basic strings take JSON's escapes, but DEL (U+007F) must be escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(_KEYS), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)), value=_SCALARS)
def test_a_bad_cluster_key_or_value_names_it(tmp_path: Path, key: str, value: Any) -> None:
    kind = bridge_cli._CLUSTER_KEYS.get(key)
    fits = kind is not None and (type(value) is kind or (kind is float and type(value) in (int, float)))
    if fits:
        return  # a value of the right type: other tests cover what it means
    url = "" if key == "url" else 'url = "https://a.example"\n'
    path = write_config(tmp_path, f"[[cluster]]\n{url}{key} = {_toml_value(value)}\n")
    with pytest.raises(ConfigurationError, match=re.escape(f"cluster[0].{key}")):
        bridge_cli.load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[cluster]]\nusername = 'u'\n", r"cluster\[0\]\.url: required"),
        ("[[cluster]]\nurl = 'https://a'\nusername = 'u'\npassword_file = 'missing'\n", "password_file: cannot read"),
        ("[[cluster]]\nurl = 'https://a'\napi_key_env = 'SHELLINFO_TEST_UNSET'\n", "SHELLINFO_TEST_UNSET is unset"),
        ("[[cluster]]\nurl = 'https://a'\n", r"cluster\[0\]: credentials"),
        ("[[cluster]]\nurl = 'ftp://a'\napi_key_env = 'HOME'\n", r"cluster\[0\]: cluster URL"),
        ("[clusters]\n", "unknown table 'clusters'"),
        ("[defaults]\nusername = 'u'\n", "defaults.username: unknown key"),
        ("[service]\nport = 1\n", "service.port: unknown key"),
        ("[[cluster]\n", "not valid TOML"),
    ],
)
def test_bad_config_files_say_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bridge_cli.load_config(write_config(tmp_path, text))


# --- flags ----------------------------------------------------------------------------------------


def test_no_password_or_key_on_the_command_line() -> None:
    with pytest.raises(SystemExit):
        parse("bridge", "--cluster", "https://a", "--username", "u", "--password", "p")
    with pytest.raises(SystemExit):
        parse("bridge", "--cluster", "https://a", "--api-key", "k")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "nothing to bridge"),
        (("--username", "u"), "go with --cluster"),
        (("--cluster", "https://a"), "needs credentials"),
        (("--cluster", "https://a", "--username", "u", "--api-key-file", "k"), "not both"),
        (("--cluster", "https://a", "--api-key-file", "/nonexistent/key"), "cannot read"),
    ],
)
def test_bad_flags_are_one_line_configuration_errors(
    argv: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHELLINFO_CLUSTER_API_KEY", raising=False)
    monkeypatch.delenv("SHELLINFO_CLUSTER_PASSWORD", raising=False)
    with pytest.raises(ConfigurationError, match=message) as error:
        bridge_cli.run(parse("bridge", *argv), stderr=io.StringIO())
    assert "\n" not in str(error.value)


# --- --once end to end ------------------------------------------------------------------------------


@aio_test
async def test_once_publishes_every_run_and_says_by_its_status_whether_all_went_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await create_server("127.0.0.1:0", open_store("memory://"))
    try:
        async with FakeCluster() as cluster:
            job = cluster.add_job("vm")
            runs = {cluster.add_run(job) for _ in range(3)}
            (tmp_path / "pw").write_text("admin", encoding="utf-8")
            args = parse(
                "bridge",
                *("--cluster", cluster.url, "--source", "c1", "--username", "admin", "--password-file"),
                *(str(tmp_path / "pw"), "--once", "--address", f"127.0.0.1:{running.port}"),
            )
            err = io.StringIO()
            assert await asyncio.to_thread(bridge_cli.run, args, stderr=err) == 0
            assert "plain HTTP" in err.getvalue()
            async with AsyncRunUpdateClient(f"127.0.0.1:{running.port}") as client:
                assert {u.run.job_run_id async for u in client.list(sources="c1")} == runs

            monkeypatch.setenv("SHELLINFO_CLUSTER_PASSWORD", "wrong")
            args = parse(
                "bridge",
                *("--cluster", cluster.url, "--username", "admin", "--once"),
                *("--address", f"127.0.0.1:{running.port}"),
            )
            err = io.StringIO()
            assert await asyncio.to_thread(bridge_cli.run, args, stderr=err) == 1
            assert "wrong" not in err.getvalue()
            assert all(line.startswith("shellinfo: ") for line in err.getvalue().splitlines())
    finally:
        await running.stop(grace=0)


# --- fake-cluster as a process ----------------------------------------------------------------------


def test_fake_cluster_command_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shellinfo_grpc.cli", "fake-cluster", "--address", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"fake cluster on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        login = urllib.request.Request(
            f"{match.group(1)}{API_PREFIX}/accessTokens",
            data=json.dumps({"username": "admin", "password": "admin"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(login, timeout=10) as answer:
            assert json.load(answer)["tokenType"] == "Bearer"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --- a running bridge and SIGTERM -----------------------------------------------------------------------


@aio_test
async def test_a_running_bridge_publishes_as_runs_change_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    running = await create_server("127.0.0.1:0", open_store("memory://"))
    try:
        async with FakeCluster() as cluster, AsyncRunUpdateClient(f"127.0.0.1:{running.port}") as client:
            run = cluster.add_run(cluster.add_job("vm"), timeline=[("kRunning", 0)])
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "shellinfo_grpc.cli", "bridge", "--cluster", cluster.url, "--source", "c1"),
                *("--username", "admin"),
                *("--interval", "0.1", "--address", f"127.0.0.1:{running.port}", "--log-level", "warning"),
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "SHELLINFO_CLUSTER_PASSWORD": "admin"},
            )
            try:
                assert proc.stderr is not None
                lines: list[str] = []
                while not lines or "bridging" not in lines[-1]:
                    lines.append((await proc.stderr.readline()).decode())
                    assert lines[-1], lines
                assert f"shellinfo: bridging c1 to 127.0.0.1:{running.port}" in lines[-1]
                async with client.watch(start_revision=1) as watch:
                    statuses = []
                    async for event in watch:
                        if event.update is not None:
                            statuses.append(event.update.run.status)
                            if len(statuses) == 1:
                                cluster.set_status(run, "kSuccess")
                            else:
                                break
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 10) == 0
                rest = (await proc.stderr.read()).decode()
                assert "Traceback" not in rest
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert len(statuses) == 2
    finally:
        await running.stop(grace=0)
