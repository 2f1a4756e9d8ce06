"""``fleche-remote pull`` / ``push SRC DST``: copy entries between caches.

Both copy from ``SRC`` to ``DST`` (the two names only read better one way
or the other: ``pull cluster laptop``, ``push laptop cluster``). Any two
caches work: local ones, ssh ones, one layer of a stack (``NAME:N``).

How it goes, so that it is fast over ssh and safe to interrupt:

1. the selected records are listed from ``SRC`` (layer by layer, nothing
   back-filled), filtered like ``ls``;
2. ``DST`` is asked which of them it holds already, in batches of
   :data:`BATCH_KEYS` (one round trip each over ssh); those are skipped;
3. the rest moves in batches of at most :data:`BATCH_KEYS` entries and
   :data:`BATCH_BYTES` bytes: one ``load_entries`` from ``SRC`` and one
   ``save_records`` into ``DST`` each, bytes only (nothing is unpickled).

Each saved entry is complete (record and value), so an interrupted copy
leaves only whole entries behind, and running the same command again
skips them: a rerun resumes. The bar counts the bytes written into
``DST``; it is drawn when stderr is a terminal or with ``--progress``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, List, Optional, TextIO, Tuple

from ..call import CallRecord
from ..errors import ConfigError
from ..progress import ByteBar, CountingBlob, human_bytes, wanted
from .common import (
    Filters,
    add_cache_options,
    add_filter_options,
    layers_of,
    no_progress_bars,
    open_cache,
    select,
)

#: Entries per round trip (``contains_many``, ``load_entries``, ``save_records``).
BATCH_KEYS = 256

#: Bytes per batch: what a batch of spooled values may hold on the way.
BATCH_BYTES = 256 << 20


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _batches(records: List[CallRecord]) -> List[List[CallRecord]]:
    out: List[List[CallRecord]] = []
    batch: List[CallRecord] = []
    size = 0
    for record in records:
        if batch and (len(batch) >= BATCH_KEYS or size + record.value_size > BATCH_BYTES):
            out.append(batch)
            batch, size = [], 0
        batch.append(record)
        size += record.value_size
    if batch:
        out.append(batch)
    return out


def cmd_copy(args: argparse.Namespace, out: TextIO) -> int:
    """Copy the selected entries of SRC that DST lacks."""
    filters = Filters.from_args(args)
    src = open_cache(args.src, args)
    dst: Optional[Any] = None
    try:
        dst = open_cache(args.dst, args)
        if dst.cache.read_only:
            raise ConfigError(f"{dst.label} is read-only: it cannot take copies")
        no_progress_bars(src.cache)
        no_progress_bars(dst.cache)
        started = time.perf_counter()
        selected = [record for record, _ in select(src.cache, filters)]
        todo: List[CallRecord] = []
        for i in range(0, len(selected), BATCH_KEYS):
            chunk = selected[i : i + BATCH_KEYS]
            held = dst.cache.contains_many([r.key for r in chunk])
            todo.extend(r for r, h in zip(chunk, held) if not h)
        total = sum(r.value_size for r in todo)
        copied, moved, missing = 0, 0, 0
        if not args.dry_run and todo:
            copied, moved, missing = _copy(src.cache, dst.cache, todo, total, args)
        elapsed = time.perf_counter() - started
    finally:
        src.close()
        if dst is not None:
            dst.close()
    summary = {
        "source": src.label,
        "destination": dst.label,
        "selected": len(selected),
        "already_there": len(selected) - len(todo),
        "to_copy": len(todo),
        "bytes_to_copy": total,
        "copied": copied,
        "bytes_copied": moved,
        "missing_in_source": missing,
        "dry_run": bool(args.dry_run),
        "seconds": round(elapsed, 3),
    }
    if args.json:
        json.dump(summary, out, indent=1)
        out.write("\n")
    elif args.dry_run:
        out.write(
            f"would copy {len(todo)} of {_entries(len(selected))} ({human_bytes(total)}) "
            f"from {src.label} to {dst.label}; {len(selected) - len(todo)} already there\n"
        )
    else:
        rate = f", {human_bytes(moved / elapsed)}/s" if moved and elapsed > 0 else ""
        out.write(
            f"copied {_entries(copied)} ({human_bytes(moved)}) from {src.label} to {dst.label} "
            f"in {elapsed:.2f} s{rate}; {len(selected) - len(todo)} already there"
            + (f"; {missing} listed without a value in the source, skipped" if missing else "")
            + "\n"
        )
    return 0


def _copy(
    src: Any, dst: Any, todo: List[CallRecord], total: int, args: argparse.Namespace
) -> Tuple[int, int, int]:
    """Move ``todo`` from ``src`` to ``dst`` batch by batch; returns
    (entries copied, bytes copied, entries the source could not give)."""
    show = wanted(True if args.progress else None)
    bar = ByteBar(total, "copy") if show else None
    copied = moved = missing = 0
    # read each record from a layer that holds it: a stack would back-fill
    reader = src if len(layers_of(src)) == 1 else _LayeredReader(src)
    try:
        for batch in _batches(todo):
            entries = reader.load_entries([r.key for r in batch])
            items = [e for e in entries if e is not None]
            missing += len(entries) - len(items)
            if bar is not None:
                items = [(record, CountingBlob(blob, bar)) for record, blob in items]
            if items:
                dst.save_records(items)
            copied += len(items)
            moved += sum(record.value_size for record, _ in items)
    finally:
        if bar is not None:
            bar.close()
    return copied, moved, missing


class _LayeredReader:
    """``load_entries`` over a stack's layers in order, without back-fill."""

    def __init__(self, stack: Any) -> None:
        self.layers = layers_of(stack)

    def load_entries(self, keys: List[str]) -> List[Any]:
        from ..caches.stack import first_found

        return first_found(self.layers, keys, lambda layer, some: layer.load_entries(some))


def register(sub: Any) -> None:
    """Add ``pull`` and ``push`` to the command line."""
    for name, verb in (("pull", "fetch"), ("push", "send")):
        p = sub.add_parser(
            name,
            help=f"{verb} entries from SRC into DST (skipping what DST has)",
            description=(
                "Copy the entries of SRC selected by the filters into DST, skipping those DST "
                "already holds, in batches (one round trip each over ssh). Interrupted, run it "
                "again: it resumes. SRC and DST are cache names, NAME:LAYER, or user@host."
            ),
        )
        p.add_argument("src", metavar="SRC", help="copy from this cache")
        p.add_argument("dst", metavar="DST", help="into this cache")
        add_filter_options(p)
        p.add_argument("--dry-run", action="store_true", help="say what would be copied, copy nothing")
        p.add_argument("--progress", action="store_true", help="draw the bar even when stderr is no terminal")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        add_cache_options(p)
        p.set_defaults(run=cmd_copy)
