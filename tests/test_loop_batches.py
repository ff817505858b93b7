"""An SQLite batch in two steps: its statements on the event loop, its COMMIT in a thread
(``bank.batch_ledger``). The loop never waits for the write lock: while another
connection holds it (an operator command's write), the batch goes to a thread, which
waits; a COMMIT that fails rolls back, and the next batch starts clean."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path

import pytest
import trio
import trio.testing

from bank.batch_ledger import BatchLedger, open_ledger
from bank.ledger import Posting, PostResult
from bank.pins import KEY_BYTES
from bank.store import BUSY_TIMEOUT_MS, BalanceQuery, PostRequest, Store
from tests.helpers import DEMO_ACCOUNT, DEMO_BALANCE_CENTS
from wire import AMOUNT_CENTS_MAX, EntryKind

T0 = 1_800_000_000_000
WAIT_S = 10
"""Bound on every wait here, so that a broken test fails instead of hanging."""


def deposit_request(cents: int) -> PostRequest:
    return PostRequest(DEMO_ACCOUNT, uuid.uuid4().bytes, EntryKind.DEPOSIT, cents,
                       AMOUNT_CENTS_MAX)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "bank.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store(db, bytes(KEY_BYTES)) as opened:
        yield opened


@pytest.fixture
async def ledger(db: Path, tmp_path: Path) -> AsyncIterator[BatchLedger]:
    opened = await open_ledger(db, tmp_path / "bank.key")
    try:
        yield opened
    finally:
        await opened.aclose()


def busy_timeout_ms(store: Store) -> int:
    return int(store._conn.execute("PRAGMA busy_timeout").fetchone()[0])


def test_a_batch_begins_at_once_only_while_no_one_else_writes(store: Store, db: Path):
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # an operator command's write, in progress
        assert store.begin_batch_now() is False  # at once, not after the busy timeout
        assert not store._conn.in_transaction
        other.execute("COMMIT")
    assert busy_timeout_ms(store) == BUSY_TIMEOUT_MS  # a batch in a thread still waits
    assert store.begin_batch_now() is True
    outcomes = store.run_batch([deposit_request(1_00), BalanceQuery(DEMO_ACCOUNT)], T0)
    store.commit_batch()
    booked, balance = outcomes
    assert isinstance(booked, Posting) and booked.result is PostResult.BOOKED
    assert balance == booked.balance_cents == DEMO_BALANCE_CENTS + 1_00
    assert store.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00


def test_a_failed_commit_rolls_back_and_the_next_batch_starts_clean(store: Store):
    """A deferred foreign key fails only at COMMIT, and SQLite then keeps the transaction
    open: ``commit_batch`` must end it, or every later BEGIN would fail."""
    assert store.begin_batch_now()
    store.run_batch([deposit_request(1_00)], T0)
    store._conn.execute("PRAGMA defer_foreign_keys = ON")
    store._conn.execute(  # an entry of no account: refused at COMMIT, not now
        "INSERT INTO entries (account, txn_no, kind, amount_cents, balance_cents, time_ms)"
        " SELECT 'QQ-00000', max(txn_no), 1, 1, 1, 1 FROM transactions",
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_batch()
    assert not store._conn.in_transaction
    assert store.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS  # the deposit went with it
    assert store.begin_batch_now()
    store.run_batch([deposit_request(2_00)], T0)
    store.commit_batch()
    assert store.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 2_00


async def test_a_batch_that_meets_another_writer_waits_in_a_thread_not_on_the_loop(
    ledger: BatchLedger, db: Path
):
    """While another connection holds the write lock, a post waits for it (up to the busy
    timeout) without stopping the loop: other tasks run meanwhile, and the post books
    once the lock is let go."""
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    posted = trio.Event()
    outcome: list[object] = []

    async def post() -> None:
        outcome.append(await ledger.post(
            account=DEMO_ACCOUNT, txn_id=uuid.uuid4().bytes, kind=EntryKind.DEPOSIT,
            amount_cents=5_00, limit_cents=AMOUNT_CENTS_MAX,
        ))
        posted.set()

    try:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                # The loop is free while the post waits for the lock: this task runs.
                await trio.testing.wait_all_tasks_blocked()
                assert not posted.is_set()
                other.execute("COMMIT")
                await posted.wait()
    finally:
        other.close()
    [booked] = outcome
    assert isinstance(booked, Posting) and booked.result is PostResult.BOOKED
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 5_00
    assert await ledger.check_invariants() == []
