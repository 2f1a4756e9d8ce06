"""Sweeps on the host, as directories: what the server does for ``on=``.

A sweep's misses become one *job*: a directory under the host's jobs
directory (``[compute] directory``) holding

* ``job.json``: what to run and how (plain JSON, written by the server);
* ``function.bin``: the client's function, opaque bytes;
* ``points.bin``: each point's record template and opaque argument bytes
  (a pickle of plain records and ``bytes``: the server pickles, the worker
  unpickles; the server never unpickles anything a client sent);
* ``state/<index>``: one small JSON file per point, written by the worker
  (``running``, ``done``, ``failed`` with the error) or by :func:`status`
  when the task computing it ended without saying (Slurm killed it);
* ``logs/``: the workers' stdout and stderr.

A job whose points have all ended is removed at the first submission
after ``[compute] keep_jobs`` (7 days by default): renamed out of ``run/``
first, so that a status request sees it whole or not at all. Its age is
in its name, so a submission looks into old jobs only.

``keys/<key>`` names the job and index computing a key while it is
queued or running (created with ``O_EXCL``, removed when the point ends):
a second sweep of the same key, from a rerun, another laptop or another
server process on this host, attaches to that point instead of computing
it again.

Nothing here imports or runs user code; :mod:`.worker` does, in its own
processes.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..call import CallRecord
from ..config.compute import ComputeSettings
from ..errors import Rejected

#: Point states, in the order a point goes through them.
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"

#: Seconds a key claimed by a job whose ``job.json`` is not written yet
#: counts as being computed (the claiming server writes it right after).
CLAIM_SETTLE = 120.0

#: Lines of a task's log that a failure it did not report itself carries.
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ComputeHost:
    """What a server needs to run sweeps: its settings and how a worker
    opens the same cache (config file, cache name, working directory).

    Attributes:
        forced: the server was started by an ``authorized_keys`` forced
            command; computing is then refused unless ``allowed``.
        allowed: the forced command opted in (``serve --allow-compute``).
    """

    settings: Optional[ComputeSettings]
    config_path: Optional[str]
    cache_name: Optional[str]
    cwd: str
    forced: bool = False
    allowed: bool = False


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def set_state(job_dir: Path, index: int, state: str, **info: Any) -> None:
    """Record a point's state (atomic: a reader never sees half of it)."""
    write_atomic(job_dir / "state" / str(index), json.dumps({"state": state, **info}).encode())


def read_state(job_dir: Path, index: int) -> Optional[Dict[str, Any]]:
    try:
        state = json.loads((job_dir / "state" / str(index)).read_bytes())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def key_file(root: Path, key: str) -> Path:
    return root / "keys" / key[:2] / key


def release_key(root: Path, key: str, job: str) -> None:
    """Forget that ``job`` computes ``key`` (only if it is still that job)."""
    path = key_file(root, key)
    try:
        if path.read_text().split()[0] == job:
            path.unlink()
    except (OSError, IndexError):
        pass


class Jobs:
    """The jobs directory of one host (see the module notes)."""

    def __init__(self, host: ComputeHost) -> None:
        assert host.settings is not None
        self.host = host
        self.settings: ComputeSettings = host.settings
        self.root = self.settings.jobs_directory()
        self._jobs: Dict[str, Dict[str, Any]] = {}

    # -- submitting -------------------------------------------------------------

    def submit(
        self,
        function: bytes,
        about: Dict[str, Any],
        records: Sequence[CallRecord],
        arguments: Sequence[bytes],
        stored: Sequence[bool],
    ) -> List[Optional[List[Any]]]:
        """Start computing the points not ``stored`` and not already being
        computed; return, per point, ``[job, index]`` to poll (None: stored).
        """
        for sub in ("keys", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.clean()
        job = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        job_dir = self.root / "run" / job
        answer: List[Optional[List[Any]]] = [None] * len(records)
        mine: List[int] = []
        todo = [i for i, is_stored in enumerate(stored) if not is_stored]
        if todo:
            for sub in ("state", "logs"):
                (job_dir / sub).mkdir(parents=True, exist_ok=True)
        for i in todo:
            ours = len(mine)
            other = self._claim(records[i].key, job, ours)
            if other is None:
                mine.append(i)
                answer[i] = [job, ours]
            else:
                answer[i] = other
        if not mine:
            if todo:
                os.rmdir(job_dir / "state")
                os.rmdir(job_dir / "logs")
                os.rmdir(job_dir)
            return answer
        tasks, per = self.settings.split(len(mine))
        spec = {
            **about,
            "job": job,
            "count": len(mine),
            "tasks": tasks,
            "per_task": per,
            "keys": [records[i].key for i in mine],
            "executor": self.settings.executor,
            "workers": self.settings.workers,
            "config": self.host.config_path,
            "cache": self.host.cache_name,
            "cwd": self.host.cwd,
            "root": str(self.root),
            "created": time.time(),
        }
        write_atomic(job_dir / "function.bin", function)
        points = [(records[i], arguments[i]) for i in mine]
        write_atomic(job_dir / "points.bin", pickle.dumps(points, protocol=4))
        write_atomic(job_dir / "job.json", json.dumps(spec).encode())
        try:
            launched = self._executor().launch(job_dir, spec, self.settings)
        except Exception:
            for key in spec["keys"]:
                release_key(self.root, key, job)
            raise
        spec.update(launched)
        write_atomic(job_dir / "job.json", json.dumps(spec).encode())
        return answer

    def clean(self) -> List[str]:
        """Remove the jobs older than ``keep_jobs`` whose points have all
        ended (done or failed); the names of those removed. A job still
        queued or running stays, however old."""
        run = self.root / "run"
        cutoff = time.time() - self.settings.keep_jobs
        removed: List[str] = []
        try:
            names = sorted(os.listdir(run))
        except FileNotFoundError:
            return removed
        for name in names:
            started = _job_time(name)
            if started is None:
                continue  # not a job (a rename in progress, say)
            if started > cutoff:
                break  # names sort by age: the rest are younger still
            if not self._ended(name):
                continue
            gone = run / f".gone-{name}-{secrets.token_hex(3)}"
            try:
                os.rename(run / name, gone)
            except OSError:
                continue  # another server process took it first
            self._jobs.pop(name, None)
            shutil.rmtree(gone, ignore_errors=True)
            removed.append(name)
        return removed

    def _ended(self, job: str) -> bool:
        try:
            _, spec = self._job(job)
        except Rejected:  # never got its job.json: its submission failed, or is under way
            return _age(self.root / "run" / job) > CLAIM_SETTLE
        try:
            states = self.status([[job, i] for i in range(spec["count"])])
        except (Rejected, OSError, KeyError, TypeError):
            return False
        return all(state["state"] in (DONE, FAILED) for state in states)

    def _claim(self, key: str, job: str, index: int) -> Optional[List[Any]]:
        """None when ``job`` now computes ``key``; else ``[job, index]`` of
        the live point that already does."""
        path = key_file(self.root, key)
        path.parent.mkdir(exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = _read_claim(path)
                if other is not None and self._live(other, path):
                    return other
                try:  # ended without removing its entry: take over
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{job} {index}\n")
            return None
        raise Rejected(f"could not claim key {key[:16]} in {self.root}: it keeps changing hands")

    def _live(self, point: List[Any], claim: Path) -> bool:
        try:
            return self.status([point])[0]["state"] in (QUEUED, RUNNING)
        except Rejected:
            # its job.json is not written yet (keys are claimed first): young means alive
            return _age(claim) < CLAIM_SETTLE

    def _executor(self) -> Any:
        if self.settings.executor == "slurm":
            from . import slurm

            return slurm
        from . import local

        return local

    # -- polling ------------------------------------------------------------------

    def _job(self, job: str) -> Tuple[Path, Dict[str, Any]]:
        if not job.replace("-", "").isalnum() or len(job) > 64:
            raise Rejected(f"no such job {job[:64]!r}")
        job_dir = self.root / "run" / job
        spec = self._jobs.get(job)
        if spec is None:
            try:
                spec = json.loads((job_dir / "job.json").read_bytes())
            except (OSError, ValueError):
                raise Rejected(f"no job {job!r} in {self.root / 'run'} (removed, or another host's jobs)")
            self._jobs[job] = spec
        return job_dir, spec

    def status(self, points: Sequence[Sequence[Any]]) -> List[Dict[str, Any]]:
        """Each ``[job, index]``'s state: ``{"state": ..., **details}``.

        A point without a state file whose task has ended (Slurm killed it,
        the pool died) is failed here, with the task's state and its log's
        last lines, and recorded so, so that the next sweep resubmits it.
        """
        out: List[Dict[str, Any]] = []
        tasks: Dict[str, Dict[int, Tuple[str, str]]] = {}
        for job, index in points:
            job_dir, spec = self._job(str(job))
            if not isinstance(index, int) or not 0 <= index < spec["count"]:
                raise Rejected(f"job {job} has no point {index!r}")
            state = read_state(job_dir, index)
            if state is not None and state["state"] in (DONE, FAILED):
                out.append(state)
                continue
            if job not in tasks:
                tasks[job] = self._executor_of(spec).task_states(job_dir, spec)
            task = index // spec["per_task"]
            task_state, reason = tasks[job].get(task, ("PENDING", ""))
            if task_state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING"):
                if state is None:
                    state = {"state": RUNNING if task_state != "PENDING" else QUEUED}
                state["task"] = task_state
                out.append(state)
                continue
            state = read_state(job_dir, index)  # it may have finished since
            if state is not None and state["state"] in (DONE, FAILED):
                out.append(state)
                continue
            log = self._executor_of(spec).task_log(job_dir, spec, task)
            failed = {
                "state": FAILED,
                "type": "fleche_remote.errors.ComputeError",
                "message": f"{'Slurm task' if spec['executor'] == 'slurm' else 'the worker'} ended "
                f"{task_state}{f' ({reason})' if reason else ''} before this point was done",
                "slurm_state": task_state,
                "log": _tail(log),
            }
            set_state(job_dir, index, FAILED, **{k: v for k, v in failed.items() if k != "state"})
            release_key(Path(spec["root"]), spec["keys"][index], str(job))
            out.append(failed)
        return out

    def _executor_of(self, spec: Dict[str, Any]) -> Any:
        if spec["executor"] == "slurm":
            from . import slurm

            return slurm
        from . import local

        return local


def _job_time(name: str) -> Optional[float]:
    """When a job was submitted, from its name (``YYYYmmdd-HHMMSS-hex``)."""
    try:
        return time.mktime(time.strptime(name[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        return None


def _read_claim(path: Path) -> Optional[List[Any]]:
    try:
        job, index = path.read_text().split()
        return [job, int(index)]
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _tail(path: Optional[Path]) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
