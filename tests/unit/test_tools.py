"""The tool registry against the code that runs the tools, and against dpkg.

(a) Every program the host-side code invokes by name (the first element of an
argv given to subprocess, os.exec* or ktstr's own argv runners; a `which`
look-up) is in ``ktstr.tools.TOOLS``. (b) Every registry entry is installed here,
dpkg says it comes from the declared package, and ``debian-packages.txt``
installs that package (or dpkg guarantees it: Essential). CI installs the list
before the tests, so a program missing here is a real failure.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from ktstr import tools
from ktstr.errors import KtstrError
from ktstr.sessions.system import required_packages

KTSTR = Path(tools.__file__).resolve().parent
GUEST = KTSTR / "guest"
"""Runs inside the VM: its programs are the guest's (busybox applets, packed binaries)."""

SUBPROCESS_RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}
OS_RUNNER_PREFIXES = ("exec", "spawn", "posix_spawn")
PROJECT_RUNNERS = {"run_logged", "_pipe"}
"""ktstr helpers whose first argument is an argv they run."""
LOOKUPS = {"which", "require", "tool", "install_hint", "missing_message"}
"""`shutil.which` and ktstr.tools' look-ups: their first argument is a program name."""
USRMERGE_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin")


# --- (a) the code against the registry ------------------------------------------------------


@dataclass
class _Scope:
    values: dict[str, list[ast.expr]] = field(default_factory=dict)

    def bind(self, name: str, value: ast.expr) -> None:
        self.values.setdefault(name, []).append(value)


@dataclass(frozen=True)
class Invocation:
    program: str
    where: str


class _Scanner(ast.NodeVisitor):
    """Program names in one module; names resolve through assignments, defaults, constants."""

    def __init__(self, where: str, constants: dict[str, list[ast.expr]]) -> None:
        self.where = where
        self.constants = constants
        self.scopes: list[_Scope] = [_Scope()]
        self.found: list[Invocation] = []

    # Scopes: assignments and parameter defaults of each function, module-level ones.
    def visit_Module(self, node: ast.Module) -> None:
        self._bind_assignments(node, self.scopes[0])
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        scope = _Scope()
        args = node.args
        positional = [*args.posonlyargs, *args.args]
        for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults,
                                strict=True):
            scope.bind(arg.arg, default)
        for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
            if kw_default is not None:
                scope.bind(arg.arg, kw_default)
        self._bind_assignments(node, scope)
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    @staticmethod
    def _bind_assignments(node: ast.AST, scope: _Scope) -> None:
        body = [node] if not isinstance(node, (ast.Module, ast.FunctionDef,
                                                ast.AsyncFunctionDef)) else node.body
        stack: list[ast.AST] = list(body)
        while stack:  # this scope's statements, not those of nested functions
            stmt = stack.pop()
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                 ast.Lambda)):
                continue
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        scope.bind(target.id, stmt.value)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and stmt.value is not None:
                scope.bind(stmt.target.id, stmt.value)
            stack.extend(ast.iter_child_nodes(stmt))

    def _lookup(self, name: str) -> list[ast.expr]:
        for scope in reversed(self.scopes):
            if name in scope.values:
                return scope.values[name]
        return self.constants.get(name, [])

    # Resolution: an expression to the program names it can stand for.
    def _names(self, expr: ast.expr, depth: int = 0) -> set[str]:
        if depth > 8:
            return set()
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {os.path.basename(expr.value.split()[0])} if expr.value.strip() else set()
        if isinstance(expr, (ast.List, ast.Tuple)) and expr.elts:
            first = expr.elts[0]
            inner = first.value if isinstance(first, ast.Starred) else first
            return self._names(inner, depth + 1)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self._names(expr.left, depth + 1)
        if isinstance(expr, ast.Name):
            return {n for value in self._lookup(expr.id) for n in self._names(value, depth + 1)}
        return set()  # computed at run time (a path found by a look-up, sys.executable, ...)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
            func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else (
            func.id if isinstance(func, ast.Name) else "")
        runs = ((owner == "subprocess" and name in SUBPROCESS_RUNNERS)
                or (owner == "os" and name.startswith(OS_RUNNER_PREFIXES))
                or name in PROJECT_RUNNERS)
        looks_up = name in LOOKUPS and (owner in ("shutil", "tools") or owner is None)
        if (runs or looks_up) and node.args:
            for program in self._names(node.args[0]):
                self.found.append(Invocation(program, f"{self.where}:{node.lineno}"))
        self.generic_visit(node)


def _host_modules() -> Iterator[Path]:
    for path in sorted(KTSTR.rglob("*.py")):
        if GUEST not in path.parents:
            yield path


@cache
def invocations() -> tuple[Invocation, ...]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in _host_modules()}
    constants: dict[str, list[ast.expr]] = {}
    for tree in trees.values():  # module-level string constants, for imported names
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) \
                    and isinstance(stmt.value.value, str):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        constants.setdefault(target.id, []).append(stmt.value)
    found: list[Invocation] = []
    for path, tree in trees.items():
        scanner = _Scanner(str(path.relative_to(KTSTR.parent)), constants)
        scanner.visit(tree)
        found += scanner.found
    return tuple(found)


def test_scanner_sees_the_known_invocations() -> None:
    """A scanner that finds nothing would pass the next test: it must see these."""
    programs = {inv.program for inv in invocations()}
    expected = {"make", "tar", "git", "lz4", "zstd", "objcopy", "busybox", "mkfs.btrfs",
                "losetup", "mount", "umount", "qemu-system-x86_64", "setpriv", "pyenv",
                "dpkg-query", "apt-get"}
    assert expected <= programs, sorted(expected - programs)


def test_every_invoked_program_is_registered() -> None:
    unknown = sorted(f"{inv.program} ({inv.where})" for inv in invocations()
                     if inv.program not in tools.TOOLS)
    assert not unknown, ("programs the code runs but ktstr/tools.py does not register "
                         "(add each with its Debian package): " + ", ".join(unknown))


def test_scanner_resolves_names_through_scopes() -> None:
    source = (
        'BIN = "qemu-system-x86_64"\n'
        "def f(name=BIN):\n"
        "    shutil.which(name)\n"
        '    cmd = ["make", "-C", "x"]\n'
        "    run_logged([*cmd, 'all'], log)\n"
        "    def inner():\n"
        '        subprocess.run(["git", "status"])\n'
        "    subprocess.run([sys.executable, '-c', ''])\n"
        "    os.execvp('busybox', ['busybox'])\n"
    )
    scanner = _Scanner("x.py", {})
    scanner.visit(ast.parse(source))
    assert sorted(inv.program for inv in scanner.found) == [
        "busybox", "git", "make", "qemu-system-x86_64"]


# --- the registry's helpers -----------------------------------------------------------------


def test_require_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match=r"ld\.lld-19 not found .*apt-get install lld-19"):
        tools.require("ld.lld-19", path=str(tmp_path))
    (tmp_path / "ld.lld-19").symlink_to("/bin/true")
    assert tools.require("ld.lld-19", path=str(tmp_path)) == str(tmp_path / "ld.lld-19")


def test_unregistered_programs_are_refused() -> None:
    with pytest.raises(KeyError):
        tools.which("no-such-tool")


# --- (b) the registry against dpkg and the package list ------------------------------------


def _dpkg_paths(paths: list[str]) -> dict[str, set[str]]:
    """path -> owning packages, for the paths dpkg knows (`dpkg -S`; exit 1 for unknown ones)."""
    out = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True,
                         check=False).stdout
    owners: dict[str, set[str]] = {}
    for line in out.splitlines():
        if line.startswith("diversion by") or ": " not in line:
            continue
        packages, path = line.split(": ", 1)
        owners[path.strip()] = {p.strip().split(":")[0] for p in packages.split(",")}
    return owners


def _candidates(path: str) -> list[str]:
    """The program's path as found, then as resolved; each also under usrmerge's other dirs."""
    out: list[str] = []
    for p in (path, os.path.realpath(path)):
        out.append(p)
        if os.path.dirname(p) in USRMERGE_DIRS:
            out += [os.path.join(d, os.path.basename(p)) for d in USRMERGE_DIRS]
    return list(dict.fromkeys(out))


def dpkg_owner(path: str) -> set[str]:
    """Packages owning the first candidate dpkg knows: the name's own package before its
    target's (/usr/bin/gcc is gcc's, its target gcc-12's)."""
    candidates = _candidates(path)
    known = _dpkg_paths(candidates)
    return next((known[c] for c in candidates if c in known), set())


@cache
def _essential(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Essential}", package],
                         capture_output=True, text=True, check=False).stdout
    return out.strip() == "yes"


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg") is None or shutil.which("dpkg-query") is None,
                                reason="not a Debian host (no dpkg): the package list is Debian's")


@needs_dpkg
@pytest.mark.parametrize("entry", tools.required(), ids=lambda t: t.name)
def test_registered_tool_is_installed_from_a_listed_package(entry: tools.Tool) -> None:
    assert entry.package is not None
    path = tools.which(entry.name)
    if path is None:
        pytest.fail(f"{entry.name} is not installed: install {entry.package} "
                    f"({entry.install}; {entry.purpose})")
    owners = dpkg_owner(path)
    assert owners == {entry.package}, (
        f"dpkg says {path} comes from {sorted(owners) or 'no package'}, the registry says "
        f"{entry.package}")
    assert entry.package in required_packages() or _essential(entry.package), (
        f"{entry.name} comes from {entry.package}, which ktstr/sessions/debian-packages.txt "
        "does not install: add it")


@needs_dpkg
def test_every_declared_package_is_listed_or_essential() -> None:
    """The same rule without dpkg's verdict on the files: a package the list misses."""
    listed = set(required_packages())
    unlisted = sorted({t.package for t in tools.required()} - listed)
    if shutil.which("dpkg-query") is not None:
        unlisted = [p for p in unlisted if not _essential(p)]
    assert not unlisted, f"add to ktstr/sessions/debian-packages.txt: {' '.join(unlisted)}"


@needs_dpkg
def test_dpkg_owner_follows_usrmerge_and_symlinks() -> None:
    assert dpkg_owner("/usr/bin/tar") == {"tar"}     # dpkg knows it as /bin/tar
    ld_lld = shutil.which("ld.lld-19")
    if ld_lld is not None:
        assert dpkg_owner(ld_lld) == {"lld-19"}
    assert dpkg_owner("/nonexistent/program") == set()
