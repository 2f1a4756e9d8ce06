"""Code in the key: what ``@cached`` does with a code digest at run time.

:mod:`.codec.code` computes the digest (pure, no caches); this module says
so when it cannot (no source), and explains a recomputation by comparing
the digest's parts with those a stored call of the same arguments kept in
its metadata. It asks the first layer only, and only if that is local: an
explanation is worth a local index lookup, never a remote round trip.
"""

from __future__ import annotations

import logging
import pickle
import threading
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .caches import BaseCache, CacheStack
from .codec.code import CodeDigest, changed_parts, code_digest
from .codec.digest import Digest, call_digest, digest_of
from .errors import UnpicklableArgumentError

log = logging.getLogger("fleche_remote.cached")

HashCodeSpec = Union[None, bool, str]

#: Misses per function and process whose arguments are looked up in the
#: first layer to explain a recomputation; after one explanation, none are:
#: the code is hashed once per process, so the reason would be the same.
EXPLAIN_CHECKS = 8

#: A version not worked out yet (None is a version: "the name alone").
UNRESOLVED: Any = object()


class CodeDigestWarning(UserWarning):
    """A ``@cached`` function's source could not be read: its key holds its name, not its code."""


def warn_no_source(func: Callable[..., Any], name: str) -> None:
    """Warn, pointing at the function's first line (its decorator), that its
    code cannot count in its keys."""
    code = getattr(func, "__code__", None)
    warnings.warn_explicit(
        f"@cached cannot read the source of {name}, so its keys hold its name but not its code: "
        f"results stay valid after an edit of it or of what it calls. Define it in a file (or a "
        f"notebook cell), or pin a version with @cached(version=...) and bump it on edits.",
        CodeDigestWarning,
        code.co_filename if code is not None else "<unknown>",
        code.co_firstlineno if code is not None else 0,
        module=getattr(func, "__module__", None) or "fleche_remote",
    )


def first_local_layer(cache: BaseCache) -> Optional[BaseCache]:
    """The layer a stack saves into first, if it is on this machine."""
    while isinstance(cache, CacheStack):
        cache = cache.layers[0]
    return None if cache.is_remote else cache


def explain_miss(
    name: str, code: CodeDigest, version: Optional[str], cache: BaseCache, arguments: Dict[str, Any]
) -> Optional[str]:
    """Why a call with ``arguments`` computes although the first, local layer
    holds them under another version (other code); None when it does not.

    Raises:
        Exception: whatever the layer's query raises.
    """
    layer = first_local_layer(cache)
    if layer is None:
        return None
    digests = {k: str(digest_of(v)) for k, v in arguments.items()}
    found = [
        r
        for r in layer.query_records(name, digests)
        if r.version != version and dict(r.arg_digests) == digests
    ]
    if not found:
        return None
    latest = max(found, key=lambda r: float(r.metadata.get("timestamp") or 0.0))
    old = latest.metadata.get("code")
    if isinstance(old, dict) and isinstance(old.get("parts"), dict):
        what = "; ".join(changed_parts(old["parts"], code.parts)) or "its code changed"
    else:
        what = f"that result has version {latest.version!r}, these keys have {version!r}"
    return f"a result for these arguments is stored (key {latest.key[:12]}) from other code: {what}"


class KeyVersion:
    """The version part of one function's keys: the pinned version, else
    ``code:<digest>`` of its code (worked out once, at first use), else None.

    Args:
        func: the bare function.
        name: the name its calls are filed under.
        pinned: ``version=``, normalised (a str or None).
        hash_code: ``hash_code=`` as given (None: on unless pinned).

    Raises:
        TypeError: ``hash_code`` is not True/False/"deps"/None, or is on
            while ``pinned`` is given.
    """

    def __init__(self, func: Callable[..., Any], name: str, pinned: Optional[str], hash_code: HashCodeSpec):
        if hash_code not in (None, True, False, "deps"):
            raise TypeError(f"hash_code must be True, False or 'deps', got {hash_code!r}")
        if pinned is not None and hash_code:
            raise TypeError(
                f"@cached(version={pinned!r}) pins the key to that version instead of the code, so "
                f"hash_code={hash_code!r} would have no effect; give one of the two"
            )
        self.func = func
        self.name = name
        self.pinned = pinned
        self.hash_code: Union[bool, str] = pinned is None if hash_code is None else hash_code
        self.code: Optional[CodeDigest] = None
        self.value: Optional[str] = UNRESOLVED
        self._lock = threading.Lock()
        self._explained = False
        self._checks = 0

    def __getstate__(self) -> Dict[str, Any]:
        # travels with a cached function to workers, digest included: a
        # worker may lack the source, and runs the same code
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def resolve(self) -> Optional[str]:
        """The version keys carry, working out the code digest if need be."""
        with self._lock:
            if self.value is not UNRESOLVED:
                return self.value
            version = self.pinned
            if version is None and self.hash_code:
                code = code_digest(self.func, deps=self.hash_code == "deps")
                if code.source_found:
                    self.code, version = code, code.token
                else:
                    warn_no_source(self.func, self.name)
            self.value = version
            return version

    def pin(self, version: Optional[str]) -> None:
        """Pin to ``version`` (None: back to the code, if hashed)."""
        with self._lock:
            self.pinned, self.code, self.value = version, None, UNRESOLVED
            if version is not None:
                self.hash_code = False
            self._explained, self._checks = False, 0

    def stand_in(self) -> Any:
        """How code calling this function counts it (``__fleche_code__``,
        see :mod:`.codec.code`): its function, followed there, or a string."""
        if self.pinned is not None:
            return f"version:{self.pinned}"
        return self.func if self.hash_code else "unhashed"

    def with_code(self, metadata: Dict[str, Any]) -> Dict[str, Any]:
        """``metadata`` plus, under ``"code"``, the digest and its parts."""
        self.resolve()
        if self.code is not None:
            metadata["code"] = self.code.metadata()
        return metadata

    def explain_miss(self, cache: BaseCache, arguments: Dict[str, Any]) -> None:
        """Log at INFO, once per process, why a call computes when the first,
        local layer holds its arguments under other code."""
        self.resolve()
        code = self.code
        if code is None or self._explained or self._checks >= EXPLAIN_CHECKS:
            return
        self._checks += 1
        try:
            why = explain_miss(self.name, code, self.value, cache, arguments)
        except Exception:
            log.debug("%s: could not look for results of other code", self.name, exc_info=True)
            self._checks = EXPLAIN_CHECKS
            return
        if why is not None:
            self._explained = True
            log.info("%s computes: %s", self.name, why)


def call_key(name: str, arguments: Dict[str, Any], version: Optional[str]) -> Digest:
    """The key of a call of ``name`` with bound ``arguments``; an argument
    that cannot be pickled (hence hashed) is named, with the fix, instead
    of a bare pickling error from deep inside the hashing.

    Raises:
        UnpicklableArgumentError: that argument, by name and type.
    """
    try:
        return call_digest(name, arguments, version)
    except (TypeError, pickle.PicklingError, AttributeError) as exc:
        culprit = _unpicklable(arguments)
        if culprit is None:
            raise
        param, value = culprit
        type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        if type(value).__module__ in ("builtins", "_io", "io"):
            type_name = type(value).__qualname__
        raise UnpicklableArgumentError(name, param, type_name, str(exc)) from None


def _unpicklable(arguments: Mapping[str, Any]) -> Optional[Tuple[str, Any]]:
    """The first argument whose digest fails, with its value (None if each
    hashes alone, so the failure was not one argument's)."""
    for param, value in arguments.items():
        try:
            digest_of(value)
        except (TypeError, pickle.PicklingError, AttributeError):
            return param, value
    return None
