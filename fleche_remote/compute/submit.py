"""The laptop's side of ``f.map(points, on=LAYER)``.

The sweep has been looked up already (one batch through the stack); what
reaches :func:`compute_on` are the misses. They travel to LAYER's host in
one ``compute_submit`` request:

* the function as opaque bytes, pickled *by value* (its module's code
  travels with it), with its import name and code digest, so that the
  host can run its own copy when it is the same code (see :mod:`.code`);
* per point, the record the result will be filed under, built here, so
  keys are the laptop's whatever the host's versions; and the arguments,
  opaque bytes.

Then it polls (``compute_status``, one round trip) and fetches what is
done (``load_entries``, one round trip), back-filling the laptop's first
layer as results land, until every point is done or failed. A point that
raised comes back as its own exception, with the remote traceback; the
others are kept. Leaving early (Ctrl-C, a lost connection) leaves the
host computing: a rerun attaches to the same points.

Each point is computed once: a sweep of a key already queued or running
on that host (a rerun, another laptop) attaches to its job (the host's
jobs directory, :mod:`.jobs`), and the workers claim their points in the
host's store before running them (:mod:`fleche_remote.claiming`), so a
point a cluster job is computing is waited for, not computed again. The
claims are the workers', not the laptop's: a laptop that leaves cannot
renew a lease, and its points must go on.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from ..call import CallRecord
from ..codec.digest import Digest, digest_of
from ..codec.values import decode_value
from ..errors import ComputeError, ConfigError, RemoteError
from .code import function_file, function_parts, plain
from .jobs import DONE, FAILED, QUEUED, RUNNING

if TYPE_CHECKING:  # pragma: no cover
    from ..caches.base import BaseCache
    from ..remote.client import SshCache


class Sweeping(Protocol):
    """What a sweep sent to a host needs of its cached function (a
    :class:`~fleche_remote.cached.CachedFunction`)."""

    name: str
    func: Callable[..., Any]

    @property
    def version(self) -> Optional[str]: ...

    @property
    def cache(self) -> BaseCache: ...

    @property
    def cache_spec(self) -> Any: ...

    def with_code(self, metadata: Dict[str, Any]) -> Dict[str, Any]: ...


log = logging.getLogger("fleche_remote.compute")

#: Seconds between polls: short at first (a local pool finishes 1 ms points
#: in a blink), growing while nothing changes, up to a Slurm-friendly pace.
POLL_FIRST = 0.05
POLL_MAX = 2.0

Todo = Mapping[Digest, Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]]

_by_value_lock = threading.Lock()
_LAYER = re.compile(r"(?P<name>.+):(?P<index>\d+)")


# -- which layer ----------------------------------------------------------------


def resolve_layer(function: Sweeping, on: Any) -> SshCache:
    """The ssh layer ``on`` names: an :class:`SshCache`, ``"NAME:N"`` (layer N
    of the stack NAME, as the command line names layers) or the name of an
    ssh cache in fleche.toml. A layer of the function's own stack is taken
    from it, so the sweep reuses its connection.

    Raises:
        ConfigError: no such cache or layer, or one that is not over ssh.
    """
    from ..caches.stack import CacheStack
    from ..remote.client import SshCache

    if isinstance(on, SshCache):
        return _unsigned(on, on)
    if not isinstance(on, str):
        raise TypeError(f"on= takes an ssh layer: an SshCache, 'NAME:N' or an ssh cache's name, got {on!r}")
    from ..config import load_cache, load_config

    own = function.cache
    own_layers = own.layers if isinstance(own, CacheStack) else [own]
    match = _LAYER.fullmatch(on)
    config = load_config()
    name = match.group("name") if match else on
    if name not in config.cache_names():
        names = ", ".join(config.cache_names()) or "none"
        raise ConfigError(
            f"on={on!r}: no cache named {name!r} in fleche.toml (caches: {names}); "
            f"give 'NAME:N' for layer N of a stack, an ssh cache's name, or an SshCache"
        )
    spec = function.cache_spec if isinstance(function.cache_spec, str) else config.default_cache()
    if match and spec == name and isinstance(own, CacheStack):
        layer: Any = _layer_at(own, int(match.group("index")), on)
    else:
        found = load_cache(name, config=config)
        layer = _layer_at(found, int(match.group("index")), on) if match else found
        for mine in own_layers:  # the same host as one of ours: use our connection
            if (
                isinstance(mine, SshCache)
                and isinstance(layer, SshCache)
                and mine.to_config() == layer.to_config()
            ):
                layer = mine
    if not isinstance(layer, SshCache):
        raise ConfigError(
            f"on={on!r} is {layer!r}, which is not an ssh layer: points are computed on the host of an "
            f'ssh layer (type = "ssh"); for this machine, use executor= instead'
        )
    return _unsigned(layer, on)


def _unsigned(layer: SshCache, on: Any) -> SshCache:
    """``layer``, unless it signs its entries: its host never sees the key,
    so what the host computes could not be signed, and this client would
    refuse it after the host had spent the compute on it."""
    if layer.signer is not None:
        raise ConfigError(
            f"on={on!r}: {layer!r} signs its entries (secret_key), and its host never sees the key, so "
            f"the results it computes could not be signed and would be refused here; compute on a "
            f"layer without secret_key, or compute here (without on=) and save through this layer"
        )
    return layer


def _layer_at(cache: BaseCache, index: int, on: str) -> BaseCache:
    from ..caches.stack import CacheStack

    layers = cache.layers if isinstance(cache, CacheStack) else [cache]
    if index >= len(layers):
        raise ConfigError(f"on={on!r}: that cache has {len(layers)} layer(s), 0 to {len(layers) - 1}")
    return layers[index]


# -- what travels ---------------------------------------------------------------


def pack_function(func: Any) -> bytes:
    """``func`` pickled by value, its module's code included, so that a host
    without the laptop's files can run it."""
    import cloudpickle

    module = sys.modules.get(getattr(func, "__module__", "") or "")
    with _by_value_lock:
        registered = False
        if module is not None and module.__name__ != "__main__":
            try:
                cloudpickle.register_pickle_by_value(module)
                registered = True
            except (ValueError, TypeError):
                pass
        try:
            return cloudpickle.dumps(func, protocol=4)  # type: ignore[no-any-return]
        finally:
            if registered:
                cloudpickle.unregister_pickle_by_value(module)


def pack_points(function: Sweeping, todo: Todo) -> Tuple[List[CallRecord], List[bytes]]:
    """The record each result is filed under (the laptop's key) and the
    call's arguments, pickled."""
    import cloudpickle

    records: List[CallRecord] = []
    arguments: List[bytes] = []
    for key, (args, kwargs, bound) in todo.items():
        records.append(
            CallRecord(
                key=str(key),
                name=function.name,
                version=function.version,
                arguments=cloudpickle.dumps(bound, protocol=4),
                arg_digests={k: str(digest_of(v)) for k, v in bound.items()},
                metadata=plain(function.with_code({})),
                value="",
            )
        )
        arguments.append(cloudpickle.dumps((args, kwargs), protocol=4))
    return records, arguments


# -- the sweep ------------------------------------------------------------------------


class _Bar:
    """found / queued / running / done / failed, on stderr (tqdm)."""

    def __init__(self, total: int, found: int, show: Optional[bool], name: str) -> None:
        from .. import progress

        self.bar: Any = None
        if progress.wanted(show):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=found, desc=name, unit="pt", file=sys.stderr, leave=True)
        self.found = found

    def update(self, counts: Dict[str, int], finished: int) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(found=self.found, **counts, refresh=False)
        self.bar.update(self.found + finished - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compute_on(
    function: Sweeping, layer: SshCache, todo: Todo, *, found: int = 0,
    progress: Optional[bool] = None, strict: bool = False,
) -> Tuple[Dict[Digest, Any], Dict[Digest, BaseException]]:  # fmt: skip
    """Compute ``todo`` on ``layer``'s host; return the results and the
    failures, by key (results already back-filled into the first layer)."""
    func = function.func
    parts = function_parts(func)
    about = {
        "name": function.name,
        "module": func.__module__,
        "qualname": func.__qualname__,
        "digest": parts[0] if parts else None,
        "parts": parts[1] if parts else {},
        "strict": bool(strict),
        "file": function_file(func),
    }
    records, arguments = pack_points(function, todo)
    keys = [Digest(r.key) for r in records]
    answer = layer.compute_submit(pack_function(func), about, records, arguments)
    pending: Dict[Digest, List[Any]] = {}
    ready: List[Digest] = []
    for key, point in zip(keys, answer):
        if point is None:
            ready.append(key)
        else:
            pending[key] = point
    results: Dict[Digest, Any] = {}
    failures: Dict[Digest, BaseException] = {}
    bar = _Bar(found + len(keys), found, progress, function.name.rsplit(".", 1)[-1])
    delay = POLL_FIRST
    try:
        while True:
            if ready:
                _fetch(function, layer, ready, results, failures)
                ready = []
            counts = {QUEUED: 0, RUNNING: 0, DONE: len(results), FAILED: len(failures)}
            if not pending:
                bar.update(counts, len(results) + len(failures))
                break
            time.sleep(delay)
            order = list(pending)
            changed = False
            for key, state in zip(order, layer.compute_status([pending[k] for k in order])):
                what = state.get("state")
                if what == DONE:
                    ready.append(key)
                elif what == FAILED:
                    failures[key] = rebuild_failure(state)
                else:
                    counts[QUEUED if what == QUEUED else RUNNING] += 1
                    continue
                del pending[key]
                changed = True
            counts[DONE] = len(results) + len(ready)
            counts[FAILED] = len(failures)
            bar.update(counts, len(results) + len(ready) + len(failures))
            delay = POLL_FIRST if changed else min(delay * 1.5, POLL_MAX)
    finally:
        bar.close()
    return results, failures


def _fetch(
    function: Sweeping, layer: SshCache, keys: List[Digest],
    results: Dict[Digest, Any], failures: Dict[Digest, BaseException],
) -> None:  # fmt: skip
    """Load what the host has computed and copy it into the first layer."""
    from ..caches.stack import CacheStack

    entries = layer.load_entries(keys)
    cache = function.cache
    target = cache.layers[0] if isinstance(cache, CacheStack) else cache
    found = [e for e in entries if e is not None]
    if target is not layer and found and not target.read_only:
        try:
            target.save_records(found)
        except Exception:
            log.warning("could not back-fill %d computed results into %r", len(found), target, exc_info=True)
    for key, entry in zip(keys, entries):
        if entry is None:
            failures[key] = ComputeError(
                f"the host reported {function.name} key {key[:12]} done, but its cache does not have it "
                f"(evicted since, or the workers save into another cache than the server's)"
            )
        else:
            results[key] = decode_value(entry[1])


def rebuild_failure(state: Mapping[str, Any]) -> BaseException:
    """A failed point as the exception it raised (its own type, when it
    unpickles here), with the remote traceback attached."""
    tb = str(state.get("traceback") or "")
    exc: Optional[BaseException] = None
    pickled = state.get("pickled")
    if isinstance(pickled, str):
        try:
            import cloudpickle

            loaded = cloudpickle.loads(base64.b64decode(pickled))
            exc = loaded if isinstance(loaded, BaseException) else None
        except Exception:
            exc = None
    if exc is None and state.get("type") == "fleche_remote.errors.ComputeError":
        exc = ComputeError(
            str(state.get("message", "")), str(state.get("slurm_state") or ""), str(state.get("log") or "")
        )
    if exc is None:
        from ..remote.exchange import rebuild_exception
        from ..remote.protocol import ErrorResponse

        exc = rebuild_exception(
            ErrorResponse(0, str(state.get("type")), str(state.get("message", "")), (), tb)
        )
    if tb:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
        if hasattr(exc, "add_note") and not isinstance(exc, RemoteError):
            exc.add_note("--- remote traceback ---\n" + tb.rstrip())
    return exc
