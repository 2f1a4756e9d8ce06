"""Cold start with and without a zero-install remote: time to the first result.

For each link (direct, and a 20 ms RTT slow link), the median of
``--rounds`` fresh ``SshCache(...).load_value(key)`` calls, each from the
constructor to the value (ssh login, remote start, one request), for:

* ``installed, never``: the remote's own fleche_remote, started with
  ``python -m fleche_remote serve`` (no stub: the command before
  zero-install remotes);
* ``installed, auto``: the same interpreter through the stub, which finds
  the installed package of the same version;
* ``bare, cached``: a Python 3.9 with no packages at all, the server code
  found in ``$XDG_CACHE_HOME/fleche-remote/code/<hash>`` from an earlier
  start;
* ``bare, uncached``: the same with an empty cache directory each time,
  so the client sends the code (the first start on a new cluster).

Plus ``ssh host true`` (login alone) for scale. Both remote interpreters
are CPython 3.9 (``.test-state/py3.9`` with this checkout installed, and
``.test-state/bare3.9``, made here from pyenv's 3.9 if missing).

    .venv/bin/python benchmarks/bench_bootstrap.py [--rounds 7] [--delays 0,10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from _remote_common import REPO, Link, bare_ssh_true

from fleche_remote import Call
from fleche_remote.config import load_cache, load_config
from fleche_remote.remote.bootstrap import code_bundle
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import private_sshd

TOML = '[default]\ncache = "main"\nroot = true\n\n[main]\ntemplate = "sql"\nroot = "store"\n'
STATE = REPO / ".test-state"


def _pyenv39() -> str:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = sorted(root.glob("versions/3.9.*/bin/python3.9"))
    if not found:
        sys.exit("no pyenv Python 3.9 to build the bare interpreter from")
    return str(found[-1])


def bare_python() -> str:
    python = STATE / "bare3.9" / "bin" / "python"
    if not python.exists():
        subprocess.run([_pyenv39(), "-m", "venv", "--without-pip", str(python.parent.parent)], check=True)
    return str(python)


def installed_python() -> str:
    python = Path(os.environ.get("FLECHE_REMOTE_PY39") or STATE / "py3.9" / "bin" / "python")
    if not python.exists():
        sys.exit(f"{python} is missing: run scripts/test.sh once, or set FLECHE_REMOTE_PY39")
    return str(python)


def first_result(
    link: Link, workdir: Path, key: str, python: str, bootstrap: str, xdg: Path, expect: object
) -> float:
    """Seconds from the constructor to the first value; checks how it started."""
    setup = [f"export XDG_CACHE_HOME={xdg}"]
    if bootstrap != "never" or "bare" in python:
        setup.insert(0, "unset PYTHONPATH")
    t0 = time.perf_counter()
    cache = SshCache(
        link.server.host,
        python=python,
        ssh_options=link.options,
        workdir=str(workdir),
        setup_commands=setup,
        bootstrap=bootstrap,
        fast_cipher=False,
    )
    try:
        assert cache.load_value(key) == "hello"
        elapsed = time.perf_counter() - t0
        assert cache.bootstrap_status == expect, (cache.bootstrap_status, expect)
    finally:
        cache.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--delays", default="0,10", help="one-way delays in ms")
    args = parser.parse_args()
    bare, installed = bare_python(), installed_python()
    bundle = code_bundle()
    with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp, private_sshd() as server:
        root = Path(tmp)
        workdir = root / "remote"
        workdir.mkdir()
        (workdir / "fleche.toml").write_text(TOML)
        local = load_cache(config=load_config(workdir / "fleche.toml"))
        key = local.save(Call("bench.hello", {}, "hello"))
        local.close()
        print(f"server code: {len(bundle.zip())} bytes zipped, hash {bundle.sha256[:12]}")
        for delay in [float(d) for d in args.delays.split(",")]:
            link = Link(server, delay)
            link.measure_rtt(20)
            warm = root / f"xdg-warm-{delay:g}"
            first_result(link, workdir, key, bare, "always", warm, "sent")  # fills the cache
            login = "ssh host true (login only)"
            cases = [
                ("installed, bootstrap = never", installed, "never", False, None),
                ("installed, bootstrap = auto", installed, "auto", False, "installed"),
                ("bare 3.9, code cached", bare, "auto", False, "cached"),
                ("bare 3.9, code sent (uncached)", bare, "auto", True, "sent"),
            ]
            rows: Dict[str, List[float]] = {label: [] for label in [login] + [c[0] for c in cases]}
            # round-robin, so that the machine's load drifts over every case alike
            for i in range(args.rounds):
                rows[login].append(bare_ssh_true(link, 1))
                for label, python, mode, fresh, expect in cases:
                    xdg = root / f"xdg-{delay:g}-{i}" if fresh else warm
                    rows[label].append(first_result(link, workdir, key, python, mode, xdg, expect))
            print(f"\n{link.label}: raw ssh ping-pong median {link.rtt * 1e3:.1f} ms")
            print("| start | first result, median (ms) | min (ms) |")
            print("|---|---:|---:|")
            for label, samples in rows.items():
                print(f"| {label} | {statistics.median(samples) * 1e3:.0f} | {min(samples) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
