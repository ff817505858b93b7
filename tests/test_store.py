"""The synchronous stores: schema, seeding, PINs, lockout, postings, invariants, and
``read_books``, the read-only view of the ledger from outside a Store.

Every test that takes ``store`` or ``any_db`` runs twice, on SQLite (``bank.store.Store``,
a fresh file in tmp_path) and on PostgreSQL (``bank.pg_store.PgStore``, a fresh schema in
the session's throwaway cluster): one suite, one set of money rules. What only SQLite has
(pragmas, its migrations, the WAL, its files) takes ``sqlite_store`` or ``db_path``;
PostgreSQL's own (fencing, migrations, reconnection) is in test_pg_store.py. Times are
plain integers passed as ``now_ms``, so lock expiry is tested without waiting.
"""

import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from bank.accounts_file import AccountRecord, parse_accounts
from bank.ledger import (
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    PinVerdict,
    Posting,
    PostResult,
)
from bank.limits import LOCKOUT_MS_MAX
from bank.pg_store import PgStore
from bank.pins import KEY_BYTES, PIN_HMAC_BYTES, SALT_BYTES, hash_pin
from bank.store import (
    _ENTRIES_V4,
    _TRANSACTIONS_V4,
    DEMO_ACCOUNTS,
    PIN_FAILURES_PRUNED_MAX,
    SCHEMA_VERSION,
    AccountExists,
    BalanceQuery,
    BatchAborted,
    BookEntry,
    DestinationPolicy,
    Forgotten,
    PinCheck,
    PinPolicy,
    PostRequest,
    SchemaError,
    Store,
    TransferRequest,
    UnknownAccount,
    read_accounts_summary,
    read_books,
)
from tests.helpers import DESTINATIONS
from tests.pg import open_store, raw
from wire import EntryKind, HistoryEntry
from wire._limits import AMOUNT_CENTS_MAX, BALANCE_CENTS_MAX

KEY = bytes(range(KEY_BYTES))
OTHER_KEY = bytes(KEY_BYTES)
T0 = 1_700_000_000_000
LOCKOUT_MS = 15 * 60 * 1000
POLICY = PinPolicy(tries_max=3, lockout_ms=LOCKOUT_MS)
DEPOSIT = EntryKind.DEPOSIT
WITHDRAWAL = EntryKind.WITHDRAWAL


def txn(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "bank.db"


@pytest.fixture
def store(any_db: str) -> Iterator[Store | PgStore]:
    with open_store(any_db, KEY) as opened:
        yield opened


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[Store]:
    with Store(db_path, KEY) as opened:
        yield opened


def raw_sqlite(db_path: Path) -> closing[sqlite3.Connection]:
    """A second connection, as a hand edit or another tool would use; closed on exit."""
    return closing(sqlite3.connect(db_path, isolation_level=None))


AnyStore = Store | PgStore


def select(store: AnyStore, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a parameterless SELECT on the store's own connection (either driver)."""
    conn = store._conn
    assert conn is not None
    return list(conn.execute(sql).fetchall())


def post(
    store: AnyStore,
    n: int,
    kind: EntryKind,
    amount_cents: int,
    *,
    account: str = "AC-12345",
    now_ms: int = T0,
) -> Posting:
    return store.post(
        account=account, txn_id=txn(n), kind=kind, amount_cents=amount_cents, now_ms=now_ms,
        limit_cents=AMOUNT_CENTS_MAX,
    )


def entry_count(store: AnyStore) -> int:
    return select(store, "SELECT count(*) FROM entries")[0][0]


# -- schema, pragmas, seeding -------------------------------------------------------------


def test_pragmas(sqlite_store: Store):
    conn = sqlite_store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_schema_tables(sqlite_store: Store):
    tables = {
        name
        for (name,) in sqlite_store._conn.execute(
            "SELECT name FROM sqlite_schema WHERE type='table'"
        )
    }
    assert {"accounts", "entries", "pin_failures"} <= tables
    assert sqlite_store.integrity_ok()


def test_demo_accounts_are_seeded(store: AnyStore):
    assert len(DEMO_ACCOUNTS) == 7
    for account, pin, balance_cents in DEMO_ACCOUNTS:
        assert store.balance(account) == balance_cents
        assert store.balance(account.lower()) == balance_cents
        assert store.verify_pin(account.lower(), pin, T0, POLICY) is PinResult.MATCHED
    assert store.balance("AC-12345") == 102_432
    assert store.balance("ZZ-99999") == 65_535
    assert store.check_invariants() == []


def test_reopening_keeps_data_and_does_not_reseed(any_db: str):
    with open_store(any_db, KEY) as store:
        assert post(store, 1, WITHDRAWAL, 432).result is PostResult.BOOKED
        store.reset_pin("AC-12345", "0000")
    with open_store(any_db, KEY) as store:
        assert not store.created
        assert store.balance("AC-12345") == 102_000
        assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.MATCHED
        assert store.history("AC-12345", 10)[0].amount_cents == 432


def test_empty_database_without_demo_accounts(any_db: str):
    with open_store(any_db, KEY, seed_demo=False) as store:
        assert store.created and store.seeded == ()
        with pytest.raises(UnknownAccount):
            store.balance("AC-12345")
        assert store.check_invariants() == []


def test_newer_schema_is_refused(db_path: Path):
    Store(db_path, KEY).close()
    with raw_sqlite(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError):
        Store(db_path, KEY)


SCHEMA_5_DOWNGRADE = f"""
ALTER TABLE transactions RENAME TO transactions_v6;
{_TRANSACTIONS_V4};
INSERT INTO transactions
    (rowid, txn_id, kind, account, counterparty, amount_cents, time_ms, terminal)
    SELECT txn_no, txn_id, kind, account, counterparty, amount_cents, time_ms, terminal
    FROM transactions_v6;
ALTER TABLE entries RENAME TO entries_v6;
{_ENTRIES_V4.replace("CREATE TABLE entries (", "CREATE TABLE entries_v5 (")};
INSERT INTO entries_v5
    SELECT e.entry_id, e.account, t.txn_id, e.kind, e.amount_cents, e.balance_cents,
        e.time_ms, e.terminal
    FROM entries_v6 AS e JOIN transactions_v6 AS t ON t.txn_no = e.txn_no;
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name = 'entries_v6')
    WHERE name = 'entries_v5';
DROP TABLE entries_v6;
DROP TABLE transactions_v6;
ALTER TABLE entries_v5 RENAME TO entries;
CREATE INDEX entries_by_account ON entries (account, entry_id);
PRAGMA user_version = 5;
"""
"""Takes a version 6 database back to version 5: entries name their transaction by its
16-byte id, and a transaction's number is only its rowid (a plain connection, as a tool's,
has foreign keys off, so the tables can be dropped in any order)."""


def test_a_version_5_database_is_migrated_and_keeps_every_transaction_and_entry(
    db_path: Path,
):
    with Store(db_path, KEY) as store:
        deposit = post(store, 1, DEPOSIT, 100)
        withdrawal = store.post(
            account="WF-14351", txn_id=txn(2), kind=WITHDRAWAL, amount_cents=300,
            now_ms=T0 + 1, limit_cents=AMOUNT_CENTS_MAX, terminal="CN=atm-0042",
        )
        moved = transfer(store, 3, 500)
    books = read_books(db_path)
    with raw_sqlite(db_path) as conn:
        conn.executescript(SCHEMA_5_DOWNGRADE)
        numbers = conn.execute("SELECT rowid, txn_id FROM transactions ORDER BY rowid").fetchall()
    with pytest.raises(SchemaError, match="older than"):  # readers migrate nothing
        read_books(db_path)
    with Store(db_path, KEY) as store:
        conn = store._conn
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT txn_no, txn_id FROM transactions ORDER BY txn_no"
                            ).fetchall() == numbers
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert store.integrity_ok() and store.check_invariants() == []
        # Retries of the migrated transactions are still recognised, with their receipts.
        assert post(store, 1, DEPOSIT, 100) == dataclasses.replace(
            deposit, result=PostResult.REPLAYED
        )
        assert store.post(
            account="WF-14351", txn_id=txn(2), kind=WITHDRAWAL, amount_cents=300,
            now_ms=T0 + 2, limit_cents=AMOUNT_CENTS_MAX,
        ) == dataclasses.replace(withdrawal, result=PostResult.REPLAYED)
        assert transfer(store, 3, 500) == dataclasses.replace(moved, result=PostResult.REPLAYED)
        # Entries are unique per transaction and account on the number, not the id.
        unique = [
            [column for _, _, column in conn.execute(f"PRAGMA index_info('{name}')")]
            for _, name, is_unique, *_ in conn.execute("PRAGMA index_list('entries')")
            if is_unique
        ]
        assert unique == [["txn_no", "account"]]
        # Entry ids keep rising past the migrated ones.
        assert post(store, 4, DEPOSIT, 100).entry_id > moved.entry_id + 1
    assert read_books(db_path).entries[: len(books.entries)] == books.entries


def test_a_version_5_entry_of_no_transaction_stops_the_migration_and_changes_nothing(
    db_path: Path,
):
    with Store(db_path, KEY) as store:
        post(store, 1, DEPOSIT, 100)
    with raw_sqlite(db_path) as conn:  # a hand edit, foreign keys off: an entry of no txn
        conn.executescript(SCHEMA_5_DOWNGRADE)
        conn.execute(
            "INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms)"
            " VALUES ('AC-12345', ?, 1, 1, 102533, 0)", (txn(9),),
        )
        before = conn.execute("SELECT * FROM entries ORDER BY entry_id").fetchall()
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        Store(db_path, KEY)
    with raw_sqlite(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (5,)
        assert conn.execute("SELECT * FROM entries ORDER BY entry_id").fetchall() == before


SCHEMA_4_DOWNGRADE = SCHEMA_5_DOWNGRADE.replace("PRAGMA user_version = 5;", "") + """
DROP INDEX destination_misses_by_age;
DROP TABLE destination_misses;
PRAGMA user_version = 4;
"""
"""Takes a version 6 database back to version 4: no count of transfers to no account."""


def test_a_version_4_database_is_migrated_and_starts_counting_transfer_misses(db_path: Path):
    with Store(db_path, KEY) as store:
        moved = transfer(store, 1, 500)
    with raw_sqlite(db_path) as conn:
        conn.executescript(SCHEMA_4_DOWNGRADE)
    with pytest.raises(SchemaError, match="older than"):  # readers migrate nothing
        read_books(db_path)
    policy = DestinationPolicy(tries_max=2, lockout_ms=LOCKOUT_MS)
    with Store(db_path, KEY) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert transfer(store, 1, 500) == dataclasses.replace(moved, result=PostResult.REPLAYED)
        assert miss(store, 2, policy=policy).result is PostResult.UNKNOWN_DESTINATION
        assert miss(store, 3, policy=policy).result is PostResult.TRANSFERS_LOCKED
        assert store.check_invariants() == []
        assert store.integrity_ok()
    assert [s.transfers_locked_until_ms for s in read_accounts_summary(db_path)
            if s.account == "AC-12345"] == [T0 + LOCKOUT_MS]


SCHEMA_3_DOWNGRADE = SCHEMA_4_DOWNGRADE.replace("PRAGMA user_version = 4;", "") + """
CREATE TABLE entries_v3 (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES accounts (account),
    txn_id BLOB NOT NULL UNIQUE CHECK (length(txn_id) = 16),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2)),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0),
    time_ms INTEGER NOT NULL CHECK (time_ms >= 0),
    terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80)
) STRICT;
INSERT INTO entries_v3 SELECT entry_id, account, txn_id, kind, amount_cents, balance_cents,
    time_ms, terminal FROM entries;
DROP TABLE entries;
DROP TABLE transactions;
ALTER TABLE entries_v3 RENAME TO entries;
CREATE INDEX entries_by_account ON entries (account, entry_id);
PRAGMA user_version = 3;
"""
"""Takes a version 6 database (with deposits and withdrawals only) back to version 3:
entries as they were, each txn_id unique, and no transactions table."""


def test_a_version_3_database_is_migrated_with_every_entry_a_transaction(db_path: Path):
    with Store(db_path, KEY) as store:
        deposit = post(store, 1, DEPOSIT, 100)
        withdrawal = store.post(
            account="WF-14351", txn_id=txn(2), kind=WITHDRAWAL, amount_cents=300, now_ms=T0 + 1,
            limit_cents=AMOUNT_CENTS_MAX, terminal="CN=atm-0042",
        )
    with raw_sqlite(db_path) as conn:
        conn.executescript(SCHEMA_3_DOWNGRADE)
    with raw_sqlite(db_path) as conn:
        before = conn.execute("SELECT * FROM entries ORDER BY entry_id").fetchall()
    with pytest.raises(SchemaError, match="older than"):  # readers migrate nothing
        read_books(db_path)
    with Store(db_path, KEY) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        rows = store._conn.execute(
            "SELECT txn_id, kind, account, counterparty, amount_cents, time_ms, terminal"
            " FROM transactions ORDER BY txn_id"
        ).fetchall()
        assert rows == [
            (txn(1), 1, "AC-12345", None, 100, T0, None),
            (txn(2), 2, "WF-14351", None, 300, T0 + 1, "CN=atm-0042"),
        ]
        # Retries of the migrated transactions are still recognised.
        assert post(store, 1, DEPOSIT, 100) == dataclasses.replace(
            deposit, result=PostResult.REPLAYED
        )
        assert post(store, 2, DEPOSIT, 300).result is PostResult.TXN_ID_REUSED
        # Entry ids keep rising past the migrated ones, and a transfer books both legs.
        moved = store.transfer(
            account="AC-12345", txn_id=txn(3), to_account="WF-14351", amount_cents=50,
            now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, policy=DESTINATIONS,
        )
        assert moved.result is PostResult.BOOKED
        assert moved.entry_id > withdrawal.entry_id
        assert store.check_invariants() == []
        assert store.integrity_ok()
    with raw_sqlite(db_path) as conn:  # the entries of version 3, their ids now by number
        after = conn.execute(
            "SELECT e.entry_id, e.account, t.txn_id, e.kind, e.amount_cents, e.balance_cents,"
            " e.time_ms, e.terminal FROM entries AS e JOIN transactions AS t"
            " ON t.txn_no = e.txn_no ORDER BY e.entry_id"
        ).fetchall()
    assert after[:2] == before


def test_a_version_1_database_is_migrated_and_its_locks_kept(db_path: Path):
    Store(db_path, KEY).close()
    with raw_sqlite(db_path) as conn:  # back to version 1: pin_failures without its time column
        conn.executescript(SCHEMA_3_DOWNGRADE)
        conn.executescript(
            """
            ALTER TABLE entries DROP COLUMN terminal;
            DROP INDEX pin_failures_by_age;
            DROP TABLE pin_failures;
            CREATE TABLE pin_failures (
                account TEXT PRIMARY KEY,
                failures INTEGER NOT NULL CHECK (failures > 0),
                locked_until_ms INTEGER
            ) STRICT;
            PRAGMA user_version = 1;
            """
        )
        conn.execute("INSERT INTO pin_failures VALUES ('AC-12345', 3, ?)", (T0 + 60_000,))
        conn.execute("INSERT INTO pin_failures VALUES ('BC-01373', 2, NULL)")
    with Store(db_path, KEY) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        for n in range(PIN_FAILURES_PRUNED_MAX * 3):  # prunes what is forgotten, not locks
            store.verify_pin(f"QQ-{n:05d}", "0000", T0, POLICY)
        assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.LOCKED
        # A count from version 1 has no time: it is forgotten, so one more miss is only one.
        assert store.verify_pin("BC-01373", "0000", T0, POLICY) is PinResult.WRONG
        assert store.verify_pin("BC-01373", "0000", T0, POLICY) is PinResult.WRONG
        assert store.integrity_ok()


def test_a_version_2_database_is_migrated_and_new_entries_name_their_terminal(
    db_path: Path,
):
    with Store(db_path, KEY) as store:
        before = post(store, 1, DEPOSIT, 100)
    with raw_sqlite(db_path) as conn:  # back to version 2: entries without their terminal
        conn.executescript(SCHEMA_3_DOWNGRADE)
        conn.executescript("ALTER TABLE entries DROP COLUMN terminal; PRAGMA user_version = 2;")
    with Store(db_path, KEY) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        after = store.post(
            account="AC-12345", txn_id=bytes([2]) * 16, kind=DEPOSIT, amount_cents=100,
            now_ms=T0, limit_cents=AMOUNT_CENTS_MAX, terminal="CN=atm-0042",
        )
        assert store.integrity_ok()
    terminals = {entry.entry_id: entry.terminal for entry in read_books(db_path).entries}
    assert terminals == {before.entry_id: None, after.entry_id: "CN=atm-0042"}


def test_close_checkpoints_the_wal_and_is_idempotent(db_path: Path):
    store = Store(db_path, KEY)
    post(store, 1, DEPOSIT, 100)
    store.close()
    store.close()
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with pytest.raises(sqlite3.ProgrammingError):
        store.balance("AC-12345")


# -- PINs are never stored in plaintext ---------------------------------------------------


def test_pin_columns_hold_salt_and_hmac(store: AnyStore):
    rows = select(store, "SELECT account, pin_salt, pin_hmac FROM accounts")
    pins = {account: pin for account, pin, _ in DEMO_ACCOUNTS}
    salts = set()
    for account, salt, pin_hmac in rows:
        assert isinstance(salt, bytes) and len(salt) == SALT_BYTES
        assert isinstance(pin_hmac, bytes) and len(pin_hmac) == PIN_HMAC_BYTES
        assert pin_hmac == hash_pin(KEY, salt, account, pins[account])
        salts.add(salt)
    assert len(salts) == len(rows)  # one random salt per account


def every_cell(store: AnyStore) -> list[object]:
    tables = ["accounts", "entries", "pin_failures"]
    return [cell for table in tables for row in select(store, f"SELECT * FROM {table}")
            for cell in row]


def test_no_cell_holds_a_plaintext_pin(store: AnyStore):
    for account, pin, _ in DEMO_ACCOUNTS:
        store.verify_pin(account, pin, T0, POLICY)
        store.verify_pin(account, "0000", T0, POLICY)  # failures are recorded too
    cells = every_cell(store)
    for _, pin, _ in DEMO_ACCOUNTS:
        assert pin not in cells and pin.encode() not in cells and int(pin) not in cells


def test_no_cell_and_no_file_byte_holds_a_plaintext_pin(db_path: Path):
    store = Store(db_path, KEY)
    for account, pin, _ in DEMO_ACCOUNTS:
        store.verify_pin(account, pin, T0, POLICY)
        store.verify_pin(account, "0000", T0, POLICY)  # failures are recorded too
    cells = every_cell(store)
    store.close()
    contents = b"".join(p.read_bytes() for p in db_path.parent.iterdir())
    for account, _, _ in DEMO_ACCOUNTS:  # "ZZ-99999" contains the PIN "9999"
        contents = contents.replace(account.encode(), b"")
    for _, pin, _ in DEMO_ACCOUNTS:
        assert pin not in cells and pin.encode() not in cells and int(pin) not in cells
        assert pin.encode() not in contents


def test_a_different_key_fails_every_pin(any_db: str):
    open_store(any_db, KEY).close()
    with open_store(any_db, OTHER_KEY) as store:
        for account, pin, _ in DEMO_ACCOUNTS:
            assert store.verify_pin(account, pin, T0, POLICY) is PinResult.WRONG


# -- PIN failures and lockout --------------------------------------------------------------


def test_third_failure_locks_and_even_the_right_pin_is_refused(store: AnyStore):
    assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.WRONG
    assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.WRONG
    assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", T0 + LOCKOUT_MS - 1, POLICY) is PinResult.LOCKED
    assert store.verify_pin("WF-14351", "9834", T0, POLICY) is PinResult.MATCHED  # not others


def test_success_resets_the_count(store: AnyStore):
    for _ in range(3):
        assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.WRONG
        assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.WRONG
        assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.MATCHED


def test_lock_expires(store: AnyStore):
    for _ in range(3):
        store.verify_pin("AC-12345", "0000", T0, POLICY)
    assert store.verify_pin("AC-12345", "1324", T0 + LOCKOUT_MS, POLICY) is PinResult.MATCHED


def test_an_expired_lock_starts_a_fresh_count(store: AnyStore):
    for _ in range(3):
        store.verify_pin("AC-12345", "0000", T0, POLICY)
    later = T0 + LOCKOUT_MS
    assert store.verify_pin("AC-12345", "0000", later, POLICY) is PinResult.WRONG
    assert store.verify_pin("AC-12345", "0000", later, POLICY) is PinResult.WRONG
    assert store.verify_pin("AC-12345", "0000", later, POLICY) is PinResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", later + 1, POLICY) is PinResult.LOCKED


def test_the_policy_comes_with_each_check(store: AnyStore):
    policy = PinPolicy(tries_max=1, lockout_ms=10)
    assert store.verify_pin("AC-12345", "0000", T0, policy) is PinResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", T0 + 9, policy) is PinResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", T0 + 10, policy) is PinResult.MATCHED


def test_operator_unlock(store: AnyStore):
    for _ in range(3):
        store.verify_pin("ac-12345", "0000", T0, POLICY)
    assert store.unlock("ac-12345") == Forgotten(3, T0 + POLICY.lockout_ms)
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.MATCHED
    assert store.unlock("AC-12345") == Forgotten(0, None)
    with pytest.raises(UnknownAccount):
        store.unlock("QQ-00000")


def test_reset_pin_replaces_the_pin_and_lifts_the_lock(store: AnyStore):
    for _ in range(3):
        store.verify_pin("AC-12345", "0000", T0, POLICY)
    store.reset_pin("ac-12345", "4321")
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.WRONG
    assert store.verify_pin("AC-12345", "4321", T0, POLICY) is PinResult.MATCHED
    with pytest.raises(UnknownAccount):
        store.reset_pin("QQ-00000", "4321")
    with pytest.raises(ValueError):
        store.reset_pin("AC-12345", "43210")


def test_unknown_account_locks_like_a_real_one(store: AnyStore):
    real = [store.verify_pin("AC-12345", "0000", T0, POLICY) for _ in range(4)]
    unknown = [store.verify_pin("qq-00000", "0000", T0, POLICY) for _ in range(4)]
    assert (
        real
        == unknown
        == [
            PinResult.WRONG,
            PinResult.WRONG,
            PinResult.LOCKED,
            PinResult.LOCKED,
        ]
    )
    rows = {
        account: (failures, locked, last)
        for account, failures, locked, last in select(
            store, "SELECT account, failures, locked_until_ms, last_failure_ms FROM pin_failures"
        )
    }
    assert rows == {
        "AC-12345": (3, T0 + LOCKOUT_MS, T0),
        "QQ-00000": (3, T0 + LOCKOUT_MS, T0),
    }
    assert store.verify_pin("QQ-00000", "0000", T0 + LOCKOUT_MS, POLICY) is PinResult.WRONG


def test_wrong_pins_older_than_the_lockout_period_are_forgotten(store: AnyStore):
    for account in ("AC-12345", "BC-01373"):
        assert store.verify_pin(account, "0000", T0, POLICY) is PinResult.WRONG
        assert store.verify_pin(account, "0000", T0 + 1, POLICY) is PinResult.WRONG
    # The third miss within the period locks; a period after the last miss, it is a first.
    assert store.verify_pin("AC-12345", "0000", T0 + LOCKOUT_MS, POLICY) is PinResult.LOCKED
    assert store.verify_pin("BC-01373", "0000", T0 + 1 + LOCKOUT_MS, POLICY) is PinResult.WRONG


def test_a_lockout_of_zero_turns_locking_off(store: AnyStore):
    policy = PinPolicy(tries_max=3, lockout_ms=0)
    statuses = {store.verify_pin("AC-12345", "0000", T0, policy) for _ in range(5)}
    assert statuses == {PinResult.WRONG}
    assert store.verify_pin("AC-12345", "1324", T0, policy) is PinResult.MATCHED


@pytest.mark.parametrize(
    ("tries_max", "lockout_ms"), [(0, LOCKOUT_MS), (3, -1), (3, LOCKOUT_MS_MAX + 1), (3, 2**63)]
)
def test_impossible_pin_settings_are_refused(tries_max: int, lockout_ms: int):
    with pytest.raises(ValueError, match=r"pin_tries_max|lockout_ms"):
        PinPolicy(tries_max=tries_max, lockout_ms=lockout_ms)


@pytest.mark.parametrize("now_ms", [T0, 253_402_300_799_999])  # now, and the end of year 9999
def test_the_longest_lockout_still_counts_wrong_pins_and_locks(store: AnyStore, now_ms: int):
    policy = PinPolicy(tries_max=3, lockout_ms=LOCKOUT_MS_MAX)
    wrong = [PinCheck("AC-12345", "0000", policy)] * 3
    deposit = PostRequest("WF-14351", txn(1), DEPOSIT, 100, AMOUNT_CENTS_MAX)
    outcomes = store.execute_batch([*wrong, BalanceQuery("AC-12345"), deposit], now_ms)
    locked_until = now_ms + LOCKOUT_MS_MAX
    assert outcomes == [
        PinVerdict(PinResult.WRONG),
        PinVerdict(PinResult.WRONG),
        PinVerdict(PinResult.LOCKED, locked_until_ms=locked_until),
        102_432,
        Posting(PostResult.BOOKED, 542_922, 1, now_ms),
    ]
    assert store.verify_pin("AC-12345", "1324", locked_until - 1, policy) is PinResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", locked_until, policy) is PinResult.MATCHED


def pin_failure_rows(store: AnyStore) -> int:
    return select(store, "SELECT count(*) FROM pin_failures")[0][0]


def test_guessing_account_numbers_cannot_grow_the_failure_table_without_bound(store: AnyStore):
    guesses_per_period = 50
    for period in range(5):
        now_ms = T0 + period * (LOCKOUT_MS + 1)
        for n in range(guesses_per_period):
            account = f"QQ-{period * guesses_per_period + n:05d}"  # a new one every time
            assert store.verify_pin(account, "0000", now_ms, POLICY) is PinResult.WRONG
        # Only the current period's misses are remembered; the earlier rows are gone.
        assert pin_failure_rows(store) == guesses_per_period


# -- postings ---------------------------------------------------------------------------


def test_deposit_withdraw_balance_history(store: AnyStore):
    first = post(store, 1, DEPOSIT, 1_000, now_ms=T0)
    second = post(store, 2, WITHDRAWAL, 2_432, account="ac-12345", now_ms=T0 + 5)
    assert first == Posting(PostResult.BOOKED, 103_432, first.entry_id, T0)
    assert second == Posting(PostResult.BOOKED, 101_000, second.entry_id, T0 + 5)
    assert second.entry_id > first.entry_id > 0
    assert store.balance("AC-12345") == 101_000
    assert store.history("ac-12345", 10) == [
        HistoryEntry(second.entry_id, T0 + 5, WITHDRAWAL, 2_432, 101_000),
        HistoryEntry(first.entry_id, T0, DEPOSIT, 1_000, 103_432),
    ]
    assert store.history("AC-12345", 1) == store.history("AC-12345", 10)[:1]
    assert store.history("AC-12345", 0) == []
    assert store.history("WF-14351", 10) == []


def test_history_is_newest_first_and_per_account(store: AnyStore):
    for n in range(30):
        post(store, n, DEPOSIT, n + 1, account="AC-12345" if n % 2 else "WF-14351")
    history = store.history("AC-12345", 20)
    assert [e.amount_cents for e in history] == list(range(30, 0, -2))
    assert [e.entry_id for e in history] == sorted((e.entry_id for e in history), reverse=True)


def test_withdraw_the_whole_balance(store: AnyStore):
    assert post(store, 1, WITHDRAWAL, 4_572, account="BC-01373").balance_cents == 0
    assert store.balance("BC-01373") == 0


def test_overdraft_is_refused_and_nothing_is_recorded(store: AnyStore):
    before = entry_count(store)
    assert post(store, 1, WITHDRAWAL, 4_573, account="BC-01373") == Posting(
        PostResult.INSUFFICIENT_FUNDS
    )
    assert store.balance("BC-01373") == 4_572
    assert entry_count(store) == before
    # A refused id was not recorded, so the same id is judged afresh once funds arrive.
    post(store, 2, DEPOSIT, 1, account="BC-01373")
    assert post(store, 1, WITHDRAWAL, 4_573, account="BC-01373").result is PostResult.BOOKED


def test_replay_returns_the_original_outcome_and_moves_no_money(store: AnyStore):
    original = post(store, 1, WITHDRAWAL, 2_432, now_ms=T0)
    post(store, 2, DEPOSIT, 5_000, now_ms=T0 + 1)
    before = (store.balance("AC-12345"), entry_count(store))
    replay = post(store, 1, WITHDRAWAL, 2_432, account="ac-12345", now_ms=T0 + 99)
    # The original entry id, time and balance after that entry:
    assert replay == dataclasses.replace(original, result=PostResult.REPLAYED)
    assert (store.balance("AC-12345"), entry_count(store)) == before


@pytest.mark.parametrize(
    ("account", "kind", "amount_cents"),
    [("AC-12345", DEPOSIT, 100), ("AC-12345", WITHDRAWAL, 101), ("WF-14351", WITHDRAWAL, 100)],
)
def test_same_id_different_content_is_a_duplicate(
    store: AnyStore, account: str, kind: EntryKind, amount_cents: int
):
    post(store, 1, WITHDRAWAL, 100)
    before = (store.balance("AC-12345"), store.balance("WF-14351"), entry_count(store))
    duplicate = post(store, 1, kind, amount_cents, account=account)
    assert duplicate == Posting(PostResult.TXN_ID_REUSED)
    assert (store.balance("AC-12345"), store.balance("WF-14351"), entry_count(store)) == before


@pytest.mark.parametrize("amount_cents", [0, -1, AMOUNT_CENTS_MAX + 1, True])
def test_amount_out_of_range_is_invalid(store: AnyStore, amount_cents: int):
    for kind in EntryKind:
        assert post(store, 1, kind, amount_cents) == Posting(PostResult.AMOUNT_OUT_OF_RANGE)
    assert entry_count(store) == 0


def test_a_new_transaction_over_the_callers_limit_is_refused_but_a_replay_is_not(store: AnyStore):
    def post_limited(n: int, amount_cents: int, limit_cents: int) -> Posting:
        return store.post(account="AC-12345", txn_id=txn(n), kind=WITHDRAWAL,
                          amount_cents=amount_cents, now_ms=T0, limit_cents=limit_cents)

    assert post_limited(1, 501, limit_cents=500) == Posting(PostResult.OVER_LIMIT)
    assert entry_count(store) == 0
    booked = post_limited(2, 500, limit_cents=500)
    assert booked.result is PostResult.BOOKED
    # The id is looked up first: the limit lowered since cannot change a booked outcome.
    replay = post_limited(2, 500, limit_cents=100)
    assert replay == dataclasses.replace(booked, result=PostResult.REPLAYED)


def test_largest_amount_is_accepted(store: AnyStore):
    assert post(store, 1, DEPOSIT, AMOUNT_CENTS_MAX).result is PostResult.BOOKED


def test_deposit_past_the_largest_balance_is_refused(store: AnyStore):
    store.add_account("RR-00001", "1111", BALANCE_CENTS_MAX - 5)
    refused = post(store, 1, DEPOSIT, 6, account="RR-00001")
    assert refused == Posting(PostResult.BALANCE_FULL)
    assert post(store, 2, DEPOSIT, 5, account="RR-00001").balance_cents == BALANCE_CENTS_MAX
    assert store.check_invariants() == []


def test_unknown_account_and_bad_txn_id(store: AnyStore):
    with pytest.raises(UnknownAccount):
        post(store, 1, DEPOSIT, 100, account="QQ-00000")
    with pytest.raises(UnknownAccount):
        store.balance("QQ-00000")
    with pytest.raises(UnknownAccount):
        store.history("QQ-00000", 5)
    with pytest.raises(ValueError, match="16 bytes"):
        store.post(account="AC-12345", txn_id=b"short", kind=DEPOSIT, amount_cents=1, now_ms=T0,
                   limit_cents=AMOUNT_CENTS_MAX)
    assert entry_count(store) == 0


# -- batches ----------------------------------------------------------------------------


def test_a_request_refused_before_writing_leaves_the_rest_of_its_batch(store: AnyStore):
    outcomes = store.execute_batch(
        [
            PostRequest("WF-14351", txn(1), DEPOSIT, 100, AMOUNT_CENTS_MAX),
            PostRequest("QQ-00000", txn(2), DEPOSIT, 100, AMOUNT_CENTS_MAX),  # no such account
            BalanceQuery("WF-14351"),
        ],
        T0,
    )
    assert outcomes[0] == Posting(PostResult.BOOKED, 542_922, 1, T0)
    assert isinstance(outcomes[1], UnknownAccount)
    assert outcomes[2] == 542_922
    assert store.balance("WF-14351") == 542_922
    assert store.check_invariants() == []


def test_a_request_refused_after_its_first_write_rolls_back_its_whole_batch(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
):
    """A refusal raised after the balance UPDATE, before the entry (a bug: checks come
    first): committing the others would commit half of this one, so nothing commits."""
    insert_entry = sqlite_store._insert_entry

    def insert_entry_unless_txn_2(**columns: object) -> int:
        if columns["account"] == "AC-12345":  # txn(2)'s
            raise ValueError("refused after the balance UPDATE")
        return insert_entry(**columns)

    monkeypatch.setattr(sqlite_store, "_insert_entry", insert_entry_unless_txn_2)
    with pytest.raises(BatchAborted, match="PostRequest was refused after it wrote"):
        sqlite_store.execute_batch(
            [
                PostRequest("WF-14351", txn(1), DEPOSIT, 100, AMOUNT_CENTS_MAX),
                PostRequest("AC-12345", txn(2), WITHDRAWAL, 500, AMOUNT_CENTS_MAX),
                PinCheck("BC-01373", "0000", POLICY),
            ],
            T0,
        )
    assert sqlite_store.balance("WF-14351") == 542_822
    assert sqlite_store.balance("AC-12345") == 102_432
    assert entry_count(sqlite_store) == 0
    assert pin_failure_rows(sqlite_store) == 0
    assert sqlite_store.check_invariants() == []
    monkeypatch.undo()  # nothing of the batch remains: a retry is judged afresh
    assert post(sqlite_store, 2, WITHDRAWAL, 500).result is PostResult.BOOKED
    assert sqlite_store.balance("AC-12345") == 101_932


# -- the database's own last line -----------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE accounts SET balance_cents = -1 WHERE account = 'AC-12345'",
        "UPDATE accounts SET balance_cents = balance_cents - 200000 WHERE account = 'AC-12345'",
        "UPDATE accounts SET balance_cents = 1.5 WHERE account = 'AC-12345'",
        "INSERT INTO entries (account, txn_no, kind, amount_cents, balance_cents, time_ms)"
        " VALUES ('AC-12345', 1, 1, 0, 1, 0)",
        "INSERT INTO entries (account, txn_no, kind, amount_cents, balance_cents, time_ms)"
        " VALUES ('AC-12345', 1, 5, 1, 1, 0)",
        "INSERT INTO entries (account, txn_no, kind, amount_cents, balance_cents, time_ms)"
        " VALUES ('AC-12345', zeroblob(16), 1, 1, 1, 0)",  # a number, not an id
        "INSERT INTO transactions (txn_id, kind, account, amount_cents, time_ms)"
        " VALUES (zeroblob(15), 1, 'AC-12345', 1, 0)",
    ],
)
def test_constraints_refuse_direct_writes(sqlite_store: Store, db_path: Path, statement: str):
    with raw_sqlite(db_path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(statement)
    assert sqlite_store.balance("AC-12345") == 102_432


def test_foreign_keys_refuse_an_entry_for_no_account_or_no_transaction(sqlite_store: Store):
    booked = post(sqlite_store, 1, DEPOSIT, 100)
    (txn_no,) = sqlite_store._conn.execute("SELECT txn_no FROM entries WHERE entry_id = ?",
                                           (booked.entry_id,)).fetchone()
    insert = ("INSERT INTO entries (account, txn_no, kind, amount_cents, balance_cents, time_ms)"
              " VALUES (?, ?, 1, 1, 1, 0)")
    with pytest.raises(sqlite3.IntegrityError):
        sqlite_store._conn.execute(insert, ("QQ-00000", txn_no))
    with pytest.raises(sqlite3.IntegrityError):
        sqlite_store._conn.execute(insert, ("WF-14351", txn_no + 1))
    sqlite_store._conn.execute(insert, ("WF-14351", txn_no))  # both exist: only the FKs refused


# -- invariants ---------------------------------------------------------------------------


def test_invariants_hold_after_a_mix_of_operations(store: AnyStore):
    accounts = [account for account, _, _ in DEMO_ACCOUNTS]
    outcomes = set()
    for n in range(300):
        account = accounts[n % len(accounts)]
        kind = DEPOSIT if n % 3 == 0 else WITHDRAWAL
        amount_cents = (n * 7919) % 400_000 + 1
        outcomes.add(post(store, n % 250, kind, amount_cents, account=account).result)
    assert {PostResult.BOOKED, PostResult.INSUFFICIENT_FUNDS, PostResult.TXN_ID_REUSED} <= outcomes
    assert store.check_invariants() == []
    assert store.integrity_ok()


def test_invariants_report_a_tampered_balance(store: AnyStore, any_db: str):
    post(store, 1, DEPOSIT, 100)
    with raw(any_db) as conn:
        conn.execute(
            "UPDATE accounts SET balance_cents = balance_cents + 1 WHERE account = 'AC-12345'"
        )
        conn.execute("UPDATE entries SET balance_cents = 7")
    problems = store.check_invariants()
    assert len(problems) == 3
    assert all(problem.startswith("AC-12345:") for problem in problems[:2])
    assert problems[2].startswith("money not conserved")


# -- operator operations --------------------------------------------------------------------


def test_add_account(store: AnyStore):
    store.add_account("rr-00001", "1111", 0)
    assert store.balance("RR-00001") == 0
    assert store.verify_pin("RR-00001", "1111", T0, POLICY) is PinResult.MATCHED
    with pytest.raises(AccountExists):
        store.add_account("RR-00001", "2222", 5)
    with pytest.raises(AccountExists):
        store.add_account("ac-12345", "2222", 5)
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.MATCHED


@pytest.mark.parametrize(
    ("account", "pin", "opening_cents"),
    [
        ("RR-0001", "1111", 0),
        ("RR-00001", "111", 0),
        ("RR-00001", "1111", -1),
        ("RR-00001", "1111", 1.5),
        ("RR-00001", "1111", BALANCE_CENTS_MAX + 1),
    ],
)
def test_add_account_validates(store: AnyStore, account: str, pin: str, opening_cents: int):
    with pytest.raises(ValueError):
        store.add_account(account, pin, opening_cents)
    with pytest.raises(UnknownAccount):
        store.balance("RR-00001")


def test_add_accounts_from_an_accounts_file(store: AnyStore):
    records = parse_accounts("# new branch\nrr-00001, 1111, 10.00\nRR-00002, 2222, 0.5\n")
    assert store.add_accounts(records) == 2
    assert store.balance("RR-00001") == 1_000
    assert store.balance("RR-00002") == 50
    assert store.verify_pin("RR-00002", "2222", T0, POLICY) is PinResult.MATCHED


def test_adding_accounts_is_all_or_nothing(store: AnyStore):
    with pytest.raises(AccountExists):
        store.add_accounts(parse_accounts("RR-00001, 1111, 10.00\nAC-12345, 2222, 0.5\n"))
    with pytest.raises(UnknownAccount):
        store.balance("RR-00001")


# -- reading the books from outside -------------------------------------------------------


def test_read_books_gives_every_balance_and_entry_as_stored(store: AnyStore, any_db: str):
    deposit = post(store, 1, DEPOSIT, 500)
    withdrawal = post(store, 2, WITHDRAWAL, 200, now_ms=T0 + 1)
    assert post(store, 3, WITHDRAWAL, AMOUNT_CENTS_MAX).result is PostResult.INSUFFICIENT_FUNDS
    books = read_books(any_db)  # with the Store still open, as with a server running
    assert books.opening_cents == {account: cents for account, _, cents in DEMO_ACCOUNTS}
    assert books.balance_cents == {**books.opening_cents, "AC-12345": 1024_32 + 300}
    assert books.entries == (
        BookEntry(deposit.entry_id, "AC-12345", txn(1), DEPOSIT, 500, 1024_32 + 500, T0),
        BookEntry(withdrawal.entry_id, "AC-12345", txn(2), WITHDRAWAL, 200, 1024_32 + 300,
                  T0 + 1),
    )


def test_read_books_never_creates_a_database(tmp_path: Path):
    with pytest.raises(sqlite3.OperationalError):
        read_books(tmp_path / "missing.db")
    assert list(tmp_path.iterdir()) == []


# -- transfers: one transaction, two entries --------------------------------------------


def transfer(
    store: AnyStore, n: int, amount_cents: int, *, source: str = "AC-12345",
    destination: str = "WF-14351", limit_cents: int = AMOUNT_CENTS_MAX, now_ms: int = T0,
    policy: DestinationPolicy = DESTINATIONS,
) -> Posting:
    return store.transfer(
        account=source, txn_id=txn(n), to_account=destination, amount_cents=amount_cents,
        now_ms=now_ms, limit_cents=limit_cents, policy=policy,
    )


def test_a_transfer_books_both_legs_under_one_id(store: AnyStore, any_db: str):
    moved = transfer(store, 1, 2_432, destination="wf-14351")
    assert moved == Posting(PostResult.BOOKED, 100_000, moved.entry_id, T0)
    assert store.balance("AC-12345") == 100_000
    assert store.balance("WF-14351") == 542_822 + 2_432
    books = read_books(any_db)
    assert [(e.account, e.txn_id, e.kind, e.amount_cents, e.balance_cents)
            for e in books.entries] == [
        ("AC-12345", txn(1), EntryKind.TRANSFER_OUT, 2_432, 100_000),
        ("WF-14351", txn(1), EntryKind.TRANSFER_IN, 2_432, 542_822 + 2_432),
    ]
    assert books.entries[0].entry_id == moved.entry_id
    # Each side's history shows its own leg, with its own balance after it.
    assert store.history("WF-14351", 5) == [
        HistoryEntry(moved.entry_id + 1, T0, EntryKind.TRANSFER_IN, 2_432, 545_254)
    ]
    assert store.history("AC-12345", 5)[0].kind is EntryKind.TRANSFER_OUT
    assert store.check_invariants() == []


def test_a_transfer_replays_its_source_entry_and_moves_nothing_again(store: AnyStore):
    moved = transfer(store, 1, 500)
    later = post(store, 2, DEPOSIT, 100)  # the source's balance moves on meanwhile
    again = transfer(store, 1, 500, now_ms=T0 + 60_000)
    assert again == dataclasses.replace(moved, result=PostResult.REPLAYED)
    assert store.balance("AC-12345") == later.balance_cents
    assert store.balance("WF-14351") == 542_822 + 500
    assert entry_count(store) == 3


@pytest.mark.parametrize(
    ("source", "destination", "amount_cents"),
    [
        ("AC-12345", "WF-14351", 501),  # another amount
        ("AC-12345", "TN-13731", 500),  # another destination
        ("BC-01373", "WF-14351", 500),  # another source
    ],
)
def test_a_transfer_id_reused_with_other_content_is_refused(
    store: AnyStore, source: str, destination: str, amount_cents: int
):
    transfer(store, 1, 500)
    reused = transfer(store, 1, amount_cents, source=source, destination=destination)
    assert reused == Posting(PostResult.TXN_ID_REUSED)
    assert entry_count(store) == 2


# -- transfers to no account: the transfer lock ------------------------------------------

TRIES = DestinationPolicy(tries_max=3, lockout_ms=LOCKOUT_MS)


def miss(
    store: AnyStore, n: int, *, now_ms: int = T0, policy: DestinationPolicy = TRIES,
    source: str = "AC-12345", destination: str = "QQ-00000", amount_cents: int = 1,
) -> Posting:
    """A transfer to no account (unless ``destination`` is one): what an enumerator sends."""
    return transfer(store, n, amount_cents, source=source, destination=destination,
                    now_ms=now_ms, policy=policy)


def miss_rows(store: AnyStore) -> dict[str, tuple[int, int | None, int]]:
    return {
        account: (misses, locked, last)
        for account, misses, locked, last in select(
            store, "SELECT account, misses, locked_until_ms, last_miss_ms FROM destination_misses"
        )
    }


def test_the_miss_that_reaches_the_limit_locks_and_is_answered_locked(store: AnyStore):
    until = T0 + LOCKOUT_MS
    assert miss(store, 1).result is PostResult.UNKNOWN_DESTINATION
    assert miss(store, 2, source="ac-12345").result is PostResult.UNKNOWN_DESTINATION
    assert miss(store, 3, destination="ZZ-00001") == Posting(
        PostResult.TRANSFERS_LOCKED, locked_until_ms=until
    )
    assert miss_rows(store) == {"AC-12345": (3, until, T0)}
    # While locked, every new transfer is refused before anything else is judged: a real
    # destination, its own account, an amount over the limit or the balance, no account.
    for n, destination, amount, limit in [
        (4, "WF-14351", 1, AMOUNT_CENTS_MAX), (5, "AC-12345", 1, AMOUNT_CENTS_MAX),
        (6, "WF-14351", 500, 100), (7, "WF-14351", 10**6, AMOUNT_CENTS_MAX),
        (8, "QQ-00000", 1, AMOUNT_CENTS_MAX),
    ]:
        refused = transfer(store, n, amount, destination=destination, limit_cents=limit,
                           now_ms=until - 1)
        assert refused == Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=until), n
    assert miss_rows(store) == {"AC-12345": (3, until, T0)}  # counted nothing, not extended
    assert store.balance("AC-12345") == 102_432 and store.balance("WF-14351") == 542_822
    # Only this source is locked; the lock ends lockout_ms after the miss that set it.
    assert miss(store, 9, source="WF-14351").result is PostResult.UNKNOWN_DESTINATION
    assert transfer(store, 10, 1, now_ms=until).result is PostResult.BOOKED
    assert miss(store, 11, now_ms=until).result is PostResult.UNKNOWN_DESTINATION
    assert miss_rows(store)["AC-12345"] == (1, None, until)  # an expired lock: a fresh count
    assert store.check_invariants() == []


def test_a_booked_transfer_does_not_reset_the_count(store: AnyStore):
    assert miss(store, 1).result is PostResult.UNKNOWN_DESTINATION
    assert transfer(store, 2, 1).result is PostResult.BOOKED
    assert miss(store, 3).result is PostResult.UNKNOWN_DESTINATION
    assert transfer(store, 4, 1).result is PostResult.BOOKED
    assert miss(store, 5).result is PostResult.TRANSFERS_LOCKED


def test_misses_are_forgotten_a_lockout_period_after_the_last(store: AnyStore):
    # Each within the period of the one before: a chain longer than one period locks.
    assert miss(store, 1, now_ms=T0).result is PostResult.UNKNOWN_DESTINATION
    assert miss(store, 2, now_ms=T0 + LOCKOUT_MS - 1).result is PostResult.UNKNOWN_DESTINATION
    assert miss(store, 3, now_ms=T0 + 2 * LOCKOUT_MS - 2).result is PostResult.TRANSFERS_LOCKED
    # A period after the last miss, the next is a first one.
    source = "WF-14351"
    assert miss(store, 4, source=source, now_ms=T0).result is PostResult.UNKNOWN_DESTINATION
    assert miss(store, 5, source=source, now_ms=T0 + 1).result is PostResult.UNKNOWN_DESTINATION
    later = T0 + 1 + LOCKOUT_MS
    assert miss(store, 6, source=source, now_ms=later).result is PostResult.UNKNOWN_DESTINATION
    assert miss_rows(store)[source] == (1, None, later)


def test_a_replay_beats_the_transfer_lock(store: AnyStore):
    moved = transfer(store, 1, 500)
    for n in range(2, 5):
        miss(store, n)
    assert transfer(store, 5, 1).result is PostResult.TRANSFERS_LOCKED
    # An ATM confirming the booked transfer learns the truth; a reused id is still told so.
    assert transfer(store, 1, 500) == dataclasses.replace(moved, result=PostResult.REPLAYED)
    assert transfer(store, 1, 501).result is PostResult.TXN_ID_REUSED
    assert miss_rows(store)["AC-12345"][0] == 3


def test_only_a_transfer_answered_unknown_destination_counts(store: AnyStore):
    store.add_account("RR-00001", "4321", BALANCE_CENTS_MAX)
    refusals = [
        (1, "AC-12345", 1, AMOUNT_CENTS_MAX, PostResult.SAME_ACCOUNT),
        (2, "QQ-00000", 500, 100, PostResult.OVER_LIMIT),
        (3, "QQ-00000", 102_433, AMOUNT_CENTS_MAX, PostResult.INSUFFICIENT_FUNDS),
        (4, "RR-00001", 1, AMOUNT_CENTS_MAX, PostResult.BALANCE_FULL),
        (5, "QQ-00000", 0, AMOUNT_CENTS_MAX, PostResult.AMOUNT_OUT_OF_RANGE),
    ]
    for _ in range(TRIES.tries_max):
        for n, destination, amount, limit, result in refusals:
            refused = transfer(store, n, amount, destination=destination, limit_cents=limit)
            assert refused.result is result
    assert miss_rows(store) == {}


def test_unlock_lifts_a_transfer_lock_and_forgets_its_misses(store: AnyStore):
    for n in range(1, 4):
        miss(store, n)
    store.verify_pin("AC-12345", "0000", T0, POLICY)
    assert store.unlock("ac-12345") == Forgotten(1, None, 3, T0 + LOCKOUT_MS)
    assert transfer(store, 4, 1).result is PostResult.BOOKED
    assert miss(store, 5).result is PostResult.UNKNOWN_DESTINATION  # counting from zero
    assert store.unlock("AC-12345") == Forgotten(0, None, 1, None)
    assert store.unlock("AC-12345") == Forgotten(0, None, 0, None)


def test_the_transfer_lock_is_kept_in_the_database(any_db: str):
    """A new login is a new session on the same store; a restart a new store on the same
    database; another process a second store: none of them starts the count again."""
    with open_store(any_db, KEY) as first:
        miss(first, 1)
        with open_store(any_db, KEY) as second:  # another process, or the restarted one
            assert miss(second, 2).result is PostResult.UNKNOWN_DESTINATION
            assert miss(first, 3).result is PostResult.TRANSFERS_LOCKED
    with open_store(any_db, KEY) as restarted:
        assert transfer(restarted, 4, 1, now_ms=T0 + 1).result is PostResult.TRANSFERS_LOCKED


def test_a_destination_lockout_of_zero_turns_locking_off(store: AnyStore):
    policy = DestinationPolicy(tries_max=3, lockout_ms=0)
    results = {miss(store, n, policy=policy).result for n in range(5)}
    assert results == {PostResult.UNKNOWN_DESTINATION}
    assert transfer(store, 6, 1, policy=policy).result is PostResult.BOOKED


def test_the_destination_policy_comes_with_each_transfer(store: AnyStore):
    strict = DestinationPolicy(tries_max=1, lockout_ms=10)
    assert miss(store, 1, policy=strict) == Posting(
        PostResult.TRANSFERS_LOCKED, locked_until_ms=T0 + 10
    )
    assert transfer(store, 2, 1, now_ms=T0 + 9).result is PostResult.TRANSFERS_LOCKED
    assert transfer(store, 3, 1, now_ms=T0 + 10).result is PostResult.BOOKED


@pytest.mark.parametrize(
    ("tries_max", "lockout_ms"), [(0, LOCKOUT_MS), (3, -1), (3, LOCKOUT_MS_MAX + 1)]
)
def test_impossible_destination_settings_are_refused(tries_max: int, lockout_ms: int):
    with pytest.raises(ValueError, match=r"destination_tries_max|lockout_ms"):
        DestinationPolicy(tries_max=tries_max, lockout_ms=lockout_ms)


def test_transfer_misses_cannot_grow_their_table_without_bound(store: AnyStore):
    sources_per_period, periods = 4, 5
    records = [
        AccountRecord(f"RR-{n:05d}", "4321", 100)
        for n in range(sources_per_period * periods)
    ]
    store.add_accounts(records)
    for period in range(periods):
        now_ms = T0 + period * (LOCKOUT_MS + 1)
        for index in range(sources_per_period):
            source = records[period * sources_per_period + index].account
            n = 100 + period * sources_per_period + index
            assert miss(store, n, source=source, now_ms=now_ms).result \
                is PostResult.UNKNOWN_DESTINATION
        # Only the current period's misses are remembered; the earlier rows are gone.
        assert len(miss_rows(store)) == sources_per_period


def test_ids_are_shared_between_kinds(store: AnyStore):
    """One id space: a deposit's id cannot be a transfer's, nor the other way round."""
    post(store, 1, DEPOSIT, 500)
    assert transfer(store, 1, 500).result is PostResult.TXN_ID_REUSED
    transfer(store, 2, 500)
    assert post(store, 2, WITHDRAWAL, 500).result is PostResult.TXN_ID_REUSED
    # Even as the destination's own deposit of the same amount.
    assert post(store, 2, DEPOSIT, 500, account="WF-14351").result is PostResult.TXN_ID_REUSED


@pytest.mark.parametrize(
    ("amount_cents", "limit_cents", "destination", "result"),
    [
        (0, AMOUNT_CENTS_MAX, "WF-14351", PostResult.AMOUNT_OUT_OF_RANGE),
        (AMOUNT_CENTS_MAX + 1, AMOUNT_CENTS_MAX, "WF-14351", PostResult.AMOUNT_OUT_OF_RANGE),
        (500, AMOUNT_CENTS_MAX, "AC-12345", PostResult.SAME_ACCOUNT),
        (500, AMOUNT_CENTS_MAX, "ac-12345", PostResult.SAME_ACCOUNT),
        (501, 500, "WF-14351", PostResult.OVER_LIMIT),
        (102_433, AMOUNT_CENTS_MAX, "WF-14351", PostResult.INSUFFICIENT_FUNDS),
        (500, AMOUNT_CENTS_MAX, "QQ-00000", PostResult.UNKNOWN_DESTINATION),
        # Checked in order: an unknown destination is not looked up for money one lacks.
        (102_433, AMOUNT_CENTS_MAX, "QQ-00000", PostResult.INSUFFICIENT_FUNDS),
        (501, 500, "AC-12345", PostResult.SAME_ACCOUNT),
    ],
)
def test_refused_transfers_record_nothing(
    store: AnyStore, amount_cents: int, limit_cents: int, destination: str, result: PostResult
):
    refused = transfer(store, 1, amount_cents, destination=destination, limit_cents=limit_cents)
    assert refused == Posting(result)
    assert store.balance("AC-12345") == 102_432
    assert store._conn.execute("SELECT count(*) FROM transactions").fetchone() == (0,)
    assert entry_count(store) == 0
    # Nothing was recorded, so the same id is judged afresh.
    assert transfer(store, 1, 500).result is PostResult.BOOKED


def test_a_transfer_of_the_whole_balance_is_booked(store: AnyStore):
    assert transfer(store, 1, 102_432).balance_cents == 0
    assert store.check_invariants() == []


def test_a_transfer_that_would_overfill_the_destination_is_refused(store: AnyStore):
    store.add_account("RR-00001", "2580", BALANCE_CENTS_MAX - 100)
    assert transfer(store, 1, 101, destination="RR-00001") == Posting(PostResult.BALANCE_FULL)
    assert store.balance("AC-12345") == 102_432
    assert transfer(store, 2, 100, destination="RR-00001").result is PostResult.BOOKED
    assert store.balance("RR-00001") == BALANCE_CENTS_MAX
    assert store.check_invariants() == []  # sums past 2**63 are not SQLite's to overflow


def test_a_transfer_failing_between_its_legs_writes_nothing(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
):
    """Atomic: a failure after the source's debit, before the credit, leaves no leg."""
    move_money = sqlite_store._move_money

    def fail_the_credit(account: str, change: object, amount_cents: int) -> bool:
        if account == "WF-14351":
            raise sqlite3.OperationalError("disk I/O error")
        return move_money(account, change, amount_cents)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_store, "_move_money", fail_the_credit)
    with pytest.raises(sqlite3.OperationalError):
        transfer(sqlite_store, 1, 500)
    monkeypatch.undo()
    balances = (sqlite_store.balance("AC-12345"), sqlite_store.balance("WF-14351"))
    assert balances == (102_432, 542_822)
    assert entry_count(sqlite_store) == 0
    assert transfer(sqlite_store, 1, 500).result is PostResult.BOOKED


def test_a_leg_refused_after_its_checks_rolls_back_the_batch(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
):
    move_money = sqlite_store._move_money
    monkeypatch.setattr(
        sqlite_store, "_move_money",
        lambda account, change, amount: account != "WF-14351" and move_money(
            account, change, amount),
    )
    with pytest.raises(BatchAborted):
        sqlite_store.execute_batch(
            [TransferRequest("AC-12345", txn(1), "WF-14351", 500, AMOUNT_CENTS_MAX,
                             DESTINATIONS)],
            T0,
        )
    assert sqlite_store.balance("AC-12345") == 102_432


def test_a_transfer_between_many_accounts_conserves_money(store: AnyStore):
    accounts = [account for account, _, _ in DEMO_ACCOUNTS]
    total = sum(store.balance(account) for account in accounts)
    results = set()
    for n in range(200):
        source, destination = accounts[n % 7], accounts[(n * 3 + 1) % 7]
        amount_cents = (n * 7919) % 300_000 + 1
        results.add(transfer(store, n % 150, amount_cents, source=source,
                             destination=destination).result)
    assert {PostResult.BOOKED, PostResult.INSUFFICIENT_FUNDS, PostResult.SAME_ACCOUNT,
            PostResult.TXN_ID_REUSED} <= results
    assert sum(store.balance(account) for account in accounts) == total
    assert store.check_invariants() == []
    assert store.integrity_ok()


def test_invariants_report_a_transfer_missing_a_leg(store: AnyStore, any_db: str):
    transfer(store, 1, 500)
    with raw(any_db) as conn:
        conn.execute("DELETE FROM entries WHERE kind = 4")
        conn.execute("UPDATE accounts SET balance_cents = 542822 WHERE account = 'WF-14351'")
    problems = store.check_invariants()
    assert len(problems) == 2
    assert problems[0].startswith(f"transaction {txn(1).hex()}: entries")
    assert problems[1].startswith("money not conserved")


@pytest.mark.parametrize(
    "statement",
    [
        # A transfer names a counterparty; nothing else does; never the account itself.
        "INSERT INTO transactions VALUES"
        " (NULL, zeroblob(16), 3, 'AC-12345', NULL, 1, 0, NULL)",
        "INSERT INTO transactions VALUES"
        " (NULL, zeroblob(16), 1, 'AC-12345', 'WF-14351', 1, 0, NULL)",
        "INSERT INTO transactions VALUES"
        " (NULL, zeroblob(16), 3, 'AC-12345', 'AC-12345', 1, 0, NULL)",
        "INSERT INTO transactions VALUES"
        " (NULL, zeroblob(16), 4, 'AC-12345', 'WF-14351', 1, 0, NULL)",
        "INSERT INTO transactions VALUES"
        " (NULL, zeroblob(16), 1, 'AC-12345', NULL, 0, 0, NULL)",
    ],
)
def test_the_transactions_table_refuses_what_no_kind_books(db_path: Path, statement: str):
    Store(db_path, KEY).close()
    with raw_sqlite(db_path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(statement)


# -- a customer's PIN change --------------------------------------------------------------


def change(store: AnyStore, pin: str, new_pin: str, *, now_ms: int = T0) -> PinChangeResult:
    return store.change_pin("ac-12345", pin, new_pin, now_ms, POLICY).result


def test_a_pin_change_stores_a_new_salt_and_keyed_hash(store: AnyStore):
    (salt_before,) = store._conn.execute(
        "SELECT pin_salt FROM accounts WHERE account = 'AC-12345'").fetchone()
    assert change(store, "1324", "2580") is PinChangeResult.CHANGED
    salt, pin_hmac = store._conn.execute(
        "SELECT pin_salt, pin_hmac FROM accounts WHERE account = 'AC-12345'").fetchone()
    assert salt != salt_before
    assert pin_hmac == hash_pin(KEY, salt, "AC-12345", "2580")
    assert store.verify_pin("AC-12345", "2580", T0, POLICY) is PinResult.MATCHED
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.WRONG


def test_a_wrong_current_pin_counts_toward_the_lockout_like_a_login(store: AnyStore):
    assert store.verify_pin("AC-12345", "0000", T0, POLICY) is PinResult.WRONG
    assert change(store, "0001", "2580") is PinChangeResult.WRONG
    verdict = store.change_pin("AC-12345", "0002", "2580", T0, POLICY)
    assert verdict == PinChangeVerdict(PinChangeResult.LOCKED, T0 + LOCKOUT_MS)
    # Locked: the right PIN changes nothing, and LOGIN is locked too.
    assert change(store, "1324", "2580") is PinChangeResult.LOCKED
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.LOCKED
    assert change(store, "1324", "2580", now_ms=T0 + LOCKOUT_MS) is PinChangeResult.CHANGED


def test_a_pin_change_clears_the_failures(store: AnyStore):
    assert change(store, "0000", "2580") is PinChangeResult.WRONG
    assert change(store, "0001", "2580") is PinChangeResult.WRONG
    assert change(store, "1324", "2580") is PinChangeResult.CHANGED
    assert pin_failure_rows(store) == 0


@pytest.mark.parametrize("new_pin", ["0000", "1234", "0123", "6789", "9876", "3210", "7777"])
def test_a_trivial_new_pin_is_refused_and_counts_nothing(store: AnyStore, new_pin: str):
    for _ in range(POLICY.tries_max + 1):  # not even a wrong current PIN counts
        assert change(store, "0000", new_pin) is PinChangeResult.TRIVIAL
    assert pin_failure_rows(store) == 0
    assert store.verify_pin("AC-12345", "1324", T0, POLICY) is PinResult.MATCHED


def test_a_retried_pin_change_is_safe(store: AnyStore):
    """A change whose answer was lost: the retry with the new PIN as both finds it done
    and clears the one failure that the retry with the old PIN counted."""
    assert change(store, "1324", "2580") is PinChangeResult.CHANGED
    assert change(store, "1324", "2580") is PinChangeResult.WRONG  # the retry, as sent
    assert change(store, "2580", "2580") is PinChangeResult.CHANGED  # confirmation
    assert pin_failure_rows(store) == 0
    assert store.verify_pin("AC-12345", "2580", T0, POLICY) is PinResult.MATCHED


def test_a_pin_change_for_no_account_is_wrong_and_counts(store: AnyStore):
    verdict = store.change_pin("QQ-00000", "1324", "2580", T0, POLICY)
    assert verdict.result is PinChangeResult.WRONG
    assert pin_failure_rows(store) == 1
