"""``fleche-remote ls``, ``show``, ``evict`` and ``gc``: looking at and
tidying the entries of a cache.

``ls`` and ``show`` only read: a stack is read layer by layer, nothing is
back-filled, and arguments are shown through :mod:`fleche_remote.codec.peek`,
which imports and runs nothing. ``show`` decodes the result itself (that
is what it is asked for), unless it is larger than ``--max-result-bytes``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Any, Dict, List, TextIO

from ..codec.peek import abridged, abridged_arguments, peek_arguments
from ..errors import ConfigError
from ..progress import human_bytes
from .common import (
    Filters,
    add_cache_options,
    add_filter_options,
    confirm,
    find_record,
    human_age,
    layers_of,
    open_cache,
    select,
    table,
    timestamp,
)
from .usage import add_trim_options, trim_cache, trim_limits

#: ``evict`` by filters asks (or wants ``--yes``) past this many entries.
CONFIRM_ABOVE = 5


def _iso(stamp: Any) -> Any:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    """One line per stored call: key, name, arguments, size, age, layer."""
    filters = Filters.from_args(args)
    opened = open_cache(args.cache, args)
    try:
        stacked = len(layers_of(opened.cache)) > 1
        entries = list(select(opened.cache, filters))
    finally:
        opened.close()
    entries.sort(key=lambda e: (timestamp(e[0]) or 0.0, e[0].key))
    now = time.time()
    if args.json:
        rows: List[Dict[str, Any]] = []
        for record, depths in entries:
            arguments, complete = peek_arguments(record.arguments)
            stamp = timestamp(record)
            rows.append(
                {
                    "key": record.key,
                    "name": record.name,
                    "arguments": {k: abridged(v, 80) for k, v in arguments.items()} if complete else None,
                    "size": record.value_size,
                    "timestamp": stamp,
                    "saved": _iso(stamp),
                    "layers": depths,
                }
            )
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    header = ["KEY", "NAME", "ARGUMENTS", "SIZE", "AGE"] + (["LAYER"] if stacked else [])
    lines = [header] if not args.no_header else []
    for record, depths in entries:
        stamp = timestamp(record)
        line = [
            record.key[:12],
            record.name,
            abridged_arguments(record.arguments, args.width),
            human_bytes(record.value_size),
            human_age(None if stamp is None else now - stamp),
        ]
        if stacked:
            line.append(",".join(map(str, depths)))
        lines.append(line)
    table(lines, out)
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """The whole record of one call, and its result's repr (abridged)."""
    opened = open_cache(args.cache, args)
    try:
        record, depths = find_record(opened.cache, args.key)
        arguments, complete = peek_arguments(record.arguments)
        result: Any = None
        result_note = ""
        if args.max_result_bytes >= record.value_size:
            cache = layers_of(opened.cache)[depths[0]]
            result = abridged(cache.load_value(record.key), args.width)
        else:
            result_note = (
                f"not loaded: {human_bytes(record.value_size)} is more than --max-result-bytes "
                f"{args.max_result_bytes}"
            )
    finally:
        opened.close()
    shown_args: Any = {k: abridged(v, args.width) for k, v in arguments.items()} if complete else None
    stamp = timestamp(record)
    data = {
        "key": record.key,
        "name": record.name,
        "version": record.version,
        "arguments": shown_args,
        "arg_digests": dict(record.arg_digests),
        "metadata": dict(record.metadata),
        "saved": _iso(stamp),
        "value": record.value,
        "value_kind": record.value_kind,
        "value_size": record.value_size,
        "digest_scheme": record.digest_scheme,
        "layers": depths,
        "result": result if not result_note else None,
    }
    if args.json:
        json.dump(data, out, indent=1, default=repr)
        out.write("\n")
        return 0
    rows = [
        ["key", record.key],
        ["name", record.name],
        ["version", str(record.version)],
        ["saved", f"{_iso(stamp)} ({human_age(None if stamp is None else time.time() - stamp)} ago)"],
        ["value", f"{record.value} ({record.value_kind}, {human_bytes(record.value_size)})"],
        ["digest scheme", record.digest_scheme],
        ["layers", ",".join(map(str, depths))],
    ]
    if complete:
        rows += [[f"argument {k}", abridged(v, args.width)] for k, v in arguments.items()]
    else:
        rows.append(["arguments", f"<{len(record.arguments)} bytes, not shown>"])
    rows += [[f"metadata {k}", json.dumps(v, default=repr)] for k, v in record.metadata.items()]
    rows.append(["result", result_note or str(result)])
    table(rows, out)
    return 0


def cmd_evict(args: argparse.Namespace, out: TextIO) -> int:
    """Forget calls by key or by filters (values go at the next ``gc``)."""
    filters = Filters.from_args(args)
    if bool(args.keys) == filters.given:
        raise ConfigError("evict takes KEY... or filters (--name, --where, --since), one of the two")
    opened = open_cache(args.cache, args)
    try:
        cache = opened.cache
        if args.keys:
            keys = [str(cache.expand(k)) for k in args.keys]
        else:
            keys = [record.key for record, _ in select(cache, filters)]
        if not keys:
            out.write("nothing matches; nothing evicted\n")
            return 0
        if args.dry_run:
            for key in keys:
                out.write(f"would evict {key[:12]}\n")
            return 0
        if len(keys) > CONFIRM_ABOVE and not args.yes:
            if not confirm(f"evict {len(keys)} calls from {opened.label}?"):
                raise ConfigError(f"{len(keys)} calls match; pass --yes to evict them all")
        for key in keys:
            cache.evict(key)
        out.write(f"evicted {len(keys)} call(s) from {opened.label}; run gc to free their values\n")
    finally:
        opened.close()
    return 0


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    """Delete stored values that no call refers to; with --max-bytes,
    --max-calls or --max-age, first trim once by those limits."""
    limits = trim_limits(args)
    opened = open_cache(args.cache, args)
    try:
        if limits is not None:
            trim_cache(opened.cache, opened.label, limits, args.dry_run, out)
            if args.dry_run:
                return 0
        elif args.dry_run:
            raise ConfigError("--dry-run goes with --max-bytes, --max-calls or --max-age")
        started = time.perf_counter()
        removed = opened.cache.collect_garbage()
    finally:
        opened.close()
    elapsed = time.perf_counter() - started
    out.write(f"removed {removed} unreferenced value(s) from {opened.label} in {elapsed:.2f} s\n")
    return 0


def register(sub: Any) -> None:
    """Add ``ls``, ``show``, ``evict`` and ``gc`` to the command line."""
    spec_help = "cache name, NAME:LAYER, or user@host (default: the [default] cache)"

    p = sub.add_parser(
        "ls",
        help="list stored calls (key, name, arguments, size, age, layer)",
        description="List stored calls. Arguments are shown abridged, read without running any code.",
    )
    p.add_argument("cache", nargs="?", metavar="CACHE", help=spec_help)
    add_filter_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--width", type=int, default=48, help="characters for the arguments column")
    p.add_argument("--no-header", action="store_true", help="leave out the header line")
    add_cache_options(p)
    p.set_defaults(run=cmd_ls)

    p = sub.add_parser("show", help="show one stored call in full", description=cmd_show.__doc__)
    p.add_argument("key", metavar="KEY", help="a key or a unique prefix of one")
    p.add_argument("cache", nargs="?", metavar="CACHE", help=spec_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--width", type=int, default=200, help="characters for each repr")
    p.add_argument(
        "--max-result-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help="do not load results larger than this (default 64 MiB)",
    )
    add_cache_options(p)
    p.set_defaults(run=cmd_show)

    p = sub.add_parser(
        "evict",
        help="forget stored calls by key or by filters",
        description="Forget calls (in every writable layer of a stack). Their values stay until gc.",
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="keys or unique prefixes")
    p.add_argument("--cache", dest="cache", metavar="CACHE", help=spec_help)
    add_filter_options(p)
    p.add_argument("--yes", action="store_true", help=f"do not ask, even for more than {CONFIRM_ABOVE}")
    p.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    add_cache_options(p)
    p.set_defaults(run=cmd_evict)

    p = sub.add_parser("gc", help="delete values no stored call refers to", description=cmd_gc.__doc__)
    p.add_argument("cache", nargs="?", metavar="CACHE", help=spec_help)
    add_trim_options(p)
    add_cache_options(p)
    p.set_defaults(run=cmd_gc)
