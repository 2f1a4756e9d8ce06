"""A look at stored arguments that runs none of their code.

``fleche-remote ls`` shows each call's arguments, abridged. They are
stored as cloudpickle bytes (:attr:`CallRecord.arguments`), and unpickling
them for real would import the user's modules and run whatever their
``__reduce__`` names: not acceptable for a listing, least of all of a
colleague's cache. So the server never decodes them (records travel as
plain data), and the client reads them with :class:`_PeekUnpickler`:

* every global the pickle names (a class, a function, ``numpy``'s
  ``_reconstruct``) becomes an inert :class:`Opaque` placeholder: nothing
  is imported, nothing is called;
* "calling" a placeholder (REDUCE, NEWOBJ, BUILD) just records that a
  ``name(...)`` was built; plain data (numbers, strings, bytes, tuples,
  lists, dicts, sets) comes out as itself;
* pickles larger than :data:`PEEK_MAX_BYTES` are not read at all, and
  the others are checked against :data:`PEEK_BUDGET` first (see
  :mod:`~fleche_remote.codec.budget`): a 200-byte pickle cannot ask for a
  2 GiB memo, a 2**64-step hash or a 100,000-deep repr.

An argument that still cannot be read shows as ``<N bytes>``. The result
is only for display: ``show`` prints the same view, and code that needs
the real arguments uses :class:`~fleche_remote.LazyCall`.
"""

from __future__ import annotations

import io
import pickle
import reprlib
from typing import Any, Dict, Optional, Tuple

from .budget import Budget, check_pickle

#: Argument pickles past this size are summarised by size, not read.
PEEK_MAX_BYTES = 1 << 20

#: What peeking at one argument pickle may cost: fewer nodes than a record
#: (a listing peeks at every entry), nesting well inside the recursion limit
#: of ``repr`` and ``hash``.
PEEK_BUDGET = Budget(max_nodes=200_000, max_depth=100, max_memo=200_000)


class Opaque:
    """An object a pickle described but that was not rebuilt.

    ``name`` is what it would have been (``ndarray``, ``Path``); ``shape``
    is kept for arrays, the one detail a reader of a listing wants.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if isinstance(cls, Opaque):  # NEWOBJ of a class the pickle built by value
            return Opaque(cls.name)
        return super().__new__(cls)

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return Opaque(self.name)

    def __repr__(self) -> str:
        return f"{self.name}({self.detail})" if self.detail else f"<{self.name}>"

    # what an unpickler may do to an object it built
    def __setstate__(self, state: Any) -> None:
        if self.name == "ndarray" and isinstance(state, tuple) and len(state) >= 2:
            shape = state[1]
            if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
                self.detail = f"shape={shape}"

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


#: cloudpickle's helpers, by what they rebuild.
_FRIENDLY = {"_make_function": "function", "_make_cell": "cell", "_make_skeleton_class": "class"}


class _Global:
    """A global named by the pickle; calling it builds an :class:`Opaque`."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        # copyreg._reconstructor(cls, ...), numpy's _reconstruct(ndarray, ...),
        # cloudpickle's helpers: the first argument says what is being built
        if len(args) >= 2 and isinstance(args[0], _Global) and args[0].name == "type":
            if isinstance(args[1], str):  # cloudpickle's class by value: (type, name, ...)
                return Opaque(args[1])
        if args and isinstance(args[0], _Global):
            return Opaque(args[0].name)
        return Opaque(_FRIENDLY.get(self.name, self.name))

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name}>"


class _PeekUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler, with globals replaced by placeholders.

    The pure-Python one, because the C unpickler insists that NEWOBJ's
    class be a real type; here it is a :class:`_Global`, whose
    ``__new__`` below is looked up on the instance like any attribute.
    """

    def find_class(self, module: str, name: str) -> Any:
        return _PeekGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return Opaque("persistent")


class _PeekGlobal(_Global):
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if isinstance(cls, _Global):  # NEWOBJ: cls.__new__(cls, *args)
            return Opaque(cls.name)
        return super().__new__(cls)


def peek(data: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """The arguments pickled in ``data``, for display only, or why not.

    Returns:
        ``(arguments, problem)``: ``problem`` is None when the pickle was
        read; otherwise it says why not (too large, over the budget, not a
        dict of arguments), and ``arguments`` is empty.
    """
    if not isinstance(data, (bytes, bytearray)):
        return {}, f"arguments are a {type(data).__name__}, not pickled bytes"
    if len(data) > PEEK_MAX_BYTES:
        return {}, f"{len(data)} bytes, more than {PEEK_MAX_BYTES} to peek at"
    try:
        check_pickle(data, PEEK_BUDGET)
        value = _PeekUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # the budget's refusal, or garbage of any kind
        return {}, f"{type(exc).__name__}: {exc}"
    if not isinstance(value, dict):
        return {}, f"a pickled {type(value).__name__}, expected a dict of arguments"
    out: Dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            return {}, f"an argument named by a {type(k).__name__}, expected str"
        out[k] = v
    return out, None


def peek_arguments(data: bytes) -> Tuple[Dict[str, Any], bool]:
    """The arguments pickled in ``data``, for display only.

    Returns:
        ``(arguments, complete)``: ``complete`` is False when the pickle
        could not be read (then ``arguments`` is empty); :func:`peek` says why.
    """
    arguments, problem = peek(data)
    return arguments, problem is None


def abridged(value: Any, width: int = 40) -> str:
    """``repr`` cut to about ``width`` characters."""
    short = reprlib.Repr()
    short.maxstring = max(10, width // 2)
    short.maxother = max(10, width // 2)
    short.maxlist = short.maxtuple = short.maxset = short.maxdict = 4
    text = short.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def abridged_arguments(data: bytes, width: int = 48) -> str:
    """``n=200, steps=1000`` from pickled arguments, about ``width`` long."""
    arguments, problem = peek(data)
    if problem is not None:
        return f"<{len(data)} bytes>" if isinstance(data, (bytes, bytearray)) else "<unreadable>"
    each = max(12, width // max(1, len(arguments)))
    text = ", ".join(f"{k}={abridged(v, each)}" for k, v in arguments.items())
    return text if len(text) <= width else text[: width - 3] + "..."


__all__ = [
    "PEEK_BUDGET",
    "PEEK_MAX_BYTES",
    "Opaque",
    "abridged",
    "abridged_arguments",
    "peek",
    "peek_arguments",
]
