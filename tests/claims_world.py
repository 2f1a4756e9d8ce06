"""Real processes racing for one ``@cached`` call (for the claims tests).

Each worker is a fresh Python process running :data:`WORKER`, built from
a JSON spec: the cache's config tables, where to log each computation (one
line per run of the function: what the tests count), and files the test
uses as signals. Every wait has a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

WORKER = r"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from fleche_remote import cached
from fleche_remote.config import cache_from_config

spec = json.loads(sys.argv[1])
cache = cache_from_config(spec["cache"])

def wait_file(path, what):
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"worker {os.getpid()} never saw {what}")
        time.sleep(0.005)

@cached(cache=cache, version="1", lease=spec["lease"])
def slow(x):
    with open(spec["log"], "a") as f:
        f.write(f"{os.getpid()}\n")
    if spec.get("block"):
        wait_file(spec["finish"], "the finish signal")
    if spec.get("raise"):
        raise ValueError("the holder failed")
    return x * 2

open(spec["ready"], "w").close()
wait_file(spec["go"], "the go signal")
open(spec["calling"], "w").close()
print(json.dumps(slow(21)), flush=True)
if hasattr(cache, "flush"):
    cache.flush(60)
"""


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.01)


class World:
    """Workers sharing one cache config, in ``tmp``."""

    def __init__(self, tmp: Path, cache: Any, lease: float = 30.0) -> None:
        self.tmp = tmp
        self.cache = cache
        self.lease = lease
        self.log = tmp / "computed.log"
        self.script = tmp / "claims_worker.py"
        self.script.write_text(WORKER)
        self.procs: List[subprocess.Popen] = []
        self.n = 0

    def computed(self) -> List[str]:
        """The pid of each run of the function, in order."""
        return self.log.read_text().split() if self.log.exists() else []

    def start(self, **options: Any) -> subprocess.Popen:
        self.n += 1
        name = f"w{self.n}"
        spec: Dict[str, Any] = {
            "cache": self.cache,
            "lease": self.lease,
            "log": str(self.log),
            "ready": str(self.tmp / f"{name}.ready"),
            "calling": str(self.tmp / f"{name}.calling"),
            "go": str(self.tmp / "go"),
            "finish": str(self.tmp / "finish"),
            **options,
        }
        err = open(self.tmp / f"{name}.err", "w")
        proc = subprocess.Popen(
            [sys.executable, str(self.script), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        wait_for(lambda: (self.tmp / f"{name}.ready").exists() or proc.poll() is not None, f"{name} ready")
        return proc

    def waiting(self) -> bool:
        """Whether some worker has logged that it waits for a holder."""
        return any("waiting for" in self.stderr(p) for p in self.procs)

    def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 90.0) -> None:
        """``wait_for``, showing what each worker wrote to stderr on a time-out."""
        try:
            wait_for(condition, what, seconds)
        except AssertionError as exc:
            logs = "\n".join(
                f"--- {p.name} (exit {p.poll()}) ---\n{self.stderr(p)[-3000:]}" for p in self.procs
            )  # type: ignore[attr-defined]
            raise AssertionError(f"{exc}; computed by {self.computed()}\n{logs}") from None

    def stderr(self, proc: subprocess.Popen) -> str:
        return (self.tmp / f"{proc.name}.err").read_text()  # type: ignore[attr-defined]

    def go(self) -> None:
        (self.tmp / "go").touch()

    def calling(self, proc: subprocess.Popen) -> bool:
        return (self.tmp / f"{proc.name}.calling").exists()  # type: ignore[attr-defined]

    def finish(self) -> None:
        (self.tmp / "finish").touch()

    def result(self, proc: subprocess.Popen, timeout: float = 120.0) -> Any:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker {proc.pid} failed ({proc.returncode}):\n{self.stderr(proc)}"
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
