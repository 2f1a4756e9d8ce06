"""Claims held by an ssh cache's server, for every client that shares it.

Each operation is one request, whatever the number of keys (``claim``,
``renew_claims``, ``release_claims``, ``claimed``). The server computes
expiries in its own clock, so clients' clocks do not matter. A server of
an earlier version does not know the operations, and a ``--read-only``
one leaves them out of its table: both answer with an error, which turns
claims off for this cache (computing goes on without them).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional, Sequence

from ..claiming import ClaimsUnsupported
from ..errors import ProtocolError, Rejected
from ..storage.claims import STORED, Claims, Holder

if TYPE_CHECKING:  # pragma: no cover
    from .client import SshCache

log = logging.getLogger("fleche_remote.claims")


class RemoteClaims(Claims):
    """The claims of ``cache``'s server (what ``SshCache.claim_keeper`` gives)."""

    #: a release is a round trip the caller need not wait for
    release_in_background = True
    #: a claim answers STORED for a key stored already: no second look needed
    reports_stored = True

    def __init__(self, cache: SshCache) -> None:
        self.cache = cache
        #: set when the server refused claims: then there are none
        self.unsupported = False

    def __repr__(self) -> str:
        return f"the claims of {self.cache!r}"

    def _ask(self, op: str, keys: Sequence[str], holder: Optional[Holder], lease: Optional[float]) -> object:
        args: dict = {"keys": [str(k) for k in keys]}
        if holder is not None:
            args["holder"] = holder.to_wire()
        if lease is not None:
            args["lease"] = float(lease)
        try:
            return self.cache._request(op, args)
        except (ProtocolError, Rejected) as exc:
            # an earlier server ("unknown operation") or a read-only one
            self.unsupported = True
            log.info("%r takes no claims (%s); computing without them", self.cache, exc)
            raise ClaimsUnsupported(str(exc)) from exc

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


__all__ = ["RemoteClaims"]
