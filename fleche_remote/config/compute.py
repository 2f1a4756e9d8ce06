"""The ``[compute]`` table: how a host computes the misses of ``f.map(..., on=...)``.

It belongs in the fleche.toml that the *server* reads (the cluster's), because
how a cluster computes is the cluster's choice, not the laptop's::

    [compute]
    executor = "slurm"              # or "local": a process pool on the host
    partition = "short"
    time = "00:30:00"
    cpus_per_task = 1
    mem = "2G"
    sbatch_options = ["--account=proj42"]
    setup_commands = ["module load python/3.12", "source ~/venv/bin/activate"]
    max_tasks = 1000                # array tasks per sweep, at most
    points_per_task = 1             # at least; grows to stay within max_tasks
    keep_jobs = "7d"                # a finished sweep's directory (logs) goes after this; 0: at once

    # executor = "local"
    # workers = 8

Without the table a server refuses ``on=`` (see :data:`NO_COMPUTE_HINT`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from ..errors import ConfigError
from ..storage.quota import parse_age

#: The top-level table's name (not a cache: ``Config.cache_names`` skips it).
COMPUTE_TABLE = "compute"

#: What a refusal says when the host has no ``[compute]`` table.
NO_COMPUTE_HINT = (
    "this host does not compute: its fleche.toml has no [compute] table. Add one to the fleche.toml the "
    'server reads, e.g.\n  [compute]\n  executor = "local"   # a process pool here; workers = 8\n'
    'or\n  [compute]\n  executor = "slurm"   # one job array; partition = "...", time = "01:00:00"'
)

EXECUTORS = ("local", "slurm")

#: How long a finished sweep's directory (its inputs, states and logs) is
#: kept, unless the table says otherwise: long enough to read a failed
#: task's log, short enough that a busy host does not fill its quota.
DEFAULT_KEEP_JOBS = 7 * 86400.0

#: Array tasks per sweep unless the table says otherwise: a sweep of 10,000
#: points is one array of at most this many tasks, not 10,000 jobs.
DEFAULT_MAX_TASKS = 1000


@dataclass(frozen=True)
class ComputeSettings:
    """A parsed ``[compute]`` table (see the module notes)."""

    executor: str = "local"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    partition: Optional[str] = None
    time: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    sbatch_options: Tuple[str, ...] = ()
    setup_commands: Tuple[str, ...] = ()
    max_tasks: int = DEFAULT_MAX_TASKS
    points_per_task: int = 1
    max_running: Optional[int] = None
    directory: Optional[Path] = None
    python: Optional[str] = None
    keep_jobs: float = DEFAULT_KEEP_JOBS

    def jobs_directory(self) -> Path:
        """Where sweeps keep their inputs, states and logs: ``directory``, or
        ``~/.cache/fleche-remote/jobs`` (home is shared with compute nodes on
        most clusters; set ``directory`` where it is not)."""
        if self.directory is not None:
            return self.directory
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "fleche-remote" / "jobs"

    def split(self, points: int) -> Tuple[int, int]:
        """``(tasks, points_per_task)`` for a sweep: one array within the caps."""
        per = max(self.points_per_task, -(-points // self.max_tasks), 1)
        return max(-(-points // per), 1), per


def _positive(table: Mapping[str, Any], name: str, where: str) -> Optional[int]:
    value = table.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _strings(table: Mapping[str, Any], name: str, where: str) -> Tuple[str, ...]:
    value = table.get(name, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {name} must be a list of strings, got {value!r}")
    return tuple(value)


_KNOWN = {
    "executor", "workers", "partition", "time", "cpus_per_task", "mem", "sbatch_options",
    "setup_commands", "max_tasks", "points_per_task", "max_running", "directory", "python", "keep_jobs",
}  # fmt: skip


def parse_compute(table: Any, base_dir: Optional[Path] = None, where: str = "[compute]") -> ComputeSettings:
    """A ``[compute]`` table as settings.

    Raises:
        ConfigError: an unknown key, an unknown executor or a value of the
            wrong type, named with the fix.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")
    executor = table.get("executor", "local")
    if executor not in EXECUTORS:
        raise ConfigError(
            f"{where}: executor must be one of {', '.join(map(repr, EXECUTORS))}, got {executor!r}"
        )
    kwargs: dict[str, Any] = {"executor": executor}
    for name in ("workers", "cpus_per_task", "max_tasks", "points_per_task", "max_running"):
        value = _positive(table, name, where)
        if value is not None:
            kwargs[name] = value
    for name in ("partition", "time", "mem", "python"):
        value = table.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
        if value is not None:
            kwargs[name] = value
    if isinstance(table.get("time"), int):
        kwargs["time"] = str(table["time"])
    kwargs["sbatch_options"] = _strings(table, "sbatch_options", where)
    kwargs["setup_commands"] = _strings(table, "setup_commands", where)
    if "keep_jobs" in table:  # 0: each goes at the next submission once it has ended
        keep = table["keep_jobs"]
        zero = keep == 0 and not isinstance(keep, bool)
        kwargs["keep_jobs"] = 0.0 if zero else parse_age(keep, key=f"{where} keep_jobs")
    directory = table.get("directory")
    if directory is not None:
        if not isinstance(directory, str):
            raise ConfigError(f"{where}: directory must be a string, got {directory!r}")
        path = Path(os.path.expanduser(directory))
        kwargs["directory"] = path if path.is_absolute() or base_dir is None else base_dir / path
    return ComputeSettings(**kwargs)


def compute_settings(config: Mapping[str, Any]) -> Optional[ComputeSettings]:
    """The ``[compute]`` table of a loaded config, parsed; None without one."""
    table = config.get(COMPUTE_TABLE)
    if table is None:
        return None
    source = getattr(config, "source", lambda _name: None)(COMPUTE_TABLE)
    where = f"[compute] in {source}" if source else "[compute]"
    return parse_compute(table, source.parent if source else None, where)


__all__: List[str] = [
    "COMPUTE_TABLE",
    "NO_COMPUTE_HINT",
    "ComputeSettings",
    "compute_settings",
    "parse_compute",
]
