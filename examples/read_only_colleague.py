"""Sharing results with a colleague through a read-only ssh key.

Runs on one machine: a private sshd on 127.0.0.1 plays the cluster. On a
real cluster, the colleague's public key goes into ``~/.ssh/authorized_keys``
with a forced command (one line, split here)::

    command="cd ~/project && exec python3 -m fleche_remote serve --read-only",
        no-port-forwarding,no-agent-forwarding,no-X11-forwarding ssh-ed25519 AAAA... colleague

Whatever their ssh client asks for, that key gets a server that reads and
nothing else. The story:

1. The owner's job saves results on the cluster.
2. The colleague's fleche.toml names the cluster with their key; their
   ``@cached`` function finds the owner's results, and computes (without
   storing) what is not there.
3. Their ``fleche-remote ls`` and ``show`` work through the key; a save,
   an eviction or a ``gc`` is refused by the server itself, whatever the
   client claims.

Run: ``.venv/bin/python examples/read_only_colleague.py``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fleche_remote import Call, Rejected, SshCache, cached, load_cache
from fleche_remote.testing import private_sshd

COMPUTED = {"count": 0}


def fit(alpha: float) -> dict:
    """Stands for the owner's analysis."""
    COMPUTED["count"] += 1
    return {"alpha": alpha, "score": round(1.0 / (1.0 + alpha), 4)}


def fleche_remote(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-m", "fleche_remote", *args], capture_output=True, text=True, env=env, timeout=120
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fleche-share-") as tmp, private_sshd() as cluster:
        project, desk = Path(tmp) / "project", Path(tmp) / "colleague"
        project.mkdir()
        desk.mkdir()
        (project / "fleche.toml").write_text(
            '[default]\ncache = "results"\nroot = true\n[results]\ntemplate = "cloudpickle"\nroot = "cache"\n'
        )
        print("1. the owner's job saves fit(0.1) and fit(0.2) on the cluster")
        owner = SshCache(
            cluster.host, python=sys.executable, ssh_options=cluster.ssh_options, workdir=str(project)
        )
        cached(cache=owner)(fit).map([0.1, 0.2])
        owner.close()

        key = cluster.add_key(
            forced_command=f"cd {project} && exec {sys.executable} -m fleche_remote serve --read-only"
        )
        options = ", ".join(f'"{o}"' for o in key)
        (desk / "fleche.toml").write_text(
            f'[default]\ncache = "owner"\nroot = true\n\n[owner]\ntype = "ssh"\nhost = "{cluster.host}"\n'
            f"ssh_options = [{options}]\n"
        )
        os.chdir(desk)
        print("2. the colleague calls fit() through their read-only key")
        colleague = load_cache()
        print(f"   the server says read-only: {colleague.read_only}")
        before = COMPUTED["count"]
        theirs = cached(cache=colleague)(fit)
        print(f"   fit(0.2) = {theirs(0.2)}: computed {COMPUTED['count'] - before} time(s) here")
        theirs(0.3)
        print(
            f"   fit(0.3) is new: computed here, stored on the cluster: {colleague.contains(theirs.key(0.3))}"
        )

        print("3. the command line through the same key")
        listing = fleche_remote("ls", "owner", "--name", "fit")
        print("   " + "\n   ".join(listing.stdout.splitlines()))
        shown = fleche_remote("show", theirs.key(0.1)[:10], "owner")
        print("   show: " + next(line for line in shown.stdout.splitlines() if line.startswith("result")))
        try:
            colleague.save(Call("x.y", {}, 1))
        except Rejected as exc:
            print(f"   save refused: {exc}")
        evict = fleche_remote("evict", theirs.key(0.1)[:10], "--cache", "owner")
        print(f"   evict refused (exit {evict.returncode}): {evict.stderr.strip()}")
        gc = fleche_remote("gc", "owner")
        print(f"   gc refused (exit {gc.returncode})")
        colleague.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
