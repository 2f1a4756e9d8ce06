"""``CachePool``: several caches read as one, never written (fleche's pool).

Where a :class:`~fleche_remote.caches.CacheStack` is an ordered, writable
hierarchy (saves land in its first layer, hits are back-filled there), a
pool is a read-only union: a teammate's results, a shared archive and last
month's run, looked up together without any risk of writing to one of
them. As in fleche:

* ``load`` / ``load_value``: the first member holding the key answers;
* ``contains``: whether any member holds it;
* ``query``: the union of every member's matches, each call once;
* ``expand``: combined across members (ambiguous across them too);
* ``save`` and ``evict`` raise :class:`~fleche_remote.errors.Rejected`,
  and nothing is back-filled anywhere, so reading never changes a member.

It is a stack that never back-fills and is always read-only, so every
read walks the members in one batch each, as a stack's layers are walked.
In fleche.toml: ``[[name.pool]]`` tables, one per member.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from ..call import CallRecord
from ..codec.values import Blob
from ..errors import Rejected
from .base import BaseCache
from .stack import CacheStack


class CachePool(CacheStack):
    """A read-only union of ``members``, queried as one; never back-filled.

    Args:
        members: the caches; the order only decides whose copy a ``load``
            returns when several hold the key.

    Raises:
        ValueError: no members.
    """

    def __init__(self, members: Sequence[BaseCache]) -> None:
        if not list(members):
            raise ValueError("a CachePool needs at least one member")
        super().__init__(members, backfill=False)

    @property
    def members(self) -> List[BaseCache]:
        """The member caches, in the order given."""
        return self.layers

    def __repr__(self) -> str:
        return f"CachePool({self.layers!r})"

    @property
    def read_only(self) -> bool:
        return True

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        raise Rejected(f"cannot save: {self!r} is a read-only pool")

    def evict(self, key: str) -> None:
        raise Rejected(f"cannot evict {str(key)[:12]}: {self!r} is a read-only pool")

    def collect_garbage(self) -> int:
        return 0  # a pool never changes its members

    def to_config(self) -> Dict[str, Any]:
        """The fleche.toml table that builds this pool again: ``{pool = [...]}``."""
        return {"pool": [member.to_config() for member in self.layers]}

    def describe(self) -> Dict[str, Any]:
        return {
            "class": "CachePool",
            "members": [member.describe() for member in self.layers],
            "read_only": True,
        }
