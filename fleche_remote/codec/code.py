"""Code digests: a function's code, and the user code it reaches, as one key part.

A result is only as good as the code that computed it, so an unpinned
``@cached`` function files its calls under a digest of that code. This
module computes it, with no I/O beyond reading source files.

Design rules:

* **Tokens, not text, not bytecode.** The source (``inspect.getsource``,
  dedented) is tokenized; comments, blank lines, line continuations,
  indentation width, decorators and docstrings are dropped, ``NEWLINE`` /
  ``INDENT`` / ``DEDENT`` stay as structure markers, and a plain string
  literal counts by its value (quote style is formatting). Any other
  token change is a new digest. Bytecode and ``ast.dump`` differ between
  Python versions; tokens of the same file do not, once f-strings (one
  ``STRING`` token up to 3.11, ``FSTRING_*`` tokens from 3.12) are
  rebuilt into their exact source text. So 3.9 and 3.13 agree.
* **User code only.** Names the source uses (``NAME`` tokens, resolved in
  the function's globals and closure cells; ``mod.attr`` through a user
  module) are followed into helper functions and classes, and module-level
  constants (immutable plain data) are hashed by value, but only in the user's own
  modules: a module is the user's unless its file lies under the standard
  library or an installed-packages directory (``__main__`` and notebook
  cells are always the user's). Installed packages enter only by version,
  and only when asked for (``hash_code="deps"``).
* **Bounded.** The walk stops at :data:`MAX_DEPTH` levels and
  :data:`MAX_PARTS` parts, and visits each part once (cycles are fine).
* **Explainable.** The digest is a hash of named parts (``module.qualname``
  for code, ``module.NAME`` for a constant), each kept as a short digest,
  so a changed key can be explained by which part changed.
"""

from __future__ import annotations

import ast
import inspect
import io
import keyword
import logging
import os
import sys
import sysconfig
import textwrap
import tokenize
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .digest import digest_of

log = logging.getLogger("fleche_remote.code")

#: Levels of helpers followed below the function itself: a helper's helper's
#: helper still counts; code that far away rarely decides a result alone,
#: and a bound keeps a huge code base from costing seconds at first call.
MAX_DEPTH = 8

#: Parts (functions, classes, constants) hashed per function at most.
MAX_PARTS = 200

#: Items a module-level tuple may hold to be hashed as a constant: a lookup
#: table is a constant, a data set loaded at import is not.
MAX_CONSTANT_ITEMS = 10_000

#: Hex characters of each part's digest kept in metadata (48 bits: enough to
#: tell a changed part, small enough to show).
SHORT = 12

#: Parts of a path that mark installed packages, whatever the layout.
_INSTALLED_DIRS = ("site-packages", "dist-packages")

#: What the traversal marks a part with when its code cannot be read.
NO_SOURCE = "no-source"


@dataclass(frozen=True)
class CodeDigest:
    """What a function's code contributes to its key.

    Attributes:
        digest: hex SHA-256 over every part.
        parts: part name -> short digest (what metadata keeps).
        source_found: False when the function's own source could not be
            read (then the caller falls back to the name alone).
    """

    digest: str
    parts: Dict[str, str] = field(default_factory=dict)
    source_found: bool = True

    @property
    def token(self) -> str:
        """The version string keys and records carry: ``code:`` + 32 hex."""
        return "code:" + self.digest[:32]

    def metadata(self) -> Dict[str, Any]:
        """Plain data for a saved call's metadata."""
        return {"digest": self.digest[:32], "parts": dict(self.parts)}


# -- normalising source ---------------------------------------------------

Token = Tuple[str, Any]
_FSTRING_START = getattr(tokenize, "FSTRING_START", -1)
_FSTRING_END = getattr(tokenize, "FSTRING_END", -1)


def _char_col(lines: Sequence[str], row: int, byte_col: int) -> int:
    # ast counts columns in UTF-8 bytes, tokenize in characters
    line = lines[row - 1] if row - 1 < len(lines) else ""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", "replace"))


def _text(lines: Sequence[str], start: Tuple[int, int], end: Tuple[int, int]) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0 : r1 - 1]) + lines[r1 - 1][:c1]


def _strip_first_indent(source: str) -> str:
    # dedent fails when a string's continuation lines are less indented than
    # the def; strip the def's own indentation wherever a line has it
    lines = source.splitlines(keepends=True)
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    return "".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)


def _prepare(source: str) -> Tuple[str, ast.Module]:
    source = textwrap.dedent(source)
    if not source.endswith("\n"):
        source += "\n"
    try:
        return source, ast.parse(source)
    except SyntaxError:
        source = _strip_first_indent(source)
        return source, ast.parse(source)


def normalized_tokens(source: str) -> List[Token]:
    """The tokens of ``source`` that decide what the code does (see the module notes).

    Raises:
        SyntaxError: ``source`` is not Python (e.g. part of a lambda's line).
    """
    source, tree = _prepare(source)
    lines = source.splitlines(keepends=True)
    start_at = (0, 0)
    first = tree.body[0] if tree.body else None
    if isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and first.decorator_list:
        # decorators are how the function is wrapped (its cache, its
        # options), not what it computes
        start_at = (first.lineno, _char_col(lines, first.lineno, first.col_offset))
    docstrings: List[Tuple[Tuple[int, int], Tuple[int, int]]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            doc = node.body[0]
            if (
                isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
                and doc.end_lineno is not None
                and doc.end_col_offset is not None
            ):
                docstrings.append(
                    (
                        (doc.lineno, _char_col(lines, doc.lineno, doc.col_offset)),
                        (doc.end_lineno, _char_col(lines, doc.end_lineno, doc.end_col_offset)),
                    )
                )
    out: List[Token] = []
    depth = 0
    fstring_start = (0, 0)
    after_docstring = False
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start < start_at:
            continue
        if depth:  # inside a 3.12+ f-string: its text is taken whole at the end
            if tok.type == _FSTRING_START:
                depth += 1
            elif tok.type == _FSTRING_END:
                depth -= 1
                if not depth:
                    out.append(("F", _text(lines, fstring_start, tok.end)))
            continue
        if tok.type in skipped:
            continue
        if any(a <= tok.start and tok.end <= b for a, b in docstrings):
            after_docstring = True
            continue
        if after_docstring:
            after_docstring = False
            if tok.type == tokenize.NEWLINE or (tok.type == tokenize.OP and tok.string == ";"):
                continue
        if tok.type == _FSTRING_START:
            depth, fstring_start = 1, tok.start
        elif tok.type == tokenize.NEWLINE:
            out.append(("\n", ""))
        elif tok.type == tokenize.INDENT:
            out.append((">", ""))
        elif tok.type == tokenize.DEDENT:
            out.append(("<", ""))
        elif tok.type == tokenize.STRING:
            out.append(_string(tok.string))
        elif tok.type == tokenize.NAME:
            out.append(("N", tok.string))
        elif tok.type == tokenize.NUMBER:
            out.append(("#", tok.string))
        elif tok.type == tokenize.OP:
            out.append(("O", tok.string))
        elif tok.string.strip():
            out.append(("?", tok.string))
    return out


def _string(text: str) -> Token:
    prefix = text[: min(i for i in (text.find("'"), text.find('"')) if i >= 0)].lower()
    if "f" in prefix:
        return ("F", text)  # up to 3.11 an f-string is one token: its exact text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ("?", text)
    return ("B", value) if isinstance(value, bytes) else ("S", value)


def _references(tokens: Sequence[Token]) -> List[Tuple[str, ...]]:
    """Dotted names the code uses (``a``, ``a.b.c``), in order of first use."""
    seen: Dict[Tuple[str, ...], None] = {}
    state = _declared_global(tokens)
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "F":
            for chain in _fstring_references(text):
                seen.setdefault(chain)
        elif kind == "N" and not keyword.iskeyword(text) and (i == 0 or tokens[i - 1] != ("O", ".")):
            dotted: List[str] = [text]
            while i + 2 < len(tokens) and tokens[i + 1] == ("O", ".") and tokens[i + 2][0] == "N":
                dotted.append(tokens[i + 2][1])
                i += 2
            if text not in state:
                seen.setdefault(tuple(dotted))
        i += 1
    return list(seen)


def _declared_global(tokens: Sequence[Token]) -> Set[str]:
    # a name the code rebinds (``global n``) is state, not a constant
    names: Set[str] = set()
    for i, tok in enumerate(tokens):
        if tok == ("N", "global"):
            for kind, text in tokens[i + 1 :]:
                if kind == "N":
                    names.add(text)
                elif kind != "O":
                    break
    return names


def _fstring_references(text: str) -> List[Tuple[str, ...]]:
    # an f-string's expressions are one token up to 3.11: read them from its
    # syntax tree, the same on every version
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return []
    chains: Set[Tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            chains.add((node.id,))
        elif isinstance(node, ast.Attribute):
            parts = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                chains.add((value.id, *reversed(parts)))
    return sorted(chains)


# -- whose code is it -------------------------------------------------------

_roots: Optional[Tuple[str, ...]] = None


def _installed_roots() -> Tuple[str, ...]:
    global _roots
    if _roots is None:
        paths = sysconfig.get_paths()
        found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
        _roots = tuple(sorted(os.path.join(os.path.realpath(p), "") for p in found))
    return _roots


def is_user_module(name: Optional[str], filename: Optional[str] = None) -> bool:
    """Whether code of module ``name`` (file ``filename``) is the user's own.

    ``__main__`` (a script, a notebook) is; fleche_remote is not; otherwise
    a module is the user's when its file is known and lies outside the
    standard library and every installed-packages directory.
    """
    if name == "__main__":
        return True
    if not name or name == "fleche_remote" or name.startswith("fleche_remote."):
        return False
    if filename is None:
        filename = getattr(sys.modules.get(name), "__file__", None)
    if not filename or filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    if any(part in _INSTALLED_DIRS for part in path.split(os.sep)):
        return False
    return not path.startswith(_installed_roots())


def _is_stdlib(module: types.ModuleType) -> bool:
    filename = getattr(module, "__file__", None)
    if not filename:
        return True  # built into the interpreter
    path = os.path.realpath(filename)
    paths = sysconfig.get_paths()
    std = tuple(os.path.join(os.path.realpath(paths[k]), "") for k in ("stdlib", "platstdlib") if k in paths)
    return path.startswith(std) and not any(p in _INSTALLED_DIRS for p in path.split(os.sep))


def _package_version(top: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(top)
    except Exception:  # the import name need not be a distribution's
        version = getattr(sys.modules.get(top), "__version__", None)
        return str(version) if version is not None else "unknown"


# -- the walk -----------------------------------------------------------------


def _is_constant(value: Any, budget: List[int]) -> bool:
    """Whether ``value`` is immutable plain data, hashed as a constant.

    Lists, dicts, sets and arrays are left out: the program can change
    them, and a counter or a memo in the key would give every run new
    keys (found the hard way: ``CALLS = {"count": 0}``). A table meant as
    a constant can be a tuple or a frozenset."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    t = type(value)
    if value is None or t in (bool, int, float, complex, str, bytes):
        return True
    if t in (tuple, frozenset):
        return all(_is_constant(v, budget) for v in value)
    import enum

    return isinstance(value, enum.Enum)


def _source_of(obj: Any) -> Optional[str]:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def _source_digest(source: str) -> Tuple[str, List[Tuple[str, ...]]]:
    try:
        tokens = normalized_tokens(source)
    except (SyntaxError, tokenize.TokenError, ValueError):
        # not parseable alone (a lambda in the middle of a line): its text
        # still names exactly this code
        return digest_of(("text", source.strip())), []
    return digest_of(("tokens", tokens)), _references(tokens)


class _Walk:
    def __init__(self, deps: bool) -> None:
        self.deps = deps
        self.parts: Dict[str, str] = {}
        self.packages: Dict[str, str] = {}
        self.truncated = False

    def add(self, label: str, digest: str) -> bool:
        if label in self.parts:
            return False
        if len(self.parts) >= MAX_PARTS:
            self.truncated = True
            return False
        self.parts[label] = digest
        return True

    def code(self, label: str, obj: Any, scope: Callable[[], Dict[str, Any]], depth: int) -> None:
        """Hash ``obj``'s source as part ``label`` and follow what it names."""
        if label in self.parts:
            return
        source = _source_of(obj)
        if source is None:
            self.add(label, NO_SOURCE)
            return
        digest, refs = _source_digest(source)
        if not self.add(label, digest):
            return
        if depth >= MAX_DEPTH:
            self.truncated = self.truncated or bool(refs)
            return
        names = scope()
        for chain in refs:
            self.reference(chain, names, label, depth + 1)

    def reference(self, chain: Tuple[str, ...], names: Dict[str, Any], owner: str, depth: int) -> None:
        base = chain[0]
        if base not in names:
            return  # a local, a parameter or a builtin
        obj = names[base]
        label = f"{names.get('__name__', owner)}.{base}"
        for attr in chain[1:]:
            if not (isinstance(obj, types.ModuleType) and is_user_module(obj.__name__)):
                break
            if not hasattr(obj, attr):
                return
            label, obj = f"{obj.__name__}.{attr}", getattr(obj, attr)
        self.value(label, obj, depth)

    def value(self, label: str, obj: Any, depth: int) -> None:
        pinned = getattr(obj, "__fleche_code__", None)
        if pinned is not None and not isinstance(obj, type):
            # a cached function: its own code (followed here, so cycles stay
            # handled), or the version it is pinned to
            if isinstance(pinned, str):
                self.add(f"{getattr(obj, 'name', label)}", digest_of(("pinned", pinned)))
                return
            obj = pinned
        while not isinstance(obj, (types.FunctionType, type)) and callable(getattr(obj, "__wrapped__", None)):
            obj = obj.__wrapped__  # functools.wraps, lru_cache
        if isinstance(obj, types.ModuleType):
            if not is_user_module(obj.__name__):
                self.package(obj.__name__)
            return
        if isinstance(obj, (types.FunctionType, type)):
            module = getattr(obj, "__module__", None)
            code = getattr(obj, "__code__", None)
            filename = code.co_filename if code is not None else None
            if not is_user_module(module, filename):
                if module:
                    self.package(module)
                return
            qualname = f"{module}.{obj.__qualname__}"
            if isinstance(obj, type):
                self.code(qualname, obj, lambda: _module_names(module), depth)
            else:
                self.code(qualname, obj, lambda: _function_names(obj), depth)
            return
        if _is_constant(obj, [MAX_CONSTANT_ITEMS]):
            self.add(label, digest_of(("value", obj)))
            return
        t = type(obj)
        if is_user_module(t.__module__):
            # an instance of the user's class: its class's code counts
            self.value(f"{t.__module__}.{t.__qualname__}", t, depth)
        elif callable(obj) and isinstance(getattr(obj, "__module__", None), str):
            self.package(obj.__module__)

    def package(self, module: str) -> None:
        if not self.deps:
            return
        top = module.split(".")[0]
        loaded = sys.modules.get(top)
        if top in self.packages or loaded is None or _is_stdlib(loaded) or top == "fleche_remote":
            return
        self.packages[top] = _package_version(top)


def _module_names(module: Optional[str]) -> Dict[str, Any]:
    mod = sys.modules.get(module or "")
    return dict(vars(mod)) if mod is not None else {}


def _function_names(func: types.FunctionType) -> Dict[str, Any]:
    names = dict(func.__globals__)
    for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
        try:
            names[name] = cell.cell_contents
        except ValueError:  # an empty cell: not yet assigned
            continue
    return names


def code_digest(func: Callable[..., Any], *, deps: bool = False) -> CodeDigest:
    """The digest of ``func``'s code and the user code it reaches.

    Args:
        func: a plain function (the one ``@cached`` wraps).
        deps: also count the versions of installed packages it reaches.

    Returns:
        A :class:`CodeDigest`; ``source_found`` is False (and the digest
        names the function only) when its source cannot be read.
    """
    walk = _Walk(deps)
    module = getattr(func, "__module__", None)
    label = f"{module}.{getattr(func, '__qualname__', getattr(func, '__name__', '?'))}"
    if isinstance(func, types.FunctionType):
        walk.code(label, func, lambda: _function_names(func), 0)
    else:
        walk.value(label, func, 0)
    found = walk.parts.get(label) not in (None, NO_SOURCE)
    if walk.truncated:
        log.debug("%s: code digest stopped at %d parts / depth %d", label, MAX_PARTS, MAX_DEPTH)
    for top, version in sorted(walk.packages.items()):
        walk.parts[f"package {top}"] = digest_of(("package", top, version))
    digest = digest_of(("code", sorted(walk.parts.items())))
    return CodeDigest(
        digest=digest,
        parts={name: d[:SHORT] if d != NO_SOURCE else d for name, d in walk.parts.items()},
        source_found=found,
    )


def changed_parts(old: Dict[str, Any], new: Dict[str, str]) -> Iterator[str]:
    """Human phrases for what differs between two ``parts`` dicts."""
    for name in sorted(set(old) | set(new)):
        if name not in old:
            yield f"{name} is new"
        elif name not in new:
            yield f"{name} is no longer used"
        elif old[name] != new[name]:
            yield f"{name} changed"


__all__ = ["CodeDigest", "changed_parts", "code_digest", "is_user_module", "normalized_tokens"]
