"""Shared set-up for tests that go through the real sshd."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

from fleche_remote.remote.client import SshCache

REMOTE_TOML = """\
[default]
cache = "main"
root = true

[main]
template = "cloudpickle"
root = "store"

[ro]
template = "cloudpickle"
root = "store"
read_only = true
"""

#: A remote whose calls and small values are in SQLite (the ``sql`` template).
SQL_TOML = """\
[default]
cache = "main"
root = true

[main]
template = "sql"
root = "store"
"""


def remote_dir(tmp_path: Path, toml: str = REMOTE_TOML) -> Path:
    """A directory on the 'remote' with its own fleche.toml."""
    path = tmp_path / "remote"
    path.mkdir(exist_ok=True)
    (path / "fleche.toml").write_text(toml)
    return path


def ssh_table(sshd: Any, workdir: Path, **more: Any) -> Dict[str, Any]:
    """The fleche.toml table of an ``ssh`` layer on the test sshd."""
    return {
        "type": "ssh",
        "host": sshd.host,
        "python": sys.executable,
        "workdir": str(workdir),
        "ssh_options": list(sshd.ssh_options),
        "timeout": 30,
        **more,
    }


def ssh_cache(sshd: Any, workdir: Path, **kwargs: Any) -> SshCache:
    kwargs.setdefault("python", sys.executable)
    kwargs.setdefault("timeout", 15)
    kwargs.setdefault("connect_timeout", 30)
    kwargs.setdefault("ssh_options", sshd.ssh_options)
    return SshCache(sshd.host, workdir=str(workdir), **kwargs)
