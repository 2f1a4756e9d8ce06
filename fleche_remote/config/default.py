"""The cache ``@cached`` uses when no fleche.toml exists anywhere.

A first-time user should get a working, persistent cache, not an error.
It lives in the user cache directory, where a platform expects data that
can be rebuilt:

* ``$XDG_CACHE_HOME/fleche-remote`` when ``XDG_CACHE_HOME`` is set (an
  absolute path; the XDG spec says to ignore a relative one);
* else ``~/Library/Caches/fleche-remote`` on macOS,
  ``%LOCALAPPDATA%\\fleche-remote`` on Windows, and
  ``~/.cache/fleche-remote`` elsewhere.

The store is the ``sql`` template: call records, and every value up to
32 KiB, in one SQLite file (``calls.db``), bigger values as files under
``values/``. That is the fast local layout (one file, not one per result,
for small values; native SQL queries by argument), and it needs nothing
beyond the standard library. Where that directory is on a network or
parallel file system (an NFS home on a cluster), SQLite's locking is not
safe and the SQLite store refuses it, so the built-in cache is then plain
files (the ``cloudpickle`` template), which are safe there.

Any fleche.toml that is found wins, whole: the built-in table is used
only when discovery found no file at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from ..storage.fs import network_mount

#: The name the built-in cache goes by (``load_cache("local")``, ``fleche-remote ls local``).
BUILTIN_NAME = "local"
APP_DIR = "fleche-remote"


def user_cache_dir(home: Optional[Path] = None) -> Path:
    """The directory the built-in cache lives in (not created here)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / APP_DIR
    if home is None:
        home = Path(os.path.expanduser("~"))
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / APP_DIR
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / APP_DIR
    return home / ".cache" / APP_DIR


def builtin_tables(root: Optional[Path] = None) -> Dict[str, Any]:
    """The fleche.toml tables in effect when no file was found."""
    root = user_cache_dir() if root is None else root
    template = "cloudpickle" if network_mount(root) is not None else "sql"
    return {
        "default": {"cache": BUILTIN_NAME},
        BUILTIN_NAME: {"template": template, "root": str(root)},
    }
