"""Which discovered fleche.toml files are safe to read.

Discovery walks up from the working directory, and a table may name a
program to run (``ssh = ...``, ``python = ...``, ``setup_commands``). On a
shared login node, whoever can write ``/tmp/fleche.toml`` or
``/scratch/fleche.toml`` would otherwise run code as every user whose
working directory is below it. So, like git's ``safe.directory`` check, a
*discovered* file is read only when

* it is owned by the user running Python (the effective uid) or by root,
  and
* neither its group nor others may write it.

A file that fails is skipped with an :class:`UntrustedConfigWarning`
naming it and the fix. The mode is read from the open file descriptor the
TOML is then parsed from, so the file cannot be swapped between the check
and the read. A file named explicitly (``load_config(path)``,
``--config PATH``) is the user's own choice and is not checked. On
platforms without Unix owners (Windows) every file is trusted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional


class ConfigWarning(UserWarning):
    """Something in a fleche.toml was accepted but deserves attention."""


class UntrustedConfigWarning(ConfigWarning):
    """A discovered fleche.toml was skipped because others could have written it."""


def untrusted_reason(st: os.stat_result) -> Optional[str]:
    """Why a file with status ``st`` must not be trusted, or None if it may.

    Args:
        st: the file's ``os.fstat`` result.
    """
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # no Unix ownership to check
        return None
    me = geteuid()
    if st.st_uid not in (me, 0):
        return f"it is owned by uid {st.st_uid}, not by you (uid {me}) or root"
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    if writable:
        return f"it is writable by {' and '.join(writable)} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def skip_message(path: Path, reason: str) -> str:
    """The warning for a skipped file: which one, why, and what to do."""
    return (
        f"ignoring {path}: {reason}, so anyone who can write it could make fleche-remote run "
        f"programs as you. If it is yours, run `chmod go-w {path}` (and own it); "
        f"otherwise remove it or add a fleche.toml of your own closer to your working directory "
        f"(with root = true in [default] to stop the walk there)"
    )
