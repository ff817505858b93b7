"""One ATM per account: a lease is a ``trio.Lock`` held from login to the session's end.

The table holds only accounts in use: a lock is created when its account is leased and
dropped when the lease is released, so the table never grows with accounts that were
merely seen. Nobody ever waits for a lease (a second ATM is refused at once), which is
what makes dropping the lock on release safe: no other task can be parked on it.
"""

from __future__ import annotations

import trio


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
