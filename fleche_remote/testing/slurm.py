"""A private single-node Slurm cluster, for tests and benchmarks.

:func:`private_slurm` starts Debian's ``munged``, ``slurmctld`` and
``slurmd`` in a temp dir, on private ports and a private munge socket, as
the user running the tests (root on the test machine), without systemd or
cgroups, and hands back the environment (``SLURM_CONF``) under which
``sbatch``, ``squeue`` and ``scontrol`` talk to it and to nothing else.

What makes it work on a bare machine, each for a reason:

* ``munged`` with its own ``--key-file``, ``--socket`` and ``--pid-file``,
  and ``AuthInfo=socket=...`` in slurm.conf, so that the machine's own
  munge (if any) is neither needed nor touched;
* ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none`` and
  ``JobAcctGatherType=jobacct_gather/none``: no cgroups, which a container
  rarely offers;
* ``SlurmUser``/``SlurmdUser`` = the current user, so no ``slurm`` account
  is needed; one node named after ``hostname -s`` with this machine's CPUs;
* ``MinJobAge`` long enough that a finished job (``TIMEOUT``,
  ``CANCELLED``) stays visible to ``scontrol show job`` for the test that
  asks why it ended: there is no accounting database here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from ._util import free_port, new_temp_dir, stop_process, tail, tool, user_name

#: How long the daemons get to come up (the node to be idle): ~1 s here,
#: the margin is for a loaded machine.
SLURM_START_TIMEOUT = 60.0


class SlurmCluster:
    """A running private Slurm: its config file and the environment that
    reaches it.

    Attributes:
        directory: the temp dir with slurm.conf, the munge key and socket,
            the daemons' logs and spool.
        conf: path of slurm.conf (``SLURM_CONF`` for every Slurm command).
        node: the node's name (``hostname -s``).
        cpus: its CPUs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.conf = directory / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.munge_socket = directory / "munge.socket"
        self._procs: List[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> Dict[str, str]:
        """Variables to add to a process's environment so that its Slurm
        commands use this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster (text, no check)."""
        return subprocess.run(
            list(argv), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        """The daemons' last log lines, for a failing test's message."""
        return "\n".join(
            f"--- {name}\n{tail(self.directory / name, 20)}"
            for name in ("munged.log", "slurmctld.log", "slurmd.log")
        )

    def __repr__(self) -> str:
        return f"<SlurmCluster {self.conf}>"

    # -- starting and stopping --------------------------------------------------

    def _start(self) -> None:
        d = self.directory
        (d / "spool").mkdir()
        (d / "state").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munged = tool("munged", "/usr/sbin/munged")
        self._spawn(
            [
                munged,
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            d / "munged.out",
        )
        _wait(lambda: self.munge_socket.exists(), "munged to create its socket", self)
        self.conf.write_text(self._config())
        self._spawn([tool("slurmctld", "/usr/sbin/slurmctld"), "-D", "-f", str(self.conf)], d / "ctld.out")
        self._spawn([tool("slurmd", "/usr/sbin/slurmd"), "-D", "-f", str(self.conf)], d / "slurmd.out")

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-o", "%T", timeout=10)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated")

        _wait(idle, "the node to be idle in sinfo", self)

    def _spawn(self, argv: List[str], out: Path) -> None:
        with open(out, "wb") as fh:
            self._procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env},
                    start_new_session=True,
                )
            )

    def _stop(self) -> None:
        # jobs first, so no slurmstepd outlives the daemons
        with contextlib.suppress(Exception):
            self.run("scancel", "--user", user_name(), timeout=10)
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()

    def _config(self) -> str:
        d = self.directory
        user = user_name()
        ctld, node_port = free_port(), free_port()
        return "\n".join(
            [
                "ClusterName=fleche-test",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={ctld}",
                f"SlurmdPort={node_port}",
                f"SlurmUser={user}",
                f"SlurmdUser={user}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"StateSaveLocation={d / 'state'}",
                f"SlurmdSpoolDir={d / 'spool'}",
                f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                f"SlurmdPidFile={d / 'slurmd.pid'}",
                f"SlurmctldLogFile={d / 'slurmctld.log'}",
                f"SlurmdLogFile={d / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/backfill",
                "MpiDefault=none",
                "ReturnToService=2",
                "MinJobAge=600",
                "MaxArraySize=100001",
                "KillWait=2",
                "InactiveLimit=0",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )


def _wait(ready: Callable[[], bool], what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + SLURM_START_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"private Slurm: waited {SLURM_START_TIMEOUT:.0f} s for {what}\n{cluster.logs()}")


def slurm_available() -> Optional[str]:
    """None when slurm-wlm and munge are installed, else what is missing."""
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(n, path=_path())]
    if missing:
        return (
            f"{', '.join(missing)} not found; install them (Debian: apt-get install slurm-wlm munge, "
            f"as scripts/test.sh does)"
        )
    return None


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"


@contextlib.contextmanager
def private_slurm() -> Iterator[SlurmCluster]:
    """Start a private single-node Slurm; stop it and delete its files on exit.

    Raises:
        RuntimeError: Slurm or munge is not installed, or the daemons did
            not come up (their logs are in the message).
    """
    problem = slurm_available()
    if problem is not None:
        raise RuntimeError(f"private Slurm: {problem}")
    cluster = SlurmCluster(new_temp_dir("fleche-slurm-"))
    try:
        cluster._start()
        yield cluster
    finally:
        cluster._stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)


__all__ = ["SlurmCluster", "private_slurm", "slurm_available"]
