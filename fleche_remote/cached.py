"""``@cached``: the memoizing front end.

A decorated function's call is filed under a key made from the function's
``module.qualname``, its ``version`` and its bound arguments (defaults
applied, so ``f(1)``, ``f(x=1)`` and ``f(1, y=2)`` with ``y=2`` the default
are one call). A hit returns the stored result; a miss runs the function
and saves the :class:`~fleche_remote.call.Call` with some plain metadata.

Choices worth knowing:

* The cache is resolved on first call, not at decoration, so importing a
  module never reads fleche.toml or opens an ssh connection.
* Caching never costs the caller a computed result: a read-only cache, a
  refused write or a failing save is logged and the result returned; a
  corrupt stored entry is logged and recomputed.
* ``f.map`` / ``f.starmap`` / ``f.map_kwargs`` run a sweep with one
  lookup (``load_many(results=True)``) and one ``save_many`` for the
  whole batch, because on a remote layer round trips, not bytes, are
  what the user waits for.
* A ``pathlib.Path`` argument is keyed by the file or directory tree it
  names (see :mod:`.paths`), so a changed input is a new call. A result
  that is (or plainly holds) a ``Path`` names a file on this machine: it
  is saved to local layers only, never to a remote one (logged, not
  raised; a stack saves it into its first layer without pushing it on).
* A miss is claimed before it is computed (:mod:`.claiming`): threads,
  processes and machines that miss the same key meanwhile wait for the
  holder's result. Claims are per key, so a slow call never blocks
  other keys.
* Unless ``version=`` pins it, the key's version is ``code:<digest>`` of
  the function's code and the user code it reaches (see :mod:`.codec.code`),
  computed once per process at first use. Records carry it as their
  version and the digest's parts in ``metadata["code"]``, so a miss whose
  arguments were stored under other code says, once, which part changed.
  That comparison asks the first layer only, if it is local: a miss never
  costs a remote round trip for an explanation.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import time
import types
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from . import claiming
from .caches import BaseCache

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Executor
from .call import Call, LazyCall
from .codec.code import CodeDigest
from .codec.digest import Digest, call_digest, normalize_version
from .codekey import UNRESOLVED, CodeDigestWarning, HashCodeSpec, KeyVersion, call_key
from .compute.here import run_timed, sweep_misses
from .errors import CorruptEntryError, Rejected
from .query import plan_function_query
from .results import find_stored, save_result, save_results
from .storage.claims import DEFAULT_LEASE, Claims, Holder, LoadOrClaim

log = logging.getLogger("fleche_remote.cached")

F = TypeVar("F", bound=Callable[..., Any])
CacheSpec = Union[None, str, BaseCache]
VersionSpec = Union[None, str, int]


def _metadata(wall_time: float) -> Dict[str, Any]:
    import platform
    import socket

    from . import __version__

    return {
        "wall_time": wall_time,
        "hostname": socket.gethostname(),
        "python_version": platform.python_version(),
        "timestamp": time.time(),
        "fleche_remote_version": __version__,
    }


class CachedFunction:
    """A function whose results are kept in a cache (what ``@cached`` returns).

    Calling it returns the stored result when there is one, else computes
    and saves. The helpers take the same arguments as the function and
    never run it.

    Attributes:
        name: the name calls are filed under, ``module.qualname``.
        version: the version keys and records carry: the pinned one (held
            as a str: ``@cached(version=2)`` gives ``"2"``), else
            ``code:<digest>`` of the code (see :attr:`code`), else None.
        ignore: parameters left out of the key (e.g. a verbosity flag).
        hash_code: True (the code counts), ``"deps"`` (and the versions
            of installed packages it uses) or False (only the name does).
    """

    def __init__(
        self,
        func: Callable[..., Any],
        cache: CacheSpec,
        version: VersionSpec,
        ignore: Iterable[str],
        hash_code: HashCodeSpec = None,
        *,
        claims: bool = True,
        lease: float = DEFAULT_LEASE,
        claim_timeout: Optional[float] = None,
    ):
        if not callable(func):
            raise TypeError(f"@cached needs a function, got {func!r}")
        if cache is not None and not isinstance(cache, (str, BaseCache)):
            raise TypeError(
                f"cache must be None, a cache name or a BaseCache, got {type(cache).__name__} {cache!r}"
            )
        version = normalize_version(version)  # 2 and "2" are one version
        ignored = (ignore,) if isinstance(ignore, str) else tuple(ignore)
        self._signature = inspect.signature(func)
        unknown = [n for n in ignored if n not in self._signature.parameters]
        if unknown:
            raise TypeError(
                f"ignore names {', '.join(map(repr, unknown))}, which {func.__qualname__} does not take; "
                f"its parameters are {', '.join(self._signature.parameters) or 'none'}"
            )
        module = getattr(func, "__module__", None)
        qualname = getattr(func, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str):
            # the name is half of every key: a guessed one would collide or drift
            raise TypeError(
                f"@cached names keys by module.__qualname__, and {func!r} has none; wrap it in a def"
            )
        self.func = func
        self.name = f"{module}.{qualname}"
        self._keys = KeyVersion(func, self.name, version, hash_code)
        self.ignore: Tuple[str, ...] = ignored
        self._cache_spec = cache
        self._cache: Optional[BaseCache] = cache if isinstance(cache, BaseCache) else None
        self._cache_lock = threading.Lock()
        if not lease > 0 or (claim_timeout is not None and not claim_timeout >= 0):
            raise ValueError(
                f"lease must be > 0 and claim_timeout None or >= 0, got {lease!r}, {claim_timeout!r}"
            )
        #: claim a miss before computing it (see :mod:`fleche_remote.claiming`)
        self.claims = bool(claims)
        #: seconds a claim lives unless renewed: what a dead holder costs waiters
        self.lease = float(lease)
        #: seconds a miss waits for another holder before ClaimWaitTimeout; None: as long as it lives
        self.claim_timeout = claim_timeout
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<cached {self.name}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # a module-level cached function pickles by name, as functions do
        # (its __qualname__ leads to this wrapper, not to the bare function)
        obj: Any = sys.modules.get(self.__module__)
        for part in self.func.__qualname__.split("."):
            obj = getattr(obj, part, None)
        if obj is self:
            return self.func.__qualname__
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> Dict[str, Any]:
        # cached functions travel to worker processes (multiprocessing,
        # dask): drop the lock, and a cache resolved from fleche.toml, which
        # the worker resolves again from its own files
        state = dict(self.__dict__)
        del state["_cache_lock"]
        if not isinstance(self._cache_spec, BaseCache):
            state["_cache"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        # decorating a method: bind like a function does
        if instance is None:
            return self
        return types.MethodType(self, instance)

    @property
    def cache(self) -> BaseCache:
        """The cache in use, resolved (from fleche.toml if need be) on first use.

        Raises:
            ConfigError: the named or default cache cannot be built.
        """
        if self._cache is None:
            with self._cache_lock:
                if self._cache is None:
                    from .config import load_cache

                    spec = self._cache_spec
                    self._cache = load_cache(spec if isinstance(spec, str) else None)
        return self._cache

    @property
    def version(self) -> Optional[str]:
        found = self._keys.value  # read on every call: one attribute test once resolved
        return self._keys.resolve() if found is UNRESOLVED else found  # type: ignore[no-any-return]

    @version.setter
    def version(self, value: VersionSpec) -> None:
        self._keys.pin(normalize_version(value))

    @property
    def hash_code(self) -> Union[bool, str]:
        """True (the code counts), ``"deps"`` (and installed packages' versions) or False."""
        return self._keys.hash_code

    @property
    def code(self) -> Optional[CodeDigest]:
        """What the code puts into keys (digest and parts), computed on first
        use; None when ``version=`` pins the key or ``hash_code`` is off."""
        self._keys.resolve()
        return self._keys.code

    @property
    def __fleche_code__(self) -> Any:
        # how a function that calls this one counts it (see .codec.code)
        return self._keys.stand_in()

    def _metadata(self, wall_time: float) -> Dict[str, Any]:
        return self.with_code(_metadata(wall_time))

    @property
    def cache_spec(self) -> CacheSpec:
        """The cache as given to ``@cached``: a name, a cache, or None (the
        ``[default]`` one), before it is resolved."""
        return self._cache_spec

    def with_code(self, metadata: Dict[str, Any]) -> Dict[str, Any]:
        """``metadata`` with what went into this function's code digest (under
        ``"code"``), as a saved call carries it."""
        return self._keys.with_code(metadata)

    def rerun(self, *args: Any, **kwargs: Any) -> Any:
        """Compute again, whatever is stored, and replace the stored result.

        The stored call is evicted (from every writable layer of a stack)
        and the new one saved; a reader between the two finds nothing and
        computes too. Saving follows the rules of a call (a read-only cache
        or a failing save is logged, and the result still returned).

        Returns:
            The new result.
        """
        arguments = self.arguments(*args, **kwargs)
        key = call_digest(self.name, arguments, self.version)
        cache = self.cache
        computed = {key: run_timed(self, args, kwargs)}
        if not cache.read_only:
            try:
                cache.evict(key)
            except KeyError:
                pass
            except Rejected as exc:
                log.debug("%s: old result of key %s kept by a read-only layer: %s", self.name, key[:12], exc)
        self.save_batch(cache, {key: (args, kwargs, arguments)}, computed)
        return computed[key][0]

    def arguments(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """The arguments as they enter the key: bound by name, defaults
        applied, ignored parameters dropped.

        Raises:
            TypeError: the arguments do not fit the function's signature.
        """
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k not in self.ignore}

    def _key(self, arguments: Dict[str, Any]) -> Digest:
        return call_key(self.name, arguments, self.version)

    def key(self, *args: Any, **kwargs: Any) -> Digest:
        """The key a call with these arguments is filed under."""
        return self._key(self.arguments(*args, **kwargs))

    def contains(self, *args: Any, **kwargs: Any) -> bool:
        """Whether a result for these arguments is stored."""
        return self.cache.contains(self.key(*args, **kwargs))

    def load(self, *args: Any, **kwargs: Any) -> LazyCall:
        """The stored call for these arguments (result loaded on access).

        Raises:
            KeyError: nothing is stored for them.
        """
        return self.cache.load(self.key(*args, **kwargs))

    def query(
        self,
        *args: Any,
        arguments: Optional[Mapping[str, Any]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        version: Any = None,
        **filters: Any,
    ) -> Iterator[LazyCall]:
        """Stored calls of this function whose arguments equal those given.

        ``f.query(1)``, ``f.query(x=1)`` and fleche's ``f.query(arguments=
        {"x": 1})`` are one query; arguments not given match anything.
        Every version's calls are included unless ``version`` is given;
        ``LazyCall.version`` tells them apart. ``metadata`` is as in
        :meth:`~fleche_remote.caches.BaseCache.query`.

        Raises:
            TypeError: a name the function does not take, arguments that
                do not fit its signature, or a parameter whose name is also
                a query field (``version``, ``metadata``, ...) given as a
                keyword: pass it as ``arguments={"version": ...}``.
            ValueError: a parameter in ``ignore``, which keys leave out, so
                no stored call could match it.
        """
        plan = plan_function_query(
            self.name, self._signature, self.ignore, args, arguments, metadata, version, filters
        )
        return self.cache.run_query(plan)

    # -- sweeps: one lookup and one save for a whole batch of calls ---------

    def map(
        self,
        items: Iterable[Any],
        *,
        executor: Optional[Executor] = None,
        on: Any = None,
        progress: Optional[bool] = None,
        strict: bool = False,
    ) -> List[Any]:
        """``[f(item) for item in items]``, with one cache lookup and one save
        for the whole batch (two round trips to a remote, not two per item).

        Each item is the function's *single positional argument*: a tuple
        item is passed whole as that one argument. For several arguments
        use :meth:`starmap` (tuples) or :meth:`map_kwargs` (dicts).

        Only the misses are computed, each distinct call once (an item
        repeated in ``items`` is computed once), serially in this thread
        or through ``executor``; every new result is saved in one batch.

        Args:
            items: the argument of each call.
            executor: a :class:`concurrent.futures.Executor` to compute the
                misses in (threads or processes; for processes, the
                function must be importable by name): a
                ``ProcessPoolExecutor``, a dask ``Client.get_executor()``.
            on: compute the misses on the host of this ssh layer instead
                (``"NAME:N"``, an ssh cache's name, or an ``SshCache``), as
                its ``[compute]`` table says: a process pool there or one
                Slurm job array. Results are saved in that host's cache and
                back-filled into the first layer (see
                :mod:`fleche_remote.compute`).
            progress: a bar on stderr (found, queued, running, done,
                failed); None shows one when stderr is a terminal.
            strict: with ``on``, refuse to run unless the host's copy of
                the function is the laptop's (otherwise the laptop's copy
                travels by value).

        Returns:
            The results, in the order of ``items``.

        Raises:
            TypeError: an item does not fit the function's signature
                (before anything runs).
            Exception: the first failing call's exception (in input
                order); the others' results are saved first. With ``on``,
                it carries the remote traceback (``remote_traceback``).
            Rejected: with ``on``, the host does not compute for this key
                (read-only or forced command) or has no ``[compute]`` table.
        """
        return self._sweep([((item,), {}) for item in items], executor, on, progress, strict)

    def starmap(
        self,
        items: Iterable[Iterable[Any]],
        *,
        executor: Optional[Executor] = None,
        on: Any = None,
        progress: Optional[bool] = None,
        strict: bool = False,
    ) -> List[Any]:
        """Like :meth:`map`, each item being the positional arguments:
        ``[f(*args) for args in items]``."""
        return self._sweep([(tuple(args), {}) for args in items], executor, on, progress, strict)

    def map_kwargs(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        executor: Optional[Executor] = None,
        on: Any = None,
        progress: Optional[bool] = None,
        strict: bool = False,
    ) -> List[Any]:
        """Like :meth:`map`, each item being the keyword arguments:
        ``[f(**kwargs) for kwargs in items]`` (a parameter grid)."""
        return self._sweep([((), dict(kwargs)) for kwargs in items], executor, on, progress, strict)

    def _sweep(
        self,
        calls: Sequence[Tuple[Tuple[Any, ...], Dict[str, Any]]],
        executor: Optional[Executor],
        on: Any = None,
        progress: Optional[bool] = None,
        strict: bool = False,
    ) -> List[Any]:
        if on is not None and executor is not None:
            raise TypeError("give on= (compute on a host) or executor= (compute here), not both")
        keys: List[Digest] = []
        todo: Dict[Digest, Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]] = {}
        for args, kwargs in calls:
            arguments = self.arguments(*args, **kwargs)
            key = self._key(arguments)
            keys.append(key)
            todo.setdefault(key, (args, kwargs, arguments))
        if not keys:
            return []
        cache = self.cache
        unique = list(todo)
        results: Dict[Digest, Any] = {}
        for key, lazy in zip(unique, find_stored(cache, unique, self.name)):
            if lazy is not None:
                results[key] = lazy.result
                del todo[key]
        if todo:
            self._keys.explain_miss(cache, next(iter(todo.values()))[2])
            if on is not None:
                results.update(self._compute_on(on, todo, len(unique) - len(todo), progress, strict, keys))
            else:
                sweep_misses(self, cache, todo, executor, results, progress)
        return [results[key] for key in keys]

    def _compute_on(
        self,
        on: Any,
        todo: Mapping[Digest, Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]],
        found: int,
        progress: Optional[bool],
        strict: bool,
        order: Sequence[Digest],
    ) -> Dict[Digest, Any]:
        """The misses, computed on the host of ``on`` (see :mod:`.compute`);
        the first failure in input order is raised once the rest are in."""
        from .compute.submit import compute_on, resolve_layer

        layer = resolve_layer(self, on)
        results, failures = compute_on(self, layer, todo, found=found, progress=progress, strict=strict)
        if failures:
            first = next(key for key in order if key in failures)
            raise failures[first]
        return results

    def save_batch(
        self,
        cache: BaseCache,
        todo: Mapping[Digest, Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]],
        computed: Mapping[Digest, Tuple[Any, float]],
    ) -> None:
        """Save the ``computed`` ``(result, wall_time)`` of ``todo``'s misses
        in one batch (failures logged, never raised: see :mod:`.results`)."""
        calls = [
            Call(self.name, todo[key][2], result, self._metadata(wall_time), self.version)
            for key, (result, wall_time) in computed.items()
        ]
        save_results(cache, calls, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self.arguments(*args, **kwargs)
        key = self._key(arguments)
        cache = self.cache
        lookup = cache.lookup_claims() if self.claims else None
        if lookup is None:
            try:
                return self._stored(cache, key)
            except KeyError:
                pass
        return self._miss(cache, key, arguments, args, kwargs, lookup)

    def _stored(self, cache: BaseCache, key: Digest) -> Any:
        """The stored result of ``key``; a corrupt one is logged and, like
        a missing one, a KeyError: it is computed again."""
        try:
            return cache.load_value(key)
        except CorruptEntryError as exc:
            raise self._corrupt(key, exc) from None

    def _corrupt(self, key: str, exc: CorruptEntryError) -> KeyError:
        """Log a stored result that cannot be read: it is computed again."""
        log.warning("stored result of %s (key %s) is corrupt, recomputing: %s", self.name, key[:12], exc)
        return KeyError(key)

    def _miss(
        self,
        cache: BaseCache,
        key: Digest,
        arguments: Dict[str, Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        lookup: Optional[Tuple[Claims, LoadOrClaim]],
    ) -> Any:
        """A call that missed, computed once across threads, processes and
        machines (:mod:`.claiming`); with ``lookup``, one not looked up yet,
        whose lookup claims it if it misses (one round trip, not two)."""

        def compute() -> Any:
            self._keys.explain_miss(cache, arguments)
            return self._compute_and_save(cache, key, arguments, args, kwargs)

        def load() -> Any:  # a holder we waited for saved it
            return self._stored(cache, key)

        if lookup is None:
            keeper = cache.claim_keeper() if self.claims else None
            return claiming.compute_once(
                keeper, key, self.name, self.lease, self.claim_timeout, cache.contains_many, load, compute
            )
        keeper, load_or_claim = lookup

        def look(full: str, holder: Holder, lease: float) -> Tuple[bool, Any]:
            try:
                return load_or_claim(full, holder, lease)
            except CorruptEntryError as exc:
                raise self._corrupt(full, exc) from None

        return claiming.load_or_compute(
            keeper, look, key, self.name, self.lease, self.claim_timeout, cache.contains_many, load, compute
        )

    def _compute_and_save(
        self,
        cache: BaseCache,
        key: Digest,
        arguments: Dict[str, Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        start = time.perf_counter()
        result = self.func(*args, **kwargs)
        wall_time = time.perf_counter() - start
        save_result(cache, Call(self.name, arguments, result, self._metadata(wall_time), self.version), key)
        return result


@overload
def cached(func: F) -> F: ...


@overload
def cached(
    func: None = None,
    *,
    cache: CacheSpec = None,
    version: VersionSpec = None,
    ignore: Iterable[str] = (),
    hash_code: HashCodeSpec = None,
    claims: bool = True,
    lease: float = DEFAULT_LEASE,
    claim_timeout: Optional[float] = None,
) -> Callable[[F], F]: ...


def cached(
    func: Optional[Callable[..., Any]] = None,
    *,
    cache: CacheSpec = None,
    version: VersionSpec = None,
    ignore: Iterable[str] = (),
    hash_code: HashCodeSpec = None,
    claims: bool = True,
    lease: float = DEFAULT_LEASE,
    claim_timeout: Optional[float] = None,
) -> Any:
    """Memoize a function in a persistent cache.

    Use as ``@cached`` or ``@cached(cache=..., version=..., ignore=..., hash_code=...)``.

    A key is the function's name, its arguments, and its version: by
    default a digest of its code and of the user code it reaches (helpers,
    classes, module-level constants; not the standard library or installed
    packages), so editing any of them computes anew, while comments,
    docstrings and formatting do not count.

    Args:
        func: the function (when used without parentheses).
        cache: a :class:`~fleche_remote.caches.BaseCache`, the name of a
            cache in fleche.toml, or None for ``[default] cache``; names
            are resolved on the first call.
        version: pins the key to this version (a str or an int) instead
            of the code: edits no longer change keys; change it when the
            function's meaning changes. An int stands for its decimal
            string: ``version=2`` and ``version="2"`` are one version.
        hash_code: True (the default unless ``version`` is given): the
            code is in the key. ``"deps"``: so are the versions of the
            installed packages the code uses. False: neither (the name
            alone, as ``fleche`` does by default).
        ignore: names of parameters that do not affect the result (a
            log level, a progress flag); they are left out of the key.
        claims: claim a missed call before computing it, so that other
            threads, processes and machines sharing the cache wait for
            this result instead of computing it too (see
            :mod:`fleche_remote.claiming`).
        lease: seconds a claim lives unless its holder renews it (every
            third of it): a holder that dies is taken over within
            ``lease`` plus one poll (at most 2 s).
        claim_timeout: seconds a miss waits for another holder before
            raising :class:`~fleche_remote.ClaimWaitTimeout` (naming the
            holder's host and pid); None waits as long as it lives.

    Returns:
        A :class:`CachedFunction` (or a decorator making one), which also
        offers ``.key``, ``.contains``, ``.load``, ``.query``, ``.cache``,
        ``.rerun`` (compute again and replace), ``.code`` (the digest),
        and the sweeps ``.map``, ``.starmap`` and ``.map_kwargs``.

    Raises:
        TypeError: at decoration, for a name in ``ignore`` that the
            function does not take, a ``cache``/``version``/``hash_code``
            of the wrong type, or both ``version`` and ``hash_code``.

    Warns:
        CodeDigestWarning: at first use, once, when the function's source
            cannot be read (then its name stands for its code).
    """

    def decorate(f: Callable[..., Any]) -> CachedFunction:
        return CachedFunction(
            f,
            cache,
            version,
            ignore,
            hash_code,
            claims=claims,
            lease=lease,
            claim_timeout=claim_timeout,
        )

    if func is None:
        return decorate
    return decorate(func)


__all__ = ["CachedFunction", "CodeDigestWarning", "cached"]
