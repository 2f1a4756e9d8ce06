"""Claims: leases that let one process compute a call while others wait.

A ``@cached`` call that misses *claims* its key in the store its result
will be shared through before it computes; whoever asks for the same key
while the claim is live waits for the result instead of computing it too.

Design rules:

* **A claim is a lease.** It names a :class:`Holder` (a random per-process
  ``owner`` token; host and pid only for messages, never compared: pids
  mean nothing across machines) and an expiry. The holder renews it while
  it computes; a holder that dies (``kill -9``, a vanished node, a lost ssh
  connection) stops renewing, and the claim is free once it expires.
* **Taking a claim is one atomic step**, never check-then-set: a file
  created with ``link(2)`` (which fails if the name exists, on NFS and
  Lustre as on a local disk), a SQL upsert whose ``WHERE`` only overwrites
  an expired claim (:mod:`.sql.claims`), a dict under a lock.
* **All batch**: every operation takes a list of keys, so a sweep's claims
  cost one round trip to a remote, and one renewal per process per cache.
* **Expiry is in the store's clock** (``time.time()`` where the store
  runs): the store, not the caller, computes ``expires = now + lease``.
  Machines sharing a file or SQL store need clocks within a small part of
  the lease of each other (NTP does far better than seconds).

File claims (:class:`FileClaims`) live in a ``claims/`` directory beside
the store's data, one file per (key, generation): ``<key>.<generation>``
holding the holder as JSON. The highest generation of a key holds it,
when it has not expired. To take a free or expired key, a process writes
its holder to a private temp file and links it to the next generation's
name; the link fails when another process made that generation first,
which is the whole race. A holder that finds a higher generation than its
own has lost the key (its lease ran out and someone took over), and says
so at its next renewal.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: Claims live this long unless renewed: what a dead holder costs its
#: waiters at most (plus one poll). Long enough that a busy machine's
#: renewal thread, which runs every third of it, never misses one.
DEFAULT_LEASE = 30.0


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: ``owner`` decides, ``host``/``pid`` are for messages.

    Attributes:
        owner: a random token, one per process (and per fork).
        host: the holder's host name.
        pid: the holder's process id (on ``host``).
        expires: when the claim ends unless renewed (Unix time, in the
            store's clock); 0 in a request, where the store fills it in.
    """

    owner: str
    host: str
    pid: int
    expires: float = 0.0

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def to_wire(self) -> List[Any]:
        return [self.owner, self.host, int(self.pid), float(self.expires)]

    @classmethod
    def from_wire(cls, value: Any) -> Holder:
        """A holder from its plain-data form; ``ValueError`` if malformed."""
        if not (isinstance(value, (list, tuple)) and len(value) == 4):
            raise ValueError(f"a claim holder is [owner, host, pid, expires], got {value!r:.200}")
        owner, host, pid, expires = value
        if not (isinstance(owner, str) and isinstance(host, str) and isinstance(pid, int)):
            raise ValueError(f"a claim holder is [owner, host, pid, expires], got {value!r:.200}")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise ValueError(f"a claim's expiry must be a number, got {expires!r:.50}")
        return cls(owner[:200], host[:200], pid, float(expires))


#: What a claim answers for a key whose result is stored already (an ssh
#: server checks, after taking the claim, so a result saved just before its
#: holder released is never computed again): read it, compute nothing.
STORED = Holder("", "", 0)

#: What a lookup that claims answers when the place that keeps the claims
#: cannot be reached and its cache is set to carry on (``on_error =
#: "warn"``): not stored there, and not claimed; compute without a claim.
UNREACHED = Holder("", "", -1)

#: A cache's lookup of one key that claims it when it misses, in one round
#: trip (``BaseCache.lookup_claims``): ``(key, holder, lease)`` gives
#: ``(True, result)`` when stored, else ``(False, answer)`` with the
#: claim's answer: None (now the holder's), another holder, or UNREACHED.
LoadOrClaim = Callable[[str, Holder, float], Tuple[bool, Any]]


class Claims(ABC):
    """A call store that can hold claims (a capability, like ``InlineValues``).

    Every method is a batch: one transaction, one round trip over ssh.
    """

    @abstractmethod
    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        """Take each key that is free, expired or already ``holder``'s, for
        ``lease`` seconds. Returns, per key, None when it is now
        ``holder``'s, else the live holder that has it."""

    @abstractmethod
    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        """Extend ``holder``'s claims by ``lease`` seconds from now; False
        for a key it no longer holds (its lease ran out and another took it)."""

    @abstractmethod
    def release(self, keys: Sequence[str], holder: Holder) -> None:
        """Drop ``holder``'s claims on ``keys`` (others' are left alone)."""

    @abstractmethod
    def claimed(self, keys: Sequence[str]) -> List[bool]:
        """Whether each key has a live claim (what eviction must skip)."""


class KeptClaims(Claims):
    """A call store whose claims a helper keeps (a :class:`FileClaims`
    beside its files, a :class:`MemoryClaims`): the store names it in
    :meth:`_claims_keeper`, made on first use."""

    _keeper: Optional[Claims] = None

    def _make_keeper(self) -> Claims:
        raise NotImplementedError

    def _claims_keeper(self) -> Claims:
        if self._keeper is None:
            self._keeper = self._make_keeper()
        return self._keeper

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        return self._claims_keeper().claim(keys, holder, lease)

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        return self._claims_keeper().renew(keys, holder, lease)

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        self._claims_keeper().release(keys, holder)

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        return self._claims_keeper().claimed(keys)


class MemoryClaims(Claims):
    """Claims in a dict: threads of one process (a memory store is not shared)."""

    def __init__(self) -> None:
        self._held: Dict[str, Holder] = {}
        self._lock = threading.Lock()

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        now = time.time()
        out: List[Optional[Holder]] = []
        with self._lock:
            for key in keys:
                current = self._held.get(key)
                if current is None or current.expires < now or current.owner == holder.owner:
                    self._held[key] = replace(holder, expires=now + lease)
                    out.append(None)
                else:
                    out.append(current)
        return out

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        now = time.time()
        out = []
        with self._lock:
            for key in keys:
                current = self._held.get(key)
                mine = current is not None and current.owner == holder.owner
                if mine:
                    self._held[key] = replace(holder, expires=now + lease)
                out.append(mine)
        return out

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        with self._lock:
            for key in keys:
                current = self._held.get(key)
                if current is not None and current.owner == holder.owner:
                    del self._held[key]

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        now = time.time()
        return [(h := self._held.get(k)) is not None and h.expires >= now for k in keys]


#: Temp files of claims (``.tmp-<owner>-<n>``) older than this are a killed
#: claimer's leftovers, removed by the next claimer of the same shard.
_TMP_MAX_AGE = 3600.0
_counter = itertools.count()


class FileClaims(Claims):
    """Claims as generation-numbered files under ``directory`` (see the
    module notes); safe on NFS and Lustre, where ``flock`` may not be.

    Args:
        directory: where claim files go (created on first claim).
    """

    def __init__(self, directory: os.PathLike[str] | str) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"FileClaims({str(self.directory)!r})"

    def _shard(self, key: str) -> Path:
        if len(key) < 3 or not key.isalnum():
            raise ValueError(f"a claim key is a hex digest, got {key!r:.80}")
        return self.directory / key[:2]

    def _generations(self, shard: Path, key: str) -> List[int]:
        try:
            names = os.listdir(shard)
        except FileNotFoundError:
            return []
        prefix = key + "."
        gens = []
        for name in names:
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                gens.append(int(name[len(prefix) :]))
        return sorted(gens)

    def _read(self, path: Path) -> Optional[Holder]:
        try:
            with open(path, "rb") as f:
                return Holder.from_wire(json.loads(f.read()))
        except FileNotFoundError:
            return None  # released meanwhile
        except ValueError:
            # written whole before it is linked, so never torn; a file that
            # does not parse is not ours to honour
            return None

    def _write_tmp(self, shard: Path, holder: Holder) -> Path:
        tmp = shard / f".tmp-{holder.owner}-{os.getpid()}-{next(_counter)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(holder.to_wire()).encode())
        finally:
            os.close(fd)
        return tmp

    def _current(self, shard: Path, key: str) -> Tuple[int, Optional[Holder]]:
        """The highest generation of ``key`` and its holder (None: released
        or unreadable); (0, None) when there is none."""
        gens = self._generations(shard, key)
        if not gens:
            return 0, None
        top = gens[-1]
        return top, self._read(shard / f"{key}.{top}")

    def _claim_one(self, key: str, holder: Holder, lease: float) -> Optional[Holder]:
        shard = self._shard(key)
        for _ in range(100):  # each turn lost a race that another process won
            now = time.time()
            top, current = self._current(shard, key)
            mine = replace(holder, expires=now + lease)
            if current is not None and current.owner == holder.owner:
                self._rewrite(shard, f"{key}.{top}", mine)
                return None
            if current is not None and current.expires >= now:
                return current
            shard.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(shard, mine)
            try:
                # link(2) is atomic and fails on an existing name over NFS
                # too (open(2)'s notes on O_EXCL recommend exactly this)
                os.link(tmp, shard / f"{key}.{top + 1}")
            except FileExistsError:
                continue  # another process took this generation first: look again
            finally:
                _unlink(tmp)
            newer, winner = self._current(shard, key)
            if newer > top + 1 and winner is not None and winner.expires >= now:
                _unlink(shard / f"{key}.{top + 1}")  # a higher live generation: back off
                return winner
            for gen in self._generations(shard, key):
                if gen < top + 1:
                    _unlink(shard / f"{key}.{gen}")  # expired or released ones below ours
            return None
        raise OSError(errno.EAGAIN, f"could not settle the claim on {key[:16]} in {shard}: too many races")

    def _rewrite(self, shard: Path, name: str, holder: Holder) -> None:
        tmp = self._write_tmp(shard, holder)
        try:
            os.replace(tmp, shard / name)
        except BaseException:
            _unlink(tmp)
            raise

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        return [self._claim_one(key, holder, lease) for key in keys]

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        out = []
        for key in keys:
            shard = self._shard(key)
            top, current = self._current(shard, key)
            mine = current is not None and current.owner == holder.owner
            if mine:
                self._rewrite(shard, f"{key}.{top}", replace(holder, expires=time.time() + lease))
                # a takeover between our look and our rewrite made a higher one
                mine = self._current(shard, key)[0] == top
            out.append(mine)
        return out

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        for key in keys:
            shard = self._shard(key)
            for gen in self._generations(shard, key):
                path = shard / f"{key}.{gen}"
                found = self._read(path)
                if found is not None and found.owner == holder.owner:
                    _unlink(path)

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        now = time.time()
        out = []
        for key in keys:
            current = self._current(self._shard(key), key)[1]
            out.append(current is not None and current.expires >= now)
        return out

    def collect_temporaries(self) -> int:
        """Remove temp files killed claimers left; returns how many."""
        removed = 0
        cutoff = time.time() - _TMP_MAX_AGE
        try:
            shards = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        for shard in shards:
            try:
                for entry in os.scandir(shard):
                    if entry.name.startswith(".tmp-") and entry.stat().st_mtime < cutoff:
                        _unlink(Path(entry.path))
                        removed += 1
            except (NotADirectoryError, FileNotFoundError):
                continue
        return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "DEFAULT_LEASE",
    "STORED",
    "UNREACHED",
    "Claims",
    "FileClaims",
    "Holder",
    "KeptClaims",
    "LoadOrClaim",
    "MemoryClaims",
]
