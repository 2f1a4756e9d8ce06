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
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..call import CallRecord, UnreadableRecord
from ..codec.peek import abridged, abridged_arguments, peek
from ..codec.values import BytesBlob, decode_value
from ..errors import ConfigError
from ..progress import human_bytes
from . import PROG
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

#: ``evict`` by filters asks (or wants ``--yes``) past this many entries.
CONFIRM_ABOVE = 5


#: The exit status of ``ls`` and ``show`` when they listed what they could,
#: but some entries were unreadable (a record that does not decode, has
#: fields of the wrong type, or arguments past the peek budget).
EXIT_UNREADABLE = 3

#: Characters of an unreadable entry's reason in a table row.
_REASON_WIDTH = 120


def _iso(stamp: Any) -> Any:
    if stamp is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):  # timestamp() keeps to a sane range; belt and braces
        return None


def _problem(record: Any) -> Optional[str]:
    """Why an entry cannot be shown, or None."""
    if isinstance(record, UnreadableRecord):
        return record.reason
    return peek(record.arguments)[1]


def _code(record: Any) -> str:
    """The short code digest a call was computed by ("" if none was kept):
    what ``@cached`` stored in ``metadata["code"]``, read defensively."""
    metadata = getattr(record, "metadata", None)  # an unreadable entry has none
    code = metadata.get("code") if isinstance(metadata, dict) else None
    digest = code.get("digest") if isinstance(code, dict) else None
    return digest[:12] if isinstance(digest, str) else ""


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    """One line per stored call: key, name, arguments, size, age, layer.

    An entry that cannot be read is listed as ``<unreadable: reason>``
    (with ``--json``, an ``error`` field) and the listing goes on; the exit
    status is then :data:`EXIT_UNREADABLE`.
    """
    filters = Filters.from_args(args)
    opened = open_cache(args.cache, args)
    try:
        stacked = len(layers_of(opened.cache)) > 1
        entries = list(select(opened.cache, filters, unreadable=True))
    finally:
        opened.close()

    def order(entry: Tuple[Any, List[int]]) -> Tuple[float, str]:
        record = entry[0]
        stamp = timestamp(record) if isinstance(record, CallRecord) else None
        return (stamp or 0.0, str(record.key))

    entries.sort(key=order)
    now = time.time()
    unreadable = 0
    if args.json:
        rows: List[Dict[str, Any]] = []
        for record, depths in entries:
            if isinstance(record, UnreadableRecord):
                unreadable += 1
                rows.append({"key": record.key, "error": record.reason, "layers": depths})
                continue
            arguments, problem = peek(record.arguments)
            stamp = timestamp(record)
            row: Dict[str, Any] = {
                "key": record.key,
                "name": record.name,
                "arguments": {k: abridged(v, 80) for k, v in arguments.items()} if problem is None else None,
                "size": record.value_size,
                "timestamp": stamp,
                "saved": _iso(stamp),
                "layers": depths,
                "code": _code(record) or None,
            }
            if problem is not None:
                unreadable += 1
                row["error"] = f"arguments: {problem}"
            rows.append(row)
        json.dump(rows, out, indent=1)
        out.write("\n")
        return _status(unreadable)
    header = ["KEY", "NAME", "ARGUMENTS", "SIZE", "AGE"] + (["LAYER"] if stacked else [])
    header += ["CODE"] if args.code else []
    lines = [header] if not args.no_header else []
    for record, depths in entries:
        problem = _problem(record)
        if problem is not None:
            unreadable += 1
        if isinstance(record, UnreadableRecord):
            line = [record.key[:12], "-", _unreadable(problem), "-", "-"]
        else:
            stamp = timestamp(record)
            line = [
                record.key[:12],
                record.name,
                abridged_arguments(record.arguments, args.width) if problem is None else _unreadable(problem),
                human_bytes(record.value_size),
                human_age(None if stamp is None else now - stamp),
            ]
        if stacked:
            line.append(",".join(map(str, depths)))
        if args.code:
            line.append(_code(record) or "-")
        lines.append(line)
    table(lines, out)
    return _status(unreadable)


def _unreadable(problem: Optional[str]) -> str:
    text = str(problem)
    if len(text) > _REASON_WIDTH:
        text = text[: _REASON_WIDTH - 3] + "..."
    return f"<unreadable: {text}>"


def _status(unreadable: int) -> int:
    if unreadable:
        sys.stderr.write(
            f"{PROG}: {unreadable} entr{'y' if unreadable == 1 else 'ies'} could not be read "
            f"(shown as <unreadable: ...>); exit status {EXIT_UNREADABLE}\n"
        )
        return EXIT_UNREADABLE
    return 0


def _load_result(cache: Any, record: CallRecord, limit: int, width: int) -> Tuple[Any, str]:
    """The result's abridged repr, or why it was not loaded.

    The value's own bytes are counted as they arrive, never the size the
    record claims: past ``limit`` the download stops and nothing is
    unpickled.
    """
    if limit <= 0:
        return None, "not loaded (--max-result-bytes 0)"
    blob = cache.load_blob(record.value)
    parts: List[bytes] = []
    got = 0
    for chunk in blob.chunks():
        got += len(chunk)
        if got > limit:
            return None, (
                f"not loaded: more than --max-result-bytes {limit} "
                f"(the record says {human_bytes(record.value_size)}, the stored value is larger)"
                if record.value_size <= limit
                else f"not loaded: more than --max-result-bytes {limit}"
            )
        parts.append(bytes(chunk))
    return abridged(decode_value(BytesBlob(blob.kind, blob.meta, b"".join(parts))), width), ""


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """The whole record of one call, and its result's repr (abridged).

    Showing the result decodes it: its pickle runs, importing and calling
    whatever it names, as loading the result in Python would. Use
    ``--max-result-bytes 0`` to show the record only, on a cache whose
    writers you do not trust.
    """
    opened = open_cache(args.cache, args)
    try:
        record, depths = find_record(opened.cache, args.key)
        arguments, problem = peek(record.arguments)
        result: Any = None
        result_note = ""
        if args.max_result_bytes > 0 and record.value_size > args.max_result_bytes:
            result_note = (
                f"not loaded: {human_bytes(record.value_size)} is more than --max-result-bytes "
                f"{args.max_result_bytes}"
            )
        else:
            cache = layers_of(opened.cache)[depths[0]]
            result, result_note = _load_result(cache, record, args.max_result_bytes, args.width)
    finally:
        opened.close()
    complete = problem is None
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
    if not complete:
        data["error"] = f"arguments: {problem}"
    if args.json:
        json.dump(data, out, indent=1, default=repr)
        out.write("\n")
        return _status(0 if complete else 1)
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
        rows.append(["arguments", f"<{len(record.arguments)} bytes, {_unreadable(problem)}>"])
    rows += [[f"metadata {k}", json.dumps(v, default=repr)] for k, v in record.metadata.items()]
    rows.append(["result", result_note or str(result)])
    table(rows, out)
    return _status(0 if complete else 1)


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
    """Delete stored values that no call refers to."""
    opened = open_cache(args.cache, args)
    try:
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
        description=(
            "List stored calls. Arguments are shown abridged, read without running any code; "
            "names and arguments are printed with control characters escaped. An entry that "
            f"cannot be read is listed as <unreadable: reason> and the exit status is {EXIT_UNREADABLE}."
        ),
    )
    p.add_argument("cache", nargs="?", metavar="CACHE", help=spec_help)
    add_filter_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--width", type=int, default=48, help="characters for the arguments column")
    p.add_argument("--no-header", action="store_true", help="leave out the header line")
    p.add_argument("--code", action="store_true", help="add the digest of the code that computed each call")
    add_cache_options(p)
    p.set_defaults(run=cmd_ls)

    p = sub.add_parser(
        "show",
        help="show one stored call in full",
        description=(
            "Show one stored call and its result's repr (abridged). Showing the result decodes "
            "it: its pickle runs, importing and calling whatever it names. --max-result-bytes 0 "
            f"shows the record only. Exit status {EXIT_UNREADABLE} when the arguments cannot be read."
        ),
    )
    p.add_argument("key", metavar="KEY", help="a key or a unique prefix of one")
    p.add_argument("cache", nargs="?", metavar="CACHE", help=spec_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--width", type=int, default=200, help="characters for each repr")
    p.add_argument(
        "--max-result-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help=(
            "do not load results larger than this, counted as the value arrives (default 64 MiB). "
            "Showing a result decodes it: its pickle runs, as loading it in Python would; "
            "0 shows the record only"
        ),
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
    add_cache_options(p)
    p.set_defaults(run=cmd_gc)
