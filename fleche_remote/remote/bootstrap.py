"""Zero-install remotes: the client ships its own server code over ssh.

A cluster often has a Python and nothing else; asking for ``pip install
fleche-remote`` there before anything works is the step that loses users.
So, as execnet and mitogen do, the client does not assume the package is
installed on the far side. With ``bootstrap = "auto"`` (the default) the
remote command is a small *stub*, passed to the remote ``python -c`` as one
base64 line (any login shell, even csh, runs it unchanged), which:

1. checks the interpreter is Python 3.9 or newer, or says so and exits;
2. uses an installed ``fleche_remote`` if its version is the client's
   (``"auto"`` only; ``"always"`` skips this, for tests and benchmarks);
3. otherwise uses the code cached by content hash under
   ``$XDG_CACHE_HOME/fleche-remote/code/<sha256>/`` (default
   ``~/.cache/...``), or, when that is missing, asks the client for it:
   the client sends one zip of its pure-Python modules (and a TOML parser,
   which Python 3.9 and 3.10 lack), the stub checks the hash of what is in
   it, unpacks it into a temp directory next to the cache entry and
   renames it into place (atomic). If the cache cannot be written (a
   read-only home on a compute node), the code runs from a temp directory
   removed at exit;
4. runs the server from there with the remote's own ``python``. Anything
   else the cache needs (SQLAlchemy, h5py, NumPy, xxhash) comes from that
   Python's site-packages; when it is missing the client's error names the
   package to install.

Trusting the cached copy. Whoever can write the cached code runs code as
the user at the next start, so the stub writes it, whatever the umask,
into directories (``fleche-remote/``, ``code/``, ``<sha256>/`` and every
package, ``__pycache__`` included) of mode 0700 and files of mode 0600.
Before it runs a cached copy it checks that every directory and file from
``fleche-remote/`` down is a plain directory or file, owned by the user and
writable by nobody else (so no one else can have written a ``.pyc``), and
that the sources hash to the name (~2 ms for ~700 KB): a copy planted
under the hash before the first start, or edited since, is moved aside
and sent again. A ``fleche-remote/`` or ``code/`` that fails the check is
not used at all (the code runs from a temp directory). A compiled file
that vanishes while the check looks at it is skipped: a server already
running from the copy writes each ``.pyc`` through a temp file that it
renames into place, and moving the copy aside for that would pull the
modules it has yet to import from under it. Each refusal is a
warning on stderr naming the path and the reason, which the client logs.

Why an unpacked directory rather than running the zip through zipimport:
zipimport compiles every module at every start (it cannot write ``.pyc``
files), measured at ~50 ms of CPU per start for the server's imports on
Python 3.9; from a directory the compiled files are written once, per
Python version, next to the sources.

Round trips. The stub prints one status line, ``<marker> installed``,
``<marker> cached`` or ``<marker> need``, before anything else it writes
on stdout, and :class:`BootstrapTransport` takes it out of the stream. The
client does not wait for it: the first request still leaves as soon as ssh
starts, so a remote with the code (installed or cached) costs no extra
round trip. On ``need``, the stub reads stdin, discarding what arrived
before a separator, the client sends the separator, the zip and then
again every byte it had sent before (at most :data:`REPLAY_MAX`; a bigger
first request waits for the status line instead), so the server sees
the requests exactly once. A first start therefore costs one round trip
more than a cached one, plus the zip (~230 KB) and compiling what the
server imports (once per Python version; the ``.pyc`` files stay).

The marker and the separator are derived from the code's hash, so a
login shell's output cannot be mistaken for them, and the stub reads its
input in pieces that can never go past the end of the zip (it knows the
zip is at least :data:`MIN_ZIP` bytes, and then reads its length),
leaving every later byte to the server. The zip itself is built only
when a remote asks for it; naming the code costs the client ~7 ms once
per process (reading and hashing the sources).

Big values on a server without ``xxhash``: the digest scheme hashes bodies
of 1 MiB or more with XXH3-128 (see :mod:`fleche_remote.codec.digest`), and a
server checks each value's digest before storing it. A stdlib-only server
cannot, so it refuses such a save with an error that says to install
``xxhash``, and stores nothing. Reading needs no hashing at all, so every
value, however big, can be loaded through it. We refuse rather than store
unchecked: ssh's MAC would catch corruption on the wire, but not a client
that computed a wrong digest, and a content-addressed store that files a
body under a wrong digest hands it to every other call whose value has
that digest. The usual zero-install remote, a cluster that a laptop reads
results from, never meets the limit; one that takes big uploads should
have ``fleche-remote install`` run once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import io
import re
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, RemoteConnectionError
from .protocol import MAGIC
from .stub import STUB
from .transport import BytesLike, Transport, TransportTimeout

#: What ``bootstrap`` may be: ``"auto"`` ships the code when the remote has
#: no ``fleche_remote`` of the client's version; ``"never"`` requires an
#: installed one (the command is plain ``python -m fleche_remote serve``);
#: ``"always"`` ships (or reuses the cached copy) even when one is installed.
MODES = ("auto", "never", "always")

#: Bytes the client sends before the status line arrives that it keeps to
#: send again if the remote needs the code first. The first request is
#: usually a lookup of a few hundred bytes; a bigger one (a save with a
#: large value) waits for the status line instead of being held in memory.
REPLAY_MAX = 256 << 10

#: How often a reader waiting before the status line looks again, in case
#: another thread has just read the bytes it waits for.
_POLL = 0.05

#: The stub prints its status on stdout; this starts its stderr messages.
STUB_ERROR_PREFIX = "fleche-remote bootstrap:"

#: Import names the server may need, and the distribution (and extra of
#: fleche-remote) that provides each.
PACKAGES: Dict[str, Tuple[str, Optional[str]]] = {
    "sqlalchemy": ("SQLAlchemy", "postgres"),  # SQLite needs only the standard library
    "psycopg": ("psycopg[binary]", "postgres"),
    "h5py": ("h5py", "hdf5"),
    "numpy": ("numpy", "numpy"),
    "xxhash": ("xxhash", None),
    "cloudpickle": ("cloudpickle", None),
    "tomli": ("tomli", None),
}


def check_mode(mode: Any) -> str:
    """``mode`` if it is one of :data:`MODES`.

    Raises:
        ConfigError: it is not.
    """
    if mode not in MODES:
        raise ConfigError(
            f"bootstrap must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}", key="bootstrap"
        )
    return str(mode)


# -- the code that travels --------------------------------------------------------


#: The zip is never smaller than this (the server's sources compress to
#: ~230 KB); the stub relies on it to size its reads (see ``receive``).
MIN_ZIP = 16 << 10

#: The largest zip a stub accepts: a length field beyond it is garbage.
MAX_ZIP = 64 << 20


@dataclass(frozen=True)
class CodeBundle:
    """The server code the client can send: its sources, and the hash that
    names them (SHA-256 over each path, its length and its bytes, in path
    order; independent of how the zip compresses)."""

    sources: Tuple[Tuple[str, bytes], ...]
    sha256: str
    version: str

    @property
    def marker(self) -> bytes:
        """Starts the stub's status line on stdout."""
        return b"FLECHE-REMOTE-BOOTSTRAP-" + self.sha256[:24].encode() + b" "

    @property
    def separator(self) -> bytes:
        """What the client sends on stdin right before the zip's length."""
        tag = hashlib.sha256(b"separator" + self.sha256.encode()).hexdigest()[:32]
        return b"FLECHE-REMOTE-CODE-" + tag.encode()

    def zip(self) -> bytes:
        """The sources as a zip (built on first use: only a remote that
        lacks the code needs it)."""
        return _zip(self)

    def payload(self) -> bytes:
        """What follows :attr:`separator` on the wire: length, then zip."""
        data = self.zip()
        return struct.pack(">Q", len(data)) + data


@functools.lru_cache(maxsize=4)
def _zip(bundle: CodeBundle) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in bundle.sources:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    out = buf.getvalue()
    if not MIN_ZIP <= len(out) <= MAX_ZIP:
        raise RuntimeError(f"the server code zips to {len(out)} bytes, outside [{MIN_ZIP}, {MAX_ZIP}]")
    return out


def sources_hash(sources: Sequence[Tuple[str, bytes]]) -> str:
    """The content hash of a bundle (the stub computes the same from the zip)."""
    h = hashlib.sha256()
    for name, data in sources:
        raw = name.encode()
        h.update(struct.pack(">QQ", len(raw), len(data)) + raw)
        h.update(data)
    return h.hexdigest()


#: Fixed zip timestamps: the same sources always make the same zip.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _package_files(root: Path, prefix: str, skip: Sequence[str] = ()) -> List[Tuple[str, Path]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or (rel.parts and rel.parts[0] in skip):
            continue
        out.append((f"{prefix}/{rel.as_posix()}", path))
    return out


def _toml_parser_dir() -> Optional[Path]:
    """Sources of a TOML parser importable as ``tomli`` on Python 3.9/3.10:
    the installed ``tomli`` (a dependency below 3.11), else the standard
    library's ``tomllib`` (the same code, moved into CPython 3.11)."""
    for name in ("tomli", "tomllib"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith("__init__.py"):
            return Path(spec.origin).parent
    return None


@functools.lru_cache(maxsize=1)
def code_bundle() -> CodeBundle:
    """The server code of this client (read once per process, ~7 ms):
    every module of ``fleche_remote`` except the test helpers, plus a TOML
    parser as ``tomli``."""
    from .. import __version__

    package = Path(__file__).resolve().parent.parent
    files = _package_files(package, "fleche_remote", skip=("testing",))
    toml = _toml_parser_dir()
    if toml is not None:
        files += _package_files(toml, "tomli")
    sources = tuple(sorted((name, path.read_bytes()) for name, path in files))
    return CodeBundle(sources, sources_hash(sources), __version__)


# -- the stub the remote python runs ----------------------------------------------


def stub_source(bundle: CodeBundle, mode: str) -> str:
    """The stub's Python source, with this bundle's names in it."""
    params = (mode, bundle.sha256, MIN_ZIP, MAX_ZIP, bundle.marker, bundle.separator, bundle.version)
    return STUB.replace("@PARAMS@", repr(params))


def stub_command(
    python_sh: str, serve_args: Sequence[str], mode: str, bundle: Optional[CodeBundle] = None
) -> str:
    """``python -c '<stub>' ARGS``: one line of shell that runs the server
    through the stub.

    Args:
        python_sh: the remote interpreter, already quoted for the shell.
        serve_args: arguments of ``serve``, already quoted for the shell.
        mode: ``"auto"`` or ``"always"``.
        bundle: the code to name (default: this client's).
    """
    bundle = bundle or code_bundle()
    packed = base64.b64encode(zlib.compress(stub_source(bundle, mode).encode(), 9)).decode()
    # base64 needs no quoting in any shell, and the line has no newline
    code = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{packed}')))"
    return " ".join([python_sh, "-c", f'"{code}"', *serve_args])


# -- the client's side of the stub --------------------------------------------------


class BootstrapTransport:
    """Wraps the ssh transport of a connection that starts with the stub.

    It takes the stub's status line out of what the server sends, keeps a
    copy of what the client writes until then, and on ``need`` sends the
    separator, the zip and that copy (see the module notes). Once the
    status is known every call goes straight to the wrapped transport.

    Attributes:
        status: ``"installed"``, ``"cached"`` or ``"sent"`` once known;
            ``None`` before, if the remote ended before saying, or if the
            server started without the stub (an ``authorized_keys`` forced
            command runs its own ``serve``).
        code_bytes_sent: bytes of server code sent on this connection.
    """

    def __init__(self, inner: Transport, bundle: CodeBundle, *, connect_timeout: float = 60.0) -> None:
        self._inner = inner
        self._bundle = bundle
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._resolved = False
        self._held = bytearray()  # read, not yet known not to hold the status line
        self._ready = bytearray()  # for the connection, before the direct path starts
        self._eof = False
        self._replay: Optional[bytearray] = bytearray()
        self.status: Optional[str] = None
        self.code_bytes_sent = 0

    # -- reading -------------------------------------------------------------

    def _direct(self) -> bool:
        return self._resolved and not self._ready and not self._eof

    def _pump(self) -> None:
        """Read once from the wrapped transport and look for the status line."""
        data = self._inner.read_ready()
        if data is None:
            return
        if not data:  # ended before the status line: let the connection say why
            self._ready += self._held
            self._eof = True
            self._held.clear()
            self._resolved = True
            self._replay = None
            return
        self._held += data
        marker = self._bundle.marker
        at = self._held.find(marker)
        banner = self._held.find(MAGIC)
        if banner >= 0 and (at < 0 or banner < at):
            # the server started without the stub: an authorized_keys
            # forced command runs its own. Nothing to send, nothing to hide.
            self._ready += self._held
            self._held.clear()
            self._resolve("")
            return
        if at < 0:
            keep = max(len(marker), len(MAGIC)) - 1  # either may be cut between reads
            if len(self._held) > keep:
                self._ready += self._held[:-keep]
                del self._held[:-keep]
            return
        end = self._held.find(b"\n", at)
        if end < 0:
            return
        state = bytes(self._held[at + len(marker) : end]).decode("ascii", "replace")
        # everything for the connection is in place before reads go direct
        self._ready += self._held[:at]
        self._ready += self._held[end + 1 :]
        self._held.clear()
        self._resolve(state)

    def _resolve(self, state: str) -> None:
        if state == "need":
            replay = bytes(self._replay or b"")
            try:
                payload = self._bundle.payload()
                self._inner.write(self._bundle.separator + payload, self._connect_timeout)
                self.code_bytes_sent = len(payload)
                if replay:
                    self._inner.write(replay, self._connect_timeout)
            except RemoteConnectionError:
                pass  # the remote went away; reading says why
            self.status = "sent"
        elif state in ("installed", "cached"):
            self.status = state
        else:
            self.status = None
        self._replay = None
        self._resolved = True

    def _take(self) -> Optional[bytes]:
        if self._ready:
            out = bytes(self._ready)
            self._ready.clear()
            return out
        return b"" if self._eof else None

    def read_ready(self) -> Optional[bytes]:
        if self._direct():
            return self._inner.read_ready()
        with self._lock:
            if not self._resolved:
                self._pump()
            return self._take()

    def readinto_ready(self, into: memoryview) -> Optional[int]:
        if self._direct():
            return self._inner.readinto_ready(into)
        with self._lock:
            if not self._resolved:
                self._pump()
            if self._ready:
                n = min(len(into), len(self._ready))
                into[:n] = self._ready[:n]
                del self._ready[:n]
                return n
            return 0 if self._eof else None

    def wait_readable(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._direct():
                self._inner.wait_readable(max(0.0, deadline - time.monotonic()))
                return
            with self._lock:
                if self._ready or self._eof:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"no reply from the remote within {timeout:g} s (hung or stopped?)")
            try:
                # in slices: a writer thread may read the status line meanwhile
                self._inner.wait_readable(min(remaining, _POLL))
                return
            except TransportTimeout:
                continue

    # -- writing -------------------------------------------------------------

    def write(self, data: BytesLike, timeout: float) -> None:
        if not self._resolved:
            with self._lock:
                if not self._resolved:
                    assert self._replay is not None
                    n = memoryview(data).nbytes
                    if len(self._replay) + n <= REPLAY_MAX:
                        self._replay += data
                        self._inner.write(data, timeout)
                        return
                    self._wait_status(max(timeout, self._connect_timeout))
        self._inner.write(data, timeout)

    def write_atomic(self, data: bytes) -> bool:
        # before the status is known, what is written must also be kept for a replay
        return self._resolved and self._inner.write_atomic(data)

    def _wait_status(self, timeout: float) -> None:
        """Read until the status line is in (what else arrives is kept)."""
        deadline = time.monotonic() + timeout
        while not self._resolved:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"the remote did not start within {timeout:g} s")
            self._inner.wait_readable(remaining)
            self._pump()

    # -- the rest goes straight through ------------------------------------------

    def close(self) -> None:
        self._inner.close()

    def kill(self) -> None:
        getattr(self._inner, "kill", self._inner.close)()

    def diagnose(self) -> Tuple[Optional[int], List[str]]:
        return self._inner.diagnose()

    @property
    def alive(self) -> bool:
        return self._inner.alive

    def __getattr__(self, name: str) -> Any:
        # the wrapped transport's own attributes (``proc``, ``argv``)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


# -- what the user reads when the start fails ---------------------------------------

_NO_MODULE = re.compile(r"No module named '?([A-Za-z_][A-Za-z0-9_]*)")


def missing_package_hint(module: str, host: str, python: str) -> str:
    """How to install what provides ``module`` for the remote ``python``."""
    package, extra = PACKAGES.get(module, (module, None))
    install = f"fleche-remote install {host}" + (f" --extras {extra}" if extra else "")
    return (
        f"the remote Python ({python}) on {host} lacks the package {package!r} (module {module!r}) "
        f"that this cache needs: install it for that Python (`{python} -m pip install '{package}'`), "
        f"or make a virtualenv with everything with `{install}` and set python = the path it prints"
    )


def explain_startup(
    host: str, python: str, mode: str, fallback: Callable[[Optional[int], List[str]], str]
) -> Callable[[Optional[int], List[str]], str]:
    """A startup diagnosis that knows about the stub and missing packages,
    and defers to ``fallback`` for everything else (ssh errors, bad setup
    commands)."""

    def explain(code: Optional[int], tail: List[str]) -> str:
        for line in tail:
            if line.startswith(STUB_ERROR_PREFIX) and "temp directory" not in line:
                return f"cannot start the server on {host}: {line[len(STUB_ERROR_PREFIX) :].strip()}"
        found = _NO_MODULE.search("\n".join(tail))
        if found is not None and code != 255:
            module = found.group(1)
            if module != "fleche_remote":
                return missing_package_hint(module, host, python)
            if mode == "never":
                return (
                    f"fleche_remote is not installed for python={python!r} on {host}, and "
                    f"bootstrap = 'never' forbids sending it: run `fleche-remote install {host}` and set "
                    f"python = the path it prints, or `pip install fleche-remote` there, or set "
                    f"bootstrap = 'auto' to let the client send its code"
                )
        return fallback(code, tail)

    return explain


__all__ = [
    "MODES",
    "REPLAY_MAX",
    "BootstrapTransport",
    "CodeBundle",
    "check_mode",
    "code_bundle",
    "explain_startup",
    "missing_package_hint",
    "stub_command",
]
