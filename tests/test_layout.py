"""The package's layout: no import circles, and no module reaching into another's private names.

The imports are read with ``ast`` (nothing is imported), every import counts
(at the top, inside a function, under ``TYPE_CHECKING``), and the generated
code under ``_gen`` is left out: it is only ever imported. A name is private
when it starts with one underscore; a private *module* (``_status``,
``cli/_io``) may be imported by its public names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shellinfo_grpc"


@dataclass
class Layout:
    """The modules of a package, who imports whom, and the private names taken across modules."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_layout(root: Path) -> Layout:
    """Read every module of the package at ``root`` (``_gen`` left out)."""
    layout = Layout()
    for path in sorted(root.rglob("*.py")):
        if "_gen" not in path.relative_to(root).parts:
            layout.modules[_module_name(root, path)] = path
    for name, path in layout.modules.items():
        is_package = path.name == "__init__.py"
        layout.imports[name] = targets = set()
        aliases: dict[str, str] = {}  # local name -> module of the package it stands for
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in layout.modules:
                        targets.add(alias.name)
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                if base.split(".")[0] != root.name or base.startswith(f"{root.name}._gen"):
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in layout.modules:  # `from pkg import module`
                        targets.add(submodule)
                        aliases[alias.asname or alias.name] = submodule
                        continue
                    targets.add(base)
                    if _private(alias.name) and base != name:
                        layout.private.append(f"{name} imports {alias.name} from {base}")
        for node in ast.walk(tree):  # module._name, through a module imported whole
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                layout.private.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
        targets.discard(name)
    return layout


def circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(imports.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def layout() -> Layout:
    return read_layout(PACKAGE)


def test_the_package_has_no_import_circle(layout: Layout) -> None:
    assert len(layout.modules) > 10, "the package was not found"
    assert circles(layout.imports) == []


def test_no_module_imports_a_private_name_of_another(layout: Layout) -> None:
    assert layout.private == []


def test_the_stores_interface_does_not_know_its_backends(layout: Layout) -> None:
    backends = {"shellinfo_grpc.stores.memory", "shellinfo_grpc.stores.sqlite", "shellinfo_grpc.stores.nats"}
    assert not layout.imports["shellinfo_grpc.stores"] & backends
    for backend in backends:
        assert "shellinfo_grpc.stores" in layout.imports[backend]


def test_the_checks_find_a_circle_and_private_names(tmp_path: Path) -> None:
    """The checks above can fail: a package with both faults is caught."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.b import helper\n_secret = 1\n")
    (root / "b.py").write_text("def helper() -> None:\n    from pkg import a\n    return a._secret\n")
    (root / "sub" / "__init__.py").write_text("from . import _io\nfrom ._io import _write\n")
    (root / "sub" / "_io.py").write_text("def _write() -> None: ...\n")
    (root / "c.py").write_text("from pkg.sub._io import _write\nfrom pkg.a import _secret\n")
    found = read_layout(root)
    assert circles(found.imports) == [["pkg.a", "pkg.b"]]
    assert sorted(found.private) == [
        "pkg.b uses pkg.a._secret",
        "pkg.c imports _secret from pkg.a",
        "pkg.c imports _write from pkg.sub._io",
        "pkg.sub imports _write from pkg.sub._io",
    ]


def test_every_rpc_of_the_proto_is_registered_and_implemented() -> None:
    """The server registers what the service descriptor lists, each rpc implemented by the servicer."""
    from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
    from shellinfo_grpc.server import RunUpdateServicer, ServerConfig, method_handlers
    from shellinfo_grpc.stores.memory import MemoryStore

    service = svc.DESCRIPTOR.services_by_name["RunUpdateService"]
    handlers = method_handlers(RunUpdateServicer(MemoryStore(), ServerConfig()))
    assert sorted(handlers) == sorted(method.name for method in service.methods)
    for method in service.methods:
        handler = handlers[method.name]
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming,
            method.server_streaming,
        ), method.name
        # Requests reach the handler as bytes, parsed there as the method's input type
        # (so that one that does not parse is INVALID_ARGUMENT; test_server_hardening.py).
        assert handler.request_deserializer(b"\x0a\x00") == b"\x0a\x00", method.name
        # Implemented here, not inherited from the generated base that answers UNIMPLEMENTED.
        assert method.name in vars(RunUpdateServicer), f"{method.name} is not implemented"
