"""The balance cache of a ledger that is its SQLite file's only writer (``sole_writer``).

Each test runs a real ``Store`` in a temporary directory, with every batch the ledger
sends it recorded (``tests.helpers.StoreBatches``), and where it matters held in its
thread until the test lets it go, so that the interleavings are made on purpose, not
hoped for: a hit needs no batch; what
fills the cache (a BALANCE, a BOOKED deposit, withdrawal or transfer's source) and what
must not (a replay, a refusal); a transfer into a cached account in flight while that
account reads, and a BALANCE and such a transfer in one batch in either order; a batch
that fails, also one whose COMMIT went through unseen; the bound; canonical account
numbers; a closed ledger; and that it is off by default and refused on PostgreSQL.
Every value read is checked against the file itself, read apart from the ledger. Last,
the stateful model of several ATMs (``tests.test_stateful``) runs with the cache on.
"""

from __future__ import annotations

import functools
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis.stateful import run_state_machine_as_test

from bank import batch_ledger
from bank.batch_ledger import BatchLedger, open_ledger
from bank.ledger import PinResult, Posting, PostResult, StorageError
from bank.store import read_accounts_summary
from tests import test_stateful
from tests.helpers import DEMO_ACCOUNT, DEMO_BALANCE_CENTS, OTHER_ACCOUNT, StoreBatches
from wire import AMOUNT_CENTS_MAX, EntryKind

OTHER_BALANCE_CENTS = 45_72
THIRD_ACCOUNT = "ZZ-99999"
RELEASE_TIMEOUT_S = 10
"""Bound on a held batch's wait, so that a broken test fails instead of hanging."""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "bank.db"


@pytest.fixture
async def ledger(db: Path, tmp_path: Path) -> AsyncIterator[BatchLedger]:
    opened = await open_ledger(db, tmp_path / "bank.key", sole_writer=True)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def batches(ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch) -> StoreBatches:
    return StoreBatches(ledger, monkeypatch)


def in_file(db: Path, account: str) -> int:
    """The balance as the file holds it, read apart from the ledger."""
    [balance] = [s.balance_cents for s in read_accounts_summary(db) if s.account == account]
    return balance


async def post(
    ledger: BatchLedger, kind: EntryKind, cents: int, *, account: str = DEMO_ACCOUNT,
    txn_id: bytes | None = None,
) -> Posting:
    return await ledger.post(
        account=account, txn_id=txn_id or uuid.uuid4().bytes, kind=kind,
        amount_cents=cents, limit_cents=AMOUNT_CENTS_MAX,
    )


async def transfer(
    ledger: BatchLedger, cents: int, *, source: str = DEMO_ACCOUNT, to: str = OTHER_ACCOUNT
) -> Posting:
    return await ledger.transfer(
        account=source, txn_id=uuid.uuid4().bytes, to_account=to, amount_cents=cents,
        limit_cents=AMOUNT_CENTS_MAX,
    )


async def hit(ledger: BatchLedger, batches: StoreBatches, account: str) -> int:
    """The balance, which must come from the cache: no batch."""
    before = batches.count
    balance = await ledger.balance(account)
    assert batches.count == before, f"{account}'s balance was not cached"
    return balance


async def miss(ledger: BatchLedger, batches: StoreBatches, account: str) -> int:
    """The balance, which must be read from the store: one batch."""
    before = batches.count
    balance = await ledger.balance(account)
    assert batches.count == before + 1, f"{account}'s balance was cached"
    return balance


async def test_a_read_balance_is_served_again_without_a_batch(
    ledger: BatchLedger, batches: StoreBatches
):
    assert await miss(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    assert await hit(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS


async def test_a_booked_deposit_or_withdrawal_fills_the_cache_with_its_balance(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    deposited = await post(ledger, EntryKind.DEPOSIT, 10_00)
    assert deposited.result is PostResult.BOOKED
    assert await hit(ledger, batches, DEMO_ACCOUNT) == deposited.balance_cents
    withdrawn = await post(ledger, EntryKind.WITHDRAWAL, 3_00)
    assert await hit(ledger, batches, DEMO_ACCOUNT) == withdrawn.balance_cents
    assert withdrawn.balance_cents == DEMO_BALANCE_CENTS + 7_00 == in_file(db, DEMO_ACCOUNT)


async def test_refusals_move_nothing_and_leave_the_cached_balance_right(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    await miss(ledger, batches, OTHER_ACCOUNT)
    overdraft = await post(ledger, EntryKind.WITHDRAWAL, 1_000_00, account=OTHER_ACCOUNT)
    assert overdraft.result is PostResult.INSUFFICIENT_FUNDS
    refused = await transfer(ledger, 1_000_00, source=OTHER_ACCOUNT, to=DEMO_ACCOUNT)
    assert refused.result is PostResult.INSUFFICIENT_FUNDS
    unknown = await transfer(ledger, 1_00, source=OTHER_ACCOUNT, to="QQ-00000")
    assert unknown.result is PostResult.UNKNOWN_DESTINATION
    assert (await ledger.verify_pin(OTHER_ACCOUNT, "0000")).result is PinResult.WRONG
    assert await hit(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS
    assert in_file(db, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS


async def test_a_replay_never_fills_the_cache_with_its_original_balance(
    ledger: BatchLedger, batches: StoreBatches, db: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    first = uuid.uuid4().bytes
    booked = await post(ledger, EntryKind.DEPOSIT, 1_00, txn_id=first)
    later = await post(ledger, EntryKind.DEPOSIT, 2_00)
    replayed = await post(ledger, EntryKind.DEPOSIT, 1_00, txn_id=first)
    assert replayed.result is PostResult.REPLAYED
    assert replayed.balance_cents == booked.balance_cents != later.balance_cents
    assert await hit(ledger, batches, DEMO_ACCOUNT) == later.balance_cents
    await ledger.aclose()
    # A fresh ledger (a restarted server) whose first word of the account is a replay.
    again = await open_ledger(db, tmp_path / "bank.key", sole_writer=True)
    try:
        restarted = StoreBatches(again, monkeypatch)
        assert (await post(again, EntryKind.DEPOSIT, 1_00, txn_id=first)).result is (
            PostResult.REPLAYED
        )
        assert await miss(again, restarted, DEMO_ACCOUNT) == later.balance_cents
    finally:
        await again.aclose()


async def test_a_transfer_fills_its_source_and_drops_its_destination(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    await miss(ledger, batches, OTHER_ACCOUNT)
    sent = await transfer(ledger, 5_00)
    assert sent.result is PostResult.BOOKED
    assert await hit(ledger, batches, DEMO_ACCOUNT) == sent.balance_cents
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00
    assert in_file(db, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00


async def test_a_transfer_to_an_account_spelled_in_lower_case_drops_its_cached_balance(
    ledger: BatchLedger, batches: StoreBatches
):
    await miss(ledger, batches, OTHER_ACCOUNT)
    assert (await transfer(ledger, 5_00, to=OTHER_ACCOUNT.lower())).result is PostResult.BOOKED
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00
    # A reader's own spelling is only looked up as it is: a miss, filled canonically.
    assert await miss(ledger, batches, DEMO_ACCOUNT.lower()) == DEMO_BALANCE_CENTS - 5_00
    assert await hit(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS - 5_00


async def test_a_transfer_in_flight_into_a_cached_account_is_not_seen_until_answered(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    """The destination's session reads while the transfer into it is in its thread: the
    old balance, at once (the transfer has not been answered); once it is, the new."""
    await miss(ledger, batches, OTHER_ACCOUNT)
    answered: list[Posting] = []

    async def send() -> None:
        answered.append(await transfer(ledger, 5_00))

    with trio.fail_after(RELEASE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            batches.hold()
            nursery.start_soon(send)
            await batches.held()
            try:
                assert batches.seen[-1][0].to_account == OTHER_ACCOUNT
                assert await hit(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS
                assert not answered
            finally:
                batches.release()
    assert answered[0].result is PostResult.BOOKED
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00
    assert in_file(db, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00


async def one_batch(
    ledger: BatchLedger, batches: StoreBatches, *calls: Callable[[], Awaitable[object]]
) -> list[object]:
    """Run ``calls`` in one batch, in this order (behind a held batch that gathers
    them), and return what each got."""
    results: list[object] = [None] * len(calls)

    async def call(index: int) -> None:
        results[index] = await calls[index]()

    with trio.fail_after(RELEASE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            batches.hold()
            nursery.start_soon(ledger.history, THIRD_ACCOUNT, 1)  # the held batch
            await batches.held()
            try:
                for index in range(len(calls)):
                    nursery.start_soon(call, index)
                    await trio.testing.wait_all_tasks_blocked()  # so their order is known
            finally:
                batches.release()
    assert [len(batch) for batch in batches.seen[-2:]] == [1, len(calls)]
    return results


async def test_a_balance_then_a_transfer_into_it_in_one_batch_leaves_no_stale_value(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    read, sent = await one_batch(
        ledger, batches, lambda: ledger.balance(OTHER_ACCOUNT), lambda: transfer(ledger, 5_00)
    )
    assert read == OTHER_BALANCE_CENTS  # read before the transfer, as it came first
    assert isinstance(sent, Posting) and sent.result is PostResult.BOOKED
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00
    assert in_file(db, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00


async def test_a_transfer_then_a_balance_of_its_destination_in_one_batch_fills_the_new(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    sent, read = await one_batch(
        ledger, batches, lambda: transfer(ledger, 5_00), lambda: ledger.balance(OTHER_ACCOUNT)
    )
    assert isinstance(sent, Posting) and sent.result is PostResult.BOOKED
    assert read == OTHER_BALANCE_CENTS + 5_00
    assert await hit(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00
    assert await hit(ledger, batches, DEMO_ACCOUNT) == sent.balance_cents
    assert in_file(db, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 5_00


async def test_a_deposit_and_balances_in_one_batch_fill_in_request_order(
    ledger: BatchLedger, batches: StoreBatches
):
    before, deposited, after = await one_batch(
        ledger, batches, lambda: ledger.balance(DEMO_ACCOUNT),
        lambda: post(ledger, EntryKind.DEPOSIT, 1_00), lambda: ledger.balance(DEMO_ACCOUNT),
    )
    assert before == DEMO_BALANCE_CENTS
    assert isinstance(deposited, Posting)
    assert after == deposited.balance_cents == DEMO_BALANCE_CENTS + 1_00
    assert await hit(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00


async def test_a_failed_batch_clears_the_whole_cache(ledger: BatchLedger, batches: StoreBatches):
    await miss(ledger, batches, DEMO_ACCOUNT)
    await miss(ledger, batches, OTHER_ACCOUNT)
    batches.fail(sqlite3.OperationalError("disk I/O error"), after_commit=False)
    with pytest.raises(StorageError):
        await post(ledger, EntryKind.DEPOSIT, 1_00, account=THIRD_ACCOUNT)
    assert await miss(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS


async def test_a_commit_that_went_through_unseen_leaves_no_stale_balance(
    ledger: BatchLedger, batches: StoreBatches, db: Path
):
    """The deposit committed, but the caller was told StorageError (a COMMIT whose
    outcome is unknown): the cached balance from before it must not be served."""
    await miss(ledger, batches, DEMO_ACCOUNT)
    batches.fail(sqlite3.OperationalError("disk I/O error"), after_commit=True)
    with pytest.raises(StorageError):
        await post(ledger, EntryKind.DEPOSIT, 1_00)
    assert in_file(db, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00  # it did commit
    assert await miss(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00


async def test_the_cache_is_bounded_and_forgets_the_oldest_filled_first(
    ledger: BatchLedger, batches: StoreBatches, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(batch_ledger, "BALANCE_CACHE_ACCOUNTS_MAX", 2)
    await miss(ledger, batches, DEMO_ACCOUNT)
    await miss(ledger, batches, OTHER_ACCOUNT)
    await post(ledger, EntryKind.DEPOSIT, 1_00)  # refilled: now the newest
    await miss(ledger, batches, THIRD_ACCOUNT)  # the oldest, OTHER_ACCOUNT, goes
    assert len(ledger._balances or ()) == 2
    assert await hit(ledger, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00
    assert await hit(ledger, batches, THIRD_ACCOUNT) == 655_35
    assert await miss(ledger, batches, OTHER_ACCOUNT) == OTHER_BALANCE_CENTS


async def test_an_unknown_account_is_not_cached(ledger: BatchLedger, batches: StoreBatches):
    for _ in range(2):
        before = batches.count
        with pytest.raises(LookupError):
            await ledger.balance("QQ-00000")
        assert batches.count == before + 1


async def test_a_closed_ledger_serves_no_cached_balance(ledger: BatchLedger, batches: StoreBatches):
    await miss(ledger, batches, DEMO_ACCOUNT)
    await ledger.aclose()
    with pytest.raises(StorageError, match="closed"):
        await ledger.balance(DEMO_ACCOUNT)


async def test_a_ledger_not_told_it_is_the_only_writer_caches_nothing(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shared = await open_ledger(db, tmp_path / "bank.key")
    try:
        batches = StoreBatches(shared, monkeypatch)
        await miss(shared, batches, DEMO_ACCOUNT)
        await post(shared, EntryKind.DEPOSIT, 1_00)
        assert await miss(shared, batches, DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 1_00
    finally:
        await shared.aclose()


async def test_postgresql_never_caches(pg_db: str, tmp_path: Path):
    with pytest.raises(ValueError, match="PostgreSQL"):
        await open_ledger(pg_db, tmp_path / "bank.key", sole_writer=True)
    shared = await open_ledger(pg_db, tmp_path / "bank.key")
    try:
        assert shared._balances is None
    finally:
        await shared.aclose()


def test_the_bank_against_its_model_with_the_cache_on(monkeypatch: pytest.MonkeyPatch):
    """``tests.test_stateful``'s model of several ATMs (deposits, withdrawals, transfers
    between sessions' accounts, retries, disconnects with requests in flight), against a
    server whose ledger caches, as the serving bank's does; its invariant reads every
    balance through the ledger after each step, from the cache where it can."""
    monkeypatch.setattr(
        test_stateful, "open_ledger", functools.partial(open_ledger, sole_writer=True)
    )
    run_state_machine_as_test(
        test_stateful.BankMachine, settings=test_stateful.BankMachine.TestCase.settings
    )
