"""The built wheel is complete and works on its own, away from the source tree."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not part of what a wheel is built from; copying them would only cost time.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*cache", ".hypothesis", ".venv", "tests", "bench"
)


def _can_build_offline() -> bool:
    """True if the installed setuptools can build the wheel without an isolated build env.

    setuptools 70.1 and later build wheels without the ``wheel`` package. An
    older one (Python 3.11's venv still installs 65.x) cannot read this
    pyproject.toml: then pip gets the build backend from PyPI instead.
    """
    try:
        major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the tree, so that the build leaves nothing in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    isolation = ["--no-build-isolation"] if _can_build_offline() else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "dist"), "."],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}{result.stderr}"
    wheels = list((tmp / "dist").glob("shellinfo_grpc-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_contains_the_typed_package_and_generated_code(wheel: Path) -> None:
    names = _names(wheel)
    assert "shellinfo_grpc/py.typed" in names
    for module in ["__init__", "errors", "rest"]:
        assert f"shellinfo_grpc/{module}.py" in names
    for generated in sorted((ROOT / "shellinfo_grpc" / "_gen").rglob("*")):
        if generated.suffix in {".py", ".pyi"}:
            assert generated.relative_to(ROOT).as_posix() in names
    pb2 = {n for n in names if n.startswith("shellinfo_grpc/_gen/shellinfo/v1/") and n.endswith("_pb2.py")}
    assert "shellinfo_grpc/_gen/shellinfo/v1/protection_shell_info_pb2.py" in pb2
    for module in pb2:
        assert module + "i" in names, f"{module} has no .pyi stub in the wheel"


def test_wheel_ships_neither_tests_nor_sources_of_other_trees(wheel: Path) -> None:
    top = {name.split("/", 1)[0] for name in _names(wheel)}
    assert top == {"shellinfo_grpc", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}


def test_unpacked_wheel_imports_and_round_trips_on_its_own(wheel: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import shellinfo_grpc
        from shellinfo_grpc import ProtectionShellInfo, from_rest, to_rest
        print(Path(shellinfo_grpc.__file__).resolve())
        data = {"jobRunId": 1, "status": "kSuccess", "error": "", "future": [2**64, 1.5]}
        msg = ProtectionShellInfo.FromString(from_rest(data).SerializeToString())
        assert to_rest(msg) == data, to_rest(msg)
        assert "grpc" not in sys.modules
        """
    )
    # -S: no site processing, so the editable install's import hook (a .pth
    # file) is not loaded; dependencies come from site-packages by path.
    site = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    env = {"PYTHONPATH": os.pathsep.join([str(unpacked), *dict.fromkeys(site)]), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    imported_from = Path(result.stdout.strip())
    assert imported_from.is_relative_to(unpacked.resolve()), imported_from
