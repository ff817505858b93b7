"""Two bank servers on one PostgreSQL, in one test process but each with its own ledger
and cluster leases (its own boot id, liveness connection and advisory lock), as two
processes have: one session per account across them, LOGOUT and disconnect free the
account for the other at once, RESUME on the other server takes the session over (fence
+1), the old server's next write (money, or a PIN change) is FENCED (nothing done,
SESSION_EXPIRED, counted), a
heartbeat ends a session whose lease was taken even if it never writes, and a replay
lands on either server with the original outcome. The real-process cases (kill -9,
SIGSTOP, --workers, racing logins) are in test_cluster_processes.py."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from bank.batch_ledger import open_ledger
from bank.cluster_leases import ClusterLeases
from bank.config import ServerConfig
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    RunningServer,
    WireClient,
    start_server,
    txn_id,
)
from tests.pg import pg_cluster, pg_db
from wire import (
    Balance,
    BalanceReply,
    ChangePin,
    Deposit,
    DepositReply,
    Logout,
    LogoutReply,
    Resume,
    ResumeReply,
    SessionExpired,
    Status,
)

__all__ = ["pg_cluster", "pg_db"]

LEASE_EXPIRY_S = 60
"""Long: these tests never wait for an expiry, and a heartbeat (every 20 s) runs only
when a test calls it."""

POLL_S = 0.02
POLLS_MAX = 500
"""Bounded polls of what another server will do soon (write a release): 10 s at most."""


@pytest.fixture
async def servers(
    pg_db: str, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    config = ServerConfig(
        host="127.0.0.1", port=0, db=pg_db, key_file=tmp_path / "bank.key",
        lease_expiry_s=LEASE_EXPIRY_S,
    )
    ledgers = [await open_ledger(pg_db, tmp_path / "bank.key") for _ in range(2)]
    try:
        running = [await start_server(nursery, config, ledger) for ledger in ledgers]
        yield running[0], running[1]
        for bank in running:
            bank.server.shutdown()
    finally:
        for ledger in ledgers:
            with trio.CancelScope(shield=True):
                await ledger.aclose()


def cluster_leases(bank: RunningServer) -> ClusterLeases:
    leases = bank.server.leases
    assert isinstance(leases, ClusterLeases)
    return leases


async def login(bank: RunningServer) -> tuple[WireClient, Status]:
    client = await bank.client()
    return client, await client.login(DEMO_ACCOUNT, DEMO_PIN)


async def login_when_free(bank: RunningServer) -> WireClient:
    """LOGIN until approved: the other server writes its release in its own time."""
    for _ in range(POLLS_MAX):
        client, status = await login(bank)
        if status is Status.APPROVED:
            return client
        assert status is Status.ACCOUNT_IN_USE
        await client.aclose()
        await trio.sleep(POLL_S)
    raise AssertionError("the account was never released")


async def test_one_session_per_account_across_servers(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = servers
    first, status = await login(a)
    assert status is Status.APPROVED
    second, status = await login(b)
    assert status is Status.ACCOUNT_IN_USE
    await second.aclose()
    assert await first.request(Logout()) == LogoutReply(Status.APPROVED)
    # LOGOUT_REPLY came after the release was written: B serves the account at once.
    third, status = await login(b)
    assert status is Status.APPROVED
    assert cluster_leases(b).fences() == {DEMO_ACCOUNT: 2}
    await third.aclose()  # a disconnect releases too, in the server's own time
    fourth = await login_when_free(a)
    assert cluster_leases(a).fences() == {DEMO_ACCOUNT: 3}
    await fourth.aclose()


async def test_resume_on_another_server_fences_the_old_one(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = servers
    old, status = await login(a)
    assert status is Status.APPROVED
    token = old.tokens[-1]
    booked_id = txn_id()
    booked = await old.request(Deposit(booked_id, 1_00))
    assert isinstance(booked, DepositReply) and booked.status is Status.APPROVED

    # The ATM lost its connection to A (A has not noticed) and resumes on B.
    new = await b.client()
    resumed = await new.request(Resume(DEMO_ACCOUNT, token))
    assert isinstance(resumed, ResumeReply) and resumed.status is Status.APPROVED
    await new.token()
    assert cluster_leases(b).fences() == {DEMO_ACCOUNT: 2}
    # The replay lands on B with A's original outcome.
    replayed = await new.request(Deposit(booked_id, 1_00))
    assert replayed == booked

    # A's stale session tries to move money: FENCED, nothing moved, SESSION_EXPIRED.
    await old.send(Deposit(txn_id(), 50_00))
    frame = await old.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await old.closed()
    assert a.server.metrics.fenced_writes == 1
    balance = await new.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS + 1_00)
    # The spent token opens nothing anywhere; the new one is the session's.
    for bank in (a, b):
        probe = await bank.client()
        again = await probe.request(Resume(DEMO_ACCOUNT, token))
        assert isinstance(again, ResumeReply) and again.status is Status.UNKNOWN_SESSION
        await probe.aclose()
    await new.aclose()


async def test_a_session_taken_over_elsewhere_cannot_change_the_pin(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    """Before its heartbeat has told it, A's stale session asks to change the PIN: the
    fence refuses it (FENCED: nothing checked, nothing counted), A ends the session with
    SESSION_EXPIRED, and the account's PIN is what it was."""
    a, b = servers
    old, _ = await login(a)
    new = await b.client()
    resumed = await new.request(Resume(DEMO_ACCOUNT, old.tokens[-1]))
    assert isinstance(resumed, ResumeReply) and resumed.status is Status.APPROVED
    await new.token()

    await old.send(ChangePin(DEMO_PIN, "2580"))
    frame = await old.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await old.closed()
    assert a.server.metrics.fenced_writes == 1
    assert await new.request(Logout()) == LogoutReply(Status.APPROVED)
    again, status = await login(b)  # with the PIN the stale session tried to replace
    assert status is Status.APPROVED
    await again.aclose()


async def test_a_heartbeat_ends_a_session_taken_over_elsewhere(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = servers
    old, _ = await login(a)
    new = await b.client()
    resumed = await new.request(Resume(DEMO_ACCOUNT, old.tokens[-1]))
    assert isinstance(resumed, ResumeReply) and resumed.status is Status.APPROVED
    await cluster_leases(a).heartbeat()  # as every lease_expiry_s / 3
    frame = await old.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await old.closed()
    assert cluster_leases(a).lost_count == 1 and a.server.metrics.fenced_writes == 0
    await new.aclose()


async def test_a_resume_for_a_released_session_opens_nothing_elsewhere(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = servers
    old, _ = await login(a)
    token = old.tokens[-1]
    await old.request(Logout())
    new = await b.client()
    resumed = await new.request(Resume(DEMO_ACCOUNT, token))
    assert isinstance(resumed, ResumeReply) and resumed.status is Status.UNKNOWN_SESSION
    await new.aclose()


def test_sqlite_refuses_more_than_one_worker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a PostgreSQL db"):
        ServerConfig(db=str(tmp_path / "bank.db"), workers=2)
    assert dataclasses.replace(ServerConfig(), workers=1).workers == 1


async def test_a_token_spent_on_another_server_opens_nothing_where_it_was_issued(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    """A keeps its sessions' tokens in its own registry too, and learns that B took one
    over only at its next heartbeat or write (a frozen A, only once thawed). Until then
    the spent token still finds A's old session there; A must not take the account's
    lease back for it once B's session has ended (its LOGOUT left the row free): the
    token was spent at B and its session is over (spec §3.15)."""
    a, b = servers
    old, status = await login(a)
    assert status is Status.APPROVED
    token = old.tokens[-1]
    new = await b.client()
    assert await new.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(Status.APPROVED)
    await new.token()
    assert await new.request(Logout()) == LogoutReply(Status.APPROVED)  # the row is free
    thief = await a.client()  # A has had no heartbeat: its old session is still registered
    assert await thief.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
        Status.UNKNOWN_SESSION
    )
    # Superseded all the same (the token was claimed): its lease was lost anyway.
    frame = await old.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await old.closed()
    assert cluster_leases(a).fences() == {}
    owner = await login_when_free(a)  # the customer, with the PIN, is served as ever
    assert cluster_leases(a).fences() == {DEMO_ACCOUNT: 3}
    for client in (thief, owner):
        await client.aclose()


async def test_guessed_resumes_neither_hold_an_account_nor_tell_it_is_in_use(
    servers: tuple[RunningServer, RunningServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RESUME with a guessed token looks at the account's lease row; while it does, the
    customer's own LOGIN on that server must not be told ACCOUNT_IN_USE (a guesser
    without any PIN could otherwise keep an account out by RESUMEs alone), and a guess
    for an account in use on that server must cost the same query as one for an account
    that is not (else its speed would tell which accounts are in use, spec §10)."""
    a, _ = servers
    leases = cluster_leases(a)
    real_run = leases._pool.run
    looked = trio.Event()
    gate = trio.Event()
    statements: list[str] = []

    async def gated(function: Any, *args: object) -> Any:
        if function.__name__ != "_acquire_row":  # a RESUME's look at the row waits
            statements.append(function.__name__)
            looked.set()
            await gate.wait()
        return await real_run(function, *args)

    monkeypatch.setattr(leases._pool, "run", gated)
    guesser = await a.client()
    reply_to = await guesser.send(Resume(DEMO_ACCOUNT, bytes(16)))
    await looked.wait()  # the guess is at the database now
    owner, status = await login(a)
    assert status is Status.APPROVED
    gate.set()
    frame = await guesser.receive()
    assert frame is not None and frame.request_id == reply_to
    assert frame.message == ResumeReply(Status.UNKNOWN_SESSION)
    # The account is in use here now: a guess for it still goes to the row.
    asked = len(statements)
    assert await guesser.request(Resume(DEMO_ACCOUNT, bytes(16))) == ResumeReply(
        Status.UNKNOWN_SESSION
    )
    assert len(statements) == asked + 1
    assert await owner.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    for client in (guesser, owner):
        await client.aclose()
