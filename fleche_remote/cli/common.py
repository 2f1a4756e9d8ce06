"""What the ``fleche-remote`` commands share: naming a cache, selecting
entries, and showing them.

Naming a cache on the command line (``SPEC``):

``NAME``
    a cache of fleche.toml (``[NAME]`` or ``[[NAME]]``);
``NAME:N``
    layer ``N`` (from 0, as in ``CacheStack.layers``) of the stack ``NAME``;
``user@host``, ``ssh://host``
    an ad-hoc :class:`~fleche_remote.SshCache` to that host (``--python``,
    ``--workdir``, ``--remote-cache``, ``--ssh-options`` shape it). ``info``
    and ``doctor`` take any name that is not a cache as a host.

Selecting entries (``--name``, ``--where``, ``--since``): a name matches
qualified or not (``simulate`` finds ``work.simulate`` and
``__main__.simulate``); ``--where ARG=VALUE`` compares the argument's
stable digest with that of ``VALUE`` read as a Python literal (else as a
string), on the server; ``--since`` keeps calls saved after a moment.

Listing never back-fills: a stack is read layer by layer, so that looking
at a cache does not change it.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..caches.base import BaseCache
from ..call import CallRecord
from ..errors import ConfigError

CONFIG_HELP = "read this file instead of discovering fleche.toml files"

_LAYER = re.compile(r"(?P<name>[^:@/]+):(?P<index>\d+)")
_SINCE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|min|h|d|w)")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# -- naming a cache -------------------------------------------------------------


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus the options of an ad-hoc ssh cache."""
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    ssh = parser.add_argument_group("an ad-hoc host (a SPEC that is not a cache name)")
    ssh.add_argument("--python", default="python3", help="remote interpreter (default: python3)")
    ssh.add_argument("--workdir", help="remote directory to start in (its fleche.toml is found from there)")
    ssh.add_argument("--remote-cache", metavar="NAME", help="cache name in the remote's fleche.toml")
    ssh.add_argument(
        "--ssh-options", metavar="OPTIONS", default="", help="extra ssh options, one shell-quoted string"
    )
    ssh.add_argument("--setup", action="append", default=[], metavar="CMD", help="remote setup command")


def load_cli_config(args: argparse.Namespace) -> Any:
    """The configuration a command works on: ``--config``, else the
    discovered files, else (none found) the built-in default cache, as
    ``@cached`` would use it."""
    from ..config import builtin_config, load_config

    path = getattr(args, "config", None)
    if path:
        return load_config(path)
    config = load_config()
    if not config.files and config.searched and not config.builtin:
        config = builtin_config(config.searched, config.ignored)
    return config


@dataclass
class Opened:
    """A cache named on the command line, and how to say which it is."""

    cache: BaseCache
    label: str
    #: what to close when done (the whole stack, even when one layer was named)
    owner: BaseCache

    def close(self) -> None:
        self.owner.close()


def _host_cache(host: str, args: argparse.Namespace) -> BaseCache:
    from ..remote.client import SshCache

    if host.startswith("ssh://"):
        host = host[len("ssh://") :]
    if not host:
        raise ConfigError("an empty host name")
    return SshCache(
        host,
        cache_name=getattr(args, "remote_cache", None),
        python=getattr(args, "python", "python3"),
        ssh_options=shlex.split(getattr(args, "ssh_options", "") or ""),
        setup_commands=list(getattr(args, "setup", []) or []),
        workdir=getattr(args, "workdir", None),
    )


def open_cache(spec: Optional[str], args: argparse.Namespace, *, any_host: bool = False) -> Opened:
    """The cache ``spec`` names (see the module notes).

    Args:
        spec: ``NAME``, ``NAME:N``, a host, or None for the default cache.
        any_host: take any ``spec`` that is not a cache name as a host
            (``info``/``doctor``); otherwise only ``user@host`` or
            ``ssh://host`` are hosts, so that a mistyped name is an error.

    Raises:
        ConfigError: no such cache, layer or fleche.toml.
    """
    from ..caches.stack import CacheStack
    from ..config import load_cache

    if spec is not None and spec.startswith("ssh://"):
        cache = _host_cache(spec, args)
        return Opened(cache, spec, cache)
    config = load_cli_config(args)
    names = set(config.cache_names()) if config.files or config.builtin else set()
    if spec is None or spec in names:
        cache = load_cache(spec, config=config)
        return Opened(cache, spec or str(config.default_cache() or "default"), cache)
    layer = _LAYER.fullmatch(spec)
    if layer is not None and layer.group("name") in names:
        stack = load_cache(layer.group("name"), config=config)
        index = int(layer.group("index"))
        if not isinstance(stack, CacheStack):
            stack.close()
            raise ConfigError(f"{layer.group('name')!r} is not a stack: it has no layer {index}")
        if index >= len(stack.layers):
            stack.close()
            raise ConfigError(
                f"{layer.group('name')!r} has {len(stack.layers)} layers (0 to {len(stack.layers) - 1}), "
                f"not {index}"
            )
        return Opened(stack.layers[index], spec, stack)
    if any_host or "@" in spec:
        cache = _host_cache(spec, args)
        return Opened(cache, spec, cache)
    available = ", ".join(sorted(names)) or "none"
    raise ConfigError(
        f"no cache named {spec!r}; available: {available} "
        f"(files read: {', '.join(map(str, config.files)) or 'none'}; "
        f"for a host, write user@host or ssh://host)"
    )


def layers_of(cache: BaseCache) -> List[BaseCache]:
    """The layers of a stack, or the cache itself."""
    from ..caches.stack import CacheStack

    return list(cache.layers) if isinstance(cache, CacheStack) else [cache]


def no_progress_bars(cache: BaseCache) -> None:
    """Silence the per-value bars of ssh layers (a command draws its own)."""
    from ..remote.client import SshCache

    for layer in layers_of(cache):
        if isinstance(layer, SshCache):
            layer.progress = False


# -- selecting entries ------------------------------------------------------------


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", metavar="FUNC", help="calls of this function (simulate finds work.simulate too)"
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="ARG=VALUE",
        help="argument ARG equals VALUE (a Python literal, else a string); repeatable",
    )
    parser.add_argument("--since", metavar="WHEN", help="saved after WHEN: 30m, 2h, 7d, 1w, or an ISO date")


def parse_value(text: str) -> Any:
    """``VALUE`` of ``--where``: a Python literal if it reads as one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_since(text: str, now: Optional[float] = None) -> float:
    """``--since`` as a Unix time.

    Raises:
        ConfigError: neither an age (``30m``) nor an ISO date.
    """
    now = time.time() if now is None else now
    match = _SINCE.fullmatch(text.strip())
    if match is not None:
        return now - float(match.group("n")) * _UNITS[match.group("unit")]
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"--since {text!r}: give an age (30m, 2h, 7d, 1w) or an ISO date (2024-05-01)")


@dataclass
class Filters:
    name: Optional[str] = None
    arg_digests: Dict[str, str] = field(default_factory=dict)
    since: Optional[float] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filters:
        from ..codec.digest import digest_of

        digests: Dict[str, str] = {}
        for item in getattr(args, "where", []) or []:
            arg, sep, value = item.partition("=")
            if not sep or not arg.strip():
                raise ConfigError(f"--where {item!r}: write ARG=VALUE, e.g. --where n=200")
            digests[arg.strip()] = str(digest_of(parse_value(value)))
        since = getattr(args, "since", None)
        return cls(getattr(args, "name", None), digests, parse_since(since) if since else None)

    @property
    def given(self) -> bool:
        return bool(self.name or self.arg_digests or self.since is not None)

    def matches(self, record: CallRecord) -> bool:
        if self.name and not name_matches(record.name, self.name):
            return False
        if self.since is not None:
            stamp = timestamp(record)
            if stamp is None or stamp < self.since:
                return False
        return True


def name_matches(stored: str, wanted: str) -> bool:
    """``wanted`` is ``stored`` or a dotted tail of it (``simulate`` matches
    ``work.simulate`` and ``__main__.simulate``; ``work.simulate`` does not
    match ``homework.simulate``)."""
    return stored == wanted or stored.endswith("." + wanted)


def select(
    cache: BaseCache, filters: Filters, *, unreadable: bool = False
) -> Iterator[Tuple[Any, List[int]]]:
    """Matching records of every layer, each once, with the layers that hold it.

    Each layer is queried on its own (nothing is back-filled). Names are
    matched here, not on the server, so that unqualified names work; the
    argument filters go to the server.

    Args:
        unreadable: also yield the records a store could not read, as
            :class:`~fleche_remote.call.UnreadableRecord` (a listing shows
            them; commands that act on entries leave them out).
    """
    held: Dict[str, Tuple[Any, List[int]]] = {}
    for depth, layer in enumerate(layers_of(cache)):
        records = layer.query_records(None, filters.arg_digests or None, None)
        try:
            for record in records:
                if not isinstance(record, CallRecord):
                    if not unreadable:
                        continue
                elif not filters.matches(record):
                    continue
                if record.key in held:
                    held[record.key][1].append(depth)
                else:
                    held[record.key] = (record, [depth])
        finally:
            close = getattr(records, "close", None)
            if close is not None:
                close()
    yield from held.values()


def find_record(cache: BaseCache, key: str) -> Tuple[CallRecord, List[int]]:
    """The record under ``key`` (full or unique prefix) and the layers that
    hold it, without back-filling.

    Raises:
        KeyError: no layer holds it.
        AmbiguousDigestError: the prefix matches several keys.
    """
    full = str(cache.expand(key))
    found: Optional[CallRecord] = None
    depths: List[int] = []
    for depth, layer in enumerate(layers_of(cache)):
        record = layer.load_records([full])[0]
        if record is not None:
            found = found or record
            depths.append(depth)
    if found is None:
        raise KeyError(key)
    return found, depths


# -- showing ------------------------------------------------------------------------


#: Timestamps outside this range (Unix seconds) are shown as unknown: a
#: stored ``10**400``, ``1e300`` or ``NaN`` is no moment ``datetime`` can print.
_STAMP_RANGE = (0.0, 1e11)


def timestamp(record: CallRecord) -> Optional[float]:
    """The record's ``timestamp`` metadata, if it is a plausible Unix time."""
    stamp = record.metadata.get("timestamp") if isinstance(record.metadata, dict) else None
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        return None
    try:
        value = float(stamp)
    except OverflowError:
        return None
    if not (_STAMP_RANGE[0] <= value <= _STAMP_RANGE[1]):  # NaN fails both
        return None
    return value


def printable(text: str) -> str:
    """``text`` with every control or invisible character escaped
    (``\x1b``, ``\n``, ``\u202e``): names and arguments in a listing are
    whatever a writer stored, and must not clear the screen or fake a row."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def human_age(seconds: Optional[float]) -> str:
    """``5400`` -> ``'1.5h'``; ``'-'`` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"
    return f"{seconds:.0f}s"


def table(rows: List[List[str]], out: Any) -> None:
    """Left-aligned columns, the last one unpadded."""
    if not rows:
        return
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        out.write("  ".join(cells).rstrip() + "\n")


def confirm(question: str) -> bool:
    """Ask on the terminal; False when there is none to ask on."""
    import sys

    if not sys.stdin.isatty():
        return False
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")
