"""A host string that starts with ``-`` never reaches ssh as an option.

``ssh -oProxyCommand='touch CANARY'`` runs a local command, so a host
taken from a shared fleche.toml or a command line must not be read as
one. Hosts like that are refused up front; and every ssh command line we
build puts ``--`` before the host, which the tests check by running the
real ``ssh`` on each command line with the host swapped for a hostile one
after the check (the canary must not appear).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, List

import pytest

from fleche_remote import ConfigError
from fleche_remote.cli import main as cli_main
from fleche_remote.cli.info import _ssh_argv
from fleche_remote.config import cache_from_config
from fleche_remote.remote import ssh_options
from fleche_remote.remote.client import SshCache

from .helpers import remote_dir, ssh_cache


def _hostile(canary: Path) -> str:
    return f"-oProxyCommand=touch {canary}"


def _run(argv: List[str]) -> None:
    # ssh fails at once on a host it cannot resolve; the deadline only
    # turns a hang into a failure
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def test_a_host_starting_with_a_dash_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    with pytest.raises(ConfigError, match="starts with '-', which ssh would read as an option"):
        SshCache(_hostile(canary))
    with pytest.raises(ConfigError, match="starts with '-'"):
        cache_from_config({"type": "ssh", "host": _hostile(canary)})
    with pytest.raises(ConfigError, match="non-empty string"):
        SshCache("")
    assert not canary.exists()


def test_every_ssh_command_line_ends_options_before_the_host(sshd: Any, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    argv = cache.argv()
    assert argv[argv.index(cache.host) - 1] == "--"
    doctor = _ssh_argv(cache, "true")
    assert doctor[doctor.index(cache.host) - 1] == "--"

    # a host that got past the check (set after construction) is still a host
    cache.host = _hostile(canary)
    _run(cache.argv())
    _run(_ssh_argv(cache, "true"))
    options = tuple(sshd.ssh_options)
    ssh_options._configs.cache_clear()
    ssh_options._probe.cache_clear()
    assert ssh_options.fast_cipher_options("ssh", options, cache.host) == ()
    assert ssh_options.timeout_options("ssh", options, cache.host) == ()
    assert (
        ssh_options.connection_needs_no_prompt(
            "ssh", (*options, "-o", "ControlPath=/nonexistent"), cache.host
        )
        is False
    )
    assert not canary.exists()


def test_install_refuses_a_host_starting_with_a_dash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "canary"
    assert cli_main(["install", "--timeout", "30", "--", _hostile(canary)]) == 2
    assert "starts with '-'" in capsys.readouterr().err
    assert not canary.exists()
