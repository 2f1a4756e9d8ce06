"""A host with a [compute] table behind the test sshd, and a laptop stack
whose second layer is that host."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

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


def restricted_key(sshd: Any, tmp_path: Path, remote: Path, mode: str) -> Tuple[str, ...]:
    """A new key whose authorized_keys line forces ``serve --<mode>`` in
    ``remote``, with ``restrict``, as the README tells an owner to write it."""
    key = tmp_path / "key-restricted"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "colleague", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    checkout = Path(__file__).resolve().parents[2]
    command = (
        f"FLECHE_TEST_SSHD={shlex.quote(str(sshd.directory))} PYTHONPATH={shlex.quote(str(checkout))} "
        f"&& export FLECHE_TEST_SSHD PYTHONPATH && cd {shlex.quote(str(remote))} "
        f"&& exec {shlex.quote(sys.executable)} -m fleche_remote serve --{mode}"
    )
    line = f'command="{command}",restrict {(tmp_path / "key-restricted.pub").read_text().strip()}\n'
    with open(sshd.directory / "authorized_keys", "a") as fh:
        fh.write(line)
    options = list(sshd.ssh_options)
    options[options.index("-i") + 1] = str(key)
    return tuple(options)
