"""A laptop and a cluster for the command-line tests.

One private sshd (module scope, with a chatty login shell) plays the
cluster; each test gets fresh directories: the cluster's cache, already
holding a few calls, and a laptop whose fleche.toml names the cluster
(``cluster``), a stack over it (``shared``: local layer first), a
read-only view through a forced-command key (``ro``) and a spare local
cache (``mirror``). Commands run as ``python -m fleche_remote ...``
subprocesses, from the laptop directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from fleche_remote import Call
from fleche_remote.config import cache_from_config

REPO = Path(__file__).resolve().parent.parent

CLUSTER_TOML = """\
[default]
cache = "results"
root = true

[results]
template = "cloudpickle"
root = "store"
"""


class Trap:
    """An argument whose unpickling makes a directory: proof that a listing
    never unpickled it, on either side."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


def ssh_table(sshd: Any, workdir: Path, options: Any = None) -> str:
    opts = ", ".join(f'"{o}"' for o in (options or sshd.ssh_options))
    return (
        f'type = "ssh"\nhost = "{sshd.host}"\npython = "{sys.executable}"\n'
        f'workdir = "{workdir}"\nssh_options = [{opts}]\ntimeout = 30\nconnect_timeout = 30\n'
    )


@dataclass
class World:
    sshd: Any
    cluster: Path
    laptop: Path
    keys: Dict[str, str]
    marker: Path

    def run(
        self, *args: str, timeout: float = 120, env: Any = None, stdin: Any = subprocess.DEVNULL
    ) -> subprocess.CompletedProcess:
        environ = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200", **(env or {}))
        return subprocess.run(
            [sys.executable, "-m", "fleche_remote", *args],
            cwd=self.laptop,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environ,
            stdin=stdin,
        )

    def call(self, *args: str) -> subprocess.CompletedProcess:
        """Like :meth:`run`, in this process (``main()``): no interpreter start,
        for the variations of a command that :meth:`run` has covered."""
        import contextlib
        import io

        from fleche_remote.cli import main

        out, err = io.StringIO(), io.StringIO()
        before = os.getcwd()
        os.chdir(self.laptop)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        finally:
            os.chdir(before)
        return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())

    def cluster_cache(self) -> Any:
        return cache_from_config({"template": "cloudpickle", "root": str(self.cluster / "store")})

    def local_cache(self, name: str = "local") -> Any:
        return cache_from_config({"template": "cloudpickle", "root": str(self.laptop / name)})

    def adhoc(self) -> List[str]:
        """Options that make ``sshd.host`` an ad-hoc cache of the cluster."""
        import shlex

        return [
            "--python",
            sys.executable,
            "--workdir",
            str(self.cluster),
            "--ssh-options",
            " ".join(shlex.quote(o) for o in self.sshd.ssh_options),
        ]


def make_world(sshd: Any, root: Path, ro_options: Any) -> World:
    cluster, laptop = root / "cluster", root / "laptop"
    cluster.mkdir()
    laptop.mkdir()
    (cluster / "fleche.toml").write_text(CLUSTER_TOML)
    table = ssh_table(sshd, cluster)
    (laptop / "fleche.toml").write_text(
        '[default]\ncache = "shared"\nroot = true\n\n'
        f"[cluster]\n{table}\n"
        f'[[shared]]\ntemplate = "cloudpickle"\nroot = "local"\n\n[[shared]]\n{table}\n'
        f"[ro]\n{ssh_table(sshd, cluster, ro_options)}\n"
        '[mirror]\ntemplate = "cloudpickle"\nroot = "mirror"\n'
    )
    marker = root / "unpickled"
    store = cache_from_config({"template": "cloudpickle", "root": str(cluster / "store")})
    keys: Dict[str, str] = {}
    for n in (1, 2, 3):
        keys[f"work.simulate({n})"] = store.save(
            Call("work.simulate", {"n": n, "steps": 1000}, list(range(n * 10)), {"timestamp": 1e9 + n})
        )
    keys["__main__.simulate(4)"] = store.save(Call("__main__.simulate", {"n": 4}, "four", {"timestamp": 2e9}))
    keys["work.other(1)"] = store.save(Call("work.other", {"n": 1}, 1.5, {"timestamp": 2e9}))
    with warnings.catch_warnings():  # a Trap's key is unstable across processes: not the point here
        warnings.simplefilter("ignore")
        keys["work.trap"] = store.save(Call("work.trap", {"obj": Trap(str(marker))}, 0, {"timestamp": 2e9}))
    store.close()
    return World(sshd, cluster, laptop, keys, marker)
