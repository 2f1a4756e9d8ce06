"""``fleche-remote du``, and the trimming half of ``gc``: how much a cache
holds against its limits, and a one-off trim by the same rules the cache
applies as it saves (see :mod:`fleche_remote.caches.quota`).

A layer over local stores is measured here, with the store's own
``usage()`` (one aggregate query for SQL); an ssh layer is measured, and
trimmed, by its server, against the limits of the remote's fleche.toml.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, TextIO

from ..caches.base import BaseCache
from ..errors import ConfigError, Rejected
from ..storage.quota import Limits, format_age, format_size, parse_age, parse_size
from .common import add_cache_options, layers_of, open_cache, table


def layer_report(layer: BaseCache) -> Optional[Dict[str, Any]]:
    """``calls``, ``bytes``, ``by_name`` and ``limits`` of one layer, as
    plain data; None for a layer that cannot say (an old server, a void)."""
    remote = getattr(layer, "usage_report", None)
    if remote is not None:
        return remote()  # type: ignore[no-any-return]
    usage = getattr(layer, "usage", None)
    if usage is None:
        return None
    from ..remote.handlers import usage_report

    return usage_report(usage(), getattr(layer, "limits", None))


def closeness(report: Dict[str, Any]) -> str:
    """How close a layer is to its limits: "45 % of max_bytes 20.0 GB, ..."."""
    limits = report.get("limits") or {}
    parts = []
    if "max_bytes" in limits:
        mb = int(limits["max_bytes"])
        parts.append(f"{100 * report['bytes'] / mb:.0f} % of max_bytes {format_size(mb)}")
    if "max_calls" in limits:
        mc = int(limits["max_calls"])
        parts.append(f"{100 * report['calls'] / mc:.0f} % of max_calls {mc}")
    if "max_age" in limits:
        parts.append(f"max_age {format_age(parse_age(limits['max_age']))}")
    return ", ".join(parts) or "no limits"


def cmd_du(args: argparse.Namespace, out: TextIO) -> int:
    """Bytes and entries per layer and per function name, largest first,
    with each layer's limits and how close it is to them."""
    opened = open_cache(args.cache, args)
    try:
        layers = layers_of(opened.cache)
        reports = [(i, layer, layer_report(layer)) for i, layer in enumerate(layers)]
    finally:
        opened.close()
    if args.json:
        json.dump([{"layer": i, "label": repr(layer), **(r or {})} for i, layer, r in reports], out, indent=2)
        out.write("\n")
        return 0
    for i, layer, report in reports:
        label = f"layer {i} of {opened.label}" if len(layers) > 1 else opened.label
        if report is None:
            out.write(f"{label}: {type(layer).__name__} does not report its size\n")
            continue
        out.write(
            f"{label}: {report['calls']} call(s), {format_size(report['bytes'])}; {closeness(report)}\n"
        )
        rows: List[List[str]] = [["NAME", "CALLS", "BYTES", "SHARE"]]
        total = max(report["bytes"], 1)
        by_size = sorted(report["by_name"].items(), key=lambda item: (-item[1][1], item[0]))
        for name, (calls, nbytes) in by_size[: args.top]:
            rows.append([name, str(calls), format_size(nbytes), f"{100 * nbytes / total:.0f} %"])
        if len(by_size) > args.top:
            rest = by_size[args.top :]
            rows.append(
                [
                    f"({len(rest)} more)",
                    str(sum(c for _, (c, _b) in rest)),
                    format_size(sum(b for _, (_c, b) in rest)),
                    "",
                ]
            )
        if len(rows) > 1:
            table(rows, out)
    return 0


def trim_limits(args: argparse.Namespace) -> Optional[Limits]:
    """The limits ``gc --max-bytes/--max-calls/--max-age`` asked for, if any."""
    given = {
        "max_bytes": getattr(args, "max_bytes", None),
        "max_calls": getattr(args, "max_calls", None),
        "max_age": getattr(args, "max_age", None),
    }
    if all(v is None for v in given.values()):
        return None
    try:
        if given["max_calls"] is not None:
            given["max_calls"] = int(given["max_calls"])
        return Limits.of(**given)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def trim_cache(cache: BaseCache, label: str, limits: Limits, dry_run: bool, out: TextIO) -> None:
    """Trim every layer of ``cache`` that can be trimmed, once, by ``limits``."""
    for i, layer in enumerate(layers_of(cache)):
        name = f"layer {i} of {label}" if len(layers_of(cache)) > 1 else label
        verb = "would evict" if dry_run else "evicted"
        remote = getattr(layer, "trim_remote", None)
        if remote is not None:
            cfg = limits.to_config()
            done = remote(cfg.get("max_bytes"), cfg.get("max_calls"), cfg.get("max_age"), dry_run)
            evicted, evicted_bytes, left = done["evicted"], done["evicted_bytes"], done["remaining"]
            out.write(
                f"{name}: {verb} {evicted} call(s), {format_size(evicted_bytes)}; "
                f"{left['calls']} call(s), {format_size(left['bytes'])} remain\n"
            )
            continue
        trim = getattr(layer, "trim", None)
        if trim is None:
            out.write(f"{name}: {type(layer).__name__} cannot be trimmed\n")
            continue
        try:
            report = trim(limits, dry_run=dry_run)
        except Rejected as exc:
            out.write(f"{name}: skipped: {exc}\n")
            continue
        out.write(
            f"{name}: {verb} {len(report.evicted)} call(s), {format_size(report.evicted_bytes)}; "
            f"{report.remaining.calls} call(s), {format_size(report.remaining.bytes)} remain\n"
        )


def add_trim_options(p: argparse.ArgumentParser) -> None:
    """``gc``'s options that trim by limits, as a cache with limits does."""
    g = p.add_argument_group("trim once by limits (least recently used first, expired first)")
    g.add_argument("--max-bytes", metavar="SIZE", help='keep at most this much, e.g. "20 GB", "500 MiB"')
    g.add_argument("--max-calls", metavar="N", help="keep at most this many calls")
    g.add_argument("--max-age", metavar="AGE", help='evict results stored longer ago, e.g. "30d", "12h"')
    g.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")


def register(sub: Any) -> None:
    """Add ``du`` to the command line."""
    p = sub.add_parser(
        "du",
        help="bytes and calls per layer and function name, against the limits",
        description=cmd_du.__doc__,
    )
    p.add_argument("cache", nargs="?", metavar="CACHE", help="cache name, NAME:LAYER, or user@host")
    p.add_argument("--top", type=int, default=20, metavar="N", help="function names shown per layer")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_cache_options(p)
    p.set_defaults(run=cmd_du)


__all__ = ["add_trim_options", "cmd_du", "layer_report", "parse_size", "trim_cache", "trim_limits"]
