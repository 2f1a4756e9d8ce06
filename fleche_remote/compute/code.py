"""Is the host's copy of a function the laptop's? A digest of its code.

The worker imports the function by name when the host's code has the same
digest as the laptop's (the host's workdir is on ``sys.path``); otherwise
it runs the laptop's copy, which travels by value (cloudpickle), or, with
``strict``, refuses and names the file that differs.

:func:`function_digest` is the one place that decides what "the same
code" means: the digest (the
user code the function reaches) plugs in here.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Dict, Optional, Tuple


def function_digest(func: Callable[..., Any]) -> Optional[str]:
    """A digest of ``func``'s code and the user code it reaches (the one
    keys carry, :func:`fleche_remote.codec.code.code_digest`); None when its
    source cannot be read (built in a REPL or by ``exec``), which never
    matches."""
    parts = function_parts(func)
    return None if parts is None else parts[0]


def function_parts(func: Callable[..., Any]) -> Optional[Tuple[str, Dict[str, str]]]:
    """``(digest, {part: short digest})``, so a mismatch can name the parts
    (functions, modules) that differ; None without source."""
    try:
        from ..codec.code import code_digest
    except ImportError:  # pragma: no cover - an older checkout: the source text alone
        try:
            source = inspect.getsource(inspect.unwrap(func))
        except (OSError, TypeError):
            return None
        return hashlib.sha256(source.encode("utf-8")).hexdigest(), {}
    try:
        code = code_digest(func)
    except Exception:
        return None
    # plain str (a part's digest may be a Digest, which the wire refuses)
    return (str(code.digest), {str(k): str(v) for k, v in code.parts.items()}) if code.source_found else None


def function_file(func: Callable[..., Any]) -> str:
    """The file a function is defined in, for a message (``?`` if unknown)."""
    try:
        return inspect.getsourcefile(inspect.unwrap(func)) or "?"
    except TypeError:
        return "?"


def plain(value: Any) -> Any:
    """``value`` with str subclasses (``Digest``) as plain str, for the wire."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
