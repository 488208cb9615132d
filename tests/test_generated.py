"""The committed stubs under shellinfo_grpc/_gen are exactly what the schema generates.

Also runs ``buf lint`` and ``buf format`` on proto/ (buf from PyPI, buf-bin).
Outside CI these skip when the development tools are not installed; in CI
(``CI`` set in the environment) a missing tool is a failure.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "shellinfo_grpc" / "_gen"
SCRIPT = ROOT / "scripts" / "generate_stubs.py"
REGENERATE = "regenerate with `python scripts/generate_stubs.py` (needs the 'dev' extra) and commit shellinfo_grpc/_gen"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed; CI must run this test (pip install -e '.[dev]')")
    pytest.skip(f"{what} is not installed (pip install -e '.[dev]')")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _diff(name: str, committed: bytes, generated: bytes) -> str:
    lines = difflib.unified_diff(
        committed.decode("utf-8", "replace").splitlines(),
        generated.decode("utf-8", "replace").splitlines(),
        f"committed/{name}",
        f"generated/{name}",
        lineterm="",
    )
    return "\n".join(list(lines)[:40])


def test_committed_stubs_match_the_generator(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        _missing("grpcio-tools")
    out = tmp_path / "_gen"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"generate_stubs.py failed:\n{result.stdout}{result.stderr}"
    committed, generated = _tree(GEN), _tree(out)
    problems = [f"only committed (stale, delete it): {name}" for name in sorted(committed.keys() - generated.keys())]
    problems += [f"not committed (missing): {name}" for name in sorted(generated.keys() - committed.keys())]
    problems += [
        f"differs: {name}\n{_diff(name, committed[name], generated[name])}"
        for name in sorted(committed.keys() & generated.keys())
        if committed[name] != generated[name]
    ]
    assert not problems, "shellinfo_grpc/_gen is stale; " + REGENERATE + ":\n" + "\n".join(problems)
    assert generated, "the generator wrote nothing"


def _buf() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "buf"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("buf")
    if found is None:
        _missing("buf (buf-bin)")
        raise AssertionError  # unreachable: _missing skips or fails
    return found


@pytest.mark.parametrize(
    "args",
    [pytest.param(["lint"], id="lint"), pytest.param(["format", "-d", "--exit-code"], id="format")],
)
def test_buf(args: list[str]) -> None:
    result = subprocess.run([_buf(), *args], cwd=ROOT, capture_output=True, text=True, check=False)
    hint = "  (fix with `buf format -w`)" if args[0] == "format" else ""
    assert result.returncode == 0, f"buf {' '.join(args)} failed{hint}:\n{result.stdout}{result.stderr}"
