"""Is the host's copy of a function the laptop's? A digest of its code.

The worker imports the function by name when the host's code has the same
digest as the laptop's (the host's workdir is on ``sys.path``); otherwise
it runs the laptop's copy, which travels by value (cloudpickle), or, with
``strict``, refuses and names the file that differs.

:func:`function_digest` is the one place that decides what "the same
code" means: today, the function's own source text. A fuller digest (the
user code the function reaches) plugs in here.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Optional


def function_digest(func: Callable[..., Any]) -> Optional[str]:
    """A digest of ``func``'s code; None when its source cannot be read
    (built in a REPL or by ``exec``), which never matches."""
    func = inspect.unwrap(func)
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def function_file(func: Callable[..., Any]) -> str:
    """The file a function is defined in, for a message (``?`` if unknown)."""
    try:
        return inspect.getsourcefile(inspect.unwrap(func)) or "?"
    except TypeError:
        return "?"
