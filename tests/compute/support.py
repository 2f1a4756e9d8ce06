"""A host with a [compute] table behind the test sshd, and a laptop stack
whose second layer is that host."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fleche_remote.caches import Cache, CacheStack
from fleche_remote.config import load_cache, load_config
from fleche_remote.remote.client import SshCache
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore


def host_dir(tmp_path: Path, compute: Optional[str]) -> Path:
    """The cluster's working directory: a file cache and ``compute`` as its
    ``[compute]`` table (None: no table)."""
    host = tmp_path / "cluster"
    host.mkdir()
    toml = '[default]\ncache = "results"\n\n[results]\ntemplate = "cloudpickle"\nroot = "results"\n'
    if compute is not None:
        toml += f"\n[compute]\ndirectory = {str(tmp_path / 'jobs')!r}\n{compute}\n"
    (host / "fleche.toml").write_text(toml)
    return host


def host_cache(host: Path) -> Any:
    """The host's cache opened directly, to check what landed there."""
    return load_cache("results", config=load_config(host / "fleche.toml"))


def laptop(
    sshd: Any, tmp_path: Path, host: Path, *, options: Sequence[str] = (), env: Any = None
) -> CacheStack:
    setup = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    remote = SshCache(
        sshd.host,
        workdir=str(host),
        python=sys.executable,
        ssh_options=tuple(options) or sshd.ssh_options,
        setup_commands=setup,
        timeout=30,
    )
    return CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote])
