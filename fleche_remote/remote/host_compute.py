"""What an ``SshCache`` asks of a host that computes (``f.map(..., on=this)``).

The requests only: what is sent, what the host's compute tables do and how
a sweep polls are :mod:`fleche_remote.compute`. A mixin of ``SshCache``,
whose connection carries the requests (``_request``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..call import CallRecord
from ..errors import ProtocolError, Rejected


class HostCompute:
    """``SshCache``'s requests for computing on its host."""

    def _request(self, op: str, args: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Any:
        raise NotImplementedError  # the connection's (Lifecycle), first in SshCache's bases

    def compute_submit(
        self,
        function: bytes,
        about: Dict[str, Any],
        records: Sequence[CallRecord],
        arguments: Sequence[bytes],
    ) -> List[Optional[List[Any]]]:
        """Have the host compute the points not stored there, in one round
        trip; per point, ``[job, index]`` to poll, or None when the host has
        it already. The function and the arguments are opaque bytes to the
        server (its workers unpickle them). See :mod:`fleche_remote.compute`.

        Raises:
            Rejected: the host refuses (no ``[compute]`` table, a read-only
                or forced-command key, sbatch failed), saying why.
        """
        args = {"function": function, "about": about, "records": list(records), "arguments": list(arguments)}
        return list(self._compute_request("compute_submit", args))

    def compute_status(self, points: Sequence[Sequence[Any]]) -> List[Dict[str, Any]]:
        """The state of each ``[job, index]`` (one round trip)."""
        wanted = {"points": [[str(j), int(i)] for j, i in points]}
        return list(self._compute_request("compute_status", wanted)) if points else []

    def _compute_request(self, op: str, args: Dict[str, Any]) -> Any:
        try:
            return self._request(op, args)
        except ProtocolError as exc:
            if "unknown operation" not in str(exc):
                raise
            raise Rejected(
                f"{self!r} runs a fleche-remote server without computing (no {op!r}); "
                f"update fleche-remote on the host to use f.map(..., on=...)"
            ) from None


__all__ = ["HostCompute"]
