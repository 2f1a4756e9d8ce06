"""The one exception tree of fleche-remote.

Every error the library raises on purpose derives from
:class:`FlecheRemoteError`, and most also derive from the built-in type a
caller would naturally catch (``KeyError`` for a missing entry,
``ValueError`` for bad configuration, ``RuntimeError`` for a dead remote),
so that code written against plain dict-like caches keeps working.

Messages say what was expected and what arrived.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

#: Frames under these directories are library code (this package, and the
#: standard library that calls back into it: contextlib, threading), which
#: a warning should not point at.
_LIBRARY_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(os.__file__)) + os.sep,
)


def _is_library(filename: str) -> bool:
    if filename.startswith(_LIBRARY_DIRS[0]):
        return True
    return filename.startswith(_LIBRARY_DIRS[1]) and "site-packages" not in filename


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this
    function point at the first frame outside fleche-remote (and the
    standard library): the user's own line, however deep in the library
    the warning arose.
    """
    level = 1
    frame = sys._getframe(1)  # the function about to warn: level 1
    while frame.f_back is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


class FlecheRemoteError(Exception):
    """Base class of every error raised on purpose by fleche-remote."""


class Rejected(FlecheRemoteError):
    """A cache refused a write (it is read-only, or its server forbids it)."""


class AmbiguousDigestError(FlecheRemoteError, KeyError):
    """A short key matched more than one stored entry.

    It is a ``KeyError`` so that "no single entry for this key" can be
    handled in one place; ``candidates`` lists (some of) the matches.
    """

    def __init__(self, prefix: str, candidates: Sequence[str]) -> None:
        self.prefix = prefix
        self.candidates = tuple(candidates)
        # args stay plain data so the error can travel from a server
        super().__init__(prefix, list(self.candidates))

    def __str__(self) -> str:
        shown = ", ".join(c[:16] for c in self.candidates[:5])
        return (
            f"key prefix {self.prefix!r} is ambiguous: it matches {len(self.candidates)}+ "
            f"entries ({shown}); give more characters"
        )


class ConfigError(FlecheRemoteError, ValueError):
    """A fleche.toml (or a config dict) is malformed.

    ``file``, ``table`` and ``key`` say where; any of them may be ``None``
    when the config did not come from a file or the error is not about one
    key.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        table: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        self.file = file
        self.table = table
        self.key = key
        where = []
        if file is not None:
            where.append(f"file {file}")
        if table is not None:
            where.append(f"table [{table}]")
        if key is not None:
            where.append(f"key {key!r}")
        self.message = message
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class UnpicklableArgumentError(FlecheRemoteError, TypeError):
    """An argument of a ``@cached`` function cannot be pickled, so it cannot
    be part of a key (a lock, a file open for writing, a database connection).

    ``function`` is the function's ``module.qualname``, ``parameter`` the
    parameter's name and ``type_name`` the argument's type. The fix, when
    the argument does not affect the result, is ``@cached(ignore=[...])``.
    """

    def __init__(self, function: str, parameter: str, type_name: str, reason: str = "") -> None:
        self.function = function
        self.parameter = parameter
        self.type_name = type_name
        self.reason = reason
        short = function.rsplit(".", 1)[-1]
        message = (
            f"{function}: argument {parameter!r} is a {type_name}, which cannot be pickled, so it "
            f"cannot be part of a key; if it does not affect the result, write "
            f"@cached(ignore=[{parameter!r}]) on {short}, else pass plain data instead"
        )
        if reason:
            message += f"\n(pickling said: {reason})"
        super().__init__(message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # rebuilt from its fields, so it can travel from a server or a worker
        return (type(self), (self.function, self.parameter, self.type_name, self.reason))


class StorageError(FlecheRemoteError, OSError):
    """A stored entry is unreadable or a store cannot be written."""


class CorruptEntryError(StorageError):
    """A stored entry exists but does not decode (torn, truncated, foreign)."""


class ProtocolError(FlecheRemoteError):
    """Bytes on the wire do not follow the fleche-remote protocol."""


class RemoteConnectionError(FlecheRemoteError, RuntimeError):
    """The transport to a remote cache died, hung, or could not start.

    ``returncode`` is the ssh (or server) exit status when it has exited,
    and ``stderr_tail`` the last lines the remote wrote to stderr: together
    they usually say what went wrong on the other side.
    """

    def __init__(
        self,
        message: str,
        *,
        returncode: Optional[int] = None,
        stderr_tail: Sequence[str] = (),
    ) -> None:
        self.returncode = returncode
        self.stderr_tail = tuple(stderr_tail)
        full = message
        if returncode is not None:
            full += f" [exit code {returncode}]"
        # a tail the message already quotes in full (ssh's one line) is not repeated
        quoted = len(self.stderr_tail) == 1 and f": {self.stderr_tail[0]}" in message
        if self.stderr_tail and not quoted:
            full += "\n--- remote stderr (last lines) ---\n" + "\n".join(self.stderr_tail)
        super().__init__(full)


class IncompatibleProtocolError(RemoteConnectionError):
    """Client and server speak different, incompatible protocol versions."""


class RemoteError(FlecheRemoteError):
    """An exception raised on the server that has no local built-in twin.

    ``remote_type`` is the qualified name of the remote exception class and
    ``remote_traceback`` the formatted traceback text from the server.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{remote_type}: {message}")

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text


class ClaimWaitTimeout(FlecheRemoteError, TimeoutError):
    """A ``@cached`` call waited longer than its ``claim_timeout`` for
    another holder (named in the message) to finish computing it."""


class RecursiveCallError(FlecheRemoteError, RuntimeError):
    """A ``@cached`` function called itself with the same arguments: it
    would wait for its own result forever."""


class ComputeError(FlecheRemoteError):
    """A point of ``f.map(..., on=...)`` that the host could not compute
    for a reason of its own, not the function's: Slurm ended its task
    (``slurm_state``: ``TIMEOUT``, ``OUT_OF_MEMORY``, ``CANCELLED``...), the
    worker pool died, or the host's code differs and the sweep is strict.
    ``log`` holds the last lines of the task's output."""

    def __init__(self, message: str, slurm_state: str = "", log: str = "") -> None:
        self.slurm_state = slurm_state
        self.log = log
        super().__init__(message)

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        if self.log:
            text += "\n--- last lines of the task's output ---\n" + self.log.rstrip()
        return text
