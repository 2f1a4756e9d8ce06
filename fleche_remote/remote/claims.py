"""Claims held by an ssh cache's server, for every client that shares it.

Each operation is one request, whatever the number of keys (``claim``,
``renew_claims``, ``release_claims``, ``claimed``). A ``@cached`` call's
lookup and, when it misses, its claim go together (``load_or_claim``), so
a miss costs one round trip before computing, as a hit does. The server
computes expiries in its own clock, so clients' clocks do not matter. A server of
an earlier version does not know the operations, and a ``--read-only``
one leaves them out of its table: both answer with an error, which turns
claims off for this cache (computing goes on without them).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..claiming import ClaimsUnsupported
from ..errors import ProtocolError, Rejected
from ..storage.claims import STORED, UNREACHED, Claims, Holder, LoadOrClaim
from .protocol import BlobHeader
from .receive import spool

#: What a server that answers ``load_or_claim`` lists in its handshake.
LOAD_OR_CLAIM = "load_or_claim"

log = logging.getLogger("fleche_remote.claims")


class RemoteClaims(Claims):
    """The claims of ``cache``'s server (what ``SshCache.claim_keeper`` gives)."""

    #: a release is a round trip the caller need not wait for
    release_in_background = True
    #: a claim answers STORED for a key stored already: no second look needed
    reports_stored = True

    def __init__(self, request: Callable[[str, Dict[str, Any]], Any], name: str) -> None:
        # a weak method: the cache holds this keeper, and must stay free to
        # be collected (and close its ssh) as soon as its user drops it
        self._request = weakref.WeakMethod(request)  # type: ignore[arg-type]
        self.name = name
        #: set when the server refused claims: then there are none
        self.unsupported = False

    def __repr__(self) -> str:
        return f"the claims of {self.name}"

    def _ask(self, op: str, keys: Sequence[str], holder: Optional[Holder], lease: Optional[float]) -> object:
        args: dict = {"keys": [str(k) for k in keys]}
        if holder is not None:
            args["holder"] = holder.to_wire()
        if lease is not None:
            args["lease"] = float(lease)
        request = self._request()
        if request is None:
            raise ClaimsUnsupported(f"{self.name} is closed")
        try:
            return request(op, args)
        except (ProtocolError, Rejected) as exc:
            # an earlier server ("unknown operation") or a read-only one
            raise self.refused(exc) from exc

    def refused(self, exc: Exception) -> ClaimsUnsupported:
        """The server turned claims down: there are none from now on."""
        self.unsupported = True
        log.info("%s takes no claims (%s); computing without them", self.name, exc)
        return ClaimsUnsupported(str(exc))

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        if not keys:
            return []
        found = self._ask("claim", keys, holder, lease)
        if not isinstance(found, list) or len(found) != len(keys):
            raise ProtocolError(f"a claim reply has one entry per key ({len(keys)}), got {found!r:.200}")
        return [STORED if h == "stored" else None if h is None else Holder.from_wire(h) for h in found]

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        if not keys:
            return []
        return [bool(x) for x in self._ask("renew_claims", keys, holder, lease)]  # type: ignore[attr-defined]

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        if keys:
            self._ask("release_claims", keys, holder, None)

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        if not keys:
            return []
        return [bool(x) for x in self._ask("claimed", keys, None, None)]  # type: ignore[attr-defined]


def load_or_claim(
    request: Callable[..., Any],
    downloading: Callable[[Callable[..., Any]], Callable[..., Any]],
    seal: Any,
    where: Any,
    keeper: RemoteClaims,
    entry: bool,
) -> LoadOrClaim:
    """An ``SshCache``'s lookup of one key that, on a miss, claims it in
    ``keeper`` in the same request (``request``, ``downloading``, ``seal``
    and ``where`` are the cache's): ``(True, result)`` (or
    ``(True, (record, blob))`` with ``entry``, for a stack to back-fill)
    when stored; else ``(False, None)`` when the claim is now ours, ``(False,
    holder)`` when another holds it, ``(False, UNREACHED)`` when the remote
    cannot be reached and ``on_error = "warn"``.

    Raises:
        ClaimsUnsupported: the server keeps no claims, or does not know the
            operation (an earlier or ``--read-only`` server, asked before
            its handshake was in): nothing was looked up.
        KeyError, CorruptEntryError: stored, but its value is missing or damaged.
    """

    def run(key: str, holder: Holder, lease: float) -> Tuple[bool, Any]:
        def consume(result: Any, streams: List[Tuple[BlobHeader, Iterator[bytes]]]) -> Tuple[bool, Any]:
            if not streams:  # a claim's answer
                try:
                    return False, None if result is None else Holder.from_wire(result)
                except ValueError as exc:
                    raise ProtocolError(f"a load_or_claim answer: {exc}") from None
            if entry:
                found = seal.open_entries([(result, spool(result, streams))], where, [key])[0]
                return True, found
            return True, seal.stream_decoder(where, key=key)(result, streams)

        args = {"keys": [str(key)], "holder": holder.to_wire(), "lease": float(lease)}
        try:
            return request(  # type: ignore[no-any-return]
                LOAD_OR_CLAIM,
                args,
                consume=downloading(consume),
                offline=lambda: (False, UNREACHED),
            )
        except Rejected as exc:  # the server's cache keeps no claims
            raise keeper.refused(exc) from exc
        except ProtocolError as exc:
            if "unknown operation" not in str(exc):
                raise
            raise ClaimsUnsupported(str(exc)) from exc

    return run


__all__ = ["LOAD_OR_CLAIM", "RemoteClaims", "load_or_claim"]
