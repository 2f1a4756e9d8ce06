"""``executor = "slurm"``: a sweep's misses as one Slurm job array.

``sbatch`` is called once per sweep, with ``--array=0-(T-1)`` where ``T``
stays within ``max_tasks`` (each task runs ``points_per_task`` or more
points), so 10,000 points are one submission, not 10,000. Each task runs
``python -m fleche_remote.compute.worker task JOBDIR $SLURM_ARRAY_TASK_ID``
after the table's ``setup_commands``, in the server's working directory,
with the server's environment (sbatch's default ``--export=ALL``).

Task states come from ``scontrol show job`` (no accounting database is
needed; a finished job stays visible for the cluster's ``MinJobAge``). A
task gone from ``scontrol`` whose points never reported ends as
``UNKNOWN``; its log's last lines say why.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config.compute import ComputeSettings
from ..errors import Rejected
from .local import worker_argv

#: sbatch and scontrol get this long: slurmctld answers in milliseconds
#: unless it is overloaded, and then a clear error beats a hang.
SLURM_TIMEOUT = 60.0


def job_script(job_dir: Path, spec: Dict[str, Any], settings: ComputeSettings) -> str:
    """The batch script: ``#SBATCH`` lines from the table, setup, the worker."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"#SBATCH --job-name={q('fleche-' + spec['name'].rsplit('.', 1)[-1])[:60]}"]
    log = job_dir / "logs" / "task-%a.out"
    lines += [f"#SBATCH --output={log}", f"#SBATCH --error={log}"]
    if settings.partition:
        lines.append(f"#SBATCH --partition={settings.partition}")
    if settings.time:
        lines.append(f"#SBATCH --time={settings.time}")
    if settings.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={settings.cpus_per_task}")
    if settings.mem:
        lines.append(f"#SBATCH --mem={settings.mem}")
    lines += [f"#SBATCH {option}" for option in settings.sbatch_options]
    lines.append("set -e")
    lines += list(settings.setup_commands)
    lines.append(f"cd {q(spec['cwd'])}")
    argv = " ".join(q(a) for a in worker_argv(settings, "task", str(job_dir)))
    lines.append(f'exec {argv} "$SLURM_ARRAY_TASK_ID"')
    return "\n".join(lines) + "\n"


def launch(job_dir: Path, spec: Dict[str, Any], settings: ComputeSettings) -> Dict[str, Any]:
    """``sbatch`` the array once; return its job id for ``job.json``.

    Raises:
        Rejected: sbatch is missing or refused the job (its message quoted).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise Rejected(
            '[compute] executor = "slurm", but sbatch is not on the server\'s PATH; '
            'add its module to setup_commands of the ssh layer, or use executor = "local"'
        )
    script = job_dir / "job.sh"
    script.write_text(job_script(job_dir, spec, settings))
    array = f"0-{spec['tasks'] - 1}" + (f"%{settings.max_running}" if settings.max_running else "")
    argv = [sbatch, "--parsable", f"--array={array}", str(script)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=SLURM_TIMEOUT, cwd=spec["cwd"], stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise Rejected(
            f"sbatch refused the sweep ({' '.join(map(shlex.quote, argv[1:]))}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    slurm_job = done.stdout.strip().split(";")[0]
    return {"slurm_job": slurm_job, "sbatch_calls": 1}


_FIELD = re.compile(r"(\w+)=(\S*)")


def task_states(job_dir: Path, spec: Dict[str, Any]) -> Dict[int, Tuple[str, str]]:
    """Each array task's ``(JobState, Reason)`` from ``scontrol show job``;
    tasks missing there are ``UNKNOWN`` once the array has started."""
    job = spec.get("slurm_job")
    if job is None:
        return {}
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job)],
        capture_output=True,
        text=True,
        timeout=SLURM_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    states: Dict[int, Tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        for task in _task_ids(fields.get("ArrayTaskId", "")):
            states[task] = (
                fields.get("JobState", "UNKNOWN"),
                fields.get("Reason", "None").replace("None", ""),
            )
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        # slurmctld unreachable: say nothing rather than fail every point
        return {task: ("PENDING", "") for task in range(spec["tasks"])}
    for task in range(spec["tasks"]):
        states.setdefault(task, ("UNKNOWN", "gone from Slurm's job list"))
    return states


def _task_ids(text: str) -> List[int]:
    """``"3"``, ``"2-5"``, ``"0,4-6%2"`` -> task ids (pending ranges)."""
    ids: List[int] = []
    for part in text.split("%")[0].split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            ids.extend(range(int(low), int(high or low) + 1))
        except ValueError:
            continue
    return ids


def task_log(job_dir: Path, spec: Dict[str, Any], task: int) -> Optional[Path]:
    return job_dir / "logs" / f"task-{task}.out"
