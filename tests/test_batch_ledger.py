"""BatchLedger: the Ledger protocol over a store, off the event loop.

Covers first start (key and database created), the protocol's methods, lock expiry
through an injected clock, storage failures surfacing as StorageError, and many trio
tasks posting at once without breaking the money invariants: each on SQLite and on
PostgreSQL (``any_db``), since the ledger serves both.
"""

import inspect
import random
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from bank.batch_ledger import BatchLedger, open_ledger
from bank.config import ServerConfig, is_postgresql
from bank.ledger import (
    Ledger,
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    Posting,
    PostResult,
    StorageError,
)
from bank.pins import KEY_BYTES
from bank.store import PinPolicy
from tests.helpers import DESTINATIONS
from tests.pg import open_store, raw
from wire import EntryKind
from wire._kinds import KIND_OF_ENTRY, MONEY_KINDS
from wire._limits import AMOUNT_CENTS_MAX

T0 = 1_700_000_000_000


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_ms = T0

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ledger(any_db: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[BatchLedger]:
    opened = await open_ledger(any_db, tmp_path / "pin.key", clock_ms=clock)
    try:
        yield opened
    finally:
        await opened.aclose()


def txn(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_sqlite_ledger_has_the_ledger_protocol_signatures():
    for name, member in inspect.getmembers(Ledger, inspect.isfunction):
        if not name.startswith("_"):
            ours = getattr(BatchLedger, name)
            assert inspect.iscoroutinefunction(ours), name
            assert inspect.signature(ours) == inspect.signature(member), name


async def test_first_start_creates_key_and_database(any_db: str, tmp_path: Path):
    ledger = await open_ledger(any_db, tmp_path / "pin.key")
    assert ledger.opened.db_created and ledger.opened.key_created
    await ledger.aclose()
    key_path = tmp_path / "pin.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.stat().st_size == KEY_BYTES
    key = key_path.read_bytes()
    ledger = await open_ledger(any_db, key_path)
    assert not ledger.opened.db_created and not ledger.opened.key_created
    try:
        assert (await ledger.verify_pin("ac-12345", "1324")).result is PinResult.MATCHED
    finally:
        await ledger.aclose()
    assert key_path.read_bytes() == key


async def test_protocol_methods(ledger: BatchLedger, clock: FakeClock):
    assert (await ledger.verify_pin("AC-12345", "1324")).result is PinResult.MATCHED
    assert await ledger.balance("ac-12345") == 102_432
    deposit = await ledger.post(
        account="AC-12345", txn_id=txn(1), kind=EntryKind.DEPOSIT, amount_cents=568,
        limit_cents=AMOUNT_CENTS_MAX,
    )
    assert deposit == Posting(PostResult.BOOKED, 103_000, deposit.entry_id, T0)
    clock.now_ms += 1_000
    overdraft = await ledger.post(
        account="BC-01373", txn_id=txn(2), kind=EntryKind.WITHDRAWAL, amount_cents=4_573,
        limit_cents=AMOUNT_CENTS_MAX,
    )
    assert overdraft == Posting(PostResult.INSUFFICIENT_FUNDS)
    replay = await ledger.post(
        account="AC-12345", txn_id=txn(1), kind=EntryKind.DEPOSIT, amount_cents=568,
        limit_cents=AMOUNT_CENTS_MAX,
    )
    assert replay == Posting(PostResult.REPLAYED, 103_000, deposit.entry_id, T0)
    history = await ledger.history("AC-12345", 5)
    assert [(e.entry_id, e.time_ms, e.amount_cents) for e in history] == [
        (deposit.entry_id, T0, 568)
    ]


async def test_lock_expiry_follows_the_injected_clock(ledger: BatchLedger, clock: FakeClock):
    for expected in (PinResult.WRONG, PinResult.WRONG, PinResult.LOCKED):
        assert (await ledger.verify_pin("AC-12345", "0000")).result is expected
    clock.now_ms += ServerConfig().pin_lockout_s * 1000 - 1  # opened with the defaults
    assert (await ledger.verify_pin("AC-12345", "1324")).result is PinResult.LOCKED
    clock.now_ms += 1
    assert (await ledger.verify_pin("AC-12345", "1324")).result is PinResult.MATCHED


async def miss(ledger: BatchLedger, n: int, destination: str = "QQ-00000") -> Posting:
    return await ledger.transfer(account="AC-12345", txn_id=txn(n), to_account=destination,
                                 amount_cents=1, limit_cents=AMOUNT_CENTS_MAX)


async def test_a_transfer_lock_follows_the_injected_clock(
    ledger: BatchLedger, clock: FakeClock
):
    defaults = ServerConfig()  # the ledger fixture opens with them
    tries, lockout_ms = defaults.destination_tries_max, defaults.destination_lockout_s * 1000
    for n in range(1, tries):  # each within the period of the one before: they add up
        assert (await miss(ledger, n)).result is PostResult.UNKNOWN_DESTINATION
        clock.now_ms += lockout_ms - 1
    locking = await miss(ledger, tries)
    until = clock.now_ms + lockout_ms
    assert locking == Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=until)
    clock.now_ms += lockout_ms - 1
    assert (await miss(ledger, 100, "WF-14351")).result is PostResult.TRANSFERS_LOCKED
    clock.now_ms += 1
    assert (await miss(ledger, 101, "WF-14351")).result is PostResult.BOOKED
    clock.now_ms += lockout_ms  # the last miss long forgotten: a fresh count
    assert (await miss(ledger, 102)).result is PostResult.UNKNOWN_DESTINATION


async def test_a_transfer_lock_survives_a_restart_of_the_ledger(
    any_db: str, tmp_path: Path, clock: FakeClock
):
    first = await open_ledger(any_db, tmp_path / "pin.key", clock_ms=clock,
                              destination_tries_max=2, destination_lockout_s=60)
    try:
        assert (await miss(first, 1)).result is PostResult.UNKNOWN_DESTINATION
        assert (await miss(first, 2)).result is PostResult.TRANSFERS_LOCKED
    finally:
        await first.aclose()
    clock.now_ms += 59_999
    restarted = await open_ledger(any_db, tmp_path / "pin.key", clock_ms=clock,
                                  destination_tries_max=2, destination_lockout_s=60)
    try:
        assert (await miss(restarted, 3, "WF-14351")).result is PostResult.TRANSFERS_LOCKED
        clock.now_ms += 1
        assert (await miss(restarted, 4, "WF-14351")).result is PostResult.BOOKED
    finally:
        await restarted.aclose()


async def test_open_ledger_passes_lockout_settings(
    any_db: str, tmp_path: Path, clock: FakeClock
):
    ledger = await open_ledger(
        any_db, tmp_path / "pin.key", pin_tries_max=1, lockout_s=2, clock_ms=clock
    )
    try:
        assert (await ledger.verify_pin("QQ-00000", "0000")).result is PinResult.LOCKED
        clock.now_ms += 2_000
        assert (await ledger.verify_pin("QQ-00000", "0000")).result is PinResult.LOCKED
        assert (await ledger.verify_pin("AC-12345", "1324")).result is PinResult.MATCHED
    finally:
        await ledger.aclose()


async def test_only_what_blocks_runs_in_a_worker_thread(any_db: str):
    """SQLite: a batch's statements on the event loop's thread, its COMMIT in a worker;
    PostgreSQL (every statement a round trip): the whole batch in a worker."""
    threads: dict[str, list[int]] = {}
    store = open_store(any_db, bytes(KEY_BYTES))

    def recording(name: str) -> None:
        method = getattr(store, name)

        def record(*args: Any) -> Any:
            threads.setdefault(name, []).append(threading.get_ident())
            return method(*args)

        setattr(store, name, record)

    for name in ("execute_batch", "begin_batch_now", "run_batch", "commit_batch"):
        if hasattr(store, name):
            recording(name)
    ledger = BatchLedger(
        store, pin_policy=PinPolicy(tries_max=3, lockout_ms=0), destination_policy=DESTINATIONS
    )
    try:
        assert await ledger.balance("AC-12345") == 102_432
    finally:
        await ledger.aclose()
    loop = threading.get_ident()
    if store.statements_on_loop:
        assert threads.keys() == {"begin_batch_now", "run_batch", "commit_batch"}
        assert threads["begin_batch_now"] == threads["run_batch"] == [loop]
        assert loop not in threads["commit_batch"]
    else:
        assert threads.keys() == {"execute_batch"} and loop not in threads["execute_batch"]


async def test_a_database_error_becomes_storage_error(ledger: BatchLedger, any_db: str):
    with raw(any_db) as conn:
        conn.execute("DROP TABLE pin_failures")
    with pytest.raises(StorageError) as caught:
        await ledger.verify_pin("AC-12345", "1324")
    assert isinstance(caught.value.__cause__, sqlite3.Error | psycopg.Error)
    assert await ledger.balance("AC-12345") == 102_432  # the ledger still serves the rest


async def test_closed_ledger_raises_storage_error(any_db: str, tmp_path: Path):
    ledger = await open_ledger(any_db, tmp_path / "pin.key")
    await ledger.aclose()
    await ledger.aclose()
    with pytest.raises(StorageError):
        await ledger.balance("AC-12345")


async def test_unopenable_database_is_a_storage_error(tmp_path: Path):
    (tmp_path / "bank.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError):
        await open_ledger(tmp_path / "bank.db", tmp_path / "pin.key")


async def test_concurrent_posts_keep_the_invariants(ledger: BatchLedger):
    accounts = {"AC-12345": 102_432, "BC-01373": 4_572}
    rng = random.Random(1)
    requests = [
        (
            rng.choice(list(accounts)),
            rng.choice([kind.entry_kind for kind in MONEY_KINDS]),
            rng.randint(1, 50_000),
        )
        for _ in range(300)
    ]
    # Tasks draw from one pool of (id -> request), so the same id often arrives several
    # times at once: each must apply once. Every fifth send alters the amount: a 94.
    plans = [[rng.randrange(len(requests)) for _ in range(25)] for _ in range(40)]
    entries_seen: dict[int, set[tuple[str, EntryKind, int, int, int]]] = {}
    results: list[PostResult] = []

    async def worker(task: int, plan: list[int]) -> None:
        for step, n in enumerate(plan):
            account, kind, amount_cents = requests[n]
            if (task + step) % 5 == 0:
                amount_cents += 1
            posting = await ledger.post(
                account=account, txn_id=txn(n), kind=kind, amount_cents=amount_cents,
                limit_cents=AMOUNT_CENTS_MAX,
            )
            results.append(posting.result)
            if posting.result in {PostResult.BOOKED, PostResult.REPLAYED}:
                entries_seen.setdefault(posting.entry_id, set()).add(
                    (account, kind, amount_cents, posting.balance_cents, posting.time_ms)
                )

    async with trio.open_nursery() as nursery:
        for task, plan in enumerate(plans):
            nursery.start_soon(worker, task, plan)

    assert await ledger.check_invariants() == []
    assert all(len(seen) == 1 for seen in entries_seen.values())  # replays agree
    entries = [next(iter(seen)) for seen in entries_seen.values()]
    for account, opening_cents in accounts.items():
        moved = sum(
            KIND_OF_ENTRY[k].balance_change_cents(c) for a, k, c, _, _ in entries if a == account
        )
        assert await ledger.balance(account) == opening_cents + moved
    assert results.count(PostResult.BOOKED) == len(entries)  # each entry booked once
    assert PostResult.REPLAYED in results
    assert PostResult.TXN_ID_REUSED in results
    assert PostResult.INSUFFICIENT_FUNDS in results


async def test_transfer_and_change_pin_through_the_ledger(ledger: BatchLedger, any_db: str):
    if is_postgresql(any_db):  # the source's lease, as the cluster's code writes it
        with raw(any_db) as conn:
            conn.execute("INSERT INTO leases (account, fence, holder, expires_at)"
                         " VALUES ('AC-12345', 7, 'boot-1', now() + interval '1 minute')")
    moved = await ledger.transfer(
        account="AC-12345", txn_id=txn(1), to_account="BC-01373", amount_cents=2_432,
        limit_cents=AMOUNT_CENTS_MAX, fence=7,  # SQLite ignores the fence
    )
    assert moved.result is PostResult.BOOKED
    assert await ledger.balance("AC-12345") == 100_000
    assert await ledger.balance("BC-01373") == 4_572 + 2_432
    assert (await ledger.history("BC-01373", 1))[0].kind is EntryKind.TRANSFER_IN
    changed = await ledger.change_pin("AC-12345", "1324", "2580")
    assert changed == PinChangeVerdict(PinChangeResult.CHANGED)
    assert (await ledger.verify_pin("AC-12345", "2580")).result is PinResult.MATCHED
    assert await ledger.check_invariants() == []


async def test_concurrent_opposite_transfers_conserve_money(ledger: BatchLedger):
    accounts = ["AC-12345", "BC-01373", "WF-14351"]
    total = sum([await ledger.balance(account) for account in accounts])
    rng = random.Random(2)

    async def worker(task: int) -> None:
        for step in range(20):
            source, destination = rng.sample(accounts, 2)
            await ledger.transfer(
                account=source, txn_id=txn(task * 100 + step % 15), to_account=destination,
                amount_cents=rng.randint(1, 5_000), limit_cents=AMOUNT_CENTS_MAX,
            )

    async with trio.open_nursery() as nursery:
        for task in range(10):
            nursery.start_soon(worker, task)
    assert sum([await ledger.balance(account) for account in accounts]) == total
    assert await ledger.check_invariants() == []
