"""What only the PostgreSQL store has: its schema versions, its session settings, the
fence of the cluster's leases, races between processes on one transaction id, and
PostgreSQL going away and coming back (a real restart of the throwaway cluster).

The money rules themselves are tested once for both stores (test_store.py,
test_batch_ledger.py, test_group_commit.py, parametrised by ``any_db``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import trio

from bank import pg_store
from bank.__main__ import main
from bank.batch_ledger import open_ledger
from bank.config import ServerConfig
from bank.ledger import PinChangeResult, PinResult, Posting, PostResult, StorageError
from bank.pg_store import (
    IDLE_IN_TRANSACTION_TIMEOUT_MS,
    LOCK_TIMEOUT_MS,
    SCHEMA_VERSION,
    PgStore,
)
from bank.store import (
    BalanceQuery,
    DestinationPolicy,
    PinPolicy,
    PostRequest,
    SchemaError,
    StoreError,
    TransferRequest,
    UnknownAccount,
    read_accounts_summary,
    read_books,
)
from tests.helpers import DEMO_ACCOUNT, DEMO_PIN, DESTINATIONS, logged_in, start_server
from tests.pg import Cluster, free_port, raw
from wire import Deposit, DepositReply, EntryKind, Status
from wire._limits import AMOUNT_CENTS_MAX, BALANCE_CENTS_MAX

KEY = bytes(32)
T0 = 1_700_000_000_000
OPENING_CENTS = 1_024_32
WAIT_TIMEOUT_S = 30
"""Bound on waiting for another connection to block or finish: a failure, not a hang."""


@pytest.fixture
def store(pg_db: str) -> Iterator[PgStore]:
    with PgStore(pg_db, KEY) as opened:
        yield opened


def deposit(store: PgStore, txn: bytes, cents: int = 100, fence: int | None = None) -> Posting:
    return store.post(account=DEMO_ACCOUNT, txn_id=txn, kind=EntryKind.DEPOSIT,
                      amount_cents=cents, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, fence=fence)


def one(db: str, sql: str, *params: Any) -> Any:
    with raw(db) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


# -- schema and settings --------------------------------------------------------------------


def test_a_new_database_gets_the_schema_version_and_the_leases_table(store: PgStore, pg_db: str):
    assert store.created
    assert one(pg_db, "SELECT version FROM schema_version") == SCHEMA_VERSION
    assert one(pg_db, "SELECT count(*) FROM leases") == 0
    with PgStore(pg_db, KEY) as again:
        assert not again.created and again.seeded == ()


def test_a_newer_schema_is_refused_by_the_store_and_the_readers(store: PgStore, pg_db: str):
    with raw(pg_db) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaError):
        PgStore(pg_db, KEY)
    with pytest.raises(SchemaError):
        read_books(pg_db)


def test_a_version_5_database_is_migrated_and_starts_counting_transfer_misses(pg_db: str):
    policy = DestinationPolicy(tries_max=2, lockout_ms=60_000)
    with PgStore(pg_db, KEY) as store:
        moved = store.transfer(account=DEMO_ACCOUNT, txn_id=txn(1), to_account="WF-14351",
                               amount_cents=100, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX,
                               policy=policy)
    with raw(pg_db) as conn:  # back to version 5: no count of transfers to no account
        conn.execute("DROP TABLE destination_misses")
        conn.execute("UPDATE schema_version SET version = 5")
    with pytest.raises(SchemaError, match="older than"):  # readers migrate nothing
        read_books(pg_db)
    with PgStore(pg_db, KEY) as store:
        assert one(pg_db, "SELECT version FROM schema_version") == SCHEMA_VERSION == 6
        replay = store.transfer(account=DEMO_ACCOUNT, txn_id=txn(1), to_account="WF-14351",
                                amount_cents=100, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX,
                                policy=policy)
        assert replay.result is PostResult.REPLAYED and replay.entry_id == moved.entry_id
        results = [
            store.transfer(account=DEMO_ACCOUNT, txn_id=txn(n), to_account="QQ-00000",
                           amount_cents=1, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX,
                           policy=policy).result
            for n in (2, 3)
        ]
        assert results == [PostResult.UNKNOWN_DESTINATION, PostResult.TRANSFERS_LOCKED]
        assert store.check_invariants() == []
    summary = {s.account: s.transfers_locked_until_ms for s in read_accounts_summary(pg_db)}
    assert summary[DEMO_ACCOUNT] == T0 + 60_000 and summary["WF-14351"] is None


def test_operator_commands_never_create_a_bank(pg_db: str):
    with pytest.raises(StoreError, match="is not a bank database"):
        PgStore(pg_db, KEY, create=False)
    with pytest.raises(StoreError, match="is not a bank database"):
        read_books(pg_db)
    assert one(pg_db, "SELECT to_regclass('schema_version')") is None


def test_processes_starting_together_migrate_once(pg_db: str):
    opened: list[PgStore] = []

    def open_one() -> None:
        opened.append(PgStore(pg_db, KEY))

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_TIMEOUT_S)
    assert sorted(store.created for store in opened) == [False, False, True]
    for store in opened:
        store.close()
    assert one(pg_db, "SELECT count(*) FROM accounts") == 7  # seeded once


def test_every_connection_bounds_lock_waits_and_idle_transactions(store: PgStore):
    conn = store._connection()
    assert conn.execute("SHOW lock_timeout").fetchone() == (f"{LOCK_TIMEOUT_MS // 1000}s",)
    assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == (
        f"{IDLE_IN_TRANSACTION_TIMEOUT_MS // 1000}s",
    )


def test_the_database_refuses_an_overdraft_written_by_hand(store: PgStore, pg_db: str):
    with raw(pg_db) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE accounts SET balance_cents = -1 WHERE account = %s", (DEMO_ACCOUNT,))
    with raw(pg_db) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO transactions (txn_id, kind, account, amount_cents, time_ms)"
            " VALUES (%s, 1, %s, 0, 0)", (bytes(16), DEMO_ACCOUNT),
        )
    with raw(pg_db) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms)"
            " VALUES (%s, %s, 1, 1, 1, 0)", (DEMO_ACCOUNT, bytes(16)),
        )
    assert store.balance(DEMO_ACCOUNT) == OPENING_CENTS


# -- the fence -------------------------------------------------------------------------------


def lease(db: str, *, fence: int, holder: str | None = "boot-1", expires: str = "1 minute",
          account: str = DEMO_ACCOUNT) -> None:
    """Write the account's lease row as the cluster's lease code would."""
    with raw(db) as conn:
        conn.execute(
            "INSERT INTO leases (account, fence, holder, expires_at)"
            " VALUES (%s, %s, %s, now() + %s::interval) ON CONFLICT (account) DO UPDATE"
            " SET fence = excluded.fence, holder = excluded.holder,"
            " expires_at = excluded.expires_at",
            (account, fence, holder, expires),
        )


def test_the_lease_holders_fence_moves_money(store: PgStore, pg_db: str):
    lease(pg_db, fence=7)
    assert deposit(store, txn(1), fence=7).result is PostResult.BOOKED


@pytest.mark.parametrize(
    "lease_row",
    [
        None,  # never leased
        {"fence": 8},  # taken over since
        {"fence": 7, "holder": None},  # released
        {"fence": 7, "expires": "-1 second"},  # expired
    ],
)
def test_a_stale_fence_moves_nothing_and_records_nothing(
    store: PgStore, pg_db: str, lease_row: dict[str, Any] | None
):
    if lease_row is not None:
        lease(pg_db, **lease_row)
    assert deposit(store, txn(1), fence=7) == Posting(PostResult.FENCED)
    assert store.balance(DEMO_ACCOUNT) == OPENING_CENTS
    assert one(pg_db, "SELECT count(*) FROM transactions") == 0
    # Nothing was recorded: the same id is judged afresh, here without a fence.
    assert deposit(store, txn(1)).result is PostResult.BOOKED


def test_a_replay_is_answered_even_when_fenced(store: PgStore, pg_db: str):
    lease(pg_db, fence=7)
    booked = deposit(store, txn(1), fence=7)
    lease(pg_db, fence=8)  # taken over
    replay = deposit(store, txn(1), fence=7)
    assert replay == Posting(PostResult.REPLAYED, booked.balance_cents, booked.entry_id, T0)
    assert deposit(store, txn(2), fence=7) == Posting(PostResult.FENCED)


def test_without_a_fence_leases_are_not_consulted(store: PgStore, pg_db: str):
    lease(pg_db, fence=8, holder=None)
    assert deposit(store, txn(1)).result is PostResult.BOOKED


PIN_POLICY = PinPolicy(tries_max=3, lockout_ms=60_000)
NEW_PIN = "2580"


def change_pin(store: PgStore, pin: str, fence: int | None) -> PinChangeResult:
    return store.change_pin(DEMO_ACCOUNT, pin, NEW_PIN, T0, PIN_POLICY, fence=fence).result


def test_the_lease_holders_fence_changes_the_pin(store: PgStore, pg_db: str):
    lease(pg_db, fence=7)
    assert change_pin(store, DEMO_PIN, fence=7) is PinChangeResult.CHANGED
    assert store.verify_pin(DEMO_ACCOUNT, NEW_PIN, T0, PIN_POLICY) is PinResult.MATCHED


@pytest.mark.parametrize("pin", [DEMO_PIN, "0000"], ids=["right PIN", "wrong PIN"])
def test_a_stale_fence_changes_no_pin_and_counts_no_failure(
    store: PgStore, pg_db: str, pin: str
):
    """A session whose lease was taken over cannot change the PIN, nor, with a wrong
    one, count a failure against the account that the new session holds."""
    lease(pg_db, fence=8)  # taken over since fence 7 was granted
    assert change_pin(store, pin, fence=7) is PinChangeResult.FENCED
    assert one(pg_db, "SELECT count(*) FROM pin_failures") == 0
    assert store.verify_pin(DEMO_ACCOUNT, DEMO_PIN, T0, PIN_POLICY) is PinResult.MATCHED


def wait_until_blocked(db: str) -> None:
    """Return once one of the store's connections waits for a lock (a row lock)."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    with raw(db) as conn:
        while not conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'bank'"
            " AND wait_event_type = 'Lock')"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the store's write never waited for the lock"
            conn.execute("SELECT pg_sleep(0.01)")


def test_a_takeover_in_progress_makes_the_old_holder_wait_then_fences_it(
    store: PgStore, pg_db: str
):
    """FOR SHARE: the stale holder's write waits for the takeover's commit, then sees
    the new fence, rather than slipping in before it."""
    lease(pg_db, fence=7)
    outcome: list[Posting] = []
    with raw(pg_db) as takeover:
        takeover.execute("BEGIN")
        takeover.execute("UPDATE leases SET fence = fence + 1, holder = 'boot-2'")
        writer = threading.Thread(target=lambda: outcome.append(deposit(store, txn(1), fence=7)))
        writer.start()
        wait_until_blocked(pg_db)
        takeover.execute("COMMIT")
        writer.join(WAIT_TIMEOUT_S)
    assert outcome == [Posting(PostResult.FENCED)]
    assert store.balance(DEMO_ACCOUNT) == OPENING_CENTS


# -- races between processes -------------------------------------------------------------------


def test_the_same_txn_id_booked_meanwhile_by_another_process_is_replayed(
    store: PgStore, pg_db: str
):
    """Another process's transaction with the id is in flight: ours waits at the primary
    key, fails when it commits, and runs again: REPLAYED, money moved once."""
    ours: list[Posting] = []
    with raw(pg_db) as other:
        other.execute("BEGIN")
        other.execute(
            "UPDATE accounts SET balance_cents = balance_cents + 100 WHERE account = %s",
            (DEMO_ACCOUNT,),
        )
        other.execute(
            "INSERT INTO transactions (txn_id, kind, account, amount_cents, time_ms)"
            " VALUES (%s, 1, %s, 100, %s)", (txn(1), DEMO_ACCOUNT, T0 - 5),
        )
        entry_id = other.execute(
            "INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms)"
            " VALUES (%s, %s, 1, 100, %s, %s) RETURNING entry_id",
            (DEMO_ACCOUNT, txn(1), OPENING_CENTS + 100, T0 - 5),
        ).fetchone()[0]
        writer = threading.Thread(target=lambda: ours.append(deposit(store, txn(1))))
        writer.start()
        wait_until_blocked(pg_db)
        other.execute("COMMIT")
        writer.join(WAIT_TIMEOUT_S)
    assert ours == [Posting(PostResult.REPLAYED, OPENING_CENTS + 100, entry_id, T0 - 5)]
    assert store.balance(DEMO_ACCOUNT) == OPENING_CENTS + 100
    assert store.check_invariants() == []


# -- PostgreSQL down, restarted ----------------------------------------------------------------


def test_postgresql_down_at_start_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    url = f"postgresql://bank:s3cret@127.0.0.1:{free_port()}/bank"
    status = main(["--port", "0", "--db", url, "--key-file", str(tmp_path / "bank.key")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("bank: cannot open postgresql://bank:***@127.0.0.1:")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "s3cret" not in err


def test_operator_commands_with_postgresql_down_say_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    url = f"postgresql://bank:s3cret@127.0.0.1:{free_port()}/bank"
    key = tmp_path / "bank.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    for command in (["unlock", DEMO_ACCOUNT, "--key-file", str(key)], ["accounts"]):
        assert main([*command, "--db", url]) == 1
        err = capsys.readouterr().err
        assert err.startswith("bank: cannot use the database postgresql://bank:***@")
        assert err.count("\n") == 1 and "s3cret" not in err


async def test_a_restart_of_postgresql_is_an_outage_the_session_survives(
    pg_cluster: Cluster, pg_db: str, tmp_path: Path, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    ledger = await open_ledger(pg_db, tmp_path / "bank.key")
    try:
        bank = await start_server(nursery, ServerConfig(host="127.0.0.1", port=0), ledger)
        client = await logged_in(bank)
        before = Deposit(uuid.uuid4().bytes, 1_00)
        booked = await client.request(before)
        assert isinstance(booked, DepositReply) and booked.status is Status.APPROVED
        await trio.to_thread.run_sync(pg_cluster.stop)
        try:
            during = await client.request(Deposit(uuid.uuid4().bytes, 2_00))
            assert during.status is Status.ISSUER_UNAVAILABLE
        finally:
            await trio.to_thread.run_sync(pg_cluster.start)
        # The outage's one failure is the project's one ERROR line, no driver warnings.
        said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
        assert len(said) == 1, said
        assert said[0][:2] == ("bank.session", "ERROR")
        assert "storage unavailable during DEPOSIT" in said[0][2]
        # The same session goes on, on a new connection the store opened by itself.
        assert await client.request(before) == booked  # replayed, not booked twice
        after = await client.request(Deposit(uuid.uuid4().bytes, 3_00))
        assert after.status is Status.APPROVED
        assert after.balance_cents == OPENING_CENTS + 1_00 + 3_00
        assert await ledger.check_invariants() == []
        await client.aclose()
    finally:
        await ledger.aclose()


async def test_a_batch_whose_connection_broke_fails_and_the_next_reconnects(
    pg_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A connection killed under the store (as a restart or a failover does): that batch
    is StorageError, whatever it held; the next opens a connection and serves."""
    ledger = await open_ledger(pg_db, tmp_path / "bank.key")
    try:
        assert await ledger.balance(DEMO_ACCOUNT) == OPENING_CENTS
        one(pg_db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'bank'")
        with caplog.at_level(logging.DEBUG, logger="psycopg"), pytest.raises(StorageError):
            await ledger.post(account=DEMO_ACCOUNT, txn_id=txn(1), kind=EntryKind.DEPOSIT,
                              amount_cents=100, limit_cents=AMOUNT_CENTS_MAX)
        # psycopg's "error ignored terminating <Pipeline>" echo of the failure is gone;
        # the failure itself is the StorageError above.
        assert [r.getMessage() for r in caplog.records if r.name == "psycopg"] == []
        posting = await ledger.post(account=DEMO_ACCOUNT, txn_id=txn(1),
                                    kind=EntryKind.DEPOSIT, amount_cents=100,
                                    limit_cents=AMOUNT_CENTS_MAX)
        assert posting.result is PostResult.BOOKED  # the lost batch had not committed
    finally:
        await ledger.aclose()


def test_only_psycopgs_echo_of_a_lost_connection_is_dropped(
    caplog: pytest.LogCaptureFixture,
):
    """The filter drops the pipeline's 'error ignored' warning for a lost connection,
    never another error it ignored, nor any other psycopg record."""
    psycopg_log = logging.getLogger("psycopg")
    with caplog.at_level(logging.WARNING, logger="psycopg"):
        psycopg_log.warning("error ignored terminating %r: %s", "<Pipeline>",
                            psycopg.OperationalError("the connection is lost"))
        psycopg_log.warning("error ignored terminating %r: %s", "<Pipeline>",
                            psycopg.errors.UniqueViolation("duplicate key"))
        psycopg_log.warning("some other warning: %s",
                            psycopg.OperationalError("the connection is lost"))
    assert [r.getMessage() for r in caplog.records] == [
        "error ignored terminating '<Pipeline>': duplicate key",
        "some other warning: the connection is lost",
    ]


def test_a_batch_request_carries_its_fence(store: PgStore, pg_db: str):
    lease(pg_db, fence=3)
    outcomes = store.execute_batch(
        [
            PostRequest(DEMO_ACCOUNT, txn(1), EntryKind.DEPOSIT, 100, AMOUNT_CENTS_MAX, fence=3),
            PostRequest(DEMO_ACCOUNT, txn(2), EntryKind.DEPOSIT, 100, AMOUNT_CENTS_MAX, fence=2),
        ],
        T0,
    )
    assert [outcome.result for outcome in outcomes] == [PostResult.BOOKED, PostResult.FENCED]


def txn(n: int) -> bytes:
    return n.to_bytes(16, "big")


# -- a batch's posts as one statement over arrays ----------------------------------------------


def independent_posts() -> list[PostRequest]:
    """A post of every outcome, each on an account of its own, and a PIN check."""
    limit = AMOUNT_CENTS_MAX
    return [
        PostRequest("AC-12345", txn(10), EntryKind.DEPOSIT, 5_00, limit),  # booked
        PostRequest("BC-01373", txn(11), EntryKind.WITHDRAWAL, 45_73, limit),  # overdraft
        PostRequest("QQ-00000", txn(12), EntryKind.DEPOSIT, 1_00, limit),  # no such account
        PostRequest("WF-14351", txn(13), EntryKind.WITHDRAWAL, 2_00, 1_00),  # over the limit
        PostRequest("TN-13731", txn(1), EntryKind.DEPOSIT, 1_00, limit),  # replayed
        PostRequest("FE-63912", txn(2), EntryKind.DEPOSIT, 9_99, limit),  # id reused
        PostRequest("KH-10406", txn(14), EntryKind.WITHDRAWAL, 6_00, limit, fence=9),  # fenced
        PostRequest("RR-00001", txn(15), EntryKind.DEPOSIT, 2, limit),  # balance full
        PostRequest("ZZ-99999", txn(16), EntryKind.WITHDRAWAL, 655_35, limit),  # the whole
    ]


def run_independent_posts(db: str) -> list[Any]:
    with PgStore(db, KEY) as store:
        store.add_account("RR-00001", "1111", BALANCE_CENTS_MAX - 1)
        store.post(account="TN-13731", txn_id=txn(1), kind=EntryKind.DEPOSIT, amount_cents=1_00,
                   now_ms=T0 - 1, limit_cents=AMOUNT_CENTS_MAX)
        store.post(account="FE-63912", txn_id=txn(2), kind=EntryKind.DEPOSIT, amount_cents=1_00,
                   now_ms=T0 - 1, limit_cents=AMOUNT_CENTS_MAX)
        outcomes = store.execute_batch(independent_posts(), T0)
        assert store.check_invariants() == []
        return [*outcomes, read_books(db)]


def test_independent_posts_run_as_one_statement_with_the_outcomes_of_one_each(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
):
    statements: list[str] = []
    execute = psycopg.Connection.execute

    def counting(conn: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        statements.append(str(query))
        return execute(conn, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)
    grouped = run_independent_posts(pg_cluster.new_database())
    assert sum("unnest" in statement for statement in statements) == 1
    monkeypatch.setattr(pg_store, "GROUPED_POSTS_MIN", len(independent_posts()) + 1)
    statements.clear()
    one_each = run_independent_posts(pg_cluster.new_database())
    assert not any("unnest" in statement for statement in statements)
    assert [type(o) for o in grouped] == [type(o) for o in one_each]
    assert [o for o in grouped if not isinstance(o, Exception)] == [
        o for o in one_each if not isinstance(o, Exception)
    ]
    assert [o.result for o in grouped[:2]] == [PostResult.BOOKED, PostResult.INSUFFICIENT_FUNDS]
    assert isinstance(grouped[2], UnknownAccount)
    assert [o.result for o in grouped[3:9]] == [
        PostResult.OVER_LIMIT, PostResult.REPLAYED, PostResult.TXN_ID_REUSED,
        PostResult.FENCED, PostResult.BALANCE_FULL, PostResult.BOOKED,
    ]


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (PostRequest(DEMO_ACCOUNT, txn(2), EntryKind.WITHDRAWAL, OPENING_CENTS + 1, 10**12),
         PostResult.BOOKED),  # only with the deposit before it
        (PostRequest("WF-14351", txn(1), EntryKind.DEPOSIT, 1, 10**12),
         PostResult.TXN_ID_REUSED),  # only once the first is booked
    ],
    ids=["same account", "same txn id"],
)
def test_posts_that_see_each_other_run_in_order(
    store: PgStore, second: PostRequest, expected: PostResult
):
    """A withdrawal of a deposit made in the same batch, or the same id twice: one
    statement has one snapshot, so these run one statement each, in order."""
    first = PostRequest(DEMO_ACCOUNT, txn(1), EntryKind.DEPOSIT, 1, 10**12)
    outcomes = store.execute_batch([first, second, BalanceQuery("WF-14351")], T0)
    assert [outcomes[0].result, outcomes[1].result] == [PostResult.BOOKED, expected]
    assert store.check_invariants() == []


# -- a batch's balance reads as one statement over an array --------------------------------


def statements_of(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every statement the stores send from now on, with its parameters."""
    sent: list[tuple[str, Any]] = []
    execute = psycopg.Connection.execute

    def recording(conn: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        sent.append((str(query), params))
        return execute(conn, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", recording)
    return sent


def grouped_reads(sent: list[tuple[str, Any]]) -> list[list[str]]:
    """The account arrays of the grouped BALANCE statements among ``sent``."""
    return [params["account"] for sql, params in sent if "WITH ORDINALITY" in sql]


def test_balances_read_together_each_see_the_batch_at_their_own_place(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
):
    """Reads of accounts that nothing earlier in the batch writes go in one statement;
    a read after a post or a transfer of its account sees it, one before does not. The
    same batch with every read its own statement answers the same."""
    limit = AMOUNT_CENTS_MAX
    batch = [
        BalanceQuery("AC-12345"),  # before the deposit to it
        BalanceQuery("WF-14351"),  # before the transfer to it
        PostRequest("AC-12345", txn(1), EntryKind.DEPOSIT, 5_00, limit),
        BalanceQuery("AC-12345"),  # after the deposit
        TransferRequest("TN-13731", txn(2), "WF-14351", 1_00, limit, DESTINATIONS),
        BalanceQuery("WF-14351"),  # after the transfer in
        BalanceQuery("TN-13731"),  # after the transfer out
        BalanceQuery("FE-63912"),  # after writes of other accounts only
        PostRequest("AC-12345", txn(3), EntryKind.WITHDRAWAL, 2_00, limit),
        BalanceQuery("AC-12345"),  # after the withdrawal too
        BalanceQuery("KH-10406"),
    ]
    sent = statements_of(monkeypatch)
    with PgStore(pg_cluster.new_database(), KEY) as store:
        together = store.execute_batch(batch, T0)
        assert store.check_invariants() == []
    assert together == [
        102_432,
        542_822,
        Posting(PostResult.BOOKED, 102_932, 1, T0),
        102_932,
        Posting(PostResult.BOOKED, 646_175, 2, T0),  # entries 2 (source) and 3
        542_922,
        646_175,
        249_912,
        Posting(PostResult.BOOKED, 102_732, 4, T0),
        102_732,
        1_532_789,
    ]
    assert grouped_reads(sent) == [["AC-12345", "WF-14351", "FE-63912", "KH-10406"]]
    monkeypatch.setattr(pg_store, "GROUPED_BALANCES_MIN", len(batch) + 1)
    sent.clear()
    with PgStore(pg_cluster.new_database(), KEY) as store:
        one_each = store.execute_batch(batch, T0)
    assert grouped_reads(sent) == []
    assert one_each == together


def test_an_unknown_account_among_balances_read_together_is_answered_as_alone(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
):
    """An account that does not exist, among known ones read in one statement (beside
    posts in one statement too, as the bench's mix makes them), is UnknownAccount, and
    a malformed number a ValueError, as when each read is its own statement."""
    limit = AMOUNT_CENTS_MAX
    batch = [
        BalanceQuery("AC-12345"),
        PostRequest("WF-14351", txn(1), EntryKind.DEPOSIT, 1_00, limit),
        BalanceQuery("QQ-00000"),  # no such account
        PostRequest("TN-13731", txn(2), EntryKind.WITHDRAWAL, 1_00, limit),
        BalanceQuery("not an account"),
        BalanceQuery("BC-01373"),
        BalanceQuery("QQ-00000"),
        BalanceQuery("ZZ-99999"),
    ]

    def run(db: str) -> list[Any]:
        with PgStore(db, KEY) as store:
            outcomes = store.execute_batch(batch, T0)
            assert store.check_invariants() == []
        return outcomes

    sent = statements_of(monkeypatch)
    together = run(pg_cluster.new_database())
    assert grouped_reads(sent) == [["AC-12345", "QQ-00000", "BC-01373", "QQ-00000", "ZZ-99999"]]
    assert sum("unnest" in sql for sql, _ in sent) == 2  # the posts' and the reads'
    monkeypatch.setattr(pg_store, "GROUPED_BALANCES_MIN", len(batch) + 1)
    monkeypatch.setattr(pg_store, "GROUPED_POSTS_MIN", len(batch) + 1)
    sent.clear()
    one_each = run(pg_cluster.new_database())
    assert not any("unnest" in sql for sql, _ in sent)
    for outcome in (together, one_each):
        assert [outcome[i] for i in (0, 5, 7)] == [102_432, 4_572, 65_535]
        assert [outcome[i].result for i in (1, 3)] == [PostResult.BOOKED, PostResult.BOOKED]
        assert isinstance(outcome[4], ValueError)
        for i in (2, 6):
            assert isinstance(outcome[i], UnknownAccount) and outcome[i].account == "QQ-00000"
    assert [(type(o), str(o)) for o in together] == [(type(o), str(o)) for o in one_each]


def test_a_transfer_is_fenced_by_its_source_lease_not_its_destinations(
    store: PgStore, pg_db: str
):
    lease(pg_db, fence=5)  # the source's
    lease(pg_db, fence=9, account="WF-14351")  # the destination is another session's
    moved = store.transfer(account=DEMO_ACCOUNT, txn_id=txn(1), to_account="WF-14351",
                           amount_cents=100, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, fence=5,
                           policy=DESTINATIONS)
    assert moved.result is PostResult.BOOKED
    lease(pg_db, fence=6)  # taken over
    stale = store.transfer(account=DEMO_ACCOUNT, txn_id=txn(2), to_account="WF-14351",
                           amount_cents=100, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, fence=5,
                           policy=DESTINATIONS)
    assert stale == Posting(PostResult.FENCED)
    replay = store.transfer(account=DEMO_ACCOUNT, txn_id=txn(1), to_account="WF-14351",
                            amount_cents=100, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, fence=5,
                           policy=DESTINATIONS)
    assert replay.result is PostResult.REPLAYED and replay.entry_id == moved.entry_id
    assert store.balance(DEMO_ACCOUNT) == OPENING_CENTS - 100
    assert store.check_invariants() == []


def test_opposite_transfers_from_two_processes_conserve_money(pg_db: str):
    """Two stores (two processes' connections) moving money both ways between the same
    two accounts at once: their rows are locked in account order, so each batch waits
    its turn, and every cent is where the books say."""
    with PgStore(pg_db, KEY) as first, PgStore(pg_db, KEY) as second:
        total = first.balance(DEMO_ACCOUNT) + first.balance("WF-14351")

        def shuttle(store: PgStore, source: str, destination: str, base: int) -> None:
            for n in range(30):
                store.transfer(account=source, txn_id=txn(base + n), to_account=destination,
                               amount_cents=1_00 + n, now_ms=T0, limit_cents=AMOUNT_CENTS_MAX,
                               policy=DESTINATIONS)

        threads = [
            threading.Thread(target=shuttle, args=(first, DEMO_ACCOUNT, "WF-14351", 1_000)),
            threading.Thread(target=shuttle, args=(second, "WF-14351", DEMO_ACCOUNT, 2_000)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_TIMEOUT_S)
        assert first.balance(DEMO_ACCOUNT) + first.balance("WF-14351") == total
        assert first.check_invariants() == []
        assert one(pg_db, "SELECT count(*) FROM transactions") == 60
