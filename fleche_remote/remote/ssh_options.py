"""Choosing ssh options for the user when they have not chosen.

Large results move at whatever speed ssh encrypts. OpenSSH prefers
chacha20-poly1305, which is the right default on CPUs without AES
instructions; on CPUs with them, AES-GCM is much faster (on our 2-core
test machine 637-710 MB/s against chacha20's 387-424 MB/s). So when the
user's ssh configuration leaves ``Ciphers`` at OpenSSH's default, and the
CPU has AES instructions, we pass ``-c aes128-gcm@openssh.com,chacha20-poly1305@openssh.com``
(chacha20 stays as the fallback for servers that refuse GCM).

"Leaves at the default" is asked of ssh itself: ``ssh -G`` prints the
configuration it would use for the host, with the user's options and
config files, and ``ssh -G -F none`` the one with no config files at all.
Any ``-c`` or ``Ciphers`` in the user's options, or a cipher list that
differs (a site policy in ``/etc/ssh/ssh_config``, say), and we pass
nothing. The answer is cached per (ssh, options, host) for the process.

Time-outs follow the same rule. OpenSSH waits for the operating system's
TCP time-out (a minute or more) on a host that accepts the connection and
never speaks, and never notices a link that died once connected. So unless
the user's options or config set them, we pass ``ConnectTimeout=10``
(covers the TCP connect and ssh's own handshake, not the authentication, so
a 2FA prompt keeps all the time it needs) and ``ServerAliveInterval=5`` x
``ServerAliveCountMax=3``: a silent host fails in about 10 s, a dead link
in about 15 s. They go after the user's options, because ssh keeps the
first value it is given: the user's own ``-o`` always wins.

Whether a reconnection could prompt (a password, a 2FA code) is asked of
ssh the same way: ``BatchMode yes`` in the effective configuration, or a
live ``ControlMaster`` socket (``ssh -O check``), means it cannot.

Every ssh command line we build puts ``--`` before the host, so a host
string can never be read as an option (``-oProxyCommand=...`` would run a
local command); and :func:`check_host` refuses such a host up front, with
a message, rather than letting ssh fail on a host named ``-o...``.
"""

from __future__ import annotations

import functools
import logging
import shlex
import subprocess
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError

log = logging.getLogger("fleche_remote.ssh")

FAST_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"

#: ``ssh -G`` reads config files only; it never connects. Two seconds is
#: generous, and a slow answer just means we add no option.
_PROBE_TIMEOUT = 2.0


def check_host(host: str) -> str:
    """``host`` if ssh can only read it as a host.

    Raises:
        ConfigError: it is not a non-empty string, or it starts with ``-``
            (no host name does; ssh would have read it as an option, e.g.
            ``-oProxyCommand=...``, which runs a local command).
    """
    if not isinstance(host, str) or not host:
        raise ConfigError(f"the ssh host must be a non-empty string, got {host!r}", key="host")
    if host.startswith("-"):
        raise ConfigError(
            f"the ssh host {host!r} starts with '-', which ssh would read as an option: "
            "give a host name (user@host), and put ssh options in ssh_options",
            key="host",
        )
    return host


def cpu_has_aes() -> bool:
    """Whether the CPU has AES instructions (AES-NI on x86, the ARMv8 AES
    extension), which is when AES-GCM outruns chacha20."""
    if sys.platform == "darwin":
        return True  # every Mac that runs a supported macOS has them
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features") and "aes" in value.split():
                    return True
    except OSError:
        pass
    return False


def _user_names_cipher(options: Sequence[str]) -> bool:
    for i, opt in enumerate(options):
        if opt == "-c" or (opt.startswith("-c") and len(opt) > 2 and not opt.startswith("-o")):
            return True
        text = opt
        if opt == "-o" and i + 1 < len(options):
            text = options[i + 1]
        elif opt.startswith("-o"):
            text = opt[2:]
        if text.strip().lower().startswith("ciphers"):
            return True
    return False


#: The time-outs we pass when the user's ssh configuration leaves them at
#: OpenSSH's defaults: (``ssh -G`` key, option name, our value).
DEFAULT_TIMEOUTS: Tuple[Tuple[str, str, str], ...] = (
    ("connecttimeout", "ConnectTimeout", "10"),
    ("serveraliveinterval", "ServerAliveInterval", "5"),
    ("serveralivecountmax", "ServerAliveCountMax", "3"),
)


def _ssh_config(argv: Sequence[str]) -> Optional[Dict[str, str]]:
    """What ``ssh -G ...`` prints, as {lower-case key: value}; None if it fails."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    config: Dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key.lower(), value.strip())
    return config


@functools.lru_cache(maxsize=64)
def _configs(
    ssh: str, options: Tuple[str, ...], host: str
) -> Tuple[Optional[Mapping[str, str]], Optional[Mapping[str, str]]]:
    """The effective configuration for ``host`` with the user's options and
    files, and OpenSSH's own defaults (no files, no options). ``BatchMode
    yes`` changes a default (ServerAliveInterval becomes 300), so the
    defaults are taken with the same BatchMode."""
    configured = _ssh_config([ssh, "-G", *options, "--", host])
    batch = ["-o", "BatchMode=yes"] if configured and configured.get("batchmode") == "yes" else []
    return configured, _ssh_config([ssh, "-G", "-F", "none", *batch, "--", host])


@functools.lru_cache(maxsize=64)
def _probe(ssh: str, options: Tuple[str, ...], host: str) -> Tuple[str, ...]:
    if _user_names_cipher(options) or not cpu_has_aes():
        return ()
    configured, default = _configs(ssh, options, host)
    if configured is None or default is None:
        return ()
    ciphers = configured.get("ciphers")
    if ciphers is None or ciphers != default.get("ciphers"):
        return ()
    if "aes128-gcm@openssh.com" not in ciphers.split(","):
        return ()  # this ssh was built without it
    log.debug("ssh for %s: no cipher configured, asking for %s", host, FAST_CIPHERS)
    return ("-c", FAST_CIPHERS)


def fast_cipher_options(ssh: str, options: Sequence[str], host: str) -> Tuple[str, ...]:
    """``("-c", FAST_CIPHERS)`` when the user has not chosen a cipher and the
    CPU has AES instructions; ``()`` otherwise (see the module notes)."""
    return _probe(ssh, tuple(options), host)


def timeout_options(ssh: str, options: Sequence[str], host: str) -> Tuple[str, ...]:
    """``-o ConnectTimeout=10`` and the ServerAlive pair, each only where the
    user's options and ssh config leave it at OpenSSH's default; ``()`` when
    ssh cannot say (see the module notes). Meant to follow the user's
    options on the command line."""
    configured, default = _configs(ssh, tuple(options), host)
    if configured is None or default is None:
        return ()
    extra: Tuple[str, ...] = ()
    for key, name, value in DEFAULT_TIMEOUTS:
        if configured.get(key) == default.get(key):
            extra += ("-o", f"{name}={value}")
    return extra


def connection_needs_no_prompt(ssh: str, options: Sequence[str], host: str) -> bool:
    """Whether ssh can connect to ``host`` without asking anybody anything:
    ``BatchMode yes`` in the effective configuration, or a live
    ControlMaster socket to reuse. Only then may a connection be reopened
    unasked (a prompt that nobody answers hangs, or locks an account)."""
    configured, _ = _configs(ssh, tuple(options), host)
    if configured is None:
        return False
    if configured.get("batchmode") == "yes":
        return True
    if configured.get("controlpath", "none") == "none":
        return False
    try:
        done = subprocess.run(
            [ssh, *options, "-O", "check", "--", host],
            capture_output=True,
            timeout=_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def sh_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading ``~`` live
    (the remote expands it to its own home)."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
