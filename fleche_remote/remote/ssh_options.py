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
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from typing import Optional, Sequence, Tuple

log = logging.getLogger("fleche_remote.ssh")

FAST_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"

#: ``ssh -G`` reads config files only; it never connects. Two seconds is
#: generous, and a slow answer just means we add no option.
_PROBE_TIMEOUT = 2.0


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


def _ciphers(argv: Sequence[str]) -> Optional[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "ciphers":
            return value.strip()
    return None


@functools.lru_cache(maxsize=64)
def _probe(ssh: str, options: Tuple[str, ...], host: str) -> Tuple[str, ...]:
    if _user_names_cipher(options) or not cpu_has_aes():
        return ()
    configured = _ciphers([ssh, "-G", *options, host])
    default = _ciphers([ssh, "-G", "-F", "none", host])
    if configured is None or default is None or configured != default:
        return ()
    if "aes128-gcm@openssh.com" not in configured.split(","):
        return ()  # this ssh was built without it
    log.debug("ssh for %s: no cipher configured, asking for %s", host, FAST_CIPHERS)
    return ("-c", FAST_CIPHERS)


def fast_cipher_options(ssh: str, options: Sequence[str], host: str) -> Tuple[str, ...]:
    """``("-c", FAST_CIPHERS)`` when the user has not chosen a cipher and the
    CPU has AES instructions; ``()`` otherwise (see the module notes)."""
    return _probe(ssh, tuple(options), host)
