"""What the server says first: a magic banner and its protocol version.

The client scans for the banner and treats every byte before it as
login-shell noise (motd, ``module``, conda), which it reports but never
parses; then it refuses a server speaking another protocol version, naming
both. No I/O happens here; :mod:`.protocol` re-exports every name, and its
module notes give the rules of the frames that follow the banner.
"""

from __future__ import annotations

import struct
import warnings
from typing import Optional, Tuple, Union

from ..errors import ProtocolError

#: Changes only when the frame layout or the meaning of an existing message
#: changes (see the compatibility policy in :mod:`.protocol`).
PROTOCOL_VERSION = 2

#: PNG-style magic: the high-bit byte and CR LF / ^Z catch text-mode
#: mangling; the name makes a hexdump self-explanatory.
MAGIC = b"\x89FLECHE-REMOTE\r\n\x1a\n"
_VERSION = struct.Struct(">H")
BANNER = MAGIC + _VERSION.pack(PROTOCOL_VERSION)

#: How much login noise to wade through before deciding no server is there.
DEFAULT_MAX_NOISE = 1 << 20


class BannerScanner:
    """Finds the server's banner in bytes that may start with login noise.

    ``feed`` returns ``None`` until the banner and version are complete,
    then ``(noise, version, rest)``: the bytes skipped, the server's
    protocol version and the bytes after the banner (the first frames).
    """

    def __init__(self, max_noise: int = DEFAULT_MAX_NOISE) -> None:
        self.max_noise = max_noise
        self._buf = bytearray()

    @property
    def noise(self) -> bytes:
        idx = self._buf.find(MAGIC)
        return bytes(self._buf if idx < 0 else self._buf[:idx])

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[bytes, int, bytes]]:
        self._buf += data
        idx = self._buf.find(MAGIC)
        if idx < 0:
            if len(self._buf) > self.max_noise + len(MAGIC):
                raise ProtocolError(
                    f"no fleche-remote banner in the first {self.max_noise} bytes from the remote; "
                    f"it starts with {describe_noise(bytes(self._buf))}"
                )
            return None
        end = idx + len(MAGIC) + _VERSION.size
        if len(self._buf) < end:
            return None
        (version,) = _VERSION.unpack_from(self._buf, idx + len(MAGIC))
        return bytes(self._buf[:idx]), version, bytes(self._buf[end:])


def describe_noise(noise: bytes, limit: int = 200) -> str:
    """Printable, escaped head of unexpected bytes, for logs and errors."""
    text = noise[:limit].decode("ascii", "backslashreplace")
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    more = f" (+{len(noise) - limit} more bytes)" if len(noise) > limit else ""
    return f"{text!r}{more}"


def check_version(remote: int) -> None:
    """Refuse a server speaking another protocol, naming both versions."""
    if remote != PROTOCOL_VERSION:
        from ..errors import IncompatibleProtocolError

        raise IncompatibleProtocolError(
            f"the remote speaks fleche-remote protocol {remote}, this client speaks "
            f"protocol {PROTOCOL_VERSION}; install matching fleche-remote versions on both sides"
        )


def warn_on_skew(host: str, remote_version: str) -> None:
    """Library-version skew is allowed (the protocol matches); say so once."""
    from .. import __version__

    if remote_version != __version__:
        warnings.warn(
            f"{host} runs fleche-remote {remote_version}, this client {__version__}; "
            f"consider upgrading the older side",
            stacklevel=2,
        )
