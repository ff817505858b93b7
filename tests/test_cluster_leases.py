"""Cluster leases over a real PostgreSQL: one holder per account across processes (here,
several ``ClusterLeases`` in one test, each with its own liveness connection, as separate
processes have), fences raised on every acquisition, takeover of a dead holder at once
and of a frozen one only after expiry, resumption tokens checked in the row, releases
written, and lost leases reported at the next heartbeat."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio

from bank.cluster_leases import ClusterLeases
from bank.pg_store import PgStore
from bank.store import DEMO_ACCOUNTS
from tests.pg import pg_cluster, pg_db

__all__ = ["pg_cluster", "pg_db"]

ACCOUNTS = [account for account, _, _ in DEMO_ACCOUNTS[:2]]
ACCOUNT = ACCOUNTS[0]
EXPIRY_S = 1
POLL_S = 0.05
POLLS_MAX = 200
"""Bounded polls of the lease table: 10 s at most, for an expiry of 1 s."""


@pytest.fixture
def bank_db(pg_db: str) -> str:
    """A fresh bank database with the demo accounts (schema created by the store)."""
    PgStore(pg_db, secrets.token_bytes(32), seed_demo=True).close()
    return pg_db


class Process:
    """One bank process's leases, running in the test's nursery until ``crash``."""

    def __init__(self, leases: ClusterLeases, scope: trio.CancelScope) -> None:
        self.leases = leases
        self._scope = scope

    def crash(self) -> None:
        """End the process: its liveness connection closes, its rows stay as they were."""
        self._scope.cancel()


class FrozenLeases(ClusterLeases):
    """A process that stopped (SIGSTOP): alive, its liveness lock held, no heartbeats."""

    frozen = False

    async def heartbeat(self) -> None:
        if not self.frozen:
            await super().heartbeat()


@pytest.fixture
async def start(bank_db: str, nursery: trio.Nursery) -> AsyncIterator[Any]:
    async def started(kind: type[ClusterLeases] = ClusterLeases) -> Process:
        leases = kind(bank_db, expiry_s=EXPIRY_S)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await leases.run(task_status=task_status)

        await nursery.start(run)
        return Process(leases, scope)

    yield started


def row(url: str, account: str = ACCOUNT) -> tuple[Any, ...]:
    with psycopg.connect(url) as connection:
        found = connection.execute(
            "SELECT fence, holder, expires_at > now() FROM leases WHERE account = %s",
            (account,),
        ).fetchone()
    assert found is not None
    return tuple(found)


async def test_one_holder_across_processes_and_the_fence_rises(start: Any, bank_db: str) -> None:
    a, b = await start(), await start()
    first = await a.leases.acquire(ACCOUNT)
    assert first is not None and first.fence == 1
    assert await b.leases.acquire(ACCOUNT) is None  # alive and unexpired: in use
    other = await b.leases.acquire(ACCOUNTS[1])  # another account is independent
    assert other is not None
    a.leases.end(first)
    await a.leases.settle()
    assert row(bank_db)[1] is None
    second = await b.leases.acquire(ACCOUNT)
    assert second is not None and second.fence == 2


async def test_a_dead_holders_lease_is_taken_at_once(start: Any, bank_db: str) -> None:
    a, b = await start(), await start()
    lease = await a.leases.acquire(ACCOUNT)
    assert lease is not None
    a.crash()
    # Its row is untouched (nothing released it) and unexpired; the liveness lock is gone.
    for _ in range(POLLS_MAX):
        taken = await b.leases.acquire(ACCOUNT)
        if taken is not None:
            break
        await trio.sleep(POLL_S)  # the crashed task's connection closes in its thread
    assert taken is not None and taken.fence == lease.fence + 1
    fence, holder, unexpired = row(bank_db)
    assert (fence, holder, unexpired) == (2, b.leases.holder.boot_id, True)


async def test_a_frozen_holders_lease_only_after_expiry(start: Any, bank_db: str) -> None:
    a, b = await start(FrozenLeases), await start()
    lease = await a.leases.acquire(ACCOUNT)
    assert lease is not None
    a.leases.frozen = True
    refused_while_unexpired = 0
    for _ in range(POLLS_MAX):
        unexpired = row(bank_db)[2]
        taken = await b.leases.acquire(ACCOUNT)
        if taken is not None:
            break
        refused_while_unexpired += unexpired
        await trio.sleep(POLL_S)
    assert taken is not None and taken.fence == 2
    assert refused_while_unexpired >= 1
    # Thawed, the old holder's heartbeat learns it lost the lease.
    lost: list[str] = []
    a.leases._held[ACCOUNT].on_lost = lambda: lost.append(ACCOUNT)
    a.leases.frozen = False
    await a.leases.heartbeat()
    assert lost == [ACCOUNT] and a.leases.lost_count == 1


async def test_heartbeat_keeps_a_lease_and_renews_an_expired_one_not_taken(
    start: Any, bank_db: str
) -> None:
    a = await start(FrozenLeases)
    lease = await a.leases.acquire(ACCOUNT)
    assert lease is not None
    a.leases.frozen = True
    for _ in range(POLLS_MAX):
        if not row(bank_db)[2]:
            break
        await trio.sleep(POLL_S)
    assert not row(bank_db)[2]
    a.leases.frozen = False
    await a.leases.heartbeat()
    assert row(bank_db) == (1, a.leases.holder.boot_id, True)
    assert a.leases.lost_count == 0


async def test_resume_token_takes_over_from_another_process(start: Any, bank_db: str) -> None:
    a, b = await start(), await start()
    token, new_token = secrets.token_bytes(16), secrets.token_bytes(16)
    lost: list[str] = []
    lease = await a.leases.acquire(
        ACCOUNT, token=token, terminal="atm-1", on_lost=lambda: lost.append(ACCOUNT)
    )
    assert lease is not None
    take = b.leases.take_over
    assert await take(ACCOUNT, token=new_token, new_token=new_token, terminal="atm-1") is None
    assert await take(ACCOUNT, token=token, new_token=new_token, terminal="atm-2") is None
    a.leases.release(ACCOUNT)  # the in-process lock alone, as when a release is queued
    assert await a.leases.take_over(
        ACCOUNT, token=token, new_token=new_token, terminal="atm-1"
    ) is None  # the holder's own process resumes through its registry, never the row
    assert a.leases.try_acquire(ACCOUNT)
    taken = await take(ACCOUNT, token=token, new_token=new_token, terminal="atm-1")
    assert taken is not None and taken.fence == 2
    # Single use: the old token opens nothing now, the new one is the row's.
    c = await start()
    assert await c.leases.take_over(
        ACCOUNT, token=token, new_token=token, terminal="atm-1"
    ) is None
    await a.leases.heartbeat()
    assert lost == [ACCOUNT]
    b.leases.end(taken)
    await b.leases.settle()
    assert await c.leases.take_over(  # released: the session ended, its token with it
        ACCOUNT, token=new_token, new_token=token, terminal="atm-1"
    ) is None


async def test_stale_release_does_not_free_the_new_holders_lease(start: Any, bank_db: str) -> None:
    a, b = await start(FrozenLeases), await start()
    lease = await a.leases.acquire(ACCOUNT, token=b"t" * 16)
    assert lease is not None
    a.crash()
    for _ in range(POLLS_MAX):
        if (taken := await b.leases.acquire(ACCOUNT)) is not None:
            break
        await trio.sleep(POLL_S)
    assert taken is not None
    c = await start()
    c.leases.holder = a.leases.holder  # the old holder's identity, releasing late
    c.leases._send.send_nowait(lease)
    await c.leases.settle()
    assert row(bank_db) == (2, b.leases.holder.boot_id, True)


async def test_a_restarted_postgresql_costs_no_lease(
    start: Any, bank_db: str, pg_cluster: Any
) -> None:
    a, b = await start(), await start()
    lease = await a.leases.acquire(ACCOUNT)
    assert lease is not None and await b.leases.acquire(ACCOUNT) is None  # pool in use
    await trio.to_thread.run_sync(pg_cluster.restart)
    # Every connection died with the server: the next heartbeat reconnects at once and
    # takes the liveness lock again, so the holder is alive again for the others.
    await a.leases.heartbeat()
    assert row(bank_db) == (1, a.leases.holder.boot_id, True)
    assert await b.leases.acquire(ACCOUNT) is None  # a stale pooled connection is replaced
    assert a.leases.lost_count == 0
    a.leases.end(lease)
    await a.leases.settle()
    taken = await b.leases.acquire(ACCOUNT)
    assert taken is not None and taken.fence == 2


async def test_a_dead_holders_session_token_dies_with_its_idle_timeout(
    start: Any, bank_db: str
) -> None:
    """A process killed with its sessions leaves their rows, tokens and all: nothing
    releases them. Had it lived, each session would have ended within idle_timeout_s of
    its last request, and its last request came before the lease's last renewal; so a
    token opens its session only until the lease's expiry plus the idle timeout, not
    for as long as nobody logs in to the account (spec §3.15, §10: a stolen token's
    life is one session)."""
    a, b = await start(), await start()
    tokens = [secrets.token_bytes(16) for _ in ACCOUNTS]
    for account, token in zip(ACCOUNTS, tokens, strict=True):
        assert await a.leases.acquire(account, token=token, terminal="atm-1") is not None
    a.crash()
    idle_s = b.leases.session_idle_s
    with psycopg.connect(bank_db) as connection:  # the first one died that long ago
        connection.execute(
            "UPDATE leases SET expires_at = now() - make_interval(secs => %s) WHERE account = %s",
            (idle_s + 1, ACCOUNTS[0]),
        )
    assert await b.leases.take_over(
        ACCOUNTS[0], token=tokens[0], new_token=tokens[1], terminal="atm-1"
    ) is None
    # The other one died just now: its ATM resumes on another process at once, as ever.
    taken = await b.leases.take_over(
        ACCOUNTS[1], token=tokens[1], new_token=tokens[0], terminal="atm-1"
    )
    assert taken is not None and taken.fence == 2
