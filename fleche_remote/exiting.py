"""Work that must run at interpreter exit while ssh connections are open.

An :class:`~fleche_remote.remote.client.SshCache` closes its connection from
a ``weakref.finalize``, and weakref runs its finalizers from an ``atexit``
hook of its own, registered when the first finalizer is made; ``atexit``
runs hooks last-registered first. Making a finalizer here, at import,
registers weakref's hook before any registered through
:func:`before_connections_close`, so those run while the connections are
still there (a write-behind push, the release of a claim).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable


class _Anchor:
    pass


_ANCHOR = _Anchor()
weakref.finalize(_ANCHOR, lambda: None)


def before_connections_close(func: Callable[..., Any], *args: Any) -> None:
    """Run ``func(*args)`` at exit, before ssh connections are closed."""
    atexit.register(func, *args)


__all__ = ["before_connections_close"]
