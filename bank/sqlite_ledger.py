"""The Ledger protocol over SQLite, with every database call off the event loop.

SQLite calls block (disk, fsync on commit, the write lock), so each one runs in
``trio.to_thread.run_sync`` behind a CapacityLimiter(1): one connection, used by one
worker thread at a time, in the order the requests arrived. A worker thread is not
abandoned on cancellation, so a commit that started always finishes before its caller
sees the cancellation.

A failing database (disk full, I/O error, a corrupt file, a closed ledger) surfaces as
``bank.ledger.StorageError``, which the session answers with ISSUER_UNAVAILABLE; no
sqlite3 exception crosses this interface. For a post, the transaction either committed
before the failure or rolled back; a retry with the same transaction id finds out which.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from bank.ledger import Posting, StorageError
from bank.pins import load_or_create_key
from bank.store import LOCKOUT_MS, PIN_TRIES_MAX, Store
from wire import EntryKind, HistoryEntry, Status

T = TypeVar("T")

LOCKOUT_S = LOCKOUT_MS // 1000

__all__ = ["LOCKOUT_S", "SqliteLedger", "StorageError", "open_ledger", "wall_clock_ms"]


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: entry timestamps and PIN lock expiry."""
    return time.time_ns() // 1_000_000


class SqliteLedger:
    """A Ledger backed by one Store; build it with ``open_ledger``."""

    def __init__(self, store: Store, *, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._store = store
        self._clock_ms = clock_ms
        self._limiter = trio.CapacityLimiter(1)
        self._closed = False

    async def verify_pin(self, account: str, pin: str) -> Status:
        """See ``Ledger.verify_pin``; the lock's clock is read when the request arrives."""
        return await self._run(self._store.verify_pin, account, pin, self._clock_ms())

    async def balance(self, account: str) -> int:
        return await self._run(self._store.balance, account)

    async def post(
        self, *, account: str, txn_id: bytes, kind: EntryKind, amount_cents: int
    ) -> Posting:
        now_ms = self._clock_ms()

        def post() -> Posting:
            return self._store.post(
                account=account,
                txn_id=txn_id,
                kind=kind,
                amount_cents=amount_cents,
                now_ms=now_ms,
            )

        return await self._run(post)

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        return await self._run(self._store.history, account, count)

    async def check_invariants(self) -> list[str]:
        """The store's money invariants, for tests and health checks."""
        return await self._run(self._store.check_invariants)

    async def aclose(self) -> None:
        """Refuse new work, let queued calls finish (the limiter is FIFO), then close."""
        if self._closed:
            return
        self._closed = True
        await self._to_thread(self._store.close)

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError("ledger is closed")
        return await self._to_thread(function, *args)

    async def _to_thread(self, function: Callable[..., T], *args: object) -> T:
        try:
            return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)
        except sqlite3.Error as error:
            raise StorageError(f"{type(error).__name__}: {error}") from error


async def open_ledger(
    db_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    pin_tries_max: int = PIN_TRIES_MAX,
    lockout_s: int = LOCKOUT_S,
    clock_ms: Callable[[], int] = wall_clock_ms,
    seed_demo: bool = True,
) -> SqliteLedger:
    """Open (creating on first start) the PIN key file and the database, off the loop.

    KeyFileError (bank.pins) and SchemaError (bank.store) pass through unchanged: they
    are start-up configuration problems for the operator, not request failures.
    """

    def open_store() -> Store:
        key = load_or_create_key(key_path)
        return Store(
            db_path,
            key,
            pin_tries_max=pin_tries_max,
            lockout_ms=lockout_s * 1000,
            seed_demo=seed_demo,
        )

    try:
        store = await trio.to_thread.run_sync(open_store)
    except sqlite3.Error as error:
        raise StorageError(f"cannot open {db_path}: {error}") from error
    return SqliteLedger(store, clock_ms=clock_ms)
