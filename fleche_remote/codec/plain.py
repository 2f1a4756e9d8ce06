"""Plain-data pickling with a restricted decoder.

Records on disk and messages on the wire are encoded with the standard
pickle protocol (fast, compact, handles ``bytes`` natively) but decoded
with an unpickler that resolves *only* an explicit allow-list of classes.
A pickle that names anything else (``os.system``, ``builtins.eval``, a
user class) is refused before any object is built, so bytes written by
another user or sent by a client can never run code in this process.

Values a user caches are *not* decoded here: they travel and rest as opaque
bytes, and only the process that asked for them unpickles them.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from ..errors import ProtocolError
from .budget import RECORD_BUDGET, Budget, check_pickle

#: Protocol 4 is understood by every Python we support (3.9+) and frames
#: large bytes objects without copying them through the memo.
PLAIN_PROTOCOL = 4

_BUILTIN_NAMES: FrozenSet[Tuple[str, str]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
    }
)


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    # what pickle rebuilds a bytearray from is its bytes; bytearray(2**40)
    # from a stored pickle would be a 1 TiB allocation, so an int is refused
    if not isinstance(source, (bytes, bytearray, str)):
        raise ProtocolError(f"refusing bytearray({type(source).__name__}): only bytes rebuild a bytearray")
    return bytearray(source, *args)


_registry: Dict[Tuple[str, str], type] = {}


def register_plain(cls: type) -> type:
    """Allow ``cls`` to be rebuilt by :func:`loads_plain` (class decorator).

    Only frozen dataclasses of plain fields belong here: the decoder
    restores them by filling ``__dict__``, never by calling user code.
    """
    _registry[(cls.__module__, cls.__qualname__)] = cls
    return cls


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        cls = _registry.get((module, name))
        if cls is not None:
            return cls
        if (module, name) in _BUILTIN_NAMES:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "bytearray"):
            return _bytearray
        raise ProtocolError(
            f"refusing to decode {module}.{name}: only plain data and "
            f"fleche-remote's own record types may appear here"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ProtocolError("refusing to decode a persistent id")


def dumps_plain(obj: Any) -> bytes:
    """Encode plain data (and registered record types) as bytes."""
    return pickle.dumps(obj, protocol=PLAIN_PROTOCOL)


def loads_plain(data: bytes | bytearray | memoryview, budget: Optional[Budget] = RECORD_BUDGET) -> Any:
    """Decode bytes from :func:`dumps_plain` without running foreign code.

    The pickle is first checked against ``budget`` (see
    :mod:`~fleche_remote.codec.budget`): memo, nesting, sizes and integer
    digits are bounded before the unpickler allocates or hashes anything.
    ``None`` skips the check, for bytes from a peer trusted with more than
    that (see :class:`~fleche_remote.remote.protocol.FrameDecoder`).

    Raises:
        ProtocolError: the bytes name a class outside the allow-list, are
            not a pickle at all, or would exceed the budget.
    """
    try:
        if budget is not None:
            check_pickle(data, budget)
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated, garbage, wrong opcodes ...
        raise ProtocolError(f"undecodable plain-data pickle: {type(exc).__name__}: {exc}") from None


_PLAIN_SCALARS = (str, int, float, bool, type(None), bytes)


#: Nodes :func:`check_plain` visits at most (shared parts counted each time):
#: metadata is a few fields, not a data set, and every reader of a listing
#: walks it (JSON, repr, a SQL index).
PLAIN_MAX_NODES = 100_000

#: Deepest nesting :func:`check_plain` accepts, and longest integer (bits).
PLAIN_MAX_DEPTH = 64
PLAIN_MAX_INT_BITS = 4096


def check_plain(obj: Any, what: str = "value", _depth: int = 0, _seen: Optional[List[int]] = None) -> None:
    """Raise ``TypeError`` unless ``obj`` is JSON-like plain data.

    Metadata must be plain so that a server (and a SQL index) can read and
    filter it without unpickling anything. It must also be small: nesting
    past 64 levels, or a walk of more than :data:`PLAIN_MAX_NODES` nodes
    (a list holding itself, or one shared list reached many times), is
    refused too.
    """
    seen = [0] if _seen is None else _seen
    seen[0] += 1
    if seen[0] > PLAIN_MAX_NODES:
        raise TypeError(
            f"{what} is too large: more than {PLAIN_MAX_NODES:,} items (shared ones counted each time)"
        )
    if _depth > PLAIN_MAX_DEPTH:
        raise TypeError(f"{what} is nested too deeply (more than {PLAIN_MAX_DEPTH} levels)")
    if isinstance(obj, _PLAIN_SCALARS):
        if type(obj) is int and obj.bit_length() > PLAIN_MAX_INT_BITS:
            raise TypeError(
                f"{what} holds an integer of {obj.bit_length()} bits; at most {PLAIN_MAX_INT_BITS}"
            )
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            check_plain(item, what, _depth + 1, seen)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{what} keys must be str, got {type(k).__name__}")
            check_plain(v, what, _depth + 1, seen)
        return
    raise TypeError(
        f"{what} must be plain data (str, int, float, bool, None, bytes, "
        f"list, tuple, dict); got {type(obj).__name__}"
    )
