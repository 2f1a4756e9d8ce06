"""A host removes a finished sweep's directory after ``[compute] keep_jobs``,
never one still running, and a sweep through the sshd leaves only what is
young or still at work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from fleche_remote import cached
from fleche_remote.compute.jobs import DONE, ComputeHost, Jobs, set_state
from fleche_remote.compute.local import FINISHED
from fleche_remote.config.compute import parse_compute
from fleche_remote.errors import ConfigError

from . import sweeps
from .support import host_dir, laptop


def jobs_at(root: Path, keep: object) -> Jobs:
    settings = parse_compute({"executor": "local", "directory": str(root), "keep_jobs": keep})
    return Jobs(ComputeHost(settings=settings, config_path=None, cache_name=None, cwd=str(root)))


def make_job(root: Path, age_s: float, runner_pid: int, *, states: List[str], finished: bool) -> str:
    when = time.time() - age_s
    name = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{len(list(root.glob('run/*'))):08x}"
    job_dir = root / "run" / name
    (job_dir / "state").mkdir(parents=True)
    (job_dir / "logs").mkdir()
    spec = {"job": name, "count": len(states), "tasks": 1, "per_task": len(states), "executor": "local",
            "keys": ["ab" * 32] * len(states), "root": str(root), "runner_pid": runner_pid}  # fmt: skip
    (job_dir / "job.json").write_text(json.dumps(spec))
    for i, state in enumerate(states):
        set_state(job_dir, i, state)
    if finished:
        (job_dir / FINISHED).touch()
    return name


@pytest.fixture
def runner() -> Iterator[List[subprocess.Popen]]:
    """A live process standing for a job's worker pool (its command line names the job)."""
    procs: List[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(30)


def test_old_finished_jobs_go_young_and_running_ones_stay(tmp_path: Path, runner: list) -> None:
    root = tmp_path / "jobs"
    old_done = make_job(root, 8 * 86400, 0, states=[DONE, DONE], finished=True)
    young_done = make_job(root, 3600, 0, states=[DONE], finished=True)
    old_running = make_job(root, 9 * 86400, 0, states=[DONE], finished=False)
    job_json = root / "run" / old_running / "job.json"
    spec = json.loads(job_json.read_text())
    spec.update(count=2, per_task=2, keys=["ab" * 32] * 2)  # one point done, one not started
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", "print('up', flush=True); import time; time.sleep(120)", old_running],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    runner.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # running, its name in its argv
    spec["runner_pid"] = proc.pid
    job_json.write_text(json.dumps(spec))

    removed = jobs_at(root, "7d").clean()

    assert removed == [old_done], (removed, proc.poll(), Path(f"/proc/{proc.pid}/cmdline").read_bytes())
    assert sorted(p.name for p in (root / "run").iterdir()) == sorted([young_done, old_running])
    proc.kill()
    proc.wait(30)
    # its pool gone without finishing: the point left is failed, and the job ended
    assert jobs_at(root, "7d").clean() == [old_running]
    assert [p.name for p in (root / "run").iterdir()] == [young_done]


def test_keep_jobs_takes_an_age_or_zero(tmp_path: Path) -> None:
    assert jobs_at(tmp_path, 0).settings.keep_jobs == 0
    assert jobs_at(tmp_path, "12h").settings.keep_jobs == 12 * 3600
    with pytest.raises(ConfigError, match="keep_jobs"):
        jobs_at(tmp_path, "soon")


def test_a_sweep_removes_the_finished_ones_before_it(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"\nworkers = 2\nkeep_jobs = 0')
    stack = laptop(sshd, tmp_path, host)
    f = cached(cache=stack)(sweeps.square)
    try:
        assert [r["square"] for r in f.map([1, 2], on=stack.layers[1], progress=False)] == [1, 4]
        (first,) = (tmp_path / "jobs" / "run").iterdir()
        assert [r["square"] for r in f.map([3], on=stack.layers[1], progress=False)] == [9]
        (second,) = (tmp_path / "jobs" / "run").iterdir()
        assert second.name != first.name and not first.exists()
    finally:
        stack.close()
