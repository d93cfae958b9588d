"""The import graph of ktstr/ keeps its layers: who may import whom, no package cycles.

Every module under ktstr/ is parsed with ``ast`` and every import that can run counts, at
any depth (imports inside functions too: a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` are for annotations only and do not. Packages and
top-level modules are the nodes of the package graph.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

KTSTR = Path(__file__).resolve().parents[2] / "ktstr"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. ktstr.guest.init
    target: str  # what it imports, e.g. ktstr.wire.frame (or a stdlib/third-party name)
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(KTSTR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (KTSTR.parent / rel).with_suffix(".py").is_file() or (KTSTR.parent / rel).is_dir()


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []
    tree = ast.parse(path.read_text(), str(path))
    # Imports under `if TYPE_CHECKING:` exist for annotations only and never run: not edges.
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # `from ktstr.x import y` names the module ktstr.x.y when y is one.
                sub = f"{target}.{alias.name}"
                out.append(Import(module, sub if _is_module(sub) else target, node.lineno))
    return out


ALL_IMPORTS = [i for p in sorted(KTSTR.rglob("*.py")) for i in imports_of(p)]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def from_package(package: str) -> list[Import]:
    return [i for i in ALL_IMPORTS if within(i.module, package)]


def test_the_parser_sees_lazy_and_relative_imports() -> None:
    """The graph is only as good as its parser: it must see imports inside functions."""
    cliargs = [i.target for i in ALL_IMPORTS if i.module == "ktstr.cliargs"]
    assert "ktstr.kernel" in cliargs  # `from ktstr.kernel import resolve_kernel` in a function
    assert "ktstr.sandbox.dispatch" in cliargs
    boot = [i.target for i in ALL_IMPORTS if i.module == "ktstr.boot"]
    assert "ktstr.vmm.vm" in boot  # `from ktstr.vmm.vm import Vm` in a function
    assert "ktstr.initramfs" in boot  # `from ktstr import initramfs`: the module, not ktstr
    assert len(ALL_IMPORTS) > 300


@pytest.mark.parametrize("package", ["ktstr.guest", "ktstr.sessions", "ktstr.testing",
                                     "ktstr.kernel", "ktstr.sandbox"])
def test_no_direct_vmm_import(package: str) -> None:
    """These reach the VMM only through the run pipeline, never by importing it."""
    bad = [str(i) for i in from_package(package) if within(i.target, "ktstr.vmm")]
    assert not bad, "\n".join(bad)


VMM_MAY_IMPORT = ("ktstr.vmm", "ktstr.wire", "ktstr.errors", "ktstr.topology", "ktstr.bzimage",
                  "ktstr.meminfo")
"""The VMM is a library: the host-guest contract and small pure modules, nothing above it."""

GUEST_MAY_IMPORT = ("ktstr.guest", "ktstr.wire", "ktstr.errors", "ktstr.topology",
                    "ktstr.cpulist", "ktstr.console")
"""Packed next to a bare interpreter: the guest runtime, the contract, small pure modules."""


def _outside(imports: list[Import], allowed: tuple[str, ...]) -> list[str]:
    return [str(i) for i in imports
            if within(i.target, "ktstr") and not any(within(i.target, a) for a in allowed)]


def test_vmm_imports_neither_guest_nor_orchestration() -> None:
    bad = _outside(from_package("ktstr.vmm"), VMM_MAY_IMPORT)
    assert not bad, "\n".join(bad)


def test_guest_imports_no_host_only_module() -> None:
    guest = from_package("ktstr.guest")
    bad = _outside(guest, GUEST_MAY_IMPORT)
    bad += [str(i) for i in guest if not within(i.target, "ktstr")
            and i.target.split(".")[0] not in sys.stdlib_module_names]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["ktstr.wire", "ktstr.console"])
def test_contract_and_console_classifier_are_standard_library_only(package: str) -> None:
    """Both sides import them, the guest next to a bare interpreter."""
    mods = from_package(package)
    bad = _outside(mods, (package,))
    bad += [str(i) for i in mods if not within(i.target, "ktstr")
            and i.target.split(".")[0] not in sys.stdlib_module_names]
    assert not bad, "\n".join(bad)


def _unit(name: str) -> str:
    """The package-graph node of a module: the package or module right under ktstr."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "ktstr"


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for i in ALL_IMPORTS:
        src, dst = _unit(i.module), _unit(i.target)
        if within(i.target, "ktstr") and src != dst and "ktstr" not in (src, dst):
            graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_package_graph_is_acyclic() -> None:
    graph = package_graph()
    assert {"vmm", "guest", "wire", "runner"} <= set(graph) | set().union(*graph.values())
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


# --- twins stay single ------------------------------------------------------------------


def defs_named(names: set[str]) -> list[str]:
    out = []
    for path in sorted(KTSTR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
                out.append(f"{module_name(path)}.{node.name}")
    return out


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"parse_cpu_list", "parse_cpulist", "parse_cpus"}, ["ktstr.cpulist.parse_cpu_list"]),
        ({"format_cpu_list", "format_cpulist"}, ["ktstr.cpulist.format_cpu_list"]),
        ({"mount_disks"}, ["ktstr.guest.disks.mount_disks"]),
        ({"checksum", "_checksum"}, ["ktstr.vmm.x86.tables.checksum"]),
        ({"host_memory_mb", "_host_memory_mb", "_mem_available_mb"},
         ["ktstr.meminfo.host_memory_mb"]),
        ({"default_busybox", "find_busybox", "_busybox"},
         ["ktstr.initramfs.busybox.default_busybox"]),
        ({"device_name", "disk_index", "disk_serial"},
         ["ktstr.wire.disks.device_name", "ktstr.wire.disks.disk_index",
          "ktstr.wire.disks.disk_serial"]),
        ({"parse_bzimage", "load_bzimage"},
         ["ktstr.bzimage.parse_bzimage", "ktstr.bzimage.load_bzimage"]),
    ],
)
def test_one_implementation_each(names: set[str], expected: list[str]) -> None:
    assert sorted(defs_named(names)) == sorted(expected)


def test_meminfo_is_read_in_one_place() -> None:
    readers = [module_name(p) for p in sorted(KTSTR.rglob("*.py"))
               if any(isinstance(n, ast.Constant) and n.value == "/proc/meminfo"
                      for n in ast.walk(ast.parse(p.read_text())))]
    assert readers == ["ktstr.meminfo"]
