"""The stub: what the remote ``python -c`` runs to start the server from
shipped code (see :mod:`fleche_remote.remote.bootstrap` for the design).

It is kept apart because it is not Python of this package: it is text,
run on the remote by any Python 3 (and parsed by 2.7, so that the version
check itself can say what is wrong), with nothing but the standard
library. ``@PARAMS@`` is replaced by the bootstrap's constants.
"""

# Runs on the remote as ``python -c``. Written for any Python 3 (and parses
# on 2.7) so that the version check itself can run and say what is wrong:
# no f-strings, no annotations. It writes only the status line on stdout.
STUB = r"""
import os, sys
MODE, HASH, MINZIP, MAXZIP, MARK, SEP, VERSION = @PARAMS@
def fail(msg, code=4):
    sys.stderr.write("fleche-remote bootstrap: " + msg + "\n")
    sys.stderr.flush()
    os._exit(code)
def say(state):
    os.write(1, MARK + state.encode() + b"\n")
if sys.version_info < (3, 9):
    fail("the remote Python %s is %s; fleche-remote needs 3.9 or newer "
         "(set python = a newer interpreter)" % (sys.executable, sys.version.split()[0]))
import hashlib, re, shutil, stat, tempfile, zipfile, io, atexit
def warn(msg):
    # not STUB_ERROR_PREFIX: the client reads that as why the start failed
    sys.stderr.write("fleche-remote bootstrap warning: " + msg + "\n")
    sys.stderr.flush()
def installed():
    try:
        import importlib.util
        if sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None:
            return False  # not an installed package, whose dependencies include tomli
        spec = importlib.util.find_spec("fleche_remote")
        if spec is None or not spec.origin:
            return False
        with open(spec.origin) as fh:
            found = re.search(r"^__version__ = [\"']([^\"']+)", fh.read(), re.M)
        return found is not None and found.group(1) == VERSION
    except Exception:
        return False
def unsafe(path, isdir):
    # why someone other than this user could change what runs from path
    try:
        st = os.lstat(path)
    except OSError as exc:
        return "cannot be read (%s)" % exc.strerror
    if not (stat.S_ISDIR if isdir else stat.S_ISREG)(st.st_mode):
        return "is not a %s (a symlink?)" % ("directory" if isdir else "regular file")
    if st.st_uid != os.getuid():
        return "is owned by uid %d, not by this user (uid %d)" % (st.st_uid, os.getuid())
    if st.st_mode & 0o022:
        return "is writable by group or others (mode %03o)" % stat.S_IMODE(st.st_mode)
    return None
def trusted(final):
    # (path, reason) if the code under final is not exactly ours, else None:
    # every dir and file ours and writable only by us (so no one else can
    # plant a .pyc either), and the sources hash to HASH
    try:
        return check(final)
    except OSError as exc:
        return getattr(exc, "filename", None) or final, "cannot be read (%s)" % exc.strerror
def walk_error(exc):
    raise exc
def vanished(path, final):
    # a compiled file that went while we looked: a server running from
    # this copy writes each .pyc through a temp file it renames into place
    parts = os.path.relpath(path, final).split(os.sep)
    return "__pycache__" in parts[:-1] and not os.path.lexists(path)
def check(final):
    found = []
    for top, dirs, files in os.walk(final, onerror=walk_error):
        for name, isdir in [(top, True)] + [(os.path.join(top, n), True) for n in dirs] + \
                [(os.path.join(top, n), False) for n in files]:
            why = unsafe(name, isdir)
            if why and not vanished(name, final):
                return name, why
        if "__pycache__" not in os.path.relpath(top, final).split(os.sep):
            found += [os.path.relpath(os.path.join(top, n), final).replace(os.sep, "/") for n in files]
    if "fleche_remote/__init__.py" not in found:
        return final, "is incomplete"
    h = hashlib.sha256()
    for name in sorted(found):
        with open(os.path.join(final, name), "rb") as fh:
            body = fh.read()
        raw = name.encode()
        h.update(len(raw).to_bytes(8, "big") + len(body).to_bytes(8, "big") + raw)
        h.update(body)
    if h.hexdigest() != HASH:
        return final, "does not hash to %s (edited, or planted there)" % HASH
    return None
def readn(n, what):
    parts = []
    while n > 0:
        chunk = os.read(0, n)
        if not chunk:
            fail("the connection ended inside the " + what, 5)
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
def receive():
    tail, rest = b"", None
    while rest is None:
        # SEP, an 8-byte length and at least MINZIP bytes are coming: a read
        # of MINZIP + 9 bytes can then never go past their end, whatever
        # part of SEP was seen, and every later byte is left to the server
        chunk = os.read(0, MINZIP + 9)
        if not chunk:
            fail("the client closed the connection before sending the server code", 5)
        buf = tail + chunk
        at = buf.find(SEP)
        if at >= 0:
            rest = buf[at + len(SEP):]
        else:
            tail = buf[-(len(SEP) - 1):]
    if len(rest) < 8:
        rest += readn(8 - len(rest), "server code's length")
    size = int.from_bytes(rest[:8], "big")
    if not MINZIP <= size <= MAXZIP:
        fail("the server code's length (%d bytes) is not plausible" % size, 5)
    data = rest[8:] + readn(size - len(rest) + 8, "server code")
    zf = zipfile.ZipFile(io.BytesIO(data))
    h = hashlib.sha256()
    for name in sorted(zf.namelist()):
        raw, body = name.encode(), zf.read(name)
        h.update(len(raw).to_bytes(8, "big") + len(body).to_bytes(8, "big") + raw)
        h.update(body)
    if h.hexdigest() != HASH:
        fail("the server code arrived but does not hash to %s" % HASH, 5)
    return zf
def unpack(zf, parent):
    tmp = tempfile.mkdtemp(prefix=".tmp-%s-" % HASH[:12], dir=parent)  # 0700, a fresh name
    zf.extractall(tmp)
    # Python makes __pycache__ with the umask the server runs under: made
    # here, under ours, no one else can plant a .pyc in it
    for top, dirs, files in os.walk(tmp):
        if any(n.endswith(".py") for n in files):
            os.mkdir(os.path.join(top, "__pycache__"))
    return tmp
def prepare(dirs):
    # why the cache cannot hold our code (None if it can), creating what is missing
    for d in dirs:
        try:
            os.mkdir(d, 0o700)
        except OSError:
            pass
        why = unsafe(d, True)
        if why:
            return "%s %s" % (d, why)
    return None
def store():
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    top = os.path.join(base, "fleche-remote")
    root = os.path.join(top, "code")
    final = os.path.join(root, HASH)
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        pass
    refused = prepare([top, root])
    if refused is None and os.path.lexists(final):
        bad = trusted(final)
        if bad is None:
            say("cached")
            return final
        warn("not running the cached server code: %s %s; sending it again" % bad)
        aside = tempfile.mkdtemp(prefix=".stale-%s-" % HASH[:12], dir=root)
        try:
            os.rename(final, os.path.join(aside, "code"))
        except OSError as exc:
            refused = "%s cannot be moved aside (%s)" % (final, exc.strerror)
        shutil.rmtree(aside, ignore_errors=True)
    say("need")
    data = receive()
    try:
        if refused:
            raise OSError(refused)
        tmp = unpack(data, root)
        try:
            os.rename(tmp, final)
        except OSError:  # another start won the race: use its copy, if it is ours
            shutil.rmtree(tmp, ignore_errors=True)
            if trusted(final) is not None:
                raise
        return final
    except OSError as exc:
        sys.stderr.write("fleche-remote bootstrap: cannot cache the server code in %s (%s); "
                         "running it from a temp directory\n" % (final, exc))
        tmp = unpack(data, tempfile.gettempdir())
        atexit.register(shutil.rmtree, tmp, True)
        return tmp
if MODE == "auto" and installed():
    say("installed")
else:
    # what we create is writable by us alone, whatever the umask; the
    # server's own files get the user's umask again
    umask = os.umask(0o077)
    try:
        path = store()
    finally:
        os.umask(umask)
    sys.path.insert(0, path)
from fleche_remote.remote.server import main
sys.argv[0] = "fleche-remote serve"
sys.exit(main(sys.argv[1:]))
"""


__all__ = ["STUB"]
