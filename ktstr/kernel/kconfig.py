"""Config fragments, `.config` files and the Kconfig dependency language.

`make olddefconfig` silently drops an option whose dependencies are not met.
After configuring, every option a fragment asks for is checked against the
resulting `.config`; for each one that did not survive, the Kconfig files of
the tree are read to say *why* (which `depends on` is false and which of its
symbols are unset), so the fragment can be fixed without `menuconfig`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ktstr.errors import KtstrError

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


# --------------------------------------------------------------------------- fragments


@dataclass(frozen=True)
class Fragment:
    """Options of one fragment file: name -> value, None meaning "is not set"."""

    origin: str
    options: dict[str, str | None]


def parse_fragment(text: str, origin: str = "<fragment>") -> Fragment:
    options: dict[str, str | None] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if m := _UNSET.match(line):
            options[m.group(1)] = None
            continue
        if line.startswith("#"):
            continue
        m = _SET.match(line)
        if not m or not m.group(2):
            raise KtstrError(
                f"{origin}:{lineno}: expected CONFIG_NAME=value or '# CONFIG_NAME is not set', "
                f"got {raw.strip()!r}"
            )
        options[m.group(1)] = m.group(2)
    return Fragment(origin, options)


def load_fragment(path: Path) -> Fragment:
    try:
        text = path.read_text()
    except OSError as err:
        raise KtstrError(f"cannot read config fragment {path}: {err.strerror}") from None
    return parse_fragment(text, str(path))


def merge_fragments(fragments: Iterable[Fragment]) -> dict[str, str | None]:
    """Later fragments override earlier ones, as in `merge_config.sh`."""
    merged: dict[str, str | None] = {}
    for frag in fragments:
        merged.update(frag.options)
    return merged


def render_fragment(options: dict[str, str | None]) -> str:
    lines = []
    for name, value in options.items():
        lines.append(f"# CONFIG_{name} is not set" if value is None else f"CONFIG_{name}={value}")
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> dict[str, str]:
    """The set options of a `.config` (name without CONFIG_ -> value)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
    return values


# --------------------------------------------------------------------------- Kconfig index


@dataclass
class SymbolDef:
    """One `config`/`menuconfig` definition (a symbol may have several)."""

    name: str
    location: str
    depends: list[str] = field(default_factory=list)  # own `depends on` lines
    inherited: list[str] = field(default_factory=list)  # enclosing if/menu/choice
    has_prompt: bool = False
    in_choice: bool = False

    @property
    def all_depends(self) -> list[str]:
        return self.inherited + self.depends


_ENTRY = re.compile(r"^(config|menuconfig)\s+([A-Za-z0-9_]+)\s*$")
_SOURCE = re.compile(r'^(source|osource|rsource|orsource)\s+"([^"]+)"')
_TYPE_PROMPT = re.compile(r'^(bool|tristate|string|int|hex|prompt)\s+"')
_MACRO_VAR = re.compile(r"\$\((\w+)\)")


@dataclass
class _Frame:
    kind: str  # "if" | "menu" | "choice"
    depends: list[str]


class KconfigIndex:
    """Every symbol definition reachable from the tree's top-level `Kconfig`."""

    def __init__(self, srctree: Path, arch: str = "x86") -> None:
        self.srctree = srctree
        self.variables = {"SRCARCH": arch, "ARCH": arch, "HEADER_ARCH": arch}
        self.symbols: dict[str, list[SymbolDef]] = {}
        self._stack: list[_Frame] = []
        self._seen: set[Path] = set()
        top = srctree / "Kconfig"
        if not top.is_file():
            raise KtstrError(f"{srctree} has no top-level Kconfig: not a kernel source tree")
        self._parse_file(top)

    def defs(self, name: str) -> list[SymbolDef]:
        return self.symbols.get(name, [])

    def _expand(self, text: str) -> str:
        return _MACRO_VAR.sub(lambda m: self.variables.get(m.group(1), m.group(0)), text)

    def _parse_file(self, path: Path) -> None:
        path = path.resolve()
        if path in self._seen:
            return
        self._seen.add(path)
        rel = path.relative_to(self.srctree.resolve()) if path.is_relative_to(
            self.srctree.resolve()) else path
        lines = path.read_text(errors="replace").splitlines()
        current: list[str] | None = None  # where `depends on` lines go
        entry: SymbolDef | None = None
        help_indent: int | None = None
        in_help = False
        help_base = 0
        i = 0
        while i < len(lines):
            raw = lines[i]
            lineno = i + 1
            i += 1
            while raw.endswith("\\") and i < len(lines):
                raw = raw[:-1] + " " + lines[i]
                i += 1
            expanded = raw.expandtabs(8)
            stripped = expanded.strip()
            if in_help:
                if not stripped:
                    continue
                indent = len(expanded) - len(expanded.lstrip())
                if help_indent is None:
                    if indent > help_base:
                        help_indent = indent
                        continue
                elif indent >= help_indent:
                    continue
                in_help = False
            if not stripped or stripped.startswith("#"):
                continue
            word = stripped.split(None, 1)[0]
            if word in ("help", "---help---"):
                in_help = True
                help_indent = None
                help_base = len(expanded) - len(expanded.lstrip())
                continue
            if m := _ENTRY.match(stripped):
                entry = SymbolDef(
                    name=m.group(2),
                    location=f"{rel}:{lineno}",
                    inherited=[d for frame in self._stack for d in frame.depends],
                    in_choice=any(f.kind == "choice" for f in self._stack),
                )
                self.symbols.setdefault(entry.name, []).append(entry)
                current = entry.depends
                continue
            if word == "depends" and stripped.startswith("depends on"):
                if current is not None:
                    current.append(" ".join(stripped[len("depends on"):].split()))
                continue
            if _TYPE_PROMPT.match(stripped):
                if entry is not None:
                    entry.has_prompt = True
                continue
            if m := _SOURCE.match(stripped):
                self._source(m.group(1), self._expand(m.group(2)), path)
                entry = current = None
                continue
            if word in ("if", "menu", "choice"):
                frame = _Frame(word, [])
                if word == "if":
                    frame.depends.append(" ".join(stripped[2:].split()))
                    current = None
                else:
                    current = frame.depends
                self._stack.append(frame)
                entry = None
                continue
            if word in ("endif", "endmenu", "endchoice"):
                want = {"endif": "if", "endmenu": "menu", "endchoice": "choice"}[word]
                if self._stack and self._stack[-1].kind == want:
                    self._stack.pop()
                entry = current = None
                continue
            if word in ("comment", "mainmenu"):
                entry = None
                current = []  # its `depends on` lines are not ours
                continue

    def _source(self, kind: str, target: str, including: Path) -> None:
        base = including.parent if kind in ("rsource", "orsource") else self.srctree
        paths = sorted(base.glob(target)) if any(c in target for c in "*?[") else [base / target]
        for p in paths:
            if p.is_file():  # a missing optional (or stripped) Kconfig defines nothing
                self._parse_file(p)


# --------------------------------------------------------------------------- expressions

_TOKEN = re.compile(r'\s*(\|\||&&|!=|<=|>=|[()!=<>]|"[^"]*"|\$\([^)]*\)|[A-Za-z0-9_.-]+)')


def _tokens(expr: str) -> list[str]:
    out: list[str] = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot parse Kconfig expression {expr!r}")
        out.append(m.group(1))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


_TRI = {"n": 0, "m": 1, "y": 2}


class _Eval:
    """Tristate evaluation of a `depends on` expression against a `.config`."""

    def __init__(self, tokens: list[str], config: dict[str, str]) -> None:
        self.toks = tokens
        self.pos = 0
        self.config = config

    def peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.pos]
        self.pos += 1
        return tok

    def parse_or(self) -> int:
        value = self.parse_and()
        while self.peek() == "||":
            self.take()
            value = max(value, self.parse_and())
        return value

    def parse_and(self) -> int:
        value = self.parse_not()
        while self.peek() == "&&":
            self.take()
            value = min(value, self.parse_not())
        return value

    def parse_not(self) -> int:
        if self.peek() == "!":
            self.take()
            return 2 - self.parse_not()
        return self.parse_cmp()

    def parse_cmp(self) -> int:
        if self.peek() == "(":
            self.take()
            value = self.parse_or()
            if self.peek() == ")":
                self.take()
            return value
        left = self.take()
        if self.peek() in ("=", "!=", "<", ">", "<=", ">="):
            op = self.take()
            right = self.take()
            return 2 if _compare(self.raw(left), op, self.raw(right)) else 0
        return self.tri(left)

    def raw(self, tok: str) -> str:
        if tok.startswith('"'):
            return tok.strip('"')
        if tok in _TRI:
            return tok
        return self.config.get(tok, "n" if not tok[:1].isdigit() else tok).strip('"')

    def tri(self, tok: str) -> int:
        if tok.startswith("$("):
            return 2  # a toolchain test; olddefconfig already evaluated it
        if tok in _TRI:
            return _TRI[tok]
        return _TRI.get(self.config.get(tok, "n"), 0)


def _compare(left: str, op: str, right: str) -> bool:
    try:
        a: int | str = int(left, 0)
        b: int | str = int(right, 0)
    except ValueError:
        a, b = left, right
    if op == "=":
        return a == b
    if op == "!=":
        return a != b
    if type(a) is not type(b):
        return False
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]  # type: ignore[operator]


def evaluate(expr: str, config: dict[str, str]) -> int:
    """0 (n), 1 (m) or 2 (y). Unknown toolchain macros count as true."""
    return _Eval(_tokens(expr), config).parse_or()


def expr_symbols(expr: str) -> list[str]:
    out = []
    for tok in _tokens(expr):
        if re.fullmatch(r"[A-Z_][A-Za-z0-9_]*", tok) and tok not in out:
            out.append(tok)
    return out


def blocking_symbols(expr: str, config: dict[str, str]) -> tuple[list[str], list[str]]:
    """Symbols that make `expr` false: (unset ones it needs, set ones it negates)."""
    unset: list[str] = []
    negated_set: list[str] = []
    toks = _tokens(expr)
    for i, tok in enumerate(toks):
        if not re.fullmatch(r"[A-Z_][A-Za-z0-9_]*", tok):
            continue
        is_set = config.get(tok, "n") != "n"
        if i > 0 and toks[i - 1] == "!":
            if is_set and tok not in negated_set:
                negated_set.append(tok)
        elif not is_set and tok not in unset:
            unset.append(tok)
    return unset, negated_set


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Dropped:
    name: str
    wanted: str
    got: str | None
    reason: str

    def message(self) -> str:
        got = "unset" if self.got is None else f"={self.got}"
        return f"CONFIG_{self.name}={self.wanted} was dropped (now {got}): {self.reason}"


@dataclass(frozen=True)
class Verification:
    unavailable: list[str]  # options this kernel's Kconfig does not define
    dropped: list[Dropped]

    def raise_if_dropped(self, where: str) -> None:
        if self.dropped:
            detail = "; ".join(d.message() for d in self.dropped)
            raise KtstrError(
                f"{where}: {len(self.dropped)} fragment option(s) did not survive "
                f"`make olddefconfig`: {detail}. Add the missing dependencies to the fragment"
            )


def explain(name: str, defs: list[SymbolDef], config: dict[str, str]) -> str:
    """Why a defined symbol could not take the requested value."""
    reasons: list[str] = []
    for d in defs:
        failing = []
        for expr in d.all_depends:
            try:
                ok = evaluate(expr, config) > 0
            except (ValueError, IndexError):
                ok = True
            if not ok:
                unset, negated = blocking_symbols(expr, config)
                notes = []
                if unset:
                    notes.append("unset: " + ", ".join("CONFIG_" + s for s in unset))
                if negated:
                    notes.append("set: " + ", ".join("CONFIG_" + s for s in negated))
                hint = f" ({'; '.join(notes)})" if notes else ""
                failing.append(f"depends on {expr}{hint}")
        if failing:
            reasons.append(f"{d.location} " + " and ".join(failing))
    if reasons:
        return " | ".join(reasons)
    if not any(d.has_prompt for d in defs):
        return "it has no prompt, so only other options can select it"
    if any(d.in_choice for d in defs):
        return "it is a choice member and another member of the choice was chosen"
    return "its dependencies are met; olddefconfig reset its value (check range/select)"


def verify(
    requested: Mapping[str, str | None],
    config: dict[str, str],
    index: Callable[[], KconfigIndex],
) -> Verification:
    """Compare fragment options with the final `.config`.

    `index` is called only if something is missing: parsing every Kconfig of a
    tree takes about a second, and a good configuration needs none of it.
    """
    missing = [
        (name, value)
        for name, value in requested.items()
        if value is not None and config.get(name) != value
    ]
    if not missing:
        return Verification([], [])
    idx = index()
    unavailable: list[str] = []
    dropped: list[Dropped] = []
    for name, value in missing:
        defs = idx.defs(name)
        if not defs:
            unavailable.append(name)
            continue
        dropped.append(Dropped(name, value, config.get(name), explain(name, defs, config)))
    return Verification(unavailable, dropped)
