"""The one exception tree of fleche-remote.

Every error the library raises on purpose derives from
:class:`FlecheRemoteError`, and most also derive from the built-in type a
caller would naturally catch (``KeyError`` for a missing entry,
``ValueError`` for bad configuration, ``RuntimeError`` for a dead remote),
so that code written against plain dict-like caches keeps working.

Messages say what was expected and what arrived.
"""

from __future__ import annotations

from typing import Optional, Sequence


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
        if self.stderr_tail:
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
