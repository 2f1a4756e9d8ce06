"""``fleche-remote import-fleche [NAME]``: bring results over from a fleche cache.

A user of the ``fleche`` package (0.22) has results in caches that
fleche-remote cannot read: fleche keys, values and call records have
their own formats. This command reads them through fleche itself, which
therefore has to be installed in the same environment (the ``fleche``
extra: ``pip install 'fleche-remote[fleche]'``; fleche needs Python >=
3.11). It is never imported anywhere else, so fleche stays optional.

Each fleche call becomes a :class:`~fleche_remote.call.Call` with:

* ``name`` = fleche's ``module.name`` (how ``@cached`` names a function),
  so a function decorated with ``@cached`` under fleche-remote finds the
  imported result when it is called with the same arguments;
* the arguments and result as fleche loads them; keys are computed anew
  under fleche-remote's scheme;
* ``version`` as a string (fleche's ``2`` becomes ``"2"``, see
  :func:`~fleche_remote.codec.digest.normalize_version`);
* fleche's metadata (``{"Runtime": {...}, ...}``), where it is plain
  data; entries that are not are dropped, and said so.

What cannot come over is listed with the reason, and the exit status is 1
when anything was left behind: an argument fleche kept only as a digest
(its value was never stored), a result whose value is missing or does not
load, or a save the destination refused. Entries already in the
destination are counted and skipped, so an interrupted import can simply
run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..call import Call
from ..codec.digest import normalize_version
from ..codec.plain import check_plain
from ..errors import ConfigError

#: Calls saved per ``save_many``: one round trip each to a remote destination.
BATCH = 200

#: Problems listed one by one before the rest are only counted.
SHOW_PROBLEMS = 20


class EntryProgress:
    """Entries done out of a total: a tqdm bar when tqdm is importable, else
    a plain line on ``stream`` every ``every`` seconds (and at the end)."""

    def __init__(self, total: int, label: str, stream: TextIO, every: float = 2.0) -> None:
        self.total, self.label, self.done = total, label, 0
        self._stream, self._every = stream, every
        self._started = self._last = time.monotonic()
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            self._line()
        else:
            self._bar = tqdm(total=total, desc=label, unit="call", file=stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(f" in {time.monotonic() - self._started:.1f} s")

    def _line(self, tail: str = "") -> None:
        self._stream.write(f"{self.label}: {self.done}/{self.total} calls{tail}\n")
        self._stream.flush()


def _fleche_cache(name: Optional[str]) -> Any:
    try:
        import fleche.config
    except ImportError as exc:
        raise ConfigError(
            f"import-fleche reads caches through the fleche package, which does not import here "
            f"({exc}); install it next to fleche-remote: python -m pip install 'fleche-remote[fleche]' "
            f"(fleche needs Python >= 3.11)"
        ) from None
    if name is not None:
        merged = fleche.config._load_merged_config()
        if name not in merged and name not in ("memory", "void", "default"):
            known = ", ".join(sorted(k for k in merged if k != "default")) or "none"
            raise ConfigError(
                f"fleche finds no cache named {name!r} in the fleche.toml files it reads from "
                f"{fleche.config.Path.cwd()} (it has: {known})"
            )
    return fleche.config.load_cache_config(name)


def convert(lazy: Any) -> Tuple[Optional[Call], List[str]]:
    """A fleche ``LazyCall`` as a fleche-remote :class:`Call`, and notes.

    Returns:
        ``(call, notes)``; ``call`` is None when the entry cannot come over,
        and ``notes`` then say why; otherwise they list what was dropped.
    """
    from fleche.digest import Digest as FlecheDigest

    notes: List[str] = []
    module = getattr(lazy, "module", None)
    name = f"{module}.{lazy.name}" if module else str(lazy.name)
    try:
        arguments = dict(lazy.arguments)
    except Exception as exc:
        return None, [f"its arguments do not load: {type(exc).__name__}: {exc}"]
    digest_only = sorted(k for k, v in arguments.items() if isinstance(v, FlecheDigest))
    if digest_only:
        return None, [f"argument {', '.join(digest_only)} was stored by fleche as a digest only (no value)"]
    try:
        result = lazy.result
    except KeyError as exc:
        return None, [f"its result value is missing from the fleche cache ({exc})"]
    except Exception as exc:
        return None, [f"its result does not load: {type(exc).__name__}: {exc}"]
    if isinstance(result, FlecheDigest):
        return None, ["its result value is missing from the fleche cache"]
    metadata: Dict[str, Any] = {}
    for key, value in dict(lazy.metadata or {}).items():
        try:
            check_plain({str(key): value}, "metadata")
        except TypeError as exc:
            notes.append(f"metadata {key!r} dropped ({exc})")
            continue
        metadata[str(key)] = _plain_copy(value)
    try:
        version = normalize_version(lazy.version)
    except TypeError:
        version = str(lazy.version)
        notes.append(f"version {lazy.version!r} kept as the string {version!r}")
    return Call(name, arguments, result, metadata, version), notes


def _plain_copy(value: Any) -> Any:
    """fleche hands metadata out as ``defaultdict`` s: plain ``dict`` s here,
    which every store and the restricted decoder accept."""
    if isinstance(value, dict):
        return {str(k): _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value


def cmd_import_fleche(args: argparse.Namespace, out: TextIO) -> int:
    """Copy every call of fleche cache NAME into a fleche-remote cache."""
    from .common import no_progress_bars, open_cache

    source = _fleche_cache(args.name)
    dst = open_cache(args.into, args)
    problems: List[str] = []
    dropped: Counter[str] = Counter()
    imported = already = 0
    started = time.perf_counter()
    try:
        if dst.cache.read_only:
            raise ConfigError(f"{dst.label} is read-only: it cannot take imported entries")
        no_progress_bars(dst.cache)
        calls = list(source.query())
        bar = EntryProgress(len(calls), f"import-fleche {args.name or 'default'}", sys.stderr)
        try:
            for i in range(0, len(calls), BATCH):
                chunk = calls[i : i + BATCH]
                batch: List[Call] = []
                for lazy in chunk:
                    call, notes = convert(lazy)
                    label = f"{getattr(lazy, 'module', None) or ''}.{lazy.name}".lstrip(".")
                    if call is None:
                        problems.append(f"{label}: {'; '.join(notes)}")
                        continue
                    for note in notes:
                        dropped[note] += 1
                    batch.append(call)
                imported_now, already_now = _save(dst.cache, batch, problems)
                imported += imported_now
                already += already_now
                bar.update(len(chunk))
        finally:
            bar.close()
    finally:
        dst.close()
    summary = {
        "source": f"fleche:{args.name or 'default'}",
        "destination": dst.label,
        "found": len(calls),
        "imported": imported,
        "already_there": already,
        "not_imported": len(problems),
        "problems": problems,
        "dropped": dict(dropped),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if args.json:
        json.dump(summary, out, indent=1)
        out.write("\n")
    else:
        out.write(
            f"imported {imported} of {len(calls)} calls from fleche cache {args.name or 'default'} "
            f"into {dst.label}; {already} already there; {len(problems)} not imported\n"
        )
        for line in problems[:SHOW_PROBLEMS]:
            out.write(f"  not imported: {line}\n")
        if len(problems) > SHOW_PROBLEMS:
            out.write(f"  ... and {len(problems) - SHOW_PROBLEMS} more (--json lists them all)\n")
        for note, n in sorted(dropped.items()):
            out.write(f"  imported without: {note} ({n} calls)\n")
    return 1 if problems else 0


def _save(cache: Any, batch: List[Call], problems: List[str]) -> Tuple[int, int]:
    """Save what ``cache`` lacks of ``batch``; (saved, already there)."""
    keyed: List[Tuple[str, Call]] = []
    for call in batch:
        try:
            keyed.append((str(call.key()), call))
        except Exception as exc:
            problems.append(f"{call.name}: its arguments cannot be hashed: {type(exc).__name__}: {exc}")
    if not keyed:
        return 0, 0
    held = cache.contains_many([k for k, _ in keyed])
    todo = [c for (_, c), h in zip(keyed, held) if not h]
    try:
        cache.save_many(todo)
        return len(todo), len(keyed) - len(todo)
    except Exception:
        pass  # find which: one unsavable result must not cost the others their save
    saved = 0
    for call in todo:
        try:
            cache.save(call)
            saved += 1
        except Exception as exc:
            problems.append(f"{call.name}: the destination refused it: {type(exc).__name__}: {exc}")
    return saved, len(keyed) - len(todo)


def register(sub: Any) -> None:
    """Add ``import-fleche`` to the ``fleche-remote`` command line."""
    from .common import add_cache_options

    p = sub.add_parser(
        "import-fleche",
        help="copy the entries of a fleche cache into a fleche-remote cache (needs fleche installed)",
        description=(
            "Read every call of the fleche cache NAME (fleche's [default] cache when omitted), "
            "through the fleche package installed in this environment, and save it into a "
            "fleche-remote cache. Reports what could not be brought over, and why."
        ),
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the cache's name in fleche's fleche.toml")
    p.add_argument(
        "--into",
        metavar="SPEC",
        help="the fleche-remote cache to import into: a name, NAME:N for a layer, or user@host "
        "(default: the default cache)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_cache_options(p)
    p.set_defaults(run=cmd_import_fleche)


__all__ = ["EntryProgress", "cmd_import_fleche", "convert", "register"]
