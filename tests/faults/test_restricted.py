"""Restricted keys through the real sshd: ``authorized_keys`` lines with
``command="... serve --read-only"`` or ``--append-only`` and ``restrict``,
as the README tells a cache's owner to write them.

The server enforces the mode whatever the client sends: the tests go
around the client's own checks and send the forbidden requests straight
to the server. And the key runs nothing but the server: a shell command
asked for on the ssh command line never runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Tuple

import pytest

from fleche_remote import Call, Rejected
from fleche_remote.remote.client import SshCache
from fleche_remote.remote.protocol import MAGIC

from .support import remote_with_stores, restricted_key


def _colleague(sshd: Any, options: Tuple[str, ...]) -> SshCache:
    # python and workdir are ignored by the forced command; set to prove it
    return SshCache(sshd.host, ssh_options=options, python="/nonexistent/python", timeout=15)


def test_read_only_key_reads_and_refuses_everything_else(sshd, tmp_path: Path) -> None:
    remote = remote_with_stores(tmp_path)
    owner = SshCache(sshd.host, workdir=str(remote), python=sys.executable, ssh_options=sshd.ssh_options)
    key = owner.save(Call("shared.f", {"x": 1}, {"answer": 42}))
    owner.close()
    options = restricted_key(sshd, tmp_path, remote, "read-only")
    colleague = _colleague(sshd, options)
    try:
        assert colleague.read_only
        assert colleague.load_value(key) == {"answer": 42}
        assert colleague.expand(key[:8]) == key
        assert [c.key for c in colleague.query("shared.f")] == [key]
        # the client's own read-only check would stop these; go around it
        for op, args in [
            ("save_records", {"records": [], "inline": []}),
            ("evict", {"key": str(key)}),
            ("collect_garbage", {}),
        ]:
            with pytest.raises(Rejected, match=f"read-only: '{op}' is not allowed"):
                colleague._request(op, args)
        assert colleague.load_value(key) == {"answer": 42}  # same connection, still serving
    finally:
        colleague.close()
    _shell_commands_never_run(sshd, tmp_path, options)


def test_append_only_key_adds_and_never_replaces_or_removes(sshd, tmp_path: Path) -> None:
    remote = remote_with_stores(tmp_path)
    owner = SshCache(sshd.host, workdir=str(remote), python=sys.executable, ssh_options=sshd.ssh_options)
    old = owner.save(Call("shared.f", {"x": 1}, "first"))
    owner.close()
    options = restricted_key(sshd, tmp_path, remote, "append-only")
    colleague = _colleague(sshd, options)
    try:
        assert colleague.info()["append_only"] is True
        new = colleague.save(Call("shared.f", {"x": 2}, "second"))  # a new entry: allowed
        big = colleague.save(Call("shared.f", {"x": 3}, os.urandom(3 << 20)))  # streamed, too
        assert colleague.save(Call("shared.f", {"x": 1}, "first")) == old  # the same again: a no-op
        with pytest.raises(Rejected, match="append-only: .* cannot be overwritten"):
            colleague.save(Call("shared.f", {"x": 1}, "changed"))
        with pytest.raises(Rejected, match="append-only"):  # one bad entry refuses the whole batch
            colleague.save_many([Call("shared.f", {"x": 4}, 4), Call("shared.f", {"x": 2}, "changed")])
        with pytest.raises(Rejected, match="append-only: 'evict' is not allowed"):
            colleague.evict(old)
        with pytest.raises(Rejected, match="append-only: 'collect_garbage' is not allowed"):
            colleague._request("collect_garbage")
        assert colleague.load_value(old) == "first"
        assert colleague.load_value(new) == "second"
        assert len(colleague.load_value(big)) == 3 << 20
        assert not colleague.contains(Call("shared.f", {"x": 4}).key())
    finally:
        colleague.close()
    _shell_commands_never_run(sshd, tmp_path, options)


def _shell_commands_never_run(sshd: Any, tmp_path: Path, options: Tuple[str, ...]) -> None:
    """What the key's holder asks to run is ignored: the server runs (and
    answers with its banner), the command does not; no pty either."""
    planted = tmp_path / "ran-a-command"
    out = subprocess.run(
        [sshd.ssh_executable, *options, sshd.host, f"touch {planted}; echo ran"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert MAGIC in out.stdout and b"ran" not in out.stdout.replace(MAGIC, b"")
    assert not planted.exists()
    tty = subprocess.run(
        [sshd.ssh_executable, *options, "-tt", sshd.host, "sh"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert b"PTY allocation request failed" in tty.stderr
