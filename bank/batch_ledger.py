"""The Ledger protocol over a batch store (SQLite's or PostgreSQL's), never blocking the loop.

Requests that arrive together run as one batch in one transaction (``BatchLedger._submit``
says why), in the order they arrived. What blocks runs in ``trio.to_thread.run_sync``
behind a CapacityLimiter as large as the store's pool of connections (one, for either
store): the whole batch for PostgreSQL, where every statement is a round trip; for
SQLite, only its COMMIT (the WAL write and its fsync). An SQLite batch's statements are
in-process work of a few microseconds each, so they run on the event loop, between its
``BEGIN IMMEDIATE`` (taken there only if the write lock is free at once: an operator
command's write sends the batch to the thread, which waits for it) and its COMMIT.
Measured (BENCHMARKS.md), running them in the thread made the batch the server's
bottleneck: that thread needs the GIL back after every statement and waits for it while
the loop serves requests (balances from the cache, replies, reads), so a batch of 50
postings took 15 ms on the thread under load against 4 ms alone. A worker thread is not
abandoned on cancellation, so a commit that started always finishes before its caller
sees the cancellation.

Both stores (``bank.store.Store``, ``bank.pg_store.PgStore``) take the same batch
requests and give the same outcomes; ``open_ledger`` picks one by ``--db``
(``bank.config.is_postgresql``).

A failing database (disk full, I/O error, a corrupt file, PostgreSQL down or restarted,
a closed ledger) surfaces as ``bank.ledger.StorageError``, which the session answers
with ISSUER_UNAVAILABLE; no driver exception crosses this interface. For a post, the
transaction either committed before the failure or rolled back (or, for a connection
lost during COMMIT, nobody knows which); a retry with the same transaction id finds out.

A ledger told that its process is the database's only writer (``sole_writer``: the
serving bank, once it holds ``bank.db_lock``'s lock on its SQLite file) answers a
BALANCE from a cache of balances when it can, with no thread, no batch and no wait for
anyone's fsync; ``BatchLedger.balance`` says why that stays exact.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import trio

from bank.config import ServerConfig, is_postgresql, redact_db
from bank.ledger import PinChangeVerdict, PinVerdict, Posting, PostResult, StorageError
from bank.pins import open_key
from bank.store import (
    BalanceQuery,
    BatchRequest,
    DestinationPolicy,
    HistoryQuery,
    Outcome,
    PinChange,
    PinCheck,
    PinPolicy,
    PostRequest,
    Store,
    TransferRequest,
)
from wire import EntryKind, HistoryEntry, canonical_account

if TYPE_CHECKING:
    from bank.pg_store import PgStore

T = TypeVar("T")

_DEFAULTS = ServerConfig()
"""The settings a ledger opened without them (by a test or a tool) runs with: the
server's own defaults, which ``ServerConfig`` alone defines."""

__all__ = [
    "BALANCE_CACHE_ACCOUNTS_MAX", "BatchLedger", "BatchStore", "Opened", "StorageError",
    "open_ledger", "wall_clock_ms",
]

BALANCE_CACHE_ACCOUNTS_MAX = 10_000
"""Accounts whose balances a sole writer's ledger remembers at most; the one filled
longest ago is forgotten first. A session reads only its own account, so this covers
every session of a server at the default --connections-max (1,000) ten times over,
while an entry costs about 155 bytes (its key, its value, its place in the order;
tracemalloc): at most about 1.5 MiB, however many accounts are ever read."""


class BatchStore(Protocol):
    """What the ledger needs of a store: ``bank.store.Store`` and ``bank.pg_store.PgStore``."""

    driver_errors: tuple[type[Exception], ...]
    """The driver's exceptions, which mean the database failed: StorageError to callers."""
    connections: int
    """Connections the store holds: how many threads may use it at once."""
    statements_on_loop: bool
    """Whether a batch's statements may run on the event loop, its COMMIT alone in a
    thread (``LoopBatchStore``); else the whole batch runs in a thread."""
    created: bool
    seeded: tuple[str, ...]

    def execute_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]: ...

    def check_invariants(self) -> list[str]: ...

    def close(self) -> None: ...


class LoopBatchStore(BatchStore, Protocol):
    """A store whose statements run on the event loop (``statements_on_loop``): SQLite's.
    ``begin_batch_now`` never waits, ``run_batch`` never blocks on anything but the CPU
    (and, rarely, a page the OS must read), ``commit_batch`` blocks and runs in a thread."""

    def begin_batch_now(self) -> bool: ...

    def run_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]: ...

    def commit_batch(self) -> None: ...


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
        destination_policy: DestinationPolicy,
        clock_ms: Callable[[], int] = wall_clock_ms, sole_writer: bool = False,
    ) -> None:
        """With ``sole_writer``, balances are cached (see ``balance``): only for a store
        that no other process moves money in (``open_ledger`` says which can be)."""
        self._store = store
        self._pin_policy = pin_policy
        self._destination_policy = destination_policy
        self._clock_ms = clock_ms
        self._limiter = trio.CapacityLimiter(store.connections)
        """Held by whatever uses the store's connection: a batch (on the loop and in its
        thread), an invariants check, the close."""
        self._commit_thread = trio.CapacityLimiter(1)
        """The thread of a loop batch's COMMIT, run while the batch holds ``_limiter``."""
        self._loop_store = cast(LoopBatchStore, store) if store.statements_on_loop else None
        self._committer = trio.Lock()
        self._open_batch: _Batch | None = None
        self._closed = False
        self._balances: OrderedDict[str, int] | None = OrderedDict() if sole_writer else None
        """Canonical account -> its balance in cents as of the last batch that completed;
        None when the ledger is not its database's only writer (no cache), or closed."""
        self.opened = Opened(db_created=False, seeded=(), key_created=False)
        """What ``open_ledger`` did; as here, nothing, for a ledger built directly."""
        self.on_commit: Callable[[int, float], None] | None = None
        """Told each batch's size (requests) and seconds from its start to its commit's end
        (``bank.admin``)."""

    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        return cast(PinVerdict, await self._submit(PinCheck(account, pin, self._pin_policy)))

    async def balance(self, account: str) -> int:
        """The balance, from the cache when this process is the database's only writer
        and the account's balance is known, else read in the open batch.

        Exact because the cache holds, for each account in it, the balance as of the last
        batch that completed, and changes only where a batch completes: in ``_commit``,
        in request order, before any of its requests is answered (``_remember``). Batches
        run one at a time (the committer lock), so that is the database's state, as long
        as nothing else moves money in it: the sole writer's lock keeps other servers
        out, and operator commands change no existing balance. A batch still in flight
        has answered no one, so a hit meanwhile returns the balance before it, which is
        what a reader is owed: a transfer into the account, or a deposit, is not done
        until it is answered, and once it is, the cache already says so (or has dropped
        the account). A cached account's balance moves only through this ledger; a
        change made in the file behind its back (a hand edit) is not seen until the
        account is forgotten or the server restarts.

        A hit awaits nothing, so it is no checkpoint, and needs none: the connection
        already yields once per request, where it reads the next one (it waits for the
        socket, or checkpoints when a pipelined request is already buffered:
        ``bank.server``), so a client asking for its balance in a loop cannot hold the
        loop, and a cancellation is seen there, before the next request is read.
        """
        balances = self._balances
        if balances is not None:  # None once closed, too
            cached = balances.get(account)
            if cached is not None:
                return cached
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
        # The session passes an EntryKind already; converting one anyway costs 0.49 us
        # per post on the loop (timeit), the type check 0.03.
        entry_kind = kind if type(kind) is EntryKind else EntryKind(kind)
        request = PostRequest(
            account, txn_id, entry_kind, amount_cents, limit_cents, terminal, fence
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
            account, txn_id, to_account, amount_cents, limit_cents, self._destination_policy,
            terminal, fence,
        )
        return cast(Posting, await self._submit(request))

    async def change_pin(
        self, account: str, pin: str, new_pin: str, *, fence: int | None = None
    ) -> PinChangeVerdict:
        request = PinChange(account, pin, new_pin, self._pin_policy, fence)
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
        committer, closes the batch and runs all of it in one transaction
        (``_execute``), while requests arriving meanwhile gather in the next batch. A batch
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
                    batch.outcomes = await self._execute(batch.requests)
                    if self.on_commit is not None:
                        self.on_commit(len(batch.requests), time.perf_counter() - started)
                except Exception as error:  # every member must see it, not only the leader
                    batch.failure = error
                finally:
                    try:
                        if self._balances is not None:
                            self._remember(batch, self._balances)
                    finally:
                        batch.done.set()

    @staticmethod
    def _remember(batch: _Batch, balances: OrderedDict[str, int]) -> None:
        """What a completed batch tells of balances, in request order, so that each fill
        or drop sees the batch as far as its own request (a BALANCE before a transfer
        into the same account is filled, then dropped; one after it is filled with the
        transfer in it). Called before the batch's requests are answered.

        Filled from a BALANCE's value and a BOOKED deposit's or withdrawal's
        ``balance_cents``, the account's balance right after it; a BOOKED transfer
        fills its source the same way and drops its destination, whose new balance the
        outcome does not carry. Never from a REPLAYED posting, whose balance is its
        original entry's, not today's (it moved nothing, so what is cached stays right);
        refusals moved nothing, and PIN checks and changes and history touch no balance.

        A batch that failed (StorageError, a bug) may or may not have committed (a
        COMMIT whose outcome is unknown), so nothing is known of any balance it touched:
        the whole cache is cleared, as cheap as it is safe, since failures are rare.
        """
        if batch.failure is not None or len(batch.outcomes) != len(batch.requests):
            balances.clear()
            return
        try:
            for request, outcome in zip(batch.requests, batch.outcomes, strict=True):
                if type(request) is BalanceQuery:
                    if type(outcome) is int:
                        _fill(balances, request.account, outcome)
                elif type(outcome) is Posting and outcome.result is PostResult.BOOKED:
                    # A deposit's or withdrawal's (PostRequest), or a transfer's source's.
                    _fill(balances, request.account, outcome.balance_cents)
                    if type(request) is TransferRequest:  # never its source (SAME_ACCOUNT)
                        balances.pop(canonical_account(request.to_account), None)
        except BaseException:  # a bug, or no memory: later requests' drops were not done
            balances.clear()
            raise

    async def _execute(self, requests: list[BatchRequest]) -> list[Outcome]:
        """Run one batch and commit it (see the module docstring): its statements on the
        loop and its COMMIT in a thread where the store allows and the write lock is free
        at once, else all of it in a thread (which waits for the lock, up to SQLite's busy
        timeout). Nothing awaits between the BEGIN and the last statement, and the batch
        holds the connection's limiter from before its BEGIN until after its COMMIT, so no
        other use of the connection (an invariants check, the close) comes in between."""
        store, now_ms = self._loop_store, self._clock_ms()
        if store is None:
            return await self._to_thread(self._store.execute_batch, requests, now_ms)
        async with self._limiter:
            try:
                if not store.begin_batch_now():
                    return await trio.to_thread.run_sync(
                        store.execute_batch, requests, now_ms, limiter=self._commit_thread
                    )
                outcomes = store.run_batch(requests, now_ms)
                await trio.to_thread.run_sync(store.commit_batch, limiter=self._commit_thread)
            except self._store.driver_errors as error:
                raise storage_error(error) from error
        return outcomes

    async def check_invariants(self) -> list[str]:
        """The store's money invariants, for tests and health checks."""
        return await self._run(self._store.check_invariants)

    async def aclose(self) -> None:
        """Refuse new work, let queued batches finish (the committer lock is fair), then close."""
        if self._closed:
            return
        self._closed = True
        self._balances = None  # a closed ledger answers nothing, from the cache neither
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
            raise storage_error(error) from error


def storage_error(error: Exception) -> StorageError:
    """A driver's exception as callers see it: its type and message on one line."""
    return StorageError(f"{type(error).__name__}: {one_line(error)}")


def _fill(balances: OrderedDict[str, int], account: str, balance_cents: int) -> None:
    """Remember ``account``'s balance as the newest entry, forgetting the oldest beyond
    BALANCE_CACHE_ACCOUNTS_MAX."""
    key = canonical_account(account)
    balances[key] = balance_cents
    balances.move_to_end(key)
    if len(balances) > BALANCE_CACHE_ACCOUNTS_MAX:
        balances.popitem(last=False)


def one_line(error: Exception) -> str:
    """A driver's message on one line: libpq's come with newlines and hints."""
    return " ".join(str(error).split())


async def open_ledger(
    db: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    pin_tries_max: int = _DEFAULTS.pin_tries_max,
    lockout_s: int = _DEFAULTS.pin_lockout_s,
    destination_tries_max: int = _DEFAULTS.destination_tries_max,
    destination_lockout_s: int = _DEFAULTS.destination_lockout_s,
    clock_ms: Callable[[], int] = wall_clock_ms,
    seed_demo: bool = True,
    sole_writer: bool = False,
) -> BatchLedger:
    """Open (creating on first start) the PIN key file and the database, off the loop:
    an SQLite file, or PostgreSQL for a URL or key=value string (``is_postgresql``).

    ``sole_writer`` says this process is the only one that moves money in the SQLite
    file (its server holds ``bank.db_lock.DatabaseLock``), so balances may be cached
    (``BatchLedger.balance``). Off by default: tests and tools that share a file with a
    server must not cache. PostgreSQL is shared by design, so it is a ValueError there.

    KeyFileError (bank.pins) and SchemaError (bank.store) pass through unchanged: they
    are start-up configuration problems for the operator, not request failures; so is
    a ValueError for PIN or transfer-lock settings the storage cannot hold.
    """
    pin_policy = PinPolicy(tries_max=pin_tries_max, lockout_ms=lockout_s * 1000)
    destination_policy = DestinationPolicy(
        tries_max=destination_tries_max, lockout_ms=destination_lockout_s * 1000
    )
    if sole_writer and is_postgresql(db):
        raise ValueError("no process is PostgreSQL's only writer: its balances are not cached")

    store_class = _store_class(db)

    def open_store() -> tuple[BatchStore, bool]:
        key, key_created = open_key(key_path)
        return store_class(db, key, seed_demo=seed_demo), key_created

    try:
        store, key_created = await trio.to_thread.run_sync(open_store)
    except store_class.driver_errors as error:
        raise StorageError(f"cannot open {redact_db(db)}: {one_line(error)}") from error
    ledger = BatchLedger(
        store, pin_policy=pin_policy, destination_policy=destination_policy,
        clock_ms=clock_ms, sole_writer=sole_writer,
    )
    ledger.opened = Opened(
        db_created=store.created, seeded=store.seeded, key_created=key_created
    )
    return ledger


def _store_class(db: str | os.PathLike[str]) -> type[Store] | type[PgStore]:
    if is_postgresql(db):
        from bank.pg_store import PgStore  # noqa: PLC0415 (psycopg only when asked for)

        return PgStore
    return Store
