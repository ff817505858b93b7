"""Batching in BatchLedger: requests that arrive together (posts, PIN checks, balances,
history) share one transaction and one thread hop, yet each gets exactly its own
outcome, durably, and no caller can be stranded: on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from bank.batch_ledger import BatchLedger, open_ledger
from bank.ledger import PinResult, PostResult, StorageError
from bank.pg_store import PgStore, _Statement
from bank.store import UnknownAccount
from tests.helpers import StoreBatches
from wire import EntryKind
from wire._limits import AMOUNT_CENTS_MAX

ACCOUNT, OPENING_CENTS = "AC-12345", 1_024_32
RELEASE_TIMEOUT_S = 10
"""Bound on the gated commit's wait, so a broken test fails instead of hanging."""


@pytest.fixture
async def ledger(any_db: str, tmp_path: Path) -> AsyncIterator[BatchLedger]:
    """A ledger on each backend in turn (this module's own: the server tests' fixture
    is SQLite's alone)."""
    opened = await open_ledger(any_db, tmp_path / "bank.key")
    try:
        yield opened
    finally:
        await opened.aclose()


async def deposit(ledger: BatchLedger, cents: int, results: list, account: str = ACCOUNT):
    try:
        results.append(await ledger.post(
            account=account, txn_id=uuid.uuid4().bytes, kind=EntryKind.DEPOSIT,
            amount_cents=cents, limit_cents=AMOUNT_CENTS_MAX,
        ))
    except Exception as error:  # the test inspects what each caller got
        results.append(error)


async def test_concurrent_posts_share_commits_and_each_gets_its_outcome(
    ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    batches = StoreBatches(ledger, monkeypatch)
    results: list = []
    async with trio.open_nursery() as nursery:
        for cents in range(1, 51):
            nursery.start_soon(deposit, ledger, cents, results)
    sizes = batches.sizes
    assert sum(sizes) == 50 and len(sizes) < 50  # fewer commits than posts
    assert all(r.result is PostResult.BOOKED for r in results)
    assert len({r.entry_id for r in results}) == 50
    assert await ledger.balance(ACCOUNT) == OPENING_CENTS + sum(range(1, 51))
    assert await ledger.check_invariants() == []


async def test_one_bad_request_does_not_spoil_its_batch(ledger: BatchLedger):
    results: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deposit, ledger, 1_00, results)
        nursery.start_soon(deposit, ledger, 2_00, results, "QQ-00000")
        nursery.start_soon(deposit, ledger, 3_00, results)
    assert sum(isinstance(r, UnknownAccount) for r in results) == 1
    assert await ledger.balance(ACCOUNT) == OPENING_CENTS + 4_00


async def test_a_storage_failure_fails_the_whole_batch_and_moves_nothing(
    ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    """The second post of the batch fails in the database, after the first wrote."""
    calls = 0
    if isinstance(ledger._store, PgStore):
        real_plan = ledger._store._plan_post

        def plan_then_fail(request, now_ms):
            nonlocal calls
            calls += 1
            plan = real_plan(request, now_ms)
            if calls == 2:  # a statement the server refuses, mid-pipeline
                return _Statement("SELECT 1 / 0", plan.params, plan.decode)
            return plan

        monkeypatch.setattr(ledger._store, "_plan_post", plan_then_fail)
    else:
        real_insert = ledger._store._insert_entry

        def insert_then_fail(**fields):
            nonlocal calls
            calls += 1
            if calls == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return real_insert(**fields)

        monkeypatch.setattr(ledger._store, "_insert_entry", insert_then_fail)
    results: list = []
    async with trio.open_nursery() as nursery:
        for cents in (1_00, 2_00, 3_00):
            nursery.start_soon(deposit, ledger, cents, results)
    monkeypatch.undo()
    assert results and all(isinstance(r, StorageError) for r in results)
    assert await ledger.balance(ACCOUNT) == OPENING_CENTS  # rolled back, all of it


async def test_a_cancelled_leader_still_commits_for_its_followers(
    ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    batches = StoreBatches(ledger, monkeypatch)
    batches.hold()  # the first commit, in its thread, until the test says
    first: list = []
    leader: list = []
    follower: list = []
    leader_scope = trio.CancelScope()

    async def cancelled_leader() -> None:
        with leader_scope:
            await deposit(ledger, 2_00, leader)

    with trio.fail_after(RELEASE_TIMEOUT_S):  # a stranded follower fails, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deposit, ledger, 1_00, first)  # commits batch 1, held at gate
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancelled_leader)  # leads batch 2, waits for the committer
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(deposit, ledger, 3_00, follower)  # joins batch 2
            await trio.testing.wait_all_tasks_blocked()
            leader_scope.cancel()
            batches.release()
    assert batches.count == 2  # batch 2 = the cancelled leader's post and its follower's
    assert [r.result for r in first + follower] == [PostResult.BOOKED, PostResult.BOOKED]
    assert await ledger.balance(ACCOUNT) == OPENING_CENTS + 1_00 + 2_00 + 3_00


async def test_reads_and_writes_share_one_batch_in_arrival_order(
    ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    batches = StoreBatches(ledger, monkeypatch)
    batches.hold()  # a first batch, so that the next one gathers behind it
    seen: dict[str, object] = {}

    async def call(name: str, request) -> None:
        seen[name] = await request()

    arrivals = [
        ("deposit", lambda: ledger.post(account=ACCOUNT, txn_id=uuid.uuid4().bytes,
                                        kind=EntryKind.DEPOSIT, amount_cents=5_00,
                                        limit_cents=AMOUNT_CENTS_MAX)),
        ("balance", lambda: ledger.balance(ACCOUNT)),
        ("pin", lambda: ledger.verify_pin(ACCOUNT, "1324")),
        ("history", lambda: ledger.history(ACCOUNT, 5)),
    ]
    with trio.fail_after(RELEASE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first", lambda: ledger.balance(ACCOUNT))
            for name, request in arrivals:  # one at a time: arrival order is known
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, name, request)
            await trio.testing.wait_all_tasks_blocked()
            batches.release()
    assert batches.sizes == [1, 4]  # two thread hops for five requests
    assert seen["balance"] == OPENING_CENTS + 5_00  # after the deposit it queued behind
    assert seen["pin"].result is PinResult.MATCHED
    assert [e.amount_cents for e in seen["history"]] == [5_00]


async def test_a_bug_in_a_batch_reaches_every_member_as_itself(
    ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    StoreBatches(ledger, monkeypatch).fail(
        OverflowError("a bug, not the database"), after_commit=False
    )
    results: list = []
    async with trio.open_nursery() as nursery:
        for cents in (1_00, 2_00, 3_00):
            nursery.start_soon(deposit, ledger, cents, results)
    assert len(results) == 3 and all(isinstance(r, OverflowError) for r in results)
