"""The bank's SQLite store: all SQL lives here, behind plain synchronous methods.

One ``Store`` owns one connection. It is not safe for concurrent use; the async
``bank.batch_ledger.BatchLedger`` runs it in one worker thread at a time. Every write
happens inside ``BEGIN IMMEDIATE ... COMMIT``: the write lock is taken up front, so a
read-then-write (the idempotency check, the PIN failure counter) cannot interleave with
another writer, and a method returns only after its commit. With ``synchronous=FULL``
in WAL mode that commit is on disk. In a batch (``Store.execute_batch``) a request may be
refused on its own only before it has written anything; one refused after a write rolls
back the whole batch, so no half of a request is ever committed.

The schema states the money rules a second time, as CHECK constraints: a bug (or a hand
edit) that tries to make a balance negative is refused by the database itself.

Every entry belongs to a transaction record (double entry, as TigerBeetle's transfers):
a deposit or withdrawal is one transaction with one entry, a transfer one transaction
with two (TRANSFER_OUT on its source, TRANSFER_IN on its destination). The transaction
id is the idempotency key, so a transfer's two legs share one id; schema version 4.
Version 5 counts each source account's transfers to no account (``destination_misses``),
which lock its transfers as wrong PINs lock a LOGIN (``Store.transfer``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bank.accounts_file import AccountRecord
from bank.config import is_postgresql
from bank.ledger import (
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    PinVerdict,
    Posting,
    PostResult,
)
from bank.limits import LOCKOUT_MS_MAX
from bank.pins import PIN_HMAC_BYTES, hash_pin, new_salt, verify
from wire import (
    AMOUNT_CENTS_MAX,
    BALANCE_CENTS_MAX,
    KIND_OF_ENTRY,
    TRANSFER,
    TXN_ID_BYTES,
    EntryKind,
    HistoryEntry,
    canonical_account,
    check_pin,
    entry_change_cents,
    is_trivial_pin,
    mask_account,
)

SCHEMA_VERSION = 6
"""Stored in ``PRAGMA user_version``; 0 means a new database, to be created and seeded."""

PIN_FAILURES_PRUNED_MAX = 2
"""Forgotten PIN-failure rows deleted with each new failure: more than the one row a
failure can add, so the table holds about the failures of one lockout period, however
many account numbers a guesser tries."""

DESTINATION_MISSES_PRUNED_MAX = PIN_FAILURES_PRUNED_MAX
"""Forgotten destination-miss rows deleted with each new miss, as for PIN failures: the
table then holds about one lockout period's misses (it is keyed by source accounts, which
exist, so the number of accounts bounds it too)."""

BUSY_TIMEOUT_MS = 5_000
"""How long to wait for another process's write lock before failing with an error."""

_PRIMARY_CODE_MASK = 0xFF
"""An SQLite extended result code's low byte is its primary code (SQLITE_BUSY for all
the SQLITE_BUSY_* kinds)."""

CANONICAL_ACCOUNTS_REMEMBERED_MAX = 4_096
"""Account numbers ``Store._canonical`` remembers as checked and canonical (about 300
KiB at most, strings included); when full it forgets them all and starts again."""

WAL_AUTOCHECKPOINT_PAGES = 4_000
"""WAL pages (4 KiB each by default: about 16 MiB) after which a COMMIT also checkpoints, copying
the WAL's pages into the database file and fsyncing it, so that the next write starts
the WAL from its beginning again: what bounds the WAL file, to about this plus one batch
(as long as no reader holds an old snapshot, as with SQLite's default of 1,000 pages).

A batch of 46 postings writes ~150 pages at 50,000 entries (random transaction ids land
on random index pages), so the default checkpointed every ~7 batches, each time writing
again the index pages that every batch touches. Four times the pages rewrite each of them
a quarter as often: measured (the code with 1,000 beside this one, same process, same
1,100 batches, 57,200 entries, three runs) COMMIT thread CPU 1.36-1.84 -> 1.11-1.52 ms a
batch on average (-17 to -19 %), 5 % less CPU and 8-10 % less wall time a request;
8,000 pages won no more, and cache_size or mmap_size won nothing measurable. Crash
safety is unchanged: what a COMMIT wrote to the WAL is on disk (synchronous=FULL)
whether or not it was checkpointed, and recovery reads at most this much WAL. Turning
automatic checkpoints off for a PASSIVE one every K batches, on this same thread, would
run the same work in the same place."""

DEMO_ACCOUNTS: tuple[tuple[str, str, int], ...] = (
    ("AC-12345", "1324", 102_432),
    ("WF-14351", "9834", 542_822),
    ("TN-13731", "2435", 646_275),
    ("FE-63912", "5338", 249_912),
    ("KH-10406", "6732", 1_532_789),
    ("BC-01373", "2947", 4_572),
    ("ZZ-99999", "9999", 65_535),
)
"""The course's demo accounts (account, PIN, balance in cents), seeded into a new database."""

_SCHEMA = """
CREATE TABLE accounts (
    account TEXT PRIMARY KEY CHECK (account = upper(account) AND length(account) = 8),
    pin_salt BLOB NOT NULL CHECK (length(pin_salt) = 16),
    pin_hmac BLOB NOT NULL CHECK (length(pin_hmac) = 32),
    opening_cents INTEGER NOT NULL CHECK (opening_cents >= 0),
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0)
) STRICT;

-- A transaction's 16-byte id is random: its UNIQUE index takes one random page per
-- posting in every COMMIT, which idempotency needs. Entries name their transaction by
-- the ascending txn_no instead, so that their own uniqueness costs no second random page
-- (BENCHMARKS.md: about 185 pages a batch of 50 postings fell to about 125).
CREATE TABLE transactions (
    txn_no INTEGER PRIMARY KEY,
    txn_id BLOB NOT NULL UNIQUE CHECK (length(txn_id) = 16),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    account TEXT NOT NULL REFERENCES accounts (account),
    counterparty TEXT REFERENCES accounts (account),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    time_ms INTEGER NOT NULL CHECK (time_ms >= 0),
    terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80),
    CHECK ((kind = 3) = (counterparty IS NOT NULL)),
    CHECK (counterparty <> account)
) STRICT;

CREATE TABLE entries (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES accounts (account),
    txn_no INTEGER NOT NULL REFERENCES transactions (txn_no),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3, 4)),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0),
    time_ms INTEGER NOT NULL CHECK (time_ms >= 0),
    terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80),
    UNIQUE (txn_no, account)
) STRICT;

CREATE INDEX entries_by_account ON entries (account, entry_id);

-- Keyed by the account string whether or not such an account exists, so an unknown
-- account locks exactly like a real one and the two cannot be told apart. A row is
-- forgotten one lockout period after its last failure (see Store._check_pin).
CREATE TABLE pin_failures (
    account TEXT PRIMARY KEY,
    failures INTEGER NOT NULL CHECK (failures > 0),
    locked_until_ms INTEGER,
    last_failure_ms INTEGER NOT NULL DEFAULT 0 CHECK (last_failure_ms >= 0)
) STRICT;

CREATE INDEX pin_failures_by_age ON pin_failures (last_failure_ms);

-- A source account's TRANSFERs answered INVALID_TO_ACCOUNT: destination_tries_max of them,
-- each within destination_lockout_s of the last, lock its transfers until locked_until_ms.
-- A row is forgotten one lockout period after its last miss (see Store._transfer_one).
CREATE TABLE destination_misses (
    account TEXT PRIMARY KEY REFERENCES accounts (account),
    misses INTEGER NOT NULL CHECK (misses > 0),
    locked_until_ms INTEGER,
    last_miss_ms INTEGER NOT NULL CHECK (last_miss_ms >= 0)
) STRICT;

CREATE INDEX destination_misses_by_age ON destination_misses (last_miss_ms);
"""

_TRANSACTIONS_V4 = """
CREATE TABLE transactions (
    txn_id BLOB PRIMARY KEY CHECK (length(txn_id) = 16),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    account TEXT NOT NULL REFERENCES accounts (account),
    counterparty TEXT REFERENCES accounts (account),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    time_ms INTEGER NOT NULL CHECK (time_ms >= 0),
    terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80),
    CHECK ((kind = 3) = (counterparty IS NOT NULL)),
    CHECK (counterparty <> account)
) STRICT;

"""
"""``transactions`` as schema versions 4 and 5 made it (migration 3 creates it so)."""

_ENTRIES_V4 = """
CREATE TABLE entries (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES accounts (account),
    txn_id BLOB NOT NULL REFERENCES transactions (txn_id) CHECK (length(txn_id) = 16),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3, 4)),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0),
    time_ms INTEGER NOT NULL CHECK (time_ms >= 0),
    terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80),
    UNIQUE (txn_id, account)
) STRICT;

"""
"""``entries`` as schema versions 4 and 5 made it (migration 3 creates it so)."""

_MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE pin_failures
    ADD COLUMN last_failure_ms INTEGER NOT NULL DEFAULT 0 CHECK (last_failure_ms >= 0);
CREATE INDEX pin_failures_by_age ON pin_failures (last_failure_ms);
""",
    2: """
ALTER TABLE entries
    ADD COLUMN terminal TEXT CHECK (terminal IS NULL OR length(terminal) <= 80);
""",
    3: _TRANSACTIONS_V4
    + """
INSERT INTO transactions (txn_id, kind, account, counterparty, amount_cents, time_ms, terminal)
    SELECT txn_id, kind, account, NULL, amount_cents, time_ms, terminal FROM entries;
"""
    + _ENTRIES_V4.replace("CREATE TABLE entries (", "CREATE TABLE entries_v4 (")
    + """
INSERT INTO entries_v4
    (entry_id, account, txn_id, kind, amount_cents, balance_cents, time_ms, terminal)
    SELECT entry_id, account, txn_id, kind, amount_cents, balance_cents, time_ms, terminal
    FROM entries;
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name = 'entries')
    WHERE name = 'entries_v4';
DROP TABLE entries;
ALTER TABLE entries_v4 RENAME TO entries;
CREATE INDEX entries_by_account ON entries (account, entry_id);
""",
    4: _SCHEMA[_SCHEMA.index("CREATE TABLE destination_misses") :],
    5: """
ALTER TABLE transactions RENAME TO transactions_v5;
"""
    + _SCHEMA[_SCHEMA.index("CREATE TABLE transactions") : _SCHEMA.index("CREATE TABLE entries")]
    + """
INSERT INTO transactions
    (txn_no, txn_id, kind, account, counterparty, amount_cents, time_ms, terminal)
    SELECT rowid, txn_id, kind, account, counterparty, amount_cents, time_ms, terminal
    FROM transactions_v5 ORDER BY rowid;
ALTER TABLE entries RENAME TO entries_v5;
"""
    + _SCHEMA[_SCHEMA.index("CREATE TABLE entries") : _SCHEMA.index("CREATE INDEX entries_by")]
    + """
INSERT INTO entries
    (entry_id, account, txn_no, kind, amount_cents, balance_cents, time_ms, terminal)
    SELECT e.entry_id, e.account, t.txn_no, e.kind, e.amount_cents, e.balance_cents,
        e.time_ms, e.terminal
    FROM entries_v5 AS e LEFT JOIN transactions AS t ON t.txn_id = e.txn_id ORDER BY e.entry_id;
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name = 'entries_v5')
    WHERE name = 'entries';
DROP TABLE entries_v5;
DROP TABLE transactions_v5;
CREATE INDEX entries_by_account ON entries (account, entry_id);
""",
}
"""Statements that take a database from version N to N + 1, run in one transaction.

1 -> 2: PIN failures carry their time, so that old ones are forgotten and their rows
deleted; rows from version 1 count as old, but a lock in force is kept until it ends.
2 -> 3: an entry records the terminal (its TLS certificate's identity) that booked it;
NULL for entries booked without one, as all earlier entries were.
3 -> 4: transactions, which every entry belongs to (a transfer has two entries under one
id): each existing entry gets a transaction row with its own kind, account, amount, time
and terminal and no counterparty, and ``entries`` is rebuilt (SQLite cannot drop a
constraint in place) with UNIQUE (txn_id, account) instead of UNIQUE (txn_id), keeping
every entry's id and the AUTOINCREMENT counter.
4 -> 5: ``destination_misses``, empty: transfers to no account before it were not
counted, so every account starts with none.
5 -> 6: an entry names its transaction by ``transactions.txn_no`` (the transaction's
rowid, now declared) instead of its 16-byte id, so that ``UNIQUE (txn_no, account)``
grows at its right edge instead of on a random page per posting (see ``_SCHEMA``). Both
tables are rebuilt, every transaction keeping its rowid as its number and every entry its
id and the AUTOINCREMENT counter. ``ALTER TABLE ... RENAME`` carries the foreign keys of
the old entries over to the renamed transactions, so both old tables drop cleanly. An entry
of no transaction (possible only by a hand edit with foreign keys off) is not dropped: its
NULL number fails the migration, which changes nothing.

A migration that takes a table's text from ``_SCHEMA`` (4 and 5 do) must be given a frozen
copy of it, as 3 was (``_TRANSACTIONS_V4``, ``_ENTRIES_V4``), when a later version changes
that table: it must build the tables of its own version."""

TRANSFER_TXN_KIND = int(TRANSFER.debit)
"""``transactions.kind`` of a transfer, 3. A transaction's kind is the kind of its entry
on ``transactions.account``: 1 deposit, 2 withdrawal, 3 a transfer's source entry."""


@dataclass(frozen=True, slots=True)
class PinPolicy:
    """When wrong PINs lock an account: the server's settings (``pin_tries_max``,
    ``pin_lockout_s``), given with every PIN check and held to what the storage can keep."""

    tries_max: int
    """Wrong PINs in a row that lock an account, each within ``lockout_ms`` of the last."""
    lockout_ms: int
    """How long a lock lasts (an operator can lift it earlier with ``unlock``), and how
    long a wrong PIN is remembered; 0 turns locking off."""

    def __post_init__(self) -> None:
        if self.tries_max < 1:
            raise ValueError("pin_tries_max must be at least 1")
        if not 0 <= self.lockout_ms <= LOCKOUT_MS_MAX:
            raise ValueError(f"lockout_ms must be 0..{LOCKOUT_MS_MAX} milliseconds (one year)")


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """When transfers to no account lock a source's TRANSFERs: the server's settings
    (``destination_tries_max``, ``destination_lockout_s``), given with every transfer and
    held to what the storage can keep, as ``PinPolicy`` is for wrong PINs. INVALID_TO_ACCOUNT
    tells a customer that no account has a number (spec §3.18); this bounds how many
    numbers one card can try to ``tries_max`` per ``lockout_ms``."""

    tries_max: int
    """Transfers to no account that lock, each within ``lockout_ms`` of the last. A
    transfer that is booked does not reset the count: interleaving good transfers would
    otherwise make the limit worthless."""
    lockout_ms: int
    """How long a lock lasts (an operator can lift it earlier with ``unlock``), and how
    long a miss is remembered; 0 turns locking off."""

    def __post_init__(self) -> None:
        if self.tries_max < 1:
            raise ValueError("destination_tries_max must be at least 1")
        if not 0 <= self.lockout_ms <= LOCKOUT_MS_MAX:
            raise ValueError(f"lockout_ms must be 0..{LOCKOUT_MS_MAX} milliseconds (one year)")


@dataclass(frozen=True, slots=True)
class PostRequest:
    """A deposit or withdrawal, as ``Store.execute_batch`` takes it (see ``Store.post``)."""

    account: str
    txn_id: bytes
    kind: EntryKind
    amount_cents: int
    limit_cents: int
    """The server's own limit for a new transaction of this kind (see ``Store.post``)."""
    terminal: str | None = None
    """The booking ATM's identity, from its TLS terminal certificate, if it had one."""
    fence: int | None = None
    """The session's lease fence, for a backend that fences leases (PostgreSQL); SQLite,
    one process holding every lease, ignores it."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """Money from ``account`` (the session's) to ``to_account`` (see ``Store.transfer``)."""

    account: str
    txn_id: bytes
    to_account: str
    amount_cents: int
    limit_cents: int
    """The server's own limit for a new transfer (its withdrawal limit)."""
    policy: DestinationPolicy
    """When transfers to no account lock the source's transfers."""
    terminal: str | None = None
    fence: int | None = None
    """As ``PostRequest.fence``: the source's lease fence; SQLite ignores it."""


@dataclass(frozen=True, slots=True)
class PinChange:
    """See ``Store.change_pin``."""

    account: str
    pin: str = field(repr=False)
    """The current PIN, checked as a LOGIN's is."""
    new_pin: str = field(repr=False)
    policy: PinPolicy
    fence: int | None = None
    """As ``PostRequest.fence``: the session's lease fence, for PostgreSQL; SQLite, one
    process holding every lease, ignores it."""


@dataclass(frozen=True, slots=True)
class PinCheck:
    """See ``Store.verify_pin``."""

    account: str
    pin: str = field(repr=False)
    policy: PinPolicy


@dataclass(frozen=True, slots=True)
class BalanceQuery:
    account: str


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    account: str
    count: int


BatchRequest = (
    PostRequest | TransferRequest | PinCheck | PinChange | BalanceQuery | HistoryQuery
)


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What ``Store.unlock`` cleared: the wrong PINs it counted, and when the lock they
    set ends (or ended), if they set one; and the same of its transfers to no account."""

    failures: int
    locked_until_ms: int | None
    destination_misses: int = 0
    transfers_locked_until_ms: int | None = None


class StoreError(Exception):
    """Base of the store's own errors: operator mistakes, not storage failures."""


class BatchAborted(Exception):
    """A batch request was refused after it had written: the whole batch is rolled back
    rather than commit half of it. A bug, never a customer's doing."""


class UnknownAccount(StoreError, LookupError):
    """No such account."""

    def __init__(self, account: str) -> None:
        super().__init__(f"no account {mask_account(account)}")
        self.account = account


class AccountExists(StoreError):
    """An account with that number already exists; it is never overwritten."""

    def __init__(self, account: str) -> None:
        super().__init__(f"account {mask_account(account)} exists already")
        self.account = account


class SchemaError(StoreError):
    """The database was written by a newer version of this program."""


Outcome = (
    Posting | PinVerdict | PinChangeVerdict | int | list[HistoryEntry] | StoreError | ValueError
)
"""What ``Store.execute_batch`` gives each request: its result, or its refusal."""


class Store:
    """The bank's accounts, ledger entries and PIN failure counters in one SQLite file."""

    driver_errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    """What a failing database raises (``bank.batch_ledger`` makes it StorageError)."""
    connections = 1
    """One connection, so one thread at a time."""
    statements_on_loop = True
    """A batch's statements are in-process work of microseconds, so the ledger runs them
    on the event loop, and only its COMMIT (the fsync) in a thread (``begin_batch_now``,
    ``run_batch``, ``commit_batch``; ``bank.batch_ledger`` says why)."""

    def __init__(
        self, db_path: str | os.PathLike[str], key: bytes, *, seed_demo: bool = True,
        create: bool = True,
    ) -> None:
        """Open the database at ``db_path``, creating (and seeding, if ``seed_demo``) it
        when missing or empty; with ``create`` false a missing file is an
        sqlite3.OperationalError and an empty one a StoreError, and nothing is written."""
        self._key = key
        # An unknown account is checked against this, so it costs one HMAC like a real one.
        self._dummy_salt = new_salt()
        self._dummy_hmac = bytes(PIN_HMAC_BYTES)
        self._conn = _connect(Path(db_path), create=create)
        self._cursor = self._conn.cursor()
        """One cursor for the posting path's statements: ``Connection.execute`` makes a
        new cursor object per call. Each statement's rows are read before the next."""
        self._canonical_accounts: set[str] = set()
        """Account numbers already checked and found canonical (``_canonical``)."""
        self.created = False
        """Whether this open created the database (made the schema in an empty file)."""
        self.seeded: tuple[str, ...] = ()
        """The demo accounts this open seeded into the new database."""
        try:
            self._create_schema_if_new(seed_demo=seed_demo)
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- customer operations -------------------------------------------------------------

    def verify_pin(self, account: str, pin: str, now_ms: int, policy: PinPolicy) -> PinResult:
        """MATCHED, WRONG or LOCKED; unknown accounts behave alike.

        While locked (``locked_until_ms > now_ms``) the PIN is not even checked. The
        failure that reaches ``policy.tries_max`` sets the lock and is already LOCKED,
        so the customer learns at once that retrying is pointless.
        A success clears the count; an expired lock is cleared by the next attempt.
        A malformed account or PIN is a ValueError (and counts nothing): the wire layer
        has already refused those.
        """
        with self._transaction():
            return self._check_pin(PinCheck(account, pin, policy), now_ms).result

    def _check_pin(self, check: PinCheck, now_ms: int) -> PinVerdict:
        """``verify_pin`` inside the caller's transaction, with what the operator's log
        may know besides: whether the account exists, and until when it is locked. It
        costs the same either way (an unknown account is checked against a dummy)."""
        account, policy = canonical_account(check.account), check.policy
        failures, locked_until_ms, last_failure_ms = self._pin_failures(account)
        if locked_until_ms is not None and locked_until_ms > now_ms:
            return PinVerdict(
                PinResult.LOCKED, self._account_exists(account), int(locked_until_ms)
            )
        if locked_until_ms is not None or last_failure_ms <= now_ms - policy.lockout_ms:
            failures = 0  # The lock expired, or the last failure is forgotten: a fresh start.
        matches, known = self._pin_matches(account, check.pin)
        if matches:
            self._conn.execute("DELETE FROM pin_failures WHERE account = ?", (account,))
            return PinVerdict(PinResult.MATCHED)
        result = self._record_pin_failure(account, failures + 1, now_ms, policy)
        if result is PinResult.LOCKED:
            return PinVerdict(result, known, now_ms + policy.lockout_ms)
        return PinVerdict(result, known)

    def balance(self, account: str) -> int:
        """The balance in cents; UnknownAccount if there is no such account."""
        account = self._canonical(account)
        row = self._cursor.execute(_BALANCE_SQL, (account,)).fetchone()
        if row is None:
            raise UnknownAccount(account)
        return int(row[0])

    def post(
        self,
        *,
        account: str,
        txn_id: bytes,
        kind: EntryKind,
        amount_cents: int,
        now_ms: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        """Apply a deposit or withdrawal once, in one committed transaction.

        A known ``txn_id`` is REPLAYED with its original entry if account, kind and
        amount match, and TXN_ID_REUSED otherwise. Only then is a new transaction held
        to ``limit_cents``, so a retry's outcome cannot change with the server's
        settings. Refusals (AMOUNT_OUT_OF_RANGE, OVER_LIMIT, INSUFFICIENT_FUNDS,
        BALANCE_FULL) record nothing, so a retry with the same id is judged afresh.
        ``fence`` is ignored: one process serves an SQLite file (see ``PostRequest``).
        """
        request = PostRequest(
            account, txn_id, EntryKind(kind), amount_cents, limit_cents, terminal, fence
        )
        return self._posting_alone(request, now_ms)

    def transfer(
        self,
        *,
        account: str,
        txn_id: bytes,
        to_account: str,
        amount_cents: int,
        now_ms: int,
        limit_cents: int,
        policy: DestinationPolicy,
        terminal: str | None = None,
    ) -> Posting:
        """Move money from ``account`` to ``to_account`` once, in one committed
        transaction: both balances, the transaction row and both entries, or nothing.

        Judged in this order, the first that holds answering: a malformed account or id
        is a ValueError; AMOUNT_OUT_OF_RANGE; a known ``txn_id`` is REPLAYED with the
        source's original entry if source, destination and amount match (TXN_ID_REUSED
        otherwise), so an ATM confirming a transfer learns the truth even once locked;
        TRANSFERS_LOCKED while the source's transfers are locked; SAME_ACCOUNT;
        OVER_LIMIT (``limit_cents``); INSUFFICIENT_FUNDS; UNKNOWN_DESTINATION;
        BALANCE_FULL (the destination's). The destination is looked up only once the
        source could pay, so a customer learns whether an account exists only by
        offering money they have, as a deposit slip would tell them.

        Refusals record nothing but UNKNOWN_DESTINATION, which counts one miss for the
        source; the miss that brings its count to ``policy.tries_max`` (each within
        ``policy.lockout_ms`` of the one before) sets the lock and is already
        TRANSFERS_LOCKED, as the wrong PIN that locks is LOCKED (``verify_pin``): the
        customer learns at once that retrying is pointless. A booked transfer leaves the
        count alone; only time (a miss is forgotten ``lockout_ms`` after it, a lock ends
        ``lockout_ms`` after the miss that set it) or ``unlock`` clears it. The source
        must exist (it is the session's account).
        """
        request = TransferRequest(
            account, txn_id, to_account, amount_cents, limit_cents, policy, terminal
        )
        return self._posting_alone(request, now_ms)

    def change_pin(
        self, account: str, pin: str, new_pin: str, now_ms: int, policy: PinPolicy
    ) -> PinChangeVerdict:
        """A customer's PIN change (see ``PinChangeResult``): TRIVIAL first, counting
        nothing; then the current PIN is checked exactly as ``verify_pin`` checks it, a
        wrong one counting toward the lockout; if it matches, the new PIN is stored with
        a new salt and the failures are cleared."""
        (outcome,) = self.execute_batch([PinChange(account, pin, new_pin, policy)], now_ms)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, PinChangeVerdict)
        return outcome

    def _posting_alone(self, request: PostRequest | TransferRequest, now_ms: int) -> Posting:
        (outcome,) = self.execute_batch([request], now_ms)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, Posting)
        return outcome

    def execute_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]:
        """Run requests in order in ONE transaction: one commit, one fsync, for all.

        Each request gets exactly the outcome its own method would give it run alone in
        this order (a later request sees the earlier ones, including the same txn_id
        twice). A request that raises StoreError or ValueError (an unknown account, a
        malformed id) before it wrote anything gets that exception as its outcome, and the
        others commit unaffected. One that raises after it wrote (a bug: every check
        comes first) raises BatchAborted instead, which rolls back the whole batch, as
        any other exception does, a sqlite3.Error included.

        Checked by SQLite's count of changed rows, not a SAVEPOINT per request: a
        savepoint and its release cost the server 4-9 % of its CPU per request under
        ``python -m bank.bench`` (BENCHMARKS.md), more in GIL hand-offs than in SQLite.
        """
        with self._transaction():
            return self._run_requests(requests, now_ms)

    # -- a batch in two steps, for the event loop (bank.batch_ledger) ----------------------

    def begin_batch_now(self) -> bool:
        """BEGIN IMMEDIATE if the write lock is free this instant; False, with nothing
        begun, if another connection holds it (an operator command's write). Then run
        the batch with ``execute_batch`` in a thread, which waits for the lock up to
        BUSY_TIMEOUT_MS: this one never waits, so that it can run on the event loop."""
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            # The primary code: SQLITE_BUSY_RECOVERY (another connection is recovering
            # the WAL) and its kin are worth waiting for in the thread, too.
            code: int | None = getattr(error, "sqlite_errorcode", None)
            if code is not None and code & _PRIMARY_CODE_MASK == sqlite3.SQLITE_BUSY:
                return False
            raise
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return True

    def run_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]:
        """``execute_batch``'s work inside the transaction ``begin_batch_now`` began, all
        but its COMMIT: the outcomes, to be given only once ``commit_batch`` has returned.
        On any exception the transaction is rolled back and the exception raised."""
        try:
            return self._run_requests(requests, now_ms)
        except BaseException:
            self._roll_back()
            raise

    def commit_batch(self) -> None:
        """COMMIT what ``run_batch`` did: the WAL write and its fsync (synchronous=FULL),
        and now and then a checkpoint; on failure, roll back (if SQLite has not already)
        and raise."""
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    def _run_requests(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]:
        """Each request's outcome in order, inside the caller's transaction (see
        ``execute_batch``): a refusal before any write is that request's outcome, one
        after a write raises BatchAborted."""
        outcomes: list[Outcome] = []
        for request in requests:
            changes = self._conn.total_changes
            try:
                outcomes.append(self._execute(request, now_ms))
            except (StoreError, ValueError) as error:
                if self._conn.total_changes != changes:
                    raise BatchAborted(
                        f"a {type(request).__name__} was refused after it wrote: {error}"
                    ) from error
                outcomes.append(error)
        return outcomes

    def _execute(self, request: BatchRequest, now_ms: int) -> Outcome:
        match request:
            case PostRequest():
                return self._post_one(request, now_ms)
            case TransferRequest():
                return self._transfer_one(request, now_ms)
            case PinCheck():
                return self._check_pin(request, now_ms)
            case PinChange():
                return self._change_pin(request, now_ms)
            case BalanceQuery(account):
                return self.balance(account)
            case HistoryQuery(account, count):
                return self.history(account, count)
        raise TypeError(f"not a batch request: {request!r}")

    def _post_one(self, request: PostRequest, now_ms: int) -> Posting:
        """One post inside the caller's transaction; every refusal comes before any write
        (``execute_batch`` rolls back the whole batch if one does not).

        Five statements when it books (six before): the replay check, the balance
        UPDATE (its WHERE clause the rule), the balance SELECT and the two INSERTs.
        Whether the account exists is asked only when the UPDATE changed no row, which
        is also before any write: so UnknownAccount still comes before the rule's
        refusal, and a booking pays for one statement less (each ``execute`` is at
        least ~1 us of SQLite and a GIL hand-off with the event loop's thread).
        ``UPDATE ... RETURNING`` instead of the SELECT measured slower here (by ~2 us a
        posting), as did folding the SELECT into the entry's INSERT.
        """
        account = self._canonical(request.account)
        txn_id = request.txn_id
        _check_txn_id(txn_id)
        amount_cents = request.amount_cents
        if type(amount_cents) is not int or not 1 <= amount_cents <= AMOUNT_CENTS_MAX:
            return Posting(PostResult.AMOUNT_OUT_OF_RANGE)
        kind = request.kind
        prior = self._prior_transaction(txn_id)
        if prior is not None:
            return _replay(prior, (int(kind), account, None, amount_cents))
        if amount_cents > request.limit_cents:
            return Posting(PostResult.OVER_LIMIT)
        post_kind = _POST_KINDS.get(kind)
        if post_kind is None:  # not a kind of posting: a bug, as KIND_OF_ENTRY says
            self._require_account(account)
            raise KeyError(kind)
        cursor = self._cursor
        change = post_kind.change
        if cursor.execute(change.sqlite_sql, (BALANCE_CENTS_MAX, amount_cents, account)
                          ).rowcount != 1:
            self._require_account(account)  # an unknown account is refused as such
            return Posting(change.refusal)
        balance_cents = cursor.execute(_BALANCE_SQL, (account,)).fetchone()[0]
        terminal = request.terminal
        txn_no = cursor.execute(
            _INSERT_TRANSACTION_SQL,
            (txn_id, post_kind.txn_kind, account, None, amount_cents, now_ms, terminal),
        ).lastrowid
        entry_id = self._insert_entry(
            account=account,
            txn_no=txn_no,
            kind=kind,
            amount_cents=amount_cents,
            balance_cents=balance_cents,
            now_ms=now_ms,
            terminal=terminal,
        )
        return Posting(PostResult.BOOKED, balance_cents, entry_id, now_ms)

    def _transfer_one(self, request: TransferRequest, now_ms: int) -> Posting:
        """One transfer inside the caller's transaction (``transfer`` gives the order of
        its checks); every refusal comes before any write. The two balance updates
        cannot then refuse, and if one did (a bug) it raises after a write, which rolls
        back the whole batch (``execute_batch``).

        Both balances are read once, before the writes: this transaction holds the
        write lock and the legs move them by exactly ``amount_cents``, so the entries'
        and the receipt's balances are those plus or minus it, not read again (eight
        statements a booked transfer, twelve before). The destination's one SELECT
        answers both whether it exists and whether it has room.
        """
        source = self._canonical(request.account)
        destination = self._canonical(request.to_account)
        txn_id = request.txn_id
        _check_txn_id(txn_id)
        amount_cents = request.amount_cents
        if type(amount_cents) is not int or not 1 <= amount_cents <= AMOUNT_CENTS_MAX:
            return Posting(PostResult.AMOUNT_OUT_OF_RANGE)
        prior = self._prior_transaction(txn_id)
        if prior is not None:
            return _replay(prior, (TRANSFER_TXN_KIND, source, destination, amount_cents))
        misses, locked_until_ms, last_miss_ms = self._destination_misses(source)
        if locked_until_ms is not None and locked_until_ms > now_ms:
            return Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=int(locked_until_ms))
        if source == destination:
            return Posting(PostResult.SAME_ACCOUNT)
        if amount_cents > request.limit_cents:
            return Posting(PostResult.OVER_LIMIT)
        source_cents = self.balance(source)
        if source_cents < amount_cents:
            return Posting(PostResult.INSUFFICIENT_FUNDS)
        row = self._cursor.execute(_BALANCE_SQL, (destination,)).fetchone()
        if row is None:
            policy = request.policy
            if locked_until_ms is not None or last_miss_ms <= now_ms - policy.lockout_ms:
                misses = 0  # the lock expired, or the last miss is forgotten: a fresh start
            return self._record_destination_miss(source, misses + 1, now_ms, policy)
        destination_cents = row[0]
        if destination_cents > BALANCE_CENTS_MAX - amount_cents:
            return Posting(PostResult.BALANCE_FULL)
        legs = (
            (source, TRANSFER.debit, source_cents - amount_cents),
            (destination, TRANSFER.credit, destination_cents + amount_cents),
        )
        for account, kind, _ in legs:
            change = _BALANCE_CHANGES[entry_change_cents(kind, 1)]
            if not self._move_money(account, change, amount_cents):
                raise StoreError(f"the {kind.name} leg was refused after its checks passed")
        terminal = request.terminal
        txn_no = self._cursor.execute(
            _INSERT_TRANSACTION_SQL,
            (txn_id, TRANSFER_TXN_KIND, source, destination, amount_cents, now_ms, terminal),
        ).lastrowid
        entry_ids = [
            self._insert_entry(
                account=account,
                txn_no=txn_no,
                kind=kind,
                amount_cents=amount_cents,
                balance_cents=balance_cents,
                now_ms=now_ms,
                terminal=terminal,
            )
            for account, kind, balance_cents in legs
        ]
        return Posting(PostResult.BOOKED, legs[0][2], entry_ids[0], now_ms)

    def _change_pin(self, request: PinChange, now_ms: int) -> PinChangeVerdict:
        """``change_pin`` inside the caller's transaction. The current PIN goes through
        ``_check_pin``, so its counting, locking and forgetting are a LOGIN's exactly."""
        account = canonical_account(request.account)
        check_pin(request.pin)
        if is_trivial_pin(request.new_pin):
            return PinChangeVerdict(PinChangeResult.TRIVIAL)
        verdict = self._check_pin(PinCheck(account, request.pin, request.policy), now_ms)
        if verdict.result is PinResult.LOCKED:
            return PinChangeVerdict(PinChangeResult.LOCKED, verdict.locked_until_ms)
        if verdict.result is PinResult.WRONG:
            return PinChangeVerdict(PinChangeResult.WRONG)
        self._store_pin(account, request.new_pin)  # _check_pin cleared the failures
        return PinChangeVerdict(PinChangeResult.CHANGED)

    def history(self, account: str, count: int) -> list[HistoryEntry]:
        """The ``count`` most recent entries, newest first."""
        account = canonical_account(account)
        if count < 0:
            raise ValueError("count must be >= 0")
        self._require_account(account)
        rows = self._conn.execute(
            "SELECT entry_id, time_ms, kind, amount_cents, balance_cents FROM entries"
            " WHERE account = ? ORDER BY entry_id DESC LIMIT ?",
            (account, count),
        ).fetchall()
        return [HistoryEntry(e, t, EntryKind(k), a, b) for e, t, k, a, b in rows]

    # -- operator operations -------------------------------------------------------------

    def add_account(self, account: str, pin: str, opening_cents: int) -> None:
        """Open an account; AccountExists if the number is taken (never overwritten)."""
        with self._transaction():
            self._insert_account(canonical_account(account), pin, opening_cents)

    def add_accounts(self, records: Sequence[AccountRecord]) -> int:
        """Open every account in ``records`` (an accounts file's), all or nothing;
        returns how many. One that already exists aborts them all with AccountExists."""
        with self._transaction():
            for record in records:
                self._insert_account(record.account, record.pin, record.balance_cents)
        return len(records)

    def reset_pin(self, account: str, pin: str) -> None:
        """Set a new PIN (with a new salt) and lift any lock on the account."""
        account = canonical_account(account)
        with self._transaction():
            self._require_account(account)
            self._store_pin(account, pin)
            self._conn.execute("DELETE FROM pin_failures WHERE account = ?", (account,))

    def unlock(self, account: str) -> Forgotten:
        """Clear the account's PIN failures and lock, and its transfers to no account
        and their lock; returns what was cleared."""
        account = canonical_account(account)
        with self._transaction():
            self._require_account(account)
            failures, locked_until_ms, _ = self._pin_failures(account)
            misses, transfers_locked_until_ms, _ = self._destination_misses(account)
            self._conn.execute("DELETE FROM pin_failures WHERE account = ?", (account,))
            self._conn.execute("DELETE FROM destination_misses WHERE account = ?", (account,))
        return Forgotten(failures, locked_until_ms, misses, transfers_locked_until_ms)

    def close(self) -> None:
        """Fold the WAL back into the database file and close; safe to call twice.

        A clean close leaves a single self-contained file, which is what a backup or a
        copy to another machine expects.
        """
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.ProgrammingError:
            return  # Already closed.
        finally:
            self._conn.close()  # A no-op when already closed.

    # -- checks for tests and tools --------------------------------------------------------

    def integrity_ok(self) -> bool:
        """SQLite's own page-level check plus the foreign keys."""
        result = self._conn.execute("PRAGMA integrity_check").fetchall()
        dangling = self._conn.execute("PRAGMA foreign_key_check").fetchall()
        return result == [("ok",)] and not dangling

    def check_invariants(self) -> list[str]:
        """Every broken money rule, as text; empty when the books balance.

        Per account: replaying its entries in order from the opening balance must give
        each entry's recorded balance and end at the stored balance (so balance ==
        opening + credits - debits), and no balance may be negative. Per transaction:
        its entries are exactly what its kind books (``transaction_problems``), so a
        transfer's two legs move the same amount and money is conserved across all
        accounts: their balances sum to their openings plus deposits minus withdrawals.
        """
        problems: list[str] = []
        with self._read_snapshot():
            accounts = self._conn.execute(
                "SELECT account, opening_cents, balance_cents FROM accounts ORDER BY account"
            ).fetchall()
            for account, opening_cents, balance_cents in accounts:
                problems += self._account_problems(account, opening_cents, balance_cents)
            problems += transaction_problems(self._conn, _ENTRY_OF_TRANSACTION)
        return problems

    # -- internals -----------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (also on an early return), ROLLBACK on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    def _roll_back(self) -> None:
        """ROLLBACK the transaction in progress, if SQLite has not ended it already."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        """A deferred transaction: several SELECTs see one consistent state."""
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _create_schema_if_new(self, *, seed_demo: bool) -> None:
        with self._transaction():
            version = self._schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than {SCHEMA_VERSION}"
                )
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                self._execute_script(_SCHEMA)
                if seed_demo:
                    for account, pin, balance_cents in DEMO_ACCOUNTS:
                        self._insert_account(account, pin, balance_cents)
                self.created = True
                self.seeded = tuple(account for account, _, _ in DEMO_ACCOUNTS) if seed_demo else ()
            else:
                for step in range(version, SCHEMA_VERSION):
                    self._execute_script(_MIGRATIONS[step])
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _execute_script(self, script: str) -> None:
        """Each statement of ``script`` in the caller's transaction (executescript commits)."""
        for statement in script.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    def _insert_account(self, account: str, pin: str, opening_cents: int) -> None:
        row = new_account_row(self._key, account, pin, opening_cents)
        if self._account_exists(account):
            raise AccountExists(account)
        self._conn.execute(
            "INSERT INTO accounts (account, pin_salt, pin_hmac, opening_cents, balance_cents)"
            " VALUES (?, ?, ?, ?, ?)",
            row,
        )

    def _store_pin(self, account: str, pin: str) -> None:
        """The PIN's keyed hash under a new salt, replacing the account's."""
        salt = new_salt()
        self._conn.execute(
            "UPDATE accounts SET pin_salt = ?, pin_hmac = ? WHERE account = ?",
            (salt, hash_pin(self._key, salt, account, check_pin(pin)), account),
        )

    def _canonical(self, account: str) -> str:
        """``canonical_account(account)``, checked exactly as it checks (a ValueError for
        anything that is not AA-NNNNN), with a set lookup first for an account number
        already found canonical: the session passes the canonical form, and the regex
        and ``upper`` cost about 0.6 us a request against 0.05 for the lookup."""
        if type(account) is str and account in self._canonical_accounts:
            return account
        canonical = canonical_account(account)
        if canonical == account:
            if len(self._canonical_accounts) >= CANONICAL_ACCOUNTS_REMEMBERED_MAX:
                self._canonical_accounts.clear()
            self._canonical_accounts.add(canonical)
        return canonical

    def _account_exists(self, account: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone()
        return row is not None

    def _require_account(self, account: str) -> None:
        if not self._account_exists(account):
            raise UnknownAccount(account)

    def _pin_failures(self, account: str) -> tuple[int, int | None, int]:
        """(failures, locked_until_ms, last_failure_ms); (0, None, 0) if none are recorded."""
        row = self._conn.execute(
            "SELECT failures, locked_until_ms, last_failure_ms FROM pin_failures"
            " WHERE account = ?",
            (account,),
        ).fetchone()
        return (0, None, 0) if row is None else (int(row[0]), row[1], int(row[2]))

    def _pin_matches(self, account: str, pin: str) -> tuple[bool, bool]:
        """(the PIN matches, the account exists): one HMAC and one compare whether or
        not the account exists."""
        row = self._conn.execute(
            "SELECT pin_salt, pin_hmac FROM accounts WHERE account = ?", (account,)
        ).fetchone()
        salt, expected = (self._dummy_salt, self._dummy_hmac) if row is None else row
        matches = verify(self._key, salt, account, pin, expected)
        return matches and row is not None, row is not None

    def _record_pin_failure(
        self, account: str, failures: int, now_ms: int, policy: PinPolicy
    ) -> PinResult:
        self._prune_pin_failures(now_ms, policy.lockout_ms)
        locked = failures >= policy.tries_max
        self._conn.execute(
            "INSERT INTO pin_failures (account, failures, locked_until_ms, last_failure_ms)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE"
            " SET failures = excluded.failures, locked_until_ms = excluded.locked_until_ms,"
            " last_failure_ms = excluded.last_failure_ms",
            (account, failures, now_ms + policy.lockout_ms if locked else None, now_ms),
        )
        return PinResult.LOCKED if locked else PinResult.WRONG

    def _prune_pin_failures(self, now_ms: int, lockout_ms: int) -> None:
        """Delete the oldest forgotten failure rows (no lock in force), a few at a time.

        Every wrong PIN for any account string adds a row, so without this a guesser
        trying account numbers would grow the table without bound.
        """
        self._conn.execute(
            "DELETE FROM pin_failures WHERE account IN ("
            " SELECT account FROM pin_failures"
            " WHERE last_failure_ms <= :forgotten AND coalesce(locked_until_ms, 0) <= :now"
            " ORDER BY last_failure_ms LIMIT :limit)",
            {
                "forgotten": now_ms - lockout_ms,
                "now": now_ms,
                "limit": PIN_FAILURES_PRUNED_MAX,
            },
        )

    def _destination_misses(self, account: str) -> tuple[int, int | None, int]:
        """(misses, locked_until_ms, last_miss_ms) of a transfer source; (0, None, 0) if
        none are recorded."""
        row = self._cursor.execute(_DESTINATION_MISSES_SQL, (account,)).fetchone()
        return (0, None, 0) if row is None else (int(row[0]), row[1], int(row[2]))

    def _record_destination_miss(
        self, account: str, misses: int, now_ms: int, policy: DestinationPolicy
    ) -> Posting:
        """Count a transfer to no account against its source, pruning forgotten rows as
        ``_record_pin_failure`` does; TRANSFERS_LOCKED if this miss locks."""
        self._conn.execute(
            "DELETE FROM destination_misses WHERE account IN ("
            " SELECT account FROM destination_misses"
            " WHERE last_miss_ms <= :forgotten AND coalesce(locked_until_ms, 0) <= :now"
            " ORDER BY last_miss_ms LIMIT :limit)",
            {
                "forgotten": now_ms - policy.lockout_ms,
                "now": now_ms,
                "limit": DESTINATION_MISSES_PRUNED_MAX,
            },
        )
        locked_until_ms = now_ms + policy.lockout_ms if misses >= policy.tries_max else None
        self._conn.execute(
            "INSERT INTO destination_misses (account, misses, locked_until_ms, last_miss_ms)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE"
            " SET misses = excluded.misses, locked_until_ms = excluded.locked_until_ms,"
            " last_miss_ms = excluded.last_miss_ms",
            (account, misses, locked_until_ms, now_ms),
        )
        if locked_until_ms is None:
            return Posting(PostResult.UNKNOWN_DESTINATION)
        return Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=locked_until_ms)

    def _prior_transaction(self, txn_id: bytes) -> _Prior | None:
        """The transaction booked under ``txn_id``, with its own account's entry."""
        row = self._cursor.execute(_PRIOR_TRANSACTION_SQL, (txn_id,)).fetchone()
        if row is None:
            return None
        kind, account, counterparty, amount, entry_id, balance, time_ms = row
        return _Prior((kind, account, counterparty, amount), entry_id, balance, time_ms)

    def _move_money(self, account: str, change: _BalanceChange, amount_cents: int) -> bool:
        """Change the balance if ``change``'s rule allows; whether a row changed."""
        params = (BALANCE_CENTS_MAX, amount_cents, account)
        return self._cursor.execute(change.sqlite_sql, params).rowcount == 1

    def _insert_entry(
        self,
        *,
        account: str,
        txn_no: int | None,
        kind: EntryKind,
        amount_cents: int,
        balance_cents: int,
        now_ms: int,
        terminal: str | None,
    ) -> int:
        """The entry of ``account`` in transaction ``txn_no`` (the ``lastrowid`` of its
        INSERT, which SQLite always gives for a rowid table); its entry id."""
        assert txn_no is not None
        cursor = self._cursor.execute(
            _INSERT_ENTRY_SQL,
            (account, txn_no, int(kind), amount_cents, balance_cents, now_ms, terminal),
        )
        entry_id = cursor.lastrowid
        assert entry_id is not None
        return entry_id

    def _account_problems(self, account: str, opening_cents: int, balance_cents: int) -> list[str]:
        entries = self._conn.execute(
            "SELECT entry_id, kind, amount_cents, balance_cents FROM entries"
            " WHERE account = ? ORDER BY entry_id",
            (account,),
        )
        return account_problems(account, opening_cents, balance_cents, entries)


def account_problems(
    account: str, opening_cents: int, balance_cents: int,
    entries: Iterable[tuple[int, EntryKind, int, int]],
) -> list[str]:
    """One account's broken money rules (see ``Store.check_invariants``), from its
    (entry_id, kind, amount_cents, balance_cents) rows in entry_id order: the same rules
    for every store."""
    problems: list[str] = []
    running = opening_cents
    for entry_id, kind, amount_cents, recorded_cents in entries:
        running += entry_change_cents(kind, amount_cents)
        if running != recorded_cents:
            problems.append(
                f"{account}: entry {entry_id} records {recorded_cents}, replay gives {running}"
            )
        if running < 0:
            problems.append(f"{account}: negative balance {running} after {entry_id}")
    if running != balance_cents:
        problems.append(
            f"{account}: balance {balance_cents} != opening + credits - debits"
            f" = {running}"
        )
    if balance_cents < 0:
        problems.append(f"{account}: negative balance {balance_cents}")
    return problems


def transaction_problems(conn: sqlite3.Connection | Any, entry_of_transaction: str) -> list[str]:
    """Every transaction whose entries are not what its kind books, and money that is
    not conserved across all accounts, as text; empty when all is well.

    A deposit or withdrawal has one entry of its own kind, on its account, for its
    amount; a transfer two, TRANSFER_OUT on its account and TRANSFER_IN on its
    counterparty, both for its amount; every entry belongs to a transaction (a foreign
    key). Then, transfers netting to zero, the balances of all accounts sum to their
    openings plus every deposit minus every withdrawal. Its SQL takes no parameters, so
    either store's connection (sqlite3's or psycopg's) runs it, given the condition
    that joins an entry ``e`` to its transaction ``t`` in that store's schema.
    """
    problems: list[str] = []
    rows = conn.execute(
        "SELECT t.txn_id, t.kind, t.account, t.counterparty, t.amount_cents,"
        " e.account, e.kind, e.amount_cents"
        f" FROM transactions AS t LEFT JOIN entries AS e ON {entry_of_transaction}"
        " ORDER BY t.txn_id, e.entry_id"
    ).fetchall()
    booked: dict[bytes, tuple[tuple[str, int, int], ...]] = {}
    expected: dict[bytes, tuple[tuple[str, int, int], ...]] = {}
    for txn_id, kind, account, counterparty, amount, e_account, e_kind, e_amount in rows:
        if kind == TRANSFER_TXN_KIND:
            expected[txn_id] = (
                (account, int(TRANSFER.debit), amount),
                (counterparty, int(TRANSFER.credit), amount),
            )
        else:
            expected[txn_id] = ((account, kind, amount),)
        if e_account is not None:
            booked[txn_id] = (*booked.get(txn_id, ()), (e_account, e_kind, e_amount))
    for txn_id, legs in expected.items():
        if sorted(booked.get(txn_id, ())) != sorted(legs):
            problems.append(f"transaction {txn_id.hex()}: entries {booked.get(txn_id, ())}"
                            f" are not its legs {legs}")
    # Summed in Python: SQLite's sum() raises on overflow, and balances go up to 2**63 - 1.
    accounts = conn.execute("SELECT opening_cents, balance_cents FROM accounts").fetchall()
    opening = sum(row[0] for row in accounts)
    balance = sum(row[1] for row in accounts)
    net = sum(
        entry_change_cents(kind, amount)
        for kind, amount in conn.execute(
            f"SELECT kind, amount_cents FROM transactions WHERE kind <> {TRANSFER_TXN_KIND}"
        )
    )
    if balance != opening + net:
        problems.append(
            f"money not conserved: balances sum to {balance}, openings {opening}"
            f" + deposits - withdrawals {net} = {opening + net}"
        )
    return problems


@dataclass(frozen=True, slots=True)
class _BalanceChange:
    """One direction a posting moves a balance: its UPDATE, whose WHERE clause holds the
    rule so that check and change are one statement, and the outcome when it refuses."""

    sql: str
    """With named parameters ``:amount``, ``:account``, ``:max`` (``bank.pg_store``
    rewrites them for psycopg)."""
    refusal: PostResult
    sqlite_sql: str = field(init=False, repr=False)
    """``sql`` with the positional parameters ``?1`` max, ``?2`` amount, ``?3`` account,
    bound from a tuple: sqlite3 binds a tuple faster than it looks names up in a dict."""

    def __post_init__(self) -> None:
        positional = (
            self.sql.replace(":max", "?1").replace(":amount", "?2").replace(":account", "?3")
        )
        assert ":" not in positional, positional
        object.__setattr__(self, "sqlite_sql", positional)


_BALANCE_CHANGES: dict[int, _BalanceChange] = {
    # A debit may not overdraw.
    -1: _BalanceChange(
        "UPDATE accounts SET balance_cents = balance_cents - :amount"
        " WHERE account = :account AND balance_cents >= :amount",
        PostResult.INSUFFICIENT_FUNDS,
    ),
    # A credit may not pass BALANCE_CENTS_MAX (written as a subtraction, so that the SQL
    # arithmetic itself never overflows).
    +1: _BalanceChange(
        "UPDATE accounts SET balance_cents = balance_cents + :amount"
        " WHERE account = :account AND balance_cents <= :max - :amount",
        PostResult.BALANCE_FULL,
    ),
}
"""By a kind's sign (``wire._kinds``): a kind moves money the one way or the other."""


@dataclass(frozen=True, slots=True)
class _PostKind:
    """What ``Store._post_one`` needs of a kind of posting, looked up once per posting."""

    txn_kind: int
    """``transactions.kind`` (and ``entries.kind``): the entry kind's number."""
    change: _BalanceChange


_POST_KINDS: dict[EntryKind, _PostKind] = {
    entry_kind: _PostKind(int(entry_kind), _BALANCE_CHANGES[kind.sign])
    for entry_kind, kind in KIND_OF_ENTRY.items()
}
"""``KIND_OF_ENTRY`` and ``_BALANCE_CHANGES`` in one lookup, by entry kind."""

# The posting path's statements, on ``Store._cursor`` with positional parameters.
_BALANCE_SQL = "SELECT balance_cents FROM accounts WHERE account = ?"
_DESTINATION_MISSES_SQL = (
    "SELECT misses, locked_until_ms, last_miss_ms FROM destination_misses WHERE account = ?"
)
_PRIOR_TRANSACTION_SQL = (
    "SELECT t.kind, t.account, t.counterparty, t.amount_cents,"
    " e.entry_id, e.balance_cents, e.time_ms"
    " FROM transactions AS t JOIN entries AS e"
    " ON e.txn_no = t.txn_no AND e.account = t.account WHERE t.txn_id = ?"
)
_INSERT_TRANSACTION_SQL = (
    "INSERT INTO transactions"
    " (txn_id, kind, account, counterparty, amount_cents, time_ms, terminal)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ENTRY_SQL = (
    "INSERT INTO entries"
    " (account, txn_no, kind, amount_cents, balance_cents, time_ms, terminal)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _connect(db_path: Path, *, create: bool = True) -> sqlite3.Connection:
    """Autocommit mode (we issue BEGIN ourselves), usable from whichever worker thread;
    without ``create``, a missing file is an error rather than a new database."""
    target, uri = (db_path, False) if create else (f"{db_path.resolve().as_uri()}?mode=rw", True)
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not create and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            raise StoreError(f"{db_path} is not a bank database")  # checked before any write
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"could not enable WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def new_account_row(
    key: bytes, account: str, pin: str, opening_cents: int
) -> tuple[str, bytes, bytes, int, int]:
    """A new account's (account, pin_salt, pin_hmac, opening_cents, balance_cents), its
    PIN and opening balance checked (ValueError): the same for every store."""
    check_pin(pin)
    if type(opening_cents) is not int or not 0 <= opening_cents <= BALANCE_CENTS_MAX:
        raise ValueError(f"opening balance out of range: {opening_cents!r}")
    salt = new_salt()
    return account, salt, hash_pin(key, salt, account, pin), opening_cents, opening_cents


def _check_txn_id(txn_id: bytes) -> None:
    if not isinstance(txn_id, bytes) or len(txn_id) != TXN_ID_BYTES:
        raise ValueError(f"txn_id must be {TXN_ID_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class _Prior:
    """A booked transaction as a retry is judged against it: what it asked for (kind,
    account, counterparty, amount), and its own account's entry, the receipt's data."""

    content: tuple[int, str, str | None, int]
    entry_id: int
    balance_cents: int
    time_ms: int


def _replay(prior: _Prior, content: tuple[int, str, str | None, int]) -> Posting:
    """The original entry if the retry asks for the same thing (kind, account,
    counterparty, amount), else TXN_ID_REUSED."""
    if prior.content != content:
        return Posting(PostResult.TXN_ID_REUSED)
    return Posting(PostResult.REPLAYED, prior.balance_cents, prior.entry_id, prior.time_ms)


# -- Reading the books from outside: audits and bank.tools.chaos's checker ----------------
# Each reader takes an SQLite path or a PostgreSQL URL (``bank.config.is_postgresql``).


@dataclass(frozen=True, slots=True)
class BookEntry:
    """One row of the ledger, as stored."""

    entry_id: int
    account: str
    txn_id: bytes
    kind: EntryKind
    amount_cents: int
    balance_cents: int
    time_ms: int
    terminal: str | None = None
    """The TLS identity of the ATM that booked it; None if it had none."""
    counterparty: str | None = None
    """For a transfer's entry, the other account: the destination of a TRANSFER_OUT,
    the source of a TRANSFER_IN. None for a deposit or withdrawal."""


@dataclass(frozen=True, slots=True)
class Books:
    """Every account's opening and current balance, and every entry in entry_id order."""

    opening_cents: dict[str, int]
    balance_cents: dict[str, int]
    entries: tuple[BookEntry, ...]


@dataclass(frozen=True, slots=True)
class AccountSummary:
    """One account as ``python -m bank accounts`` lists it."""

    account: str
    balance_cents: int
    locked_until_ms: int | None
    """When its wrong-PIN lock ends (or ended); None if wrong PINs never locked it."""
    transfers_locked_until_ms: int | None = None
    """When the lock on its transfers ends (or ended); None if transfers to no account
    never locked them."""


ACCOUNTS_SUMMARY_SQL = (
    "SELECT accounts.account, balance_cents, pin_failures.locked_until_ms,"
    " destination_misses.locked_until_ms FROM accounts"
    " LEFT JOIN pin_failures ON pin_failures.account = accounts.account"
    " LEFT JOIN destination_misses ON destination_misses.account = accounts.account"
    " ORDER BY accounts.account"
)
"""``read_accounts_summary``'s one query, the same for both stores."""


@contextmanager
def _read_only(db_path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """A read-only connection in one snapshot: creates, seeds and migrates nothing, so a
    missing file is an sqlite3.OperationalError and one that is not a bank database (an
    empty file, say) a StoreError. A server may be running meanwhile (WAL)."""
    uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN")  # one snapshot for every SELECT; closing rolls it back
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            raise StoreError(f"{db_path} is not a bank database")
        if version > SCHEMA_VERSION:
            raise SchemaError(f"database schema version {version} is newer than {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:  # a reader migrates nothing, and reads only this one
            raise SchemaError(
                f"database schema version {version} is older than {SCHEMA_VERSION}: start"
                " the server (or run any command that writes) once to migrate it"
            )
        yield conn
    finally:
        conn.close()


_ENTRY_COLUMNS = (
    "e.entry_id, e.account, t.txn_id, e.kind, e.amount_cents, e.balance_cents, e.time_ms,"
    " e.terminal, CASE WHEN e.account = t.account THEN t.counterparty ELSE t.account END"
)
_ENTRY_OF_TRANSACTION = "e.txn_no = t.txn_no"
"""How an entry ``e`` names its transaction ``t`` here (``transaction_problems``)."""

_ENTRIES = "entries AS e JOIN transactions AS t ON t.txn_no = e.txn_no"
"""Entries with their transaction, for ``_ENTRY_COLUMNS``'s id and counterparty (SQLite's
schema; ``bank.pg_store`` joins its own by the id)."""


def _book_entry(
    row: tuple[int, str, bytes, int, int, int, int, str | None, str | None],
) -> BookEntry:
    entry_id, account, txn_id, kind, amount, balance, time_ms, terminal, counterparty = row
    return BookEntry(
        entry_id, account, txn_id, EntryKind(kind), amount, balance, time_ms, terminal,
        counterparty,
    )


def read_accounts_summary(db_path: str | os.PathLike[str]) -> list[AccountSummary]:
    """Every account in account order, with its balance, wrong-PIN lock and transfer
    lock, read-only."""
    if is_postgresql(db_path):
        from bank import pg_store  # noqa: PLC0415 (it imports this module)

        return pg_store.read_accounts_summary(db_path)
    with _read_only(db_path) as conn:
        rows = conn.execute(ACCOUNTS_SUMMARY_SQL).fetchall()
    return [
        AccountSummary(account, balance, locked, transfers)
        for account, balance, locked, transfers in rows
    ]


def read_statement(
    db_path: str | os.PathLike[str], account: str, limit: int
) -> list[BookEntry]:
    """The account's ``limit`` newest entries, newest first, read-only; UnknownAccount
    if there is no such account (an account with no entries gives an empty list)."""
    if is_postgresql(db_path):
        from bank import pg_store  # noqa: PLC0415 (it imports this module)

        return pg_store.read_statement(db_path, account, limit)
    account = canonical_account(account)
    if limit < 1:
        raise ValueError("a statement's limit is at least 1")
    with _read_only(db_path) as conn:
        if conn.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is None:
            raise UnknownAccount(account)
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE e.account = ?"
            " ORDER BY e.entry_id DESC LIMIT ?",
            (account, limit),
        ).fetchall()
    return [_book_entry(row) for row in rows]


def read_entries_by_txn_id(
    db_path: str | os.PathLike[str], txn_id: bytes
) -> tuple[BookEntry, ...]:
    """The entries transaction ``txn_id`` booked, in entry order (a transfer's source
    first), read-only; empty if it moved no money."""
    if is_postgresql(db_path):
        from bank import pg_store  # noqa: PLC0415 (it imports this module)

        return pg_store.read_entries_by_txn_id(db_path, txn_id)
    _check_txn_id(txn_id)
    with _read_only(db_path) as conn:
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE t.txn_id = ? ORDER BY e.entry_id",
            (txn_id,),
        ).fetchall()
    return tuple(_book_entry(row) for row in rows)


def read_entry_by_txn_id(db_path: str | os.PathLike[str], txn_id: bytes) -> BookEntry | None:
    """The entry that transaction ``txn_id`` booked on its own account (a transfer's:
    the source's), read-only; None if it moved no money."""
    entries = read_entries_by_txn_id(db_path, txn_id)
    return entries[0] if entries else None


def read_books(db_path: str | os.PathLike[str]) -> Books:
    """The whole ledger in one snapshot, through a read-only connection.

    For a checker, which must not change what it judges: unlike a ``Store`` this creates,
    seeds and migrates nothing and needs no PIN key, and a missing database is an error
    (sqlite3.OperationalError), not a new one. A server may be running meanwhile.
    A PostgreSQL URL is read from PostgreSQL (``bank.pg_store.read_books``).
    """
    if is_postgresql(db_path):
        from bank import pg_store  # noqa: PLC0415 (it imports this module)

        return pg_store.read_books(db_path)
    with _read_only(db_path) as conn:
        accounts = conn.execute(
            "SELECT account, opening_cents, balance_cents FROM accounts ORDER BY account"
        ).fetchall()
        entries = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} ORDER BY e.entry_id"
        ).fetchall()
    return Books(
        opening_cents={account: opening for account, opening, _ in accounts},
        balance_cents={account: balance for account, _, balance in accounts},
        entries=tuple(_book_entry(row) for row in entries),
    )
