"""The ``fleche-remote`` command (also ``python -m fleche_remote``).

Subcommands:

``serve``
    Run the server on stdin/stdout (what an ``SshCache`` starts on the far
    side); every argument after ``serve`` goes to the server untouched.
``config``
    Print the merged configuration, secrets redacted, with the file each
    table came from. The output is valid TOML.
``info HOST|CACHE``, ``doctor HOST|CACHE``
    What a cache is and what its server reports; a check of a remote
    set-up with a fix for each failure (:mod:`.info`).
``ls``, ``show KEY``, ``evict``, ``gc``
    List, inspect and remove stored calls; delete unreferenced values
    (:mod:`.entries`).
``pull SRC DST``, ``push SRC DST``
    Copy selected entries between two caches, skipping what is there
    (:mod:`.copy`).
``demo``
    A laptop and a cluster on this machine, through a private sshd
    (:mod:`.demo`).

Every command has ``--help``; those whose output is data have ``--json``.

Exit status: 0 when all went well; 1 for a failure at run time (a remote
that does not answer, unreadable storage, a ``doctor`` check that failed);
2 for a usage or configuration error the user can fix (a malformed
fleche.toml, an unknown cache name, a bad option), printed as one line on
stderr without a traceback; 3 when ``ls`` or ``show`` printed what they
could but some entries were unreadable (each shown as
``<unreadable: reason>``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import re
import sys
from typing import Any, Callable, List, Mapping, Optional, Sequence, TextIO

from ..errors import ConfigError, FlecheRemoteError

PROG = "fleche-remote"

# Modules that contribute subcommands. Each has ``register(subparsers)``,
# which adds its parsers and sets ``run=FUNCTION(args, out) -> int`` on
# them; imported only when the command line is built, so that
# ``import fleche_remote`` stays cheap.
COMMAND_MODULES: Sequence[str] = (
    "fleche_remote.cli.info",
    "fleche_remote.cli.entries",
    "fleche_remote.cli.copy",
    "fleche_remote.cli.demo",
    "fleche_remote.cli.import_fleche",
    "fleche_remote.cli.install",
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CONFIG_HELP = "read this file instead of discovering fleche.toml files"


# -- a small TOML writer: enough for what fleche.toml holds ------------------


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (tables inline).

    Raises:
        TypeError: ``value`` has no TOML form (e.g. None).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dump_config(tables: Mapping[str, Any], source: Callable[[str], Any] = lambda name: None) -> str:
    """``tables`` as a TOML document, each table annotated with its source file."""
    lines: List[str] = []
    # bare top-level values must come before the first table header
    for name, value in tables.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_toml_key(name)} = {toml_value(value)}")
    for name, value in tables.items():
        origin = source(name)
        note = f"  # from {origin}" if origin is not None else ""
        if isinstance(value, Mapping):
            lines += ["", f"[{_toml_key(name)}]{note}"]
            lines += [f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()]
        elif _is_table_array(value):
            for layer in value:
                lines += ["", f"[[{_toml_key(name)}]]{note}"]
                lines += [f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in layer.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


# -- subcommands -----------------------------------------------------------------


def _load(args: argparse.Namespace) -> Any:
    from ..config import load_config

    return load_config(args.config) if args.config else load_config()


def cmd_config(args: argparse.Namespace, out: TextIO) -> int:
    """Print the merged, redacted configuration and where it came from."""
    from ..config import builtin_config, redact

    config = _load(args)
    # files skipped as unsafe are listed first: they explain a missing table
    ignored = "".join(f"# ignored {p}: {why}\n" for p, why in config.ignored)
    if not config.files:
        looked = "\n".join(f"#   {p}" for p in config.searched)
        config = builtin_config(config.searched, config.ignored)
        note = "# so @cached uses the built-in cache:\n\n"
        out.write(f"{ignored}# no fleche.toml found; looked at:\n{looked}\n{note}{dump_config(dict(config))}")
        return 0
    header = ["# merged from (highest priority first):"] + [f"#   {f}" for f in config.files]
    out.write(ignored + "\n".join(header) + "\n\n" + dump_config(redact(dict(config)), config.source))
    problems = _unbuildable(config)
    for problem in problems:
        _error(problem)
    return 2 if problems else 0


def _unbuildable(config: Any) -> List[str]:
    """Why each table that cannot be built cannot (``[default] cache``
    too). Building opens nothing: file stores create their directories,
    databases their files, and ssh layers connect on first use only."""
    from ..config import load_cache

    names: List[Optional[str]] = [*config.cache_names()]
    if config.default_spec() is not None:
        names.insert(0, None)
    problems = []
    for name in names:
        try:
            load_cache(name, config=config).close()
        except ConfigError as exc:
            if str(exc) not in problems:  # [default] cache names a broken table: said once
                problems.append(str(exc))
    return problems


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``serve`` is listed for help; its arguments are
    parsed by the server itself)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Persistent function-result caches, local or over ssh."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser(
        "serve",
        help="serve a cache on stdin/stdout (run by SshCache over ssh)",
        description="Options: --cache NAME, --config PATH, --read-only or --append-only "
        "(see 'serve --help').",
        add_help=False,
    )
    p_config = sub.add_parser("config", help="print the merged configuration (secrets redacted)")
    p_config.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p_config.set_defaults(run=cmd_config)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _error(message: str) -> None:
    # the first line says what and the fix, so it reads well after a shell
    # prompt or in a job log; further lines (a remote's stderr) stay lines,
    # indented, rather than folded into it
    first, *rest = str(message).strip().splitlines() or [""]
    lines = [f"{PROG}: error: {' '.join(first.split())}"] + [f"  {line}" for line in rest if line.strip()]
    print("\n".join(lines), file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage or configuration
        error, 1 for a failure at run time.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from ..remote import server

        return server.main(args_list[1:])
    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.run(args, sys.stdout))
    except ConfigError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted (a pull or push run again resumes where this one stopped)")
        return 130
    except KeyError as exc:
        if isinstance(exc, FlecheRemoteError):  # AmbiguousDigestError: its message says which
            _error(str(exc))
        else:
            _error(f"nothing stored under {exc.args[0] if exc.args else '?'}")
        return 1
    except (FlecheRemoteError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `fleche-remote ls | head`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        _error(f"{type(exc).__name__}: {exc}")
        return 1
