"""The Ledger protocol over a batch store (SQLite's or PostgreSQL's), off the event loop.

Database calls block (disk, fsync on commit, locks, the network), so they run in
``trio.to_thread.run_sync`` behind a CapacityLimiter as large as the store's pool of
connections (one, for either store). Requests that arrive together run as one batch in
one transaction (``BatchLedger._submit`` says why), in the order they arrived. A worker
thread is not abandoned on cancellation, so a commit that started always finishes
before its caller sees the cancellation.

Both stores (``bank.store.Store``, ``bank.pg_store.PgStore``) take the same batch
requests and give the same outcomes; ``open_ledger`` picks one by ``--db``
(``bank.config.is_postgresql``).

A failing database (disk full, I/O error, a corrupt file, PostgreSQL down or restarted,
a closed ledger) surfaces as ``bank.ledger.StorageError``, which the session answers
with ISSUER_UNAVAILABLE; no driver exception crosses this interface. For a post, the
transaction either committed before the failure or rolled back (or, for a connection
lost during COMMIT, nobody knows which); a retry with the same transaction id finds out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import trio

from bank.config import ServerConfig, is_postgresql, redact_db
from bank.ledger import PinChangeVerdict, PinVerdict, Posting, StorageError
from bank.pins import open_key
from bank.store import (
    BalanceQuery,
    BatchRequest,
    HistoryQuery,
    Outcome,
    PinChange,
    PinCheck,
    PinPolicy,
    PostRequest,
    Store,
    TransferRequest,
)
from wire import EntryKind, HistoryEntry

if TYPE_CHECKING:
    from bank.pg_store import PgStore

T = TypeVar("T")

_DEFAULTS = ServerConfig()
"""The settings a ledger opened without them (by a test or a tool) runs with: the
server's own defaults, which ``ServerConfig`` alone defines."""

__all__ = ["BatchLedger", "BatchStore", "Opened", "StorageError", "open_ledger", "wall_clock_ms"]


class BatchStore(Protocol):
    """What the ledger needs of a store: ``bank.store.Store`` and ``bank.pg_store.PgStore``."""

    driver_errors: tuple[type[Exception], ...]
    """The driver's exceptions, which mean the database failed: StorageError to callers."""
    connections: int
    """Connections the store holds: how many threads may use it at once."""
    created: bool
    seeded: tuple[str, ...]

    def execute_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]: ...

    def check_invariants(self) -> list[str]: ...

    def close(self) -> None: ...


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: entry timestamps and PIN lock expiry."""
    return time.time_ns() // 1_000_000


@dataclass(eq=False)
class _Batch:
    """Requests run together; ``done`` is set once ``outcomes`` or ``failure`` is."""

    requests: list[BatchRequest] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    failure: Exception | None = None
    """Why the whole batch failed: StorageError for the database, anything else a bug."""

    def outcome(self, index: int) -> Outcome | Exception:
        return self.failure if self.failure is not None else self.outcomes[index]


@dataclass(frozen=True, slots=True)
class Opened:
    """What ``open_ledger`` did to open the ledger, for the operator's log."""

    db_created: bool
    """The database was created (else an existing one was opened)."""
    seeded: tuple[str, ...]
    """The demo accounts seeded into the new database, if any."""
    key_created: bool
    """The PIN key file was created (else an existing one was loaded)."""


class BatchLedger:
    """A Ledger backed by one batch store; build it with ``open_ledger``."""

    def __init__(
        self, store: BatchStore, *, pin_policy: PinPolicy,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._store = store
        self._pin_policy = pin_policy
        self._clock_ms = clock_ms
        self._limiter = trio.CapacityLimiter(store.connections)
        self._committer = trio.Lock()
        self._open_batch: _Batch | None = None
        self._closed = False
        self.opened = Opened(db_created=False, seeded=(), key_created=False)
        """What ``open_ledger`` did; as here, nothing, for a ledger built directly."""
        self.on_commit: Callable[[int, float], None] | None = None
        """Told each batch's size (requests) and seconds on its thread (``bank.admin``)."""

    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        return cast(PinVerdict, await self._submit(PinCheck(account, pin, self._pin_policy)))

    async def balance(self, account: str) -> int:
        return cast(int, await self._submit(BalanceQuery(account)))

    async def post(
        self,
        *,
        account: str,
        txn_id: bytes,
        kind: EntryKind,
        amount_cents: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        request = PostRequest(
            account, txn_id, EntryKind(kind), amount_cents, limit_cents, terminal, fence
        )
        return cast(Posting, await self._submit(request))

    async def transfer(
        self,
        *,
        account: str,
        txn_id: bytes,
        to_account: str,
        amount_cents: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        request = TransferRequest(
            account, txn_id, to_account, amount_cents, limit_cents, terminal, fence
        )
        return cast(Posting, await self._submit(request))

    async def change_pin(self, account: str, pin: str, new_pin: str) -> PinChangeVerdict:
        request = PinChange(account, pin, new_pin, self._pin_policy)
        return cast(PinChangeVerdict, await self._submit(request))

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        return cast(list[HistoryEntry], await self._submit(HistoryQuery(account, count)))

    async def _submit(self, request: BatchRequest) -> object:
        """Run one request in the open batch; return its outcome once it is durable.

        Two costs dominate per request, and both are paid per batch instead: the fsync
        of a commit (with synchronous=FULL, about 6,400 single-row commits per second
        here, but 180,000 rows per second at 100 rows a commit) and the hand-off to the
        database thread (profiled at a fifth of the event loop's time under 100
        sessions, against about 2% for the SQL itself). So a request joins the open
        batch; the first request of a batch is its leader, which waits its turn for the
        committer, closes the batch and runs all of it in one transaction on the
        thread, while requests arriving meanwhile gather in the next batch. A batch
        holds at most one request per connection (a session waits for each reply),
        so connections_max bounds it.
        """
        if self._closed:
            raise StorageError("ledger is closed")
        batch = self._open_batch
        if batch is None:
            batch = self._open_batch = _Batch()
        index = len(batch.requests)
        batch.requests.append(request)
        if index == 0:
            await self._commit(batch)
        else:
            await batch.done.wait()
        outcome = batch.outcome(index)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _commit(self, batch: _Batch) -> None:
        """Run ``batch`` as its leader. Shielded: followers wait on it, and a commit that
        started must finish; every step is bounded (SQLite's busy timeout, one fsync)."""
        with trio.CancelScope(shield=True):
            async with self._committer:
                # Only a batch's leader closes it, so it is still the open one here.
                self._open_batch = None  # later requests start the next batch
                started = time.perf_counter()
                try:
                    batch.outcomes = await self._to_thread(
                        self._store.execute_batch, batch.requests, self._clock_ms()
                    )
                    if self.on_commit is not None:
                        self.on_commit(len(batch.requests), time.perf_counter() - started)
                except Exception as error:  # every member must see it, not only the leader
                    batch.failure = error
                finally:
                    batch.done.set()

    async def check_invariants(self) -> list[str]:
        """The store's money invariants, for tests and health checks."""
        return await self._run(self._store.check_invariants)

    async def aclose(self) -> None:
        """Refuse new work, let queued batches finish (the committer lock is fair), then close."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):  # bounded; a cancelled close would leave it open
            async with self._committer:  # fair: batches already waiting commit first
                await self._to_thread(self._store.close)

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError("ledger is closed")
        return await self._to_thread(function, *args)

    async def _to_thread(self, function: Callable[..., T], *args: object) -> T:
        try:
            return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)
        except self._store.driver_errors as error:
            raise StorageError(f"{type(error).__name__}: {one_line(error)}") from error


def one_line(error: Exception) -> str:
    """A driver's message on one line: libpq's come with newlines and hints."""
    return " ".join(str(error).split())


async def open_ledger(
    db: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    pin_tries_max: int = _DEFAULTS.pin_tries_max,
    lockout_s: int = _DEFAULTS.pin_lockout_s,
    clock_ms: Callable[[], int] = wall_clock_ms,
    seed_demo: bool = True,
) -> BatchLedger:
    """Open (creating on first start) the PIN key file and the database, off the loop:
    an SQLite file, or PostgreSQL for a URL or key=value string (``is_postgresql``).

    KeyFileError (bank.pins) and SchemaError (bank.store) pass through unchanged: they
    are start-up configuration problems for the operator, not request failures; so is
    a ValueError for PIN settings the storage cannot hold.
    """
    pin_policy = PinPolicy(tries_max=pin_tries_max, lockout_ms=lockout_s * 1000)

    store_class = _store_class(db)

    def open_store() -> tuple[BatchStore, bool]:
        key, key_created = open_key(key_path)
        return store_class(db, key, seed_demo=seed_demo), key_created

    try:
        store, key_created = await trio.to_thread.run_sync(open_store)
    except store_class.driver_errors as error:
        raise StorageError(f"cannot open {redact_db(db)}: {one_line(error)}") from error
    ledger = BatchLedger(store, pin_policy=pin_policy, clock_ms=clock_ms)
    ledger.opened = Opened(
        db_created=store.created, seeded=store.seeded, key_created=key_created
    )
    return ledger


def _store_class(db: str | os.PathLike[str]) -> type[Store] | type[PgStore]:
    if is_postgresql(db):
        from bank.pg_store import PgStore  # noqa: PLC0415 (psycopg only when asked for)

        return PgStore
    return Store
