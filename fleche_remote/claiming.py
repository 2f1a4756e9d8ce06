"""Computing a missed call once, across threads, processes and machines.

A ``@cached`` call that misses claims its key (see
:mod:`fleche_remote.storage.claims`) before it computes, in the one place
its cache's saves are shared through (:meth:`BaseCache.claim_keeper`):
the local store of a plain cache, the last layer a stack's saves reach (a
write-behind ssh layer, else the first layer), the server of an ssh cache.
Whoever misses the same key while the claim is held waits, then reads the
holder's result.

Design rules:

* **One claim round trip per miss, or per sweep.** ``f.map`` claims all
  its misses in one batch. Where the claims are on an ssh server, a
  ``@cached`` call's lookup claims its key when it misses, in the same
  request (:func:`load_or_compute`): a miss waits one round trip before
  computing, like a hit. Releases of a remote claim go out from a
  background thread, so the caller does not wait for them.
* **Leases, renewed in one batch per cache.** One daemon thread per
  process renews every claim the process holds, each third of the
  shortest lease. A holder that dies stops renewing, and a waiter takes
  the key over within ``lease`` seconds plus one poll (30 s + at most 2 s
  by default).
* **Waiting is cheap**: a waiter polls with ``claim`` itself (one round
  trip; it succeeds once the key is released or expired), backing off
  from :data:`POLL_MIN` to :data:`POLL_MAX` with jitter. Threads of one
  process wait on an event, not on the store.
* **A raising holder releases its claim without saving**: each waiter
  then takes the claim, finds no result, and computes (and raises) itself.
  A failure is not cached, so it is not shared either.
* **No self-deadlock**: a function computing key K that calls itself for
  K raises :class:`RecursiveCallError` (a thread-local stack of the keys
  being computed); other keys, and other cached functions, are fine.
* **No claims is not an error**: a read-only cache, a store without
  claims, an older server or one that refuses them (``--read-only``)
  mean computing as before.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .errors import ClaimWaitTimeout, RecursiveCallError
from .exiting import before_connections_close
from .storage.claims import DEFAULT_LEASE, STORED, UNREACHED, Claims, Holder, LoadOrClaim

log = logging.getLogger("fleche_remote.claims")

T = TypeVar("T")

#: A waiter's first poll comes after this many seconds; each next one waits
#: twice as long, up to :data:`POLL_MAX`, each with +-25 % jitter so that
#: waiters that started together do not poll in step.
POLL_MIN = 0.05
POLL_MAX = 2.0


class ClaimsUnsupported(Exception):
    """The keeper cannot hold claims after all (an older or read-only
    server): compute without them."""


# -- who we are ------------------------------------------------------------------

_me: Optional[Holder] = None
_me_pid = -1


def me() -> Holder:
    """This process's holder: a fresh random owner token per process (and
    per fork), with host and pid for messages."""
    global _me, _me_pid
    if _me is None or _me_pid != os.getpid():
        _me_pid = os.getpid()
        _me = Holder(secrets.token_hex(16), socket.gethostname(), _me_pid)
    return _me


# -- keys this thread is computing ---------------------------------------------


class _Stack(threading.local):
    def __init__(self) -> None:
        self.keys: List[str] = []


_computing = _Stack()


class computing:
    """Marks ``keys`` as being computed by this thread, for the duration;
    raises :class:`RecursiveCallError` for one that already is."""

    def __init__(self, name: str, keys: Sequence[str], push: bool = True) -> None:
        for key in keys:
            if key in _computing.keys:
                raise RecursiveCallError(
                    f"{name} called itself with the same arguments (key {key[:12]}) while computing "
                    f"them: it would wait for its own result forever. Give the inner call other "
                    f"arguments, or call {name}.func to run the function uncached"
                )
        self.keys = list(keys) if push else []

    def __enter__(self) -> None:
        _computing.keys.extend(self.keys)

    def __exit__(self, *exc: object) -> None:
        del _computing.keys[len(_computing.keys) - len(self.keys) :]


# -- the renewing thread ---------------------------------------------------------------


class _Renewer:
    """Renews every claim this process holds, one batch per keeper, and
    sends releases that need not hold up the caller."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._held: Dict[int, Tuple[Claims, float, Dict[str, int]]] = {}
        self._releases: List[Tuple[Claims, List[str], Callable[[], None]]] = []
        self._releasing = 0  # taken off the queue, not yet sent
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()

    def _start(self) -> None:
        if self._pid != os.getpid():  # a fork child: the thread stayed with the parent
            self._pid = os.getpid()
            self._held.clear()
            self._releases.clear()
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fleche-remote claims", daemon=True)
            self._thread.start()

    def add(self, keeper: Claims, keys: Sequence[str], lease: float) -> None:
        with self._lock:
            self._start()
            _, old_lease, held = self._held.get(id(keeper), (keeper, lease, {}))
            for key in keys:
                held[key] = held.get(key, 0) + 1
            self._held[id(keeper)] = (keeper, min(lease, old_lease), held)
            self._lock.notify_all()

    def remove(self, keeper: Claims, keys: Sequence[str]) -> None:
        with self._lock:
            entry = self._held.get(id(keeper))
            if entry is None:
                return
            held = entry[2]
            for key in keys:
                count = held.get(key, 0) - 1
                if count > 0:
                    held[key] = count
                else:
                    held.pop(key, None)
            if not held:
                del self._held[id(keeper)]

    def release_later(self, keeper: Claims, keys: List[str], before: Callable[[], None]) -> None:
        """Release ``keys`` from this thread, after ``before()`` (a
        write-behind push); they are renewed until then."""
        with self._lock:
            self._start()
            self._releases.append((keeper, keys, before))
            self._lock.notify_all()

    def _interval(self) -> Optional[float]:
        if not self._held:
            return None
        return min(lease for _, lease, _ in self._held.values()) / 3

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            with self._lock:
                while not self._releases:
                    interval = self._interval()
                    if interval is None:
                        self._lock.wait()
                        last = time.monotonic()  # first renewal a third of a lease after a claim
                        continue
                    remaining = last + interval - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                releases, self._releases = self._releases, []
                self._releasing += len(releases)
                due = [(k, lease, list(held)) for k, lease, held in self._held.values()]
            if releases:
                for keeper, keys, before in releases:
                    self._release(keeper, keys, before)
                continue
            last = time.monotonic()
            for keeper, lease, keys in due:
                self._renew(keeper, keys, lease)

    def _renew(self, keeper: Claims, keys: List[str], lease: float) -> None:
        try:
            kept = keeper.renew(keys, me(), lease)
        except Exception as exc:
            log.warning("could not renew %d claims in %r (retried next time): %s", len(keys), keeper, exc)
            return
        lost = [k for k, ok in zip(keys, kept) if not ok]
        if lost:
            log.warning(
                "lost the claim on %d keys in %r (this process was too slow to renew, and another took "
                "them over): they may be computed twice; first %s",
                len(lost),
                keeper,
                lost[0][:12],
            )

    def _release(self, keeper: Claims, keys: List[str], before: Callable[[], None]) -> None:
        try:
            before()
        except Exception:
            log.debug("waiting before releasing claims failed", exc_info=True)
        try:
            keeper.release(keys, me())
        except Exception as exc:
            log.warning(
                "could not release %d claims in %r (they expire on their own): %s", len(keys), keeper, exc
            )
        finally:
            self.remove(keeper, keys)
            with self._lock:
                self._releasing -= 1
                self._lock.notify_all()

    def drain(self, timeout: float) -> None:
        """Send the releases still queued or on their way (at exit), for
        at most ``timeout`` s: a waiter on another machine sees the result
        now rather than when the lease runs out."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._releases or self._releasing) and self._pid == os.getpid():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._lock.wait(remaining)


_renewer = _Renewer()


before_connections_close(_renewer.drain, 10.0)


# -- claiming ---------------------------------------------------------------------------


class _Local:
    """Keys being computed by some thread of this process: the others wait
    on its event rather than polling the store."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: (keeper, key) -> (set when released, claimed by a sweep)
        self.events: Dict[Tuple[int, str], Tuple[threading.Event, bool]] = {}


_local = _Local()


def _sleep(delay: float) -> float:
    time.sleep(delay * random.uniform(0.75, 1.25))
    return min(delay * 2, POLL_MAX)


class Claimed:
    """The keys of one call or sweep that this process claimed, to compute."""

    def __init__(self, keeper: Optional[Claims], keys: List[str], lease: float) -> None:
        self.keeper = keeper
        self.keys = keys
        self.lease = lease
        #: keys found stored already (and not kept claimed): read, don't compute
        self.stored: List[str] = []

    def release(self) -> None:
        """Drop the claims (and wake this process's waiting threads)."""
        keeper = self.keeper
        if keeper is not None and self.keys:
            before: Optional[Callable[[], None]] = getattr(keeper, "before_release", None)
            if before is not None or getattr(keeper, "release_in_background", False):
                _renewer.release_later(keeper, self.keys, before or (lambda: None))
            else:
                try:
                    keeper.release(self.keys, me())
                except Exception as exc:
                    log.warning("could not release claims in %r (they expire): %s", keeper, exc)
                finally:
                    _renewer.remove(keeper, self.keys)
        self.release_local()

    def release_local(self) -> None:
        """Wake this process's threads waiting for these keys."""
        with _local.lock:
            for key in self.keys:
                event = _local.events.pop((id(self.keeper), key), None)
                if event is not None:
                    event[0].set()


def claim(
    keeper: Optional[Claims],
    keys: Sequence[str],
    lease: float = DEFAULT_LEASE,
    batch: bool = False,
    stored: Optional[Callable[[List[str]], List[bool]]] = None,
) -> Tuple[Claimed, Dict[str, Holder]]:
    """Claim ``keys`` in one batch: those now ours (to compute, then
    :meth:`Claimed.release`), and the holder of each of the others. A key
    that a sweep of this process holds is neither: its points may call
    each other (``fib.map``), so it is computed without a claim rather
    than waited for by the sweep that holds it.

    A key claimed is then looked for (``stored``, unless the keeper's own
    answer says, as an ssh server's does): the last holder may have saved
    it and released just after this process missed it. Those found are
    released and listed in :attr:`Claimed.stored`."""
    keys = list(dict.fromkeys(keys))
    if keeper is None:
        return Claimed(None, keys, lease), {}
    busy: Dict[str, Holder] = {}
    asked: List[str] = []
    with _local.lock:
        for key in keys:
            held = _local.events.get((id(keeper), key))
            if held is None:
                _local.events[(id(keeper), key)] = (threading.Event(), batch)
                asked.append(key)
            elif not held[1]:
                busy[key] = me()  # another thread of ours computes it
    try:
        answers = keeper.claim(asked, me(), lease) if asked else []
    except BaseException as exc:
        Claimed(keeper, asked, lease).release_local()
        if isinstance(exc, ClaimsUnsupported):
            return Claimed(None, keys, lease), {}
        if not isinstance(exc, Exception):
            raise
        log.warning("could not claim %d calls in %r; computing without claims: %s", len(asked), keeper, exc)
        return Claimed(None, keys, lease), {}
    mine: List[str] = []
    found: List[str] = []
    for key, holder in zip(asked, answers):
        if holder is STORED or holder == STORED:
            found.append(key)
        elif holder is None:
            mine.append(key)
        else:
            busy[key] = holder
    if mine and stored is not None and not getattr(keeper, "reports_stored", False):
        hits = {k for k, hit in zip(mine, stored(mine)) if hit}
        if hits:
            Claimed(keeper, [k for k in mine if k in hits], lease).release()
            found += [k for k in mine if k in hits]
            mine = [k for k in mine if k not in hits]
    Claimed(keeper, [k for k in asked if k in busy or k in found], lease).release_local()
    if mine:
        _renewer.add(keeper, mine, lease)
    result = Claimed(keeper, mine, lease)
    result.stored = found
    return result, busy


def wait(
    keeper: Claims,
    busy: Dict[str, Holder],
    lease: float,
    timeout: Optional[float],
    name: str,
    batch: bool = False,
    stored: Optional[Callable[[List[str]], List[bool]]] = None,
) -> Tuple[Claimed, Dict[str, Holder]]:
    """Wait until some keys of ``busy`` are released or expired, polling
    in batches (one round trip per poll): returns those, claimed by this
    process (look for the holder's result, compute what is missing, then
    release), and the holders of the rest.

    Raises:
        ClaimWaitTimeout: ``timeout`` seconds passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = dict(busy)
    delay = POLL_MIN
    key, holder = next(iter(waiting.items()))
    log.info(
        "%s: waiting for %d calls held by others (%s by %s)", name, len(waiting), key[:12], holder.describe()
    )
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            key, holder = next(iter(waiting.items()))
            raise ClaimWaitTimeout(
                f"{name}: waited {timeout:g} s for {len(waiting)} calls that another process is computing "
                f"(key {key[:12]} is held by {holder.describe()}, which still renews its claim); "
                f"raise claim_timeout, or stop that process"
            )
        ours = [k for k, h in waiting.items() if h.owner == me().owner]
        with _local.lock:
            events = [e[0] for e in (_local.events.get((id(keeper), k)) for k in ours) if e is not None]
        if events and len(ours) == len(waiting):
            events[0].wait(delay)  # only threads of this process: woken when one is done
            delay = min(delay * 2, POLL_MAX)
        else:
            delay = _sleep(delay)
        claimed, waiting = claim(keeper, list(waiting), lease, batch, stored)
        if claimed.keys or claimed.stored or not waiting or claimed.keeper is None:
            return claimed, waiting


def compute_once(
    keeper: Optional[Claims],
    key: str,
    name: str,
    lease: float,
    timeout: Optional[float],
    stored: Callable[[List[str]], List[bool]],
    load: Callable[[], T],
    compute: Callable[[], T],
) -> T:
    """A missed call: claim it, or wait for its holder; ``load()`` the
    result a holder saved (``KeyError``: it failed or died); ``compute()``
    (and save) when it is still missing; release. ``stored`` is the
    cache's ``contains_many``."""
    with computing(name, [key]):
        return _claim_and_compute(keeper, key, name, lease, timeout, stored, load, compute)


def _claim_and_compute(
    keeper: Optional[Claims],
    key: str,
    name: str,
    lease: float,
    timeout: Optional[float],
    stored: Callable[[List[str]], List[bool]],
    load: Callable[[], T],
    compute: Callable[[], T],
    claimed: Optional[Tuple[Claimed, Dict[str, Holder]]] = None,
) -> T:
    """:func:`compute_once` after its check for recursion; ``claimed``: the
    claim's outcome when the lookup took it already."""
    mine, busy = claim(keeper, [key], lease, stored=stored) if claimed is None else claimed
    try:
        if busy:
            assert keeper is not None
            mine, _ = wait(keeper, busy, lease, timeout, name, stored=stored)
        if mine.stored:
            try:
                return load()
            except KeyError:
                pass
        return compute()
    finally:
        mine.release()


def load_or_compute(
    keeper: Claims,
    lookup: LoadOrClaim,
    key: str,
    name: str,
    lease: float,
    timeout: Optional[float],
    stored: Callable[[List[str]], List[bool]],
    load: Callable[[], T],
    compute: Callable[[], T],
) -> T:
    """A call whose lookup claims its key when it misses, in the same round
    trip (``BaseCache.lookup_claims``): its result, or what
    :func:`compute_once` does after the lookup missed, one round trip
    sooner. ``lookup`` raises ``KeyError`` for a stored result it cannot
    read (a lost or damaged value): that call is claimed and computed as
    a miss.

    Another thread of this process may hold the key (computing it, or
    looking it up): then this one only looks (``load()``), and waits for
    that thread as :func:`compute_once` does, rather than claiming a key
    its own process holds."""
    with computing(name, [key]):
        then = functools.partial(_claim_and_compute, keeper, key, name, lease, timeout, stored, load, compute)
        local = (id(keeper), key)
        with _local.lock:
            first = local not in _local.events
            if first:
                _local.events[local] = (threading.Event(), False)
        if first:
            asked = Claimed(keeper, [key], lease)
            try:
                found, answer = lookup(key, me(), lease)
            except ClaimsUnsupported:  # nothing was looked up: the two steps, below
                asked.release_local()
            except KeyError:  # stored, but unreadable: a miss
                asked.release_local()
                return then()
            except BaseException:
                asked.release_local()
                raise
            else:
                if found or answer is UNREACHED:
                    asked.release_local()
                    return answer if found else compute()
                if answer is None:  # ours
                    _renewer.add(keeper, [key], lease)
                    return then((asked, {}))
                asked.release_local()  # another process holds it: wait for it, as compute_once does
                return then((Claimed(keeper, [], lease), {key: answer}))
        try:
            return load()
        except KeyError:
            return then()


def compute_batch(
    keeper: Optional[Claims],
    keys: List[str],
    name: str,
    lease: float,
    timeout: Optional[float],
    stored: Callable[[List[str]], List[bool]],
    lookup: Callable[[List[str]], List[str]],
    compute: Callable[[List[str]], None],
) -> None:
    """A sweep's misses: claim them in one batch, ``compute`` ours (and
    save), then wait for the others' in batches, ``lookup`` what their
    holders saved (it returns the keys still missing) and compute those."""
    with computing(name, keys, push=False):  # each point marks itself as it runs
        got, busy = claim(keeper, keys, lease, batch=True, stored=stored)
        # ours, and those a sweep of this process holds (see claim)
        free = [k for k in keys if k not in busy and k not in got.stored]
        while True:
            try:
                compute(free + (lookup(got.stored) if got.stored else []))
            finally:
                got.release()
            if not busy:
                return
            assert keeper is not None
            got, busy = wait(keeper, busy, lease, timeout, name, batch=True, stored=stored)
            free = list(got.keys)


__all__ = [
    "POLL_MAX",
    "POLL_MIN",
    "Claimed",
    "ClaimsUnsupported",
    "claim",
    "compute_batch",
    "compute_once",
    "computing",
    "load_or_compute",
    "me",
    "wait",
]
