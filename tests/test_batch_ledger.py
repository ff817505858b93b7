"""BatchLedger: the Ledger protocol over the Store, off the event loop.

Covers first start (key and database created), the protocol's methods, lock expiry
through an injected clock, storage failures surfacing as StorageError, and many trio
tasks posting at once without breaking the money invariants.
"""

import inspect
import random
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
import trio

from bank.batch_ledger import BatchLedger, open_ledger
from bank.config import ServerConfig
from bank.ledger import Ledger, PinResult, Posting, PostResult, StorageError
from bank.pins import KEY_BYTES
from bank.store import PinPolicy, Store
from wire import EntryKind
from wire._kinds import KIND_OF_ENTRY
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
async def ledger(tmp_path: Path, clock: FakeClock) -> AsyncIterator[BatchLedger]:
    opened = await open_ledger(tmp_path / "bank.db", tmp_path / "pin.key", clock_ms=clock)
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


async def test_first_start_creates_key_and_database(tmp_path: Path):
    ledger = await open_ledger(tmp_path / "bank.db", tmp_path / "pin.key")
    await ledger.aclose()
    key_path = tmp_path / "pin.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.stat().st_size == KEY_BYTES
    key = key_path.read_bytes()
    ledger = await open_ledger(tmp_path / "bank.db", key_path)
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


async def test_open_ledger_passes_lockout_settings(tmp_path: Path, clock: FakeClock):
    ledger = await open_ledger(
        tmp_path / "bank.db", tmp_path / "pin.key", pin_tries_max=1, lockout_s=2, clock_ms=clock
    )
    try:
        assert (await ledger.verify_pin("QQ-00000", "0000")).result is PinResult.LOCKED
        clock.now_ms += 2_000
        assert (await ledger.verify_pin("QQ-00000", "0000")).result is PinResult.LOCKED
        assert (await ledger.verify_pin("AC-12345", "1324")).result is PinResult.MATCHED
    finally:
        await ledger.aclose()


async def test_store_runs_in_a_worker_thread(tmp_path: Path):
    threads: list[int] = []

    class RecordingStore(Store):
        def balance(self, account: str) -> int:
            threads.append(threading.get_ident())
            return super().balance(account)

    ledger = BatchLedger(
        RecordingStore(tmp_path / "bank.db", bytes(KEY_BYTES)),
        pin_policy=PinPolicy(tries_max=3, lockout_ms=0),
    )
    try:
        assert await ledger.balance("AC-12345") == 102_432
    finally:
        await ledger.aclose()
    assert threads and threading.get_ident() not in threads


async def test_sqlite_error_becomes_storage_error(ledger: BatchLedger, tmp_path: Path):
    with closing(sqlite3.connect(tmp_path / "bank.db", isolation_level=None)) as conn:
        conn.execute("DROP TABLE pin_failures")
    with pytest.raises(StorageError) as caught:
        await ledger.verify_pin("AC-12345", "1324")
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    assert await ledger.balance("AC-12345") == 102_432  # the ledger still serves the rest


async def test_closed_ledger_raises_storage_error(tmp_path: Path):
    ledger = await open_ledger(tmp_path / "bank.db", tmp_path / "pin.key")
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
        (rng.choice(list(accounts)), rng.choice(list(EntryKind)), rng.randint(1, 50_000))
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
