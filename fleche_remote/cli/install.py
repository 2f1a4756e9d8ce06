"""``fleche-remote install HOST``: a virtualenv with this version on a remote.

Zero-install remotes (:mod:`.bootstrap`) serve file and SQLite caches with
nothing but the standard library. A remote that takes big uploads (which
need ``xxhash`` to be checked), or keeps its cache in HDF5 or PostgreSQL,
needs packages; this command puts them in one place the user does not have
to manage:

1. one ``ssh HOST /bin/sh -s`` whose script arrives on stdin (so that the
   login shell, even csh, only ever sees ``/bin/sh -s``);
2. the script checks the interpreter (``--python``, default ``python3``)
   is 3.9 or newer, creates the virtualenv (``--venv``, default
   ``~/.fleche-remote/venv``) unless it exists, and runs its pip to install
   ``fleche-remote[EXTRAS]==`` this client's version; ``--index-url``,
   ``--extra-index-url``, ``--find-links`` and ``--no-deps`` go to pip
   as they are (paths are paths on the remote). ``PYTHONPATH`` and
   ``PYTHONHOME`` are unset first: what they point at must not stand in
   for packages the virtualenv lacks;
3. the new interpreter imports the package and prints a marker line with
   its version and path, which is how success is recognised (whatever a
   login shell prints around it);
4. we print the ``python = ...`` line for the ssh table of fleche.toml.

pip's own output goes to our stderr as it happens: an install takes a
while, and its errors are the ones the user must read.

Exit status: 0 installed; 1 the remote failed (ssh, the interpreter, venv
or pip; the reason is on stderr); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Any, List, Optional, Sequence, TextIO

from ..remote.ssh_options import sh_path

#: The extras of fleche-remote a remote may want (see pyproject.toml).
EXTRAS = ("numpy", "sql", "postgres", "hdf5")

#: Default place of the virtualenv on the remote (``~`` is the remote's home).
DEFAULT_VENV = "~/.fleche-remote/venv"

#: Seconds the whole install may take: a cold pip on a cluster's shared
#: file system is slow, but it must not hang forever either.
DEFAULT_TIMEOUT = 1800.0

MARKER = "FLECHE-REMOTE-INSTALLED"

#: Exit status of the script for a problem it explains itself.
_SCRIPT_ERROR = 97


def requirement(version: str, extras: Sequence[str] = ()) -> str:
    """``fleche-remote[extras]==version``."""
    return "fleche-remote" + (f"[{','.join(extras)}]" if extras else "") + f"=={version}"


def pip_options(
    index_url: Optional[str] = None,
    extra_index_urls: Sequence[str] = (),
    find_links: Sequence[str] = (),
    no_deps: bool = False,
) -> List[str]:
    """The pip arguments the command passes through."""
    args: List[str] = []
    if index_url:
        args += ["--index-url", index_url]
    for url in extra_index_urls:
        args += ["--extra-index-url", url]
    for link in find_links:
        args += ["--find-links", link]
    if no_deps:
        args.append("--no-deps")
    return args


def install_script(python: str, venv: str, requirement: str, pip_args: Sequence[str]) -> str:
    """The POSIX sh script run on the remote (see the module notes)."""
    q = shlex.quote
    fail = f"exit {_SCRIPT_ERROR}"
    pip = " ".join(q(a) for a in pip_args)
    return f"""\
unset PYTHONPATH PYTHONHOME
py={sh_path(python)}
venv={sh_path(venv)}
say() {{ echo "fleche-remote install: $*" >&2; }}
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    if ! command -v "$py" >/dev/null 2>&1; then
        say "no interpreter $py on the remote (give its path with --python)"; {fail}
    fi
    say "$py is $("$py" -V 2>&1); fleche-remote needs Python 3.9 or newer (see --python)"; {fail}
fi
if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtualenv $venv with $("$py" -V 2>&1)"
    if ! "$py" -m venv "$venv" >&2; then
        say "$py -m venv $venv failed (on Debian and Ubuntu the venv module is the python3-venv package)"
        {fail}
    fi
fi
say "installing {requirement} into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check {pip} {q(requirement)} >&2 || exit $?
exec "$venv/bin/python" -c 'import sys, fleche_remote; print("{MARKER}", fleche_remote.__version__, \
"%d.%d.%d" % sys.version_info[:3], sys.executable)'
"""


def _parse_marker(stdout: str) -> Optional[List[str]]:
    for line in stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0] == MARKER:
            return parts[1:]
    return None


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Install on ``args.host`` and print the fleche.toml line; the exit status."""
    from .. import __version__
    from ..errors import ConfigError
    from ..remote.ssh_options import check_host

    err = sys.stderr
    try:
        check_host(args.host)
    except ConfigError as exc:
        err.write(f"fleche-remote install: {exc.message}\n")
        return 2
    extras = [e.strip() for e in (args.extras or "").split(",") if e.strip()]
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        err.write(f"fleche-remote install: unknown extras {unknown}; known: {', '.join(EXTRAS)}\n")
        return 2
    try:
        ssh_options = shlex.split(args.ssh_options or "")
    except ValueError as exc:
        err.write(f"fleche-remote install: --ssh-options is not shell-quoted properly: {exc}\n")
        return 2
    wanted = requirement(__version__, extras)
    pip_args = pip_options(args.index_url, args.extra_index_url, args.find_links, args.no_deps)
    script = install_script(args.python, args.venv, wanted, pip_args)
    if args.dry_run:
        out.write(script)
        return 0
    argv = [args.ssh, "-T", *ssh_options, "--", args.host, "/bin/sh -s"]
    try:
        done = subprocess.run(
            argv,
            input=script.encode(),
            stdout=subprocess.PIPE,
            stderr=None,  # pip's progress and errors, as they happen
            timeout=args.timeout,
        )
    except FileNotFoundError:
        err.write(f"fleche-remote install: cannot run {args.ssh!r} (is OpenSSH installed?)\n")
        return 1
    except subprocess.TimeoutExpired:
        err.write(f"fleche-remote install: {args.host} did not finish within {args.timeout:g} s\n")
        return 1
    text = done.stdout.decode("utf-8", "replace")
    found = _parse_marker(text)
    if done.returncode != 0 or found is None:
        if done.returncode == 255:
            why = f"ssh could not connect to {args.host}"
        elif done.returncode == _SCRIPT_ERROR:
            why = "the remote interpreter cannot make the virtualenv (see above)"
        else:
            why = f"installing {wanted} failed on {args.host} (pip's messages are above)"
        err.write(f"fleche-remote install: {why} [exit code {done.returncode}]\n")
        return 1
    version, py_version, executable = found
    if version != __version__:
        err.write(
            f"fleche-remote install: {args.host} imports fleche-remote {version} from {executable}, "
            f"not {__version__}\n"
        )
        return 1
    venv_python = args.venv.rstrip("/") + "/bin/python"
    out.write(
        f"installed fleche-remote {version} for Python {py_version} on {args.host} in {args.venv}\n"
        f"# put this in the ssh table of your fleche.toml ({executable}):\n"
        f"python = {_toml_string(venv_python)}\n"
    )
    return 0


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)  # JSON string escapes are valid TOML


def register(subparsers: Any) -> None:
    """Add ``install`` to the ``fleche-remote`` command line."""
    p = subparsers.add_parser(
        "install",
        help="create a virtualenv with this version of fleche-remote on a remote host",
        description=(
            "Create a virtualenv on HOST (over ssh) and pip install this version of fleche-remote "
            "into it, then print the python = ... line for the ssh table of fleche.toml. Not needed "
            "for file and SQLite caches, which the client can serve with its own code on any "
            "Python 3.9+ (bootstrap = 'auto'); needed for big uploads (xxhash), HDF5 and PostgreSQL. "
            "Exit status: 0 installed, 1 the remote failed, 2 bad arguments."
        ),
    )
    p.add_argument("host", metavar="HOST", help="anything ssh accepts (user@host, an alias of ~/.ssh/config)")
    p.add_argument("--python", default="python3", help="remote interpreter to make the virtualenv with")
    p.add_argument("--venv", default=DEFAULT_VENV, metavar="PATH", help=f"where (default: {DEFAULT_VENV})")
    p.add_argument("--extras", metavar="LIST", help=f"comma-separated extras to add ({', '.join(EXTRAS)})")
    pip = p.add_argument_group("passed to pip on the remote")
    pip.add_argument("--index-url", metavar="URL")
    pip.add_argument("--extra-index-url", metavar="URL", action="append", default=[])
    pip.add_argument("--find-links", metavar="URL", action="append", default=[])
    pip.add_argument("--no-deps", action="store_true", help="install no dependencies")
    p.add_argument(
        "--ssh-options", metavar="OPTIONS", default="", help="extra ssh options, one shell-quoted string"
    )
    p.add_argument("--ssh", default="ssh", help="the ssh program")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help="seconds for the whole install"
    )
    p.add_argument("--dry-run", action="store_true", help="print the remote script instead of running it")
    p.set_defaults(run=run)


__all__ = ["DEFAULT_VENV", "EXTRAS", "install_script", "register", "requirement", "run"]
