"""``f.map(points, on=LAYER)`` through the real sshd into the private Slurm:
one array job for the misses, failures with Slurm's own state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fleche_remote import cached
from fleche_remote.errors import ComputeError

from . import sweeps
from .support import host_cache, host_dir, laptop


def _jobs(tmp_path: Path) -> list:
    return [json.loads((d / "job.json").read_text()) for d in (tmp_path / "jobs" / "run").iterdir()]


def test_slurm_computes_only_the_misses_in_one_array_job(sshd, slurm_cluster, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "slurm"\nmax_tasks = 2\ntime = "00:05:00"')
    stack = laptop(sshd, tmp_path, host, env=slurm_cluster.env)
    f = cached(cache=stack)(sweeps.square)
    try:
        for x in (0, 5):
            cached(cache=stack.layers[1])(sweeps.square)(x)
        results = f.map(range(6), on=stack.layers[1], progress=False)
        assert [r["square"] for r in results] == [x * x for x in range(6)]
        (job,) = _jobs(tmp_path)
        assert job["count"] == 4 and job["tasks"] == 2 and job["sbatch_calls"] == 1
        shown = slurm_cluster.run("scontrol", "show", "job", "-o", job["slurm_job"]).stdout
        assert len(re.findall(r"ArrayTaskId=\d", shown)) == 2  # the two tasks ran under Slurm
        assert all(host_cache(host).contains(f.key(x)) for x in range(6))
        assert all(stack.layers[0].contains(f.key(x)) for x in range(6))
    finally:
        stack.close()


@pytest.mark.slow  # slurmctld enforces time limits on a 30 s cycle
def test_a_task_past_its_time_limit_fails_its_points_with_the_slurm_state(
    sshd, slurm_cluster, tmp_path: Path
) -> None:
    host = host_dir(tmp_path, 'executor = "slurm"\ntime = "00:00:01"')
    stack = laptop(sshd, tmp_path, host, env=slurm_cluster.env)
    f = cached(cache=stack)(sweeps.slow)
    try:
        with pytest.raises(ComputeError) as info:
            f.map([300], on=stack.layers[1], progress=False)
        assert info.value.slurm_state == "TIMEOUT"
        assert "TIMEOUT" in str(info.value) and "DUE TO TIME LIMIT" in str(info.value)
        assert not host_cache(host).contains(f.key(300))
    finally:
        stack.close()
