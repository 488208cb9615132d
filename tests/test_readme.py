"""The README's examples run as written, in order, and the LICENSE matches pyproject.toml.

Every ```python and ```sh block of README.md runs in turn in one empty
directory: each Python block in a fresh interpreter (so each must stand on its
own), each shell block with ``bash -eu -o pipefail`` (so every command must
succeed, or say what it expects, as ``|| echo ...`` does). A block right after
``<!-- readme-test: skip (reason) -->`` is not run; the reason must be given.

Handled explicitly, so that the examples can be written for a user:

* ``shellinfo serve ... &`` starts a server that runs until stopped: the test
  starts it itself, waits for its serving line, and stops it at the end;
* the documented address ``127.0.0.1:50051`` becomes a free port, so that the
  test never meets another server (``$SHELLINFO_ADDRESS`` says it to the
  commands that use the default); ``HOME`` and ``XDG_STATE_HOME`` are
  directories of the test's own.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
ADDRESS = "127.0.0.1:50051"
WAIT = 60.0

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\n$")
_SERVE = re.compile(r"^shellinfo serve\b(.*?)&\s*(#.*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # where the block starts in README.md, for messages
    skip: str | None


def blocks(text: str) -> list[Block]:
    found = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()]
        skip = _SKIP.search(before)
        found.append(Block(match[1], match[2], before.count("\n") + 1, skip[1] if skip else None))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
        if proc.stderr is not None:
            rest = proc.stderr.read().decode()
            proc.stderr.close()
            assert "Traceback" not in rest, rest


def test_the_readme_has_examples_and_every_skip_says_why() -> None:
    found = blocks(README.read_text())
    runnable = [b for b in found if b.language in ("python", "sh") and b.skip is None]
    assert len(runnable) >= 7, "the README's examples went missing"
    assert all(b.skip.strip() for b in found if b.skip is not None)


def test_the_readme_examples_run_in_order(tmp_path: Path, servers: list[subprocess.Popen[bytes]]) -> None:
    address = f"127.0.0.1:{free_port()}"
    work, home, state = tmp_path / "work", tmp_path / "home", tmp_path / "state"
    for path in (work, home, state):
        path.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHELLINFO_", "GRPC_"))}
    env.update(HOME=str(home), XDG_STATE_HOME=str(state), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env["SHELLINFO_ADDRESS"] = address  # where the commands look for the service by default
    ran = 0
    for block in blocks(README.read_text()):
        if block.language not in ("python", "sh") or block.skip is not None:
            continue
        code = block.code.replace(ADDRESS, address)
        where = f"README.md line {block.line}"
        if block.language == "python":
            command = [sys.executable, "-c", code]
        else:
            for match in _SERVE.finditer(code):
                servers.append(start_server(shlex.split(match[1]), address, env, work, where))
            command = ["bash", "-eu", "-o", "pipefail", "-c", _SERVE.sub("", code)]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=WAIT, check=False)
        output = f"{where}:\n{result.stdout.decode()}\n{result.stderr.decode()}"
        assert result.returncode == 0, output
        assert "Traceback" not in result.stderr.decode(), output
        ran += 1
        if "validate --from jsonl --strict" in code:  # the documented exit status of a bad record
            assert "exit status 2" in result.stdout.decode(), output
    assert ran >= 7
    assert servers, "no example started the service"


def start_server(args: list[str], address: str, env: dict[str, str], cwd: Path, where: str) -> subprocess.Popen[bytes]:
    """``shellinfo serve ARGS`` on ``address``, once it says it is serving."""
    proc = subprocess.Popen(
        [str(BIN / "shellinfo"), "serve", *args, "--address", address],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline().decode()
    assert first.startswith(f"shellinfo: serving on {address} "), f"{where}: {first}"
    return proc


def test_the_license_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text
    assert "http://www.apache.org/licenses/LICENSE-2.0" in text
