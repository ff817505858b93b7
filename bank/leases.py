"""One ATM per account: a lease is a ``trio.Lock`` held from login to the session's end.

The table holds only accounts in use: a lock is created when its account is leased and
dropped when the lease is released, so the table never grows with accounts that were
merely seen. Nobody ever waits for a lease (a second ATM is refused at once), which is
what makes dropping the lock on release safe: no other task can be parked on it.

This in-process lock is the whole lease for one process over SQLite. Several processes
over PostgreSQL put a lease row behind it (``bank.cluster_leases.ClusterLeases``, a
subclass): sessions ask for a ``Lease`` through ``acquire`` / ``take_over`` / ``end`` and
do not know which of the two they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class Lease:
    """A session's hold on its account."""

    account: str
    fence: int | None = None
    """The cluster lease's fencing token, which every money write of the session carries
    (``Ledger.post(fence=...)``); None for the in-process lease alone (SQLite)."""


def _nothing() -> None:
    return None


class Leases:
    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}

    def try_acquire(self, account: str) -> bool:
        """Lease ``account`` to the calling task, or return False if another holds it."""
        lock = self._locks.setdefault(account, trio.Lock())
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    def release(self, account: str) -> None:
        """End the calling task's lease (trio.Lock checks it is the holder)."""
        self._locks[account].release()
        del self._locks[account]

    def held(self) -> frozenset[str]:
        """Accounts leased right now, for operators and tests."""
        return frozenset(self._locks)

    # -- What sessions call: the same for one process and for a cluster --------------------

    async def acquire(
        self,
        account: str,
        *,
        token: bytes | None = None,
        terminal: str | None = None,
        on_lost: Callable[[], None] = _nothing,
        succeeding: Lease | None = None,
    ) -> Lease | None:
        """The lease on ``account`` for a LOGIN whose PIN matched, or None if another
        session holds it. ``token`` (the session's resumption token, if any), ``terminal``
        and ``on_lost`` (called if another process takes the lease over) matter only to a
        cluster lease; so does ``succeeding``, the lease of this process's session that a
        RESUME supersedes, which a cluster lease takes back only if no other process took
        it since (within one process the session registry alone decides)."""
        return Lease(account) if self.try_acquire(account) else None

    async def take_over(
        self,
        account: str,
        *,
        token: bytes,
        new_token: bytes,
        terminal: str | None,
        on_lost: Callable[[], None] = _nothing,
    ) -> Lease | None:
        """A RESUME's lease from a session of another process, or None: one process has no
        other (the session registry resumes this process's own sessions)."""
        return None

    def end(self, lease: Lease) -> None:
        """Release ``lease`` (the session ended); synchronous, so that it can run in any
        ``finally``."""
        self.release(lease.account)

    async def settle(self) -> None:
        """Return once every lease ended so far is free for other processes too (a
        LOGOUT's reply waits for it, so the ATM may log in anywhere at once)."""
