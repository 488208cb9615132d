"""Run the Node.js suite (interop/node) when ``node`` is on PATH.

The suite checks the contract from a second language (docs/contract.md): a JS
REST adapter built from the schema descriptors passes every conformance vector
both ways, and a connect-node client publishes, reads, lists, watches (with a
resume across a server restart) and decodes error details against a real
``shellinfo serve`` started with this interpreter (``SHELLINFO_PYTHON``).

Installs the pinned packages with ``npm ci`` when ``node_modules`` is missing
and generates the code with ``buf generate`` (buf from this environment).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "interop" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")

# CI sets SHELLINFO_REQUIRE_NODE=1: there a missing node is a failure, never a silent skip.
if NODE is None or NPM is None:
    if os.environ.get("SHELLINFO_REQUIRE_NODE") == "1":
        raise RuntimeError("SHELLINFO_REQUIRE_NODE=1 but node/npm are not on PATH")
    pytestmark = pytest.mark.skip(reason="skipped: node not found")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # buf (buf-bin) and this Python's scripts
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["SHELLINFO_PYTHON"] = sys.executable
    return env


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=SUITE, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def suite() -> Path:
    """The suite, installed (``npm ci``) and with its code generated (``buf generate``)."""
    assert NPM is not None
    if not (SUITE / "node_modules").is_dir():
        done = _run([NPM, "ci", "--no-audit", "--no-fund"], timeout=600)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    done = _run([NPM, "run", "--silent", "generate"], timeout=300)
    assert done.returncode == 0, f"buf generate failed:\n{done.stdout}\n{done.stderr}"
    return SUITE


@pytest.mark.parametrize("name", ["conformance", "service", "reflection"])
def test_node_suite(suite: Path, name: str) -> None:
    assert NODE is not None
    done = _run([NODE, "--test", "--test-concurrency=1", f"test/{name}.test.js"], timeout=600)
    failed = [line for line in done.stdout.splitlines() if line.lstrip().startswith("not ok")]
    assert done.returncode == 0, "\n".join([*failed, "", done.stdout[-6000:], done.stderr[-3000:]])
