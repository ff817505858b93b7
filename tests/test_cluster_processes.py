"""Real ``python -m bank`` processes on one PostgreSQL: racing logins across three of
them (one session per account at any instant), takeover of a kill -9'd holder's lease
without waiting for its expiry, RESUME and replay on a survivor, a SIGSTOPped holder
taken over only after its expiry and refused by the fence once thawed, a frozen holder
taken over by RESUME whose next write is fenced (counted in bank_fenced_writes_total), a
restart of PostgreSQL under logged-in sessions (a posting caught in it settled exactly
once by its replay, the leases still one server's each), and --workers' supervision (a
killed worker restarted, SIGTERM stops all with exit 0, a killed parent takes its
workers with it).

Waits are bounded polls of what the servers answer or of /proc, never sleeps standing in
for an event: another process has no event to wait on."""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import secrets
import signal
import socket
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from bank.accounts_file import AccountRecord
from bank.cluster_leases import LEASE_LOCK_CLASS
from bank.pg_store import PgStore, read_books, read_entries_by_txn_id
from bank.pins import load_or_create_key
from bank.store import read_entry_by_txn_id
from bank.tools import launcher
from tests.helpers import DEMO_ACCOUNT, DEMO_BALANCE_CENTS, DEMO_PIN, WireClient, txn_id
from tests.pg import Cluster as PgCluster
from tests.pg import free_port, pg_cluster, pg_db
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    Logout,
    LogoutReply,
    Resume,
    ResumeReply,
    SessionExpired,
    Status,
    entry_change_cents,
    mask_account,
)

__all__ = ["pg_cluster", "pg_db"]

OTHER_ACCOUNT, OTHER_PIN = "BC-01373", "2947"
POLL_S = 0.02
POLLS_MAX = 500
"""Bounded polls: 10 s at most, far past any lease expiry used here."""


class Cluster:
    """Bank processes started on one database, all killed at the end whatever happens."""

    def __init__(self, db: str, workdir: Path) -> None:
        self.db = db
        self.workdir = workdir
        self.servers: list[launcher.Server] = []

    def args(self, lease_expiry_s: int) -> list[str]:
        return [
            "--db", self.db, "--key-file", str(self.workdir / "bank.key"),
            "--log-level", "INFO", "--shutdown-grace-s", "1",
            "--lease-expiry-s", str(lease_expiry_s),
        ]

    def start(self, name: str, *, lease_expiry_s: int = 60, extra: tuple[str, ...] = ()) -> (
        launcher.Server
    ):
        server = launcher.start(
            [*self.args(lease_expiry_s), *extra], workdir=self.workdir, name=name
        )
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                os.kill(server.pid, signal.SIGCONT)  # a frozen one must hear the stop
                server.stop()


@pytest.fixture
def cluster(pg_db: str, tmp_path: Path) -> Iterator[Cluster]:
    PgStore(pg_db, load_or_create_key(tmp_path / "bank.key"), seed_demo=True).close()
    running = Cluster(pg_db, tmp_path)
    try:
        yield running
    finally:
        running.close()


async def connect(server: launcher.Server) -> WireClient:
    client = await WireClient.connect(server.port)
    await client.hello()
    return client


async def login_when_free(
    server: launcher.Server, account: str, pin: str
) -> tuple[WireClient, int]:
    """LOGIN until approved; the client and how many ACCOUNT_IN_USE came first."""
    for refused in range(POLLS_MAX):
        client = await connect(server)
        status = await client.login(account, pin)
        if status is Status.APPROVED:
            return client, refused
        assert status is Status.ACCOUNT_IN_USE
        await client.aclose()
        await trio.sleep(POLL_S)
    raise AssertionError(f"{account} never became free on {server.port}")


def lease_row(db: str, account: str) -> tuple[int, str | None]:
    with psycopg.connect(db) as connection:
        row = connection.execute(
            "SELECT fence, holder FROM leases WHERE account = %s", (account,)
        ).fetchone()
    assert row is not None
    return int(row[0]), row[1]


async def test_kill_9_holder_taken_over_at_once_and_resumed_with_replay(
    cluster: Cluster,
) -> None:
    a, b = cluster.start("a"), cluster.start("b")  # expiry 60 s: a takeover never waits it
    resumer = await connect(a)
    assert await resumer.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    token = resumer.tokens[-1]
    booked_id = txn_id()
    booked = await resumer.request(Deposit(booked_id, 2_00))
    assert isinstance(booked, DepositReply) and booked.status is Status.APPROVED
    other = await connect(a)
    assert await other.login(OTHER_ACCOUNT, OTHER_PIN) is Status.APPROVED

    a.kill()  # kill -9; nothing released the leases
    killed_at = time.monotonic()
    # An ATM without a token: its LOGIN on B takes the dead holder's lease (liveness),
    # long before the 60 s expiry.
    taker, refused = await login_when_free(b, OTHER_ACCOUNT, OTHER_PIN)
    takeover_s = time.monotonic() - killed_at
    print(f"takeover after kill -9: {takeover_s * 1000:.0f} ms, {refused} refusals first")
    assert takeover_s < 60
    assert lease_row(cluster.db, OTHER_ACCOUNT)[0] == 2

    # The ATM with a token resumes on B, and its replay gets A's original outcome.
    survivor = await connect(b)
    resumed = await survivor.request(Resume(DEMO_ACCOUNT, token))
    assert isinstance(resumed, ResumeReply) and resumed.status is Status.APPROVED
    await survivor.token()
    assert await survivor.request(Deposit(booked_id, 2_00)) == booked
    balance = await survivor.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS + 2_00)
    for client in (taker, survivor):
        assert await client.request(Logout()) == LogoutReply(Status.APPROVED)


async def test_sigstop_holder_taken_over_after_expiry_then_fenced(cluster: Cluster) -> None:
    a, b = cluster.start("a", lease_expiry_s=2), cluster.start("b", lease_expiry_s=2)
    frozen = await connect(a)
    assert await frozen.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    stale_id, fresh_id = txn_id(), txn_id()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        # Alive (its liveness lock is held) but silent: refused until the lease expires.
        taker, refused = await login_when_free(b, DEMO_ACCOUNT, DEMO_PIN)
        assert refused >= 1
        fresh = await taker.request(Deposit(fresh_id, 3_00))
        assert isinstance(fresh, DepositReply) and fresh.status is Status.APPROVED
        await frozen.send(Deposit(stale_id, 50_00))  # waits in A's socket buffer
    finally:
        os.kill(a.pid, signal.SIGCONT)
    frame = await frozen.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await frozen.closed()
    # Nothing moved for the stale write: the fence refused it, or the thawed server's
    # first heartbeat found the lease gone and ended the session before reading it.
    assert read_entry_by_txn_id(cluster.db, stale_id) is None
    balance = await taker.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS + 3_00)
    log = a.log_path.read_text()
    assert "FENCED" in log or "lease taken over by another process" in log
    assert lease_row(cluster.db, DEMO_ACCOUNT)[0] == 2  # one takeover, nothing since
    assert await taker.request(Logout()) == LogoutReply(Status.APPROVED)


UNHEARD_EXPIRY_S = 3600
"""A lease expiry whose heartbeat (a third of it) never comes within a test: a holder
taken over cannot learn so from a heartbeat before its next write, so that write is the
one that meets the fence."""


def admin_metric(port: int, name: str) -> float:
    """One unlabelled sample from a server's /metrics."""
    for line in admin_get(port, "/metrics").splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def test_a_frozen_holder_taken_over_by_resume_has_its_next_write_fenced(
    cluster: Cluster,
) -> None:
    """The fence, on purpose: A's session is taken over by RESUME on B while A is frozen;
    the deposit A then finds in its socket is refused by the fence (nothing moves, the
    session ends SESSION_EXPIRED) and counted in bank_fenced_writes_total."""
    admin = free_port()
    a = cluster.start(
        "a", lease_expiry_s=UNHEARD_EXPIRY_S, extra=("--admin-port", str(admin))
    )
    b = cluster.start("b", lease_expiry_s=UNHEARD_EXPIRY_S)
    stale = await connect(a)
    assert await stale.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    token = stale.tokens[-1]
    before = await stale.request(Deposit(txn_id(), 1_00))
    assert isinstance(before, DepositReply) and before.status is Status.APPROVED
    assert await trio.to_thread.run_sync(admin_metric, admin, "bank_fenced_writes_total") == 0
    stale_id = txn_id()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        survivor = await connect(b)
        resumed = await survivor.request(Resume(DEMO_ACCOUNT, token))
        assert resumed == ResumeReply(Status.APPROVED)  # at once: A's state does not matter
        await survivor.token()
        assert lease_row(cluster.db, DEMO_ACCOUNT)[0] == 2
        fresh = await survivor.request(Deposit(txn_id(), 2_00))
        assert isinstance(fresh, DepositReply) and fresh.status is Status.APPROVED
        await stale.send(Deposit(stale_id, 50_00))  # waits in A's socket buffer
    finally:
        os.kill(a.pid, signal.SIGCONT)
    frame = await stale.receive()
    assert frame is not None and isinstance(frame.message, SessionExpired)
    assert await stale.closed()
    assert read_entry_by_txn_id(cluster.db, stale_id) is None
    assert await trio.to_thread.run_sync(admin_metric, admin, "bank_fenced_writes_total") == 1
    assert a.log_path.read_text().count("DEPOSIT FENCED: the lease was taken over") == 1
    balance = await survivor.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS + 1_00 + 2_00)
    assert lease_row(cluster.db, DEMO_ACCOUNT)[0] == 2  # the fenced write took nothing back
    assert await survivor.request(Logout()) == LogoutReply(Status.APPROVED)
    assert_books_balance(cluster)


RESTART_LEASE_EXPIRY_S = 6
"""Heartbeats every 2 s: soon after PostgreSQL is back each server holds its liveness
lock again (the test waits for that, not for a time)."""


def liveness_locks(db: str) -> int:
    """Bank processes holding their liveness advisory lock on this database now."""
    with psycopg.connect(db) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s::oid AND objsubid = 2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LEASE_LOCK_CLASS,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def held_leases_unexpired(db: str) -> bool:
    with psycopg.connect(db) as connection:
        row = connection.execute(
            "SELECT bool_and(expires_at > now()) FROM leases WHERE holder IS NOT NULL"
        ).fetchone()
    return row is not None and row[0] is not False


def waiting_for_a_row_lock(db: str) -> bool:
    with psycopg.connect(db) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return row is not None and int(row[0]) > 0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds, at most POLLS_MAX times POLL_S apart; it runs in
    a thread, since it may query PostgreSQL or read /proc and logs."""
    for _ in range(POLLS_MAX):
        if await trio.to_thread.run_sync(condition):
            return
        await trio.sleep(POLL_S)
    raise AssertionError(f"never: {what}")


def assert_books_balance(cluster: Cluster) -> None:
    """The store's invariants hold, and every cent is an opening balance or a booked
    entry: none created, none destroyed."""
    key = load_or_create_key(cluster.workdir / "bank.key")
    with PgStore(cluster.db, key, seed_demo=False, create=False) as store:
        assert store.check_invariants() == []
    books = read_books(cluster.db)
    moved = sum(entry_change_cents(e.kind, e.amount_cents) for e in books.entries)
    assert sum(books.balance_cents.values()) == sum(books.opening_cents.values()) + moved


async def money(client: WireClient, request: Deposit) -> DepositReply:
    reply = await client.request(request)
    assert isinstance(reply, DepositReply)
    return reply


async def test_a_postgresql_restart_under_cluster_sessions_settles_once_and_keeps_leases(
    cluster: Cluster, pg_cluster: PgCluster,
) -> None:
    """A real restart of PostgreSQL (fast shutdown: every backend ends) under two servers'
    logged-in sessions. A deposit caught waiting in the database, and requests during the
    outage, are ISSUER_UNAVAILABLE and the sessions live on; once each server holds its
    liveness lock again, the replay books the deposit exactly once, A's lease is still
    A's alone (B's LOGIN is ACCOUNT_IN_USE) until A logs out, and no money appeared or
    vanished."""
    a = cluster.start("a", lease_expiry_s=RESTART_LEASE_EXPIRY_S)
    b = cluster.start("b", lease_expiry_s=RESTART_LEASE_EXPIRY_S)
    holder = await connect(a)
    assert await holder.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    other = await connect(b)
    assert await other.login(OTHER_ACCOUNT, OTHER_PIN) is Status.APPROVED
    in_flight, during = Deposit(txn_id(), 5_00), Deposit(txn_id(), 2_00)
    stopped = False
    try:
        # The deposit waits for the account's row in PostgreSQL when the restart begins.
        blocker = psycopg.connect(cluster.db)
        try:
            blocker.execute(
                "SELECT 1 FROM accounts WHERE account = %s FOR UPDATE", (DEMO_ACCOUNT,)
            )
            await holder.send(in_flight)
            await until(functools.partial(waiting_for_a_row_lock, cluster.db),
                        "the deposit waits for the row")
            await trio.to_thread.run_sync(pg_cluster.stop)
            stopped = True
        finally:
            blocker.close()
        frame = await holder.receive()
        assert frame is not None and isinstance(frame.message, DepositReply)
        assert frame.message.status is Status.ISSUER_UNAVAILABLE
        # While PostgreSQL is down, every store request fails; nobody logs in.
        assert (await money(holder, in_flight)).status is Status.ISSUER_UNAVAILABLE
        assert (await money(other, during)).status is Status.ISSUER_UNAVAILABLE
        newcomer = await connect(b)
        assert await newcomer.login(DEMO_ACCOUNT, DEMO_PIN) is Status.ISSUER_UNAVAILABLE
        await newcomer.aclose()
    finally:
        if stopped:
            await trio.to_thread.run_sync(pg_cluster.start)
    await until(
        lambda: liveness_locks(cluster.db) == 2 and held_leases_unexpired(cluster.db),
        "both servers hold their liveness lock again and their leases are renewed",
    )
    settled = await money(holder, in_flight)
    assert settled.status is Status.APPROVED
    assert settled.balance_cents == DEMO_BALANCE_CENTS + 5_00
    assert await money(holder, in_flight) == settled  # replayed: the same entry
    assert len(read_entries_by_txn_id(cluster.db, in_flight.txn_id)) == 1
    assert (await money(other, during)).status is Status.APPROVED
    # A's lease outlived the restart as A's alone: the row untouched, B refused.
    assert lease_row(cluster.db, DEMO_ACCOUNT)[0] == 1
    rival = await connect(b)
    assert await rival.login(DEMO_ACCOUNT, DEMO_PIN) is Status.ACCOUNT_IN_USE
    await rival.aclose()
    assert await holder.request(Logout()) == LogoutReply(Status.APPROVED)
    taker, refused = await login_when_free(b, DEMO_ACCOUNT, DEMO_PIN)
    assert refused == 0  # LOGOUT waited for its release to be written
    assert lease_row(cluster.db, DEMO_ACCOUNT)[0] == 2
    after = await money(taker, Deposit(txn_id(), 3_00))
    assert after.status is Status.APPROVED
    assert after.balance_cents == DEMO_BALANCE_CENTS + 5_00 + 3_00
    for client in (taker, other):
        assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    log_a = a.log_path.read_text()
    assert "cluster liveness lock taken again after a lost connection" in log_a
    assert "lease taken over by another process" not in log_a + b.log_path.read_text()
    assert_books_balance(cluster)


RACE_ACCOUNTS = 100
RACE_ATTEMPTS = 1000
RACE_CLIENTS = 100
RACE_PIN = "4826"
RACE_OPENING_CENTS = 1_000


async def test_racing_logins_one_session_per_account_at_any_instant(
    cluster: Cluster,
) -> None:
    accounts = [f"RC-{n:05d}" for n in range(RACE_ACCOUNTS)]
    key = load_or_create_key(cluster.workdir / "bank.key")
    with PgStore(cluster.db, key, seed_demo=False) as store:
        store.add_accounts([AccountRecord(a, RACE_PIN, RACE_OPENING_CENTS) for a in accounts])
    servers = [  # every client connects from 127.0.0.1
        cluster.start(f"race-{n}", extra=("--preauth-per-address-max", str(RACE_CLIENTS)))
        for n in range(3)
    ]
    held: dict[str, list[tuple[float, float]]] = defaultdict(list)
    outcomes: Counter[Status] = Counter()
    rng = random.Random(secrets.randbits(32))
    attempts = iter(range(RACE_ATTEMPTS))

    async def one_client() -> None:
        for _ in attempts:
            account = rng.choice(accounts)
            client = await connect(rng.choice(servers))
            status = await client.login(account, RACE_PIN)
            outcomes[status] += 1
            if status is Status.APPROVED:
                got_it = trio.current_time()  # the lease is ours from here...
                reply = await client.request(Deposit(txn_id(), 1))
                assert isinstance(reply, DepositReply) and reply.status is Status.APPROVED
                held[account].append((got_it, trio.current_time()))  # ...to here at least
                assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(RACE_CLIENTS):
            nursery.start_soon(one_client)

    assert sum(outcomes.values()) == RACE_ATTEMPTS
    assert set(outcomes) <= {Status.APPROVED, Status.ACCOUNT_IN_USE}
    assert outcomes[Status.ACCOUNT_IN_USE] > 0  # the race was real
    # Each session held its lease at least from its APPROVED to its last reply: on one
    # clock, no two such spans of one account may overlap.
    for account, spans in held.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"{account}: two sessions at once"
    # Every acquisition raised the fence by one, and only approved logins acquired.
    with psycopg.connect(cluster.db) as connection:
        rows = connection.execute(
            "SELECT l.account, l.fence, a.balance_cents FROM leases l"
            " JOIN accounts a USING (account) WHERE l.account LIKE 'RC-%'"
        ).fetchall()
    fences = {account: fence for account, fence, _ in rows}
    assert fences == {account: len(spans) for account, spans in held.items()}
    assert sum(fences.values()) == outcomes[Status.APPROVED]
    for _account, fence, balance_cents in rows:
        assert balance_cents == RACE_OPENING_CENTS + fence  # one cent per session
    print(f"racing logins: {dict((s.name, n) for s, n in outcomes.items())}")


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):  # any thread may have spawned one
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        found |= {child for child in map(int, text.split()) if alive(child)}
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_workers_restart_a_dead_worker_and_stop_on_sigterm(cluster: Cluster) -> None:
    parent = cluster.start("workers", extra=("--workers", "2"))
    workers = children(parent.pid)
    assert len(workers) == 2
    client = await connect(parent)
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    await until(
        lambda: len(children(parent.pid)) == 2 and victim not in children(parent.pid),
        "the killed worker replaced",
    )
    await until(lambda: "2 workers serving" in parent.log_path.read_text(), "start-up logged")
    await until(
        lambda: parent.log_path.read_text().count("listening on") == 3, "the new one listens"
    )
    for _ in range(10):  # whichever worker the kernel picks serves
        client = await connect(parent)
        assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
        assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    survivors = children(parent.pid)
    assert parent.stop() == 0
    assert not any(alive(pid) for pid in survivors)
    assert "restarting it" in parent.log_path.read_text()


ADMIN_PORT_TRIES_MAX = 50
"""Attempts at finding two consecutive free ports for the workers' admin endpoints."""
ADMIN_TIMEOUT_S = 10
"""Bound on one admin request, which a serving worker answers at once."""


def free_port_pair() -> int:
    """A free port P with P + 1 free too (bounded tries): worker k serves P + k."""
    for _ in range(ADMIN_PORT_TRIES_MAX):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=ADMIN_TIMEOUT_S) as r:
        assert r.status == 200
        return str(r.read().decode())


async def test_each_worker_serves_its_own_admin_endpoint(cluster: Cluster) -> None:
    """With --admin-port P, worker k answers on P + k, about its own connections only:
    a logged-in session shows in exactly one worker's /sessions."""
    port = free_port_pair()
    parent = cluster.start("workers", extra=("--workers", "2", "--admin-port", str(port)))
    ports = (port, port + 1)
    for each in ports:
        metrics = await trio.to_thread.run_sync(admin_get, each, "/metrics")
        assert "bank_connections_open" in metrics
    client = await connect(parent)
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    seen = []
    for each in ports:
        sessions = json.loads(await trio.to_thread.run_sync(admin_get, each, "/sessions"))
        seen.append([c["account"] for c in sessions["connections"]])
    assert sorted(len(accounts) for accounts in seen) == [0, 1]
    assert mask_account(DEMO_ACCOUNT) in seen[0] + seen[1]
    assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    assert parent.stop() == 0


async def test_workers_end_with_a_killed_parent(cluster: Cluster) -> None:
    parent = cluster.start("workers", extra=("--workers", "2"))
    workers = children(parent.pid)
    assert len(workers) == 2
    parent.kill()
    await until(lambda: not any(alive(pid) for pid in workers), "the orphaned workers end")
