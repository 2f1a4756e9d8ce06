"""``executor = "local"``: a process pool on the host.

The server starts one detached *runner* per sweep (``python -m
fleche_remote.compute.worker local JOBDIR``, in a session of its own), and
the runner runs the points in ``workers`` processes. Detached, because the
sweep must outlive the connection: a laptop that closes its lid leaves
the points computing, and their results land in the host's cache anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..config.compute import ComputeSettings

#: The runner writes this file when every point has been run.
FINISHED = "finished"


def worker_argv(settings: ComputeSettings, *args: str) -> list[str]:
    return [settings.python or sys.executable, "-m", "fleche_remote.compute.worker", *args]


def launch(job_dir: Path, spec: Dict[str, Any], settings: ComputeSettings) -> Dict[str, Any]:
    """Start the runner; return what ``job.json`` records about it."""
    with open(job_dir / "logs" / "runner.log", "ab") as log:
        proc = subprocess.Popen(
            worker_argv(settings, "local", str(job_dir)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=spec["cwd"],
            env=_worker_env(),
            start_new_session=True,  # a hang-up of the server's session must not reach it
            close_fds=True,
        )
    return {"runner_pid": proc.pid}


def _worker_env() -> Dict[str, str]:
    # the server's own marker of a forced command is not the workers' business
    return {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}


def task_states(job_dir: Path, spec: Dict[str, Any]) -> Dict[int, Tuple[str, str]]:
    """Every task ``PENDING`` while the runner lives (a point not started
    is queued), else ``COMPLETED`` or, without its finished mark, ``FAILED``."""
    if (job_dir / FINISHED).exists():
        state = ("COMPLETED", "")
    elif _alive(spec.get("runner_pid"), spec["job"]):
        state = ("PENDING", "")
    else:
        state = ("FAILED", "the worker pool exited early")
    return {task: state for task in range(spec["tasks"])}


def task_log(job_dir: Path, spec: Dict[str, Any], task: int) -> Optional[Path]:
    return job_dir / "logs" / "runner.log"


def _alive(pid: Any, job: str) -> bool:
    if not isinstance(pid, int):
        return True  # job.json not updated yet: the runner was just started
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return job.encode() in fh.read()
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc")  # /proc exists but the pid is gone or another program
