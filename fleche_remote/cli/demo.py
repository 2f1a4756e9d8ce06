"""``fleche-remote demo``: a laptop and a cluster on this machine, in a minute.

It starts a private sshd on 127.0.0.1 (:func:`fleche_remote.testing.private_sshd`)
that plays the cluster's login node, makes two directories for the two
disks, and writes a fleche.toml for each. Then one example computation
runs twice, each time in a fresh Python process:

1. the *cluster job* calls ``simulate(n)`` for a few ``n`` through the
   cluster cache (over ssh): every call misses, is computed and saved
   there;
2. the *laptop session* calls the same with a stack (local layer first,
   the cluster second): every call is a hit fetched over ssh and
   back-filled into the local layer, and a second pass is served
   locally.

Each call prints whether it missed, hit over ssh or hit locally, and how
long it took; at the end ``fleche-remote ls`` shows which layers hold
what. Nothing outside a temp directory is touched, and everything is
stopped on exit. It needs OpenSSH's ``sshd`` and ``ssh`` (``scripts/demo.sh``
installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, TextIO

from ..errors import FlecheRemoteError

#: The example computation, a script each process runs; its function is
#: filed as ``__main__.simulate``, as every function of the script you run
#: is (``ls --name simulate`` finds it).
WORK_MODULE = '''
"""The example computation of fleche-remote's demo."""
import os, sys, time

from fleche_remote import cached, load_cache


def simulate(n, steps=200_000):
    """Stands for a long computation on the cluster."""
    time.sleep(float(os.environ.get("DEMO_WORK_SECONDS", "0.4")))
    x = 0.0
    for i in range(steps):
        x = (x * 1.000001 + n) % 1000.0
    return {"n": n, "x": x, "trace": bytes(n * 100_000)}


def run(cache_name, ns, passes):
    cache = load_cache(cache_name)
    layers = getattr(cache, "layers", [cache])
    f = cached(cache=cache)(simulate)
    for _ in range(passes):
        for n in ns:
            key = f.key(n)
            if layers[0].contains(key):
                where = "hit, local layer"
            elif len(layers) > 1 and layers[1].contains(key):
                where = "hit, fetched over ssh"
            else:
                where = "miss, computed"
            t0 = time.perf_counter()
            f(n)
            took = time.perf_counter() - t0
            note = ""
            if where.endswith("over ssh") and layers[0].contains(key):
                note = " -> back-filled into the local layer"
            elif where.startswith("miss"):
                note = " -> saved on the cluster"
            print(f"   simulate({n}): {where:<22} {took * 1000:8.1f} ms{note}", flush=True)
    cache.close()


if __name__ == "__main__":
    run(sys.argv[1], [int(a) for a in sys.argv[3:]], int(sys.argv[2]))
'''


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _run(argv: List[str], cwd: Path, env: Dict[str, str], out: TextIO) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out.write(done.stdout)
    if done.returncode != 0:
        raise FlecheRemoteError(
            f"`{' '.join(argv[:4])} ...` failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
        )
    return time.perf_counter() - started


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the laptop + cluster demo through a private sshd."""
    from ..testing import private_sshd

    ns = [int(n) for n in args.n]
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(private_sshd())
        except (RuntimeError, FileNotFoundError) as exc:
            raise FlecheRemoteError(
                f"the demo could not start a private sshd ({exc}); it needs OpenSSH's sshd and ssh: "
                f"apt-get install openssh-server openssh-client, or run bash scripts/demo.sh"
            )
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fleche-demo-"))
        root = Path(tmp)
        cluster_disk, laptop_disk, code = root / "cluster", root / "laptop", root / "code"
        for d in (cluster_disk, laptop_disk, code):
            d.mkdir()
        (code / "demo_work.py").write_text(WORK_MODULE)
        (cluster_disk / "fleche.toml").write_text(
            '[default]\ncache = "results"\nroot = true\n\n'
            '[results]\ntemplate = "cloudpickle"\nroot = "cache"\n'
        )
        options = ", ".join(f'"{o}"' for o in cluster.ssh_options)
        ssh_table = textwrap.dedent(
            f"""\
            type = "ssh"
            host = "{cluster.host}"
            python = "{sys.executable}"
            workdir = "{cluster_disk}"
            ssh_options = [{options}]
            """
        )
        (laptop_disk / "fleche.toml").write_text(
            '[default]\ncache = "shared"\nroot = true\n\n'
            f"[cluster]   # the cluster alone\n{ssh_table}\n"
            '[[shared]]  # local layer first: saves and back-fills land here\ntemplate = "cloudpickle"\n'
            'root = "cache"\n\n'
            f"[[shared]]  # then the cluster, through one ssh connection\n{ssh_table}"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(code), str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        env["DEMO_WORK_SECONDS"] = str(args.work_seconds)
        env.pop("FLECHE_REMOTE_PROGRESS", None)
        _say(out, f"a private sshd on 127.0.0.1:{cluster.port} plays the cluster; disks in {root}")
        _say(out, f"(set up in {time.perf_counter() - started:.1f} s)\n")

        work = [sys.executable, str(code / "demo_work.py")]
        _say(out, "run 1: a cluster job, in its own process, through the cluster cache (ssh)")
        first = _run([*work, "cluster", "1", *map(str, ns)], laptop_disk, env, out)
        _say(out, f"   process took {first:.2f} s\n")

        _say(out, "run 2: a laptop session, in another process, through the stack [local, cluster]")
        second = _run([*work, "shared", "2", *map(str, ns)], laptop_disk, env, out)
        _say(out, f"   process took {second:.2f} s (the second pass is local)\n")

        _say(out, "fleche-remote ls: where each result is now (layer 0 local, 1 the cluster)")
        _run([sys.executable, "-m", "fleche_remote", "ls", "shared"], laptop_disk, env, out)
    _say(out, f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


def register(sub: Any) -> None:
    """Add ``demo`` to the command line."""
    p = sub.add_parser(
        "demo",
        help="a laptop and a cluster on this machine, through a private sshd",
        description=(
            "Start a private sshd on 127.0.0.1 that plays a cluster, run an example computation "
            "in two processes (a cluster job, then a laptop session with a local layer), and show "
            "the misses, the hits fetched over ssh, the back-fill and the timings."
        ),
    )
    p.add_argument("-n", nargs="+", default=["1", "2", "3"], metavar="N", help="the arguments to compute")
    p.add_argument(
        "--work-seconds", type=float, default=0.4, metavar="S", help="how long each computation stands for"
    )
    p.set_defaults(run=cmd_demo)
