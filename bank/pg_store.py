"""The bank's PostgreSQL store: ``bank.store.Store``'s synchronous API over psycopg 3.

Any number of bank processes, on one host or several, may share one database: that is
what this store is for. It takes the same batch requests (``bank.store.PostRequest``,
``TransferRequest``, ``PinCheck``, ``PinChange``, ``BalanceQuery``, ``HistoryQuery``)
and gives the same outcomes, so
``bank.batch_ledger.BatchLedger`` runs it exactly as it runs SQLite: one batch, one
transaction, on one connection, in a worker thread.

A batch costs two round trips at most, whatever its size: one SELECT of the salts of
the accounts whose PINs it checks (only if it checks any), then its statements, sent
together in psycopg's pipeline mode between BEGIN and COMMIT. Its posts are ONE
statement over arrays (``unnest``) when they cannot see each other (distinct accounts
and transaction ids, no balance or history read of a posted account in the batch: the
common case, since a lease gives each account one session). Its BALANCE reads are ONE
statement over an array of accounts too, for every read of an account that no earlier
request of the batch writes (each then reads what it would read at its own place), run
at the first one's place; a read after a post or transfer of its account stays at its
place. Otherwise, and for every other request, each request is one self-contained
statement (a data-modifying CTE: look up the transaction id, check the fence, move the
money under its rule, write the transaction and its entry, say what happened), run in
arrival order. Refusals are
results, never errors, so one customer's overdraft cannot abort the others' batch.

Measured here (2 cores shared with PostgreSQL and four other jobs, load average 2-5,
Unix socket, fsync on, batches of 100 deposits to distinct accounts through PgStore):
each statement waited for in turn, 1,300-2,800 postings/s; the same statements
pipelined, 1,600-3,700 (round trips are cheap on a local socket; what remains is the
server's work per statement); one statement over arrays, 5,500-7,900 in the same runs
as 2,500-2,900 pipelined. (The issue's 24-35k/s over arrays was bare SQL; here the
whole store runs, replay and fence checks included, on a loaded machine.)

The money rules are the database's too: CHECK constraints on every amount and balance,
and the no-overdraft and balance-limit rules in the UPDATE's WHERE clause (the very
``bank.store`` table SQLite uses). Idempotency is by ``transactions.txn_id``: a batch
that races another process's transaction with the same id waits for it at the primary
key and fails with a unique violation; the whole batch rolled back, so it is run again
(at most ``BATCH_ATTEMPTS_MAX`` times), and then finds the committed original: REPLAYED.
Deadlocks and serialization failures are retried the same way.

With a fence (``PostRequest.fence``), money moves only while the session's lease row
holds that fence, unexpired, checked in the same statement under FOR SHARE (so a
takeover waits for the commit); otherwise the outcome is FENCED and nothing is written.

A lost connection is never retried inside a batch: if it broke during COMMIT nobody
knows whether the batch committed, so the error reaches the caller (StorageError:
ISSUER_UNAVAILABLE), and the ATM's retry with the same transaction id settles it. The
next batch opens a new connection; while PostgreSQL is down every batch fails, at once
or (a host that does not answer) within CONNECT_TIMEOUT_S.
Connect through a session-mode pooler or directly: a transaction-mode pooler breaks the
session settings below and, later, the cluster's session-level advisory locks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import psycopg
import psycopg.errors

from bank.accounts_file import AccountRecord
from bank.cluster_leases import MIGRATION_SQL as CLUSTER_LEASES_SQL
from bank.config import redact_db
from bank.ledger import (
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    PinVerdict,
    Posting,
    PostResult,
)
from bank.pins import PIN_HMAC_BYTES, new_salt, verify
from bank.store import (
    _BALANCE_CHANGES,
    _ENTRY_COLUMNS,
    ACCOUNTS_SUMMARY_SQL,
    DEMO_ACCOUNTS,
    DESTINATION_MISSES_PRUNED_MAX,
    PIN_FAILURES_PRUNED_MAX,
    TRANSFER_TXN_KIND,
    AccountExists,
    AccountSummary,
    BalanceQuery,
    BatchRequest,
    BookEntry,
    Books,
    DestinationPolicy,
    Forgotten,
    HistoryQuery,
    Outcome,
    PinChange,
    PinCheck,
    PinPolicy,
    PostRequest,
    SchemaError,
    StoreError,
    TransferRequest,
    UnknownAccount,
    _book_entry,
    _check_txn_id,
    _Prior,
    _replay,
    account_problems,
    new_account_row,
    transaction_problems,
)
from wire import (
    AMOUNT_CENTS_MAX,
    BALANCE_CENTS_MAX,
    KIND_OF_ENTRY,
    TRANSFER,
    EntryKind,
    HistoryEntry,
    canonical_account,
    check_pin,
    is_trivial_pin,
)

SCHEMA_VERSION = 6
"""The version this program writes, in the ``schema_version`` table: the same numbering
as SQLite's (``bank.store``), which PostgreSQL joined at version 4 (transactions and
entries, double entry) plus the cluster's ``leases``; version 5 (PostgreSQL only: SQLite
has no cluster) adds what cluster leases keep in their row (``bank.cluster_leases``);
version 6 adds ``destination_misses``, SQLite's version 5 (one step behind it, since
SQLite has no version 5 of cluster leases)."""

class _LostConnectionEcho(logging.Filter):
    """Drops psycopg's "error ignored terminating <Pipeline>" warning when what it ignored
    is the connection being lost (an OperationalError).

    A batch runs in ``conn.pipeline()``; when the connection dies inside it, psycopg
    raises the failure from the block and, leaving the pipeline, meets the dead
    connection again and logs that second error as a WARNING (twice: the transaction's
    pipeline and ours) rather than raise it. The first error still propagates: the batch
    fails with it, and the session logs the one ERROR line of a storage failure. So only
    this echo goes; any other record, and this one for any other error, is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg == "error ignored terminating %r: %s"
            and isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], psycopg.OperationalError)
        )


logging.getLogger("psycopg").addFilter(_LostConnectionEcho())

CONNECT_TIMEOUT_S = 5
"""How long connecting may take before PostgreSQL counts as down (libpq connect_timeout)."""
LOCK_TIMEOUT_MS = 5_000
"""Longest wait for a row lock (another process's batch on the same account) before the
batch fails: a stuck holder costs its peers this much, never forever."""
IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000
"""PostgreSQL ends a session idle this long inside a transaction: a frozen process
(SIGSTOP, a lost network) would otherwise hold its row locks, and block a takeover of
its leases, for as long as it stays frozen."""
KEEPALIVES_IDLE_S = 5
KEEPALIVES_INTERVAL_S = 2
KEEPALIVES_COUNT = 3
TCP_USER_TIMEOUT_MS = 10_000
"""TCP keepalives and the user timeout: a server that vanished (power, partition) is
noticed within about 10-11 s instead of the kernel's two hours, and the batch fails."""
BATCH_ATTEMPTS_MAX = 3
"""Runs of a batch that lost a race (see the module docstring) before its error stands."""
MIGRATION_LOCK_ID = 0x62616E6B  # "bank"
"""The advisory lock that makes processes starting together migrate one at a time."""

_RACES = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
"""Errors after which the batch rolled back whole and may simply run again."""

_SCHEMA_4 = """
CREATE TABLE accounts (
    account text PRIMARY KEY CHECK (account = upper(account) AND length(account) = 8),
    pin_salt bytea NOT NULL CHECK (length(pin_salt) = 16),
    pin_hmac bytea NOT NULL CHECK (length(pin_hmac) = 32),
    opening_cents bigint NOT NULL CHECK (opening_cents >= 0),
    balance_cents bigint NOT NULL CHECK (balance_cents >= 0)
);

CREATE TABLE transactions (
    txn_id bytea PRIMARY KEY CHECK (length(txn_id) = 16),
    kind integer NOT NULL CHECK (kind IN (1, 2, 3)),
    account text NOT NULL REFERENCES accounts (account),
    counterparty text REFERENCES accounts (account),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    time_ms bigint NOT NULL CHECK (time_ms >= 0),
    terminal text CHECK (terminal IS NULL OR length(terminal) <= 80),
    CHECK ((kind = 3) = (counterparty IS NOT NULL)),
    CHECK (counterparty <> account)
);

CREATE TABLE entries (
    entry_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account text NOT NULL REFERENCES accounts (account),
    txn_id bytea NOT NULL REFERENCES transactions (txn_id),
    kind integer NOT NULL CHECK (kind IN (1, 2, 3, 4)),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    balance_cents bigint NOT NULL CHECK (balance_cents >= 0),
    time_ms bigint NOT NULL CHECK (time_ms >= 0),
    terminal text CHECK (terminal IS NULL OR length(terminal) <= 80),
    UNIQUE (txn_id, account)
);

CREATE INDEX entries_by_account ON entries (account, entry_id);

CREATE TABLE pin_failures (
    account text PRIMARY KEY,
    failures integer NOT NULL CHECK (failures > 0),
    locked_until_ms bigint,
    last_failure_ms bigint NOT NULL DEFAULT 0 CHECK (last_failure_ms >= 0)
);

CREATE INDEX pin_failures_by_age ON pin_failures (last_failure_ms);

CREATE TABLE leases (
    account text PRIMARY KEY REFERENCES accounts (account),
    fence bigint NOT NULL CHECK (fence > 0),
    holder text,
    holder_host text,
    holder_pid integer,
    expires_at timestamptz NOT NULL
);
"""

_DESTINATION_MISSES_6 = """
CREATE TABLE destination_misses (
    account text PRIMARY KEY REFERENCES accounts (account),
    misses integer NOT NULL CHECK (misses > 0),
    locked_until_ms bigint,
    last_miss_ms bigint NOT NULL CHECK (last_miss_ms >= 0)
);

CREATE INDEX destination_misses_by_age ON destination_misses (last_miss_ms);
"""
"""Version 6: each transfer source's transfers to no account (``bank.store``'s table of
the same name), empty: misses before it were not counted."""

MIGRATIONS: dict[int, str] = {4: _SCHEMA_4, 5: CLUSTER_LEASES_SQL, 6: _DESTINATION_MISSES_6}
"""The statements that take a database to version N, from the one before it (or, for
the first, from nothing), each run in one transaction under MIGRATION_LOCK_ID. A new
database runs them all in order; later versions add an entry here, never edit one."""



def _named(sql: str) -> str:
    """``bank.store``'s SQLite ``:name`` parameters in psycopg's ``%(name)s`` spelling."""
    return re.sub(r":(\w+)", r"%(\1)s", sql)


_FENCED = """fenced AS (
    SELECT %(fence)s::bigint IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM leases WHERE account = %(account)s AND fence = %(fence)s::bigint
        AND holder IS NOT NULL AND expires_at > now() FOR SHARE
    ) AS fenced
)"""
"""A CTE: whether a fence was given that the account's lease no longer holds (FOR SHARE:
a takeover's UPDATE waits for this commit)."""

_PRIOR_AND_FENCED = f"""WITH prior AS (
    SELECT t.kind, t.account, t.counterparty, t.amount_cents,
           e.entry_id, e.balance_cents, e.time_ms
    FROM transactions t JOIN entries e ON e.txn_id = t.txn_id AND e.account = t.account
    WHERE t.txn_id = %(txn_id)s
), {_FENCED}"""
"""The first two CTEs of a single post's and of a transfer's statement: the transaction
id's original (source) entry, if booked, and ``_FENCED`` for the source's lease."""


def _post_sql(sign: int) -> str:
    """One deposit or withdrawal as one statement, for a kind's sign: every check and
    write of ``Store._post_one``, in its order, with the fence after the replay check."""
    change = _named(_BALANCE_CHANGES[sign].sql)
    return f"""
{_PRIOR_AND_FENCED}, allowed AS (
    SELECT NOT EXISTS (SELECT 1 FROM prior) AND NOT (SELECT fenced FROM fenced)
        AND %(amount)s::bigint <= %(limit)s::bigint AS allowed
), moved AS (
    {change} AND (SELECT allowed FROM allowed)
    RETURNING balance_cents
), booked AS (
    INSERT INTO transactions (txn_id, kind, account, amount_cents, time_ms, terminal)
    SELECT %(txn_id)s, %(txn_kind)s, %(account)s, %(amount)s, %(now_ms)s, %(terminal)s
    FROM moved
), entry AS (
    INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms, terminal)
    SELECT %(account)s, %(txn_id)s, %(kind)s, %(amount)s, balance_cents, %(now_ms)s,
        %(terminal)s
    FROM moved
    RETURNING entry_id, balance_cents
)
SELECT p.account, p.kind, p.counterparty, p.amount_cents, p.entry_id, p.balance_cents,
    p.time_ms, (SELECT fenced FROM fenced),
    EXISTS (SELECT 1 FROM accounts WHERE account = %(account)s),
    e.entry_id, e.balance_cents
FROM (SELECT 1) AS one LEFT JOIN prior p ON true LEFT JOIN entry e ON true
"""


_POST_SQL = {sign: _post_sql(sign) for sign in _BALANCE_CHANGES}


def _grouped_move(sign: int) -> str:
    """``bank.store``'s rule for a sign, as an UPDATE of every row of ``go`` with it."""
    sql = _BALANCE_CHANGES[sign].sql
    for name, column in (("amount", "r.amount"), ("account", "r.acct"), ("max", "%(max)s")):
        sql = sql.replace(f":{name}", column)
    head, rule = sql.split(" WHERE ", 1)
    return (
        f"{head} FROM go r WHERE r.sign = {sign} AND {rule}"
        " RETURNING r.idx, accounts.balance_cents"
    )


_GROUPED_POST_SQL = f"""
WITH r AS (
    SELECT * FROM unnest(
        %(idx)s::int[], %(txn_id)s::bytea[], %(account)s::text[], %(kind)s::int[],
        %(txn_kind)s::int[], %(sign)s::int[], %(amount)s::bigint[], %(limit)s::bigint[],
        %(fence)s::bigint[], %(terminal)s::text[]
    ) AS r(idx, txn, acct, kind, txn_kind, sign, amount, lim, fence, terminal)
), prior AS (
    SELECT r.idx, t.account, t.kind, t.counterparty, t.amount_cents,
           e.entry_id, e.balance_cents, e.time_ms
    FROM r JOIN transactions t ON t.txn_id = r.txn
    JOIN entries e ON e.txn_id = t.txn_id AND e.account = t.account
), fenced AS (
    SELECT r.idx FROM r WHERE r.fence IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM leases l WHERE l.account = r.acct AND l.fence = r.fence
        AND l.holder IS NOT NULL AND l.expires_at > now() FOR SHARE
    )
), go AS (
    SELECT r.* FROM r WHERE r.amount <= r.lim
        AND NOT EXISTS (SELECT 1 FROM prior p WHERE p.idx = r.idx)
        AND NOT EXISTS (SELECT 1 FROM fenced f WHERE f.idx = r.idx)
), credited AS ({_grouped_move(+1)}
), debited AS ({_grouped_move(-1)}
), moved AS (
    SELECT * FROM credited UNION ALL SELECT * FROM debited
), booked AS (
    INSERT INTO transactions (txn_id, kind, account, amount_cents, time_ms, terminal)
    SELECT r.txn, r.txn_kind, r.acct, r.amount, %(now_ms)s, r.terminal
    FROM moved m JOIN r ON r.idx = m.idx
), entry AS (
    INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms, terminal)
    SELECT r.acct, r.txn, r.kind, r.amount, m.balance_cents, %(now_ms)s, r.terminal
    FROM moved m JOIN r ON r.idx = m.idx ORDER BY r.idx
    RETURNING txn_id, entry_id, balance_cents
)
SELECT r.idx, p.account, p.kind, p.counterparty, p.amount_cents, p.entry_id, p.balance_cents,
    p.time_ms, EXISTS (SELECT 1 FROM fenced f WHERE f.idx = r.idx),
    EXISTS (SELECT 1 FROM accounts a WHERE a.account = r.acct),
    e.entry_id, e.balance_cents
FROM r LEFT JOIN prior p ON p.idx = r.idx LEFT JOIN entry e ON e.txn_id = r.txn
ORDER BY r.idx
"""
"""Every post of a batch as ONE statement over arrays (``unnest``), each row answered as
``_post_sql``'s single statement would answer it alone. Only for posts that cannot see
each other (``_grouped_posts``): one statement has one snapshot."""

GROUPED_POSTS_MIN = 2
"""Posts in a batch worth one statement over arrays instead of one statement each."""


def _grouped_posts(
    requests: Sequence[BatchRequest], plans: Sequence[_Statement | Outcome], now_ms: int
) -> tuple[int, _Statement] | None:
    """The batch's posts as one statement, and the index of the first (where it runs),
    if they are independent: distinct accounts and transaction ids, and no balance or
    history read of a posted account in the batch. Then running them together at the
    first's place gives each request the outcome it gets in arrival order; otherwise
    (None) every request runs as its own statement, in order."""
    posts = [
        index for index, plan in enumerate(plans)
        if isinstance(plan, _Statement) and isinstance(requests[index], PostRequest)
    ]
    if len(posts) < GROUPED_POSTS_MIN:
        return None
    rows = [cast(_Statement, plans[index]).params for index in posts]
    accounts = {row["account"] for row in rows}
    if len(accounts) < len(rows) or len({row["txn_id"] for row in rows}) < len(rows):
        return None
    for request in requests:
        touched = (
            [request.account] if isinstance(request, BalanceQuery | HistoryQuery)
            else [request.account, request.to_account] if isinstance(request, TransferRequest)
            else []
        )
        for account in touched:
            try:
                if canonical_account(account) in accounts:
                    return None
            except ValueError:
                continue
    columns = ("txn_id", "account", "kind", "txn_kind", "amount", "limit", "fence", "terminal")
    params: dict[str, object] = {column: [row[column] for row in rows] for column in columns}
    params |= {
        "idx": posts,
        "sign": [KIND_OF_ENTRY[EntryKind(cast(int, row["kind"]))].sign for row in rows],
        "now_ms": now_ms, "max": BALANCE_CENTS_MAX,
    }
    return posts[0], _Statement(_GROUPED_POST_SQL, params, _split_among_posts)


def _split_among_posts(rows: list[tuple[Any, ...]]) -> Outcome:
    raise AssertionError("a grouped statement's rows are decoded by each post's own plan")


_GROUPED_BALANCE_SQL = """
SELECT a.balance_cents
FROM unnest(%(account)s::text[]) WITH ORDINALITY AS r(acct, ord)
LEFT JOIN accounts a ON a.account = r.acct
ORDER BY r.ord
"""
"""Many BALANCE reads as ONE statement: a row per account asked for, in the order
asked, NULL for an account that does not exist (``balance_cents`` is NOT NULL)."""

GROUPED_BALANCES_MIN = 2
"""BALANCE reads in a batch worth one statement over an array instead of one each."""


def _grouped_balances(
    requests: Sequence[BatchRequest], plans: Sequence[_Statement | Outcome]
) -> tuple[list[int], _Statement] | None:
    """The batch's BALANCE reads that no earlier request of the batch writes (a post's
    account, a transfer's two), as one statement to run at the first one's place, and
    their indices in order; None if there are fewer than GROUPED_BALANCES_MIN.

    Such a read sees, at any place up to its own, what it would see at its own: nothing
    of the batch before it moves its balance. A read after a write of its account (a
    BALANCE after a DEPOSIT to it) must see that write, so it stays a statement of its
    own at its place. Posts grouped by ``_grouped_posts`` never share an account with a
    read, so moving them to the first post's place changes none of this. A request
    whose plan is already its outcome (a malformed amount) writes nothing."""
    written: set[object] = set()
    members: list[int] = []
    for index, (request, plan) in enumerate(zip(requests, plans, strict=True)):
        if not isinstance(plan, _Statement):
            continue
        if isinstance(request, BalanceQuery):
            if plan.params["account"] not in written:
                members.append(index)
        elif isinstance(request, PostRequest):
            written.add(plan.params["account"])
        elif isinstance(request, TransferRequest):
            written.update((plan.params["account"], plan.params["to"]))
    if len(members) < GROUPED_BALANCES_MIN:
        return None
    accounts = [cast(_Statement, plans[index]).params["account"] for index in members]
    return members, _Statement(_GROUPED_BALANCE_SQL, {"account": accounts}, _split_among_reads)


def _split_among_reads(rows: list[tuple[Any, ...]]) -> Outcome:
    raise AssertionError("a grouped statement's rows are decoded by each read's own plan")

_FRESH_COUNT = (
    "CASE WHEN p.locked_until_ms IS NOT NULL"
    " OR p.last_failure_ms <= %(forgotten)s THEN 1 ELSE p.failures + 1 END"
)
"""A failure's count: one more, or the first if the lock expired or the last is forgotten."""

_PIN_CHECK_SQL = f"""
WITH {{fenced}}locked AS (
    SELECT locked_until_ms FROM pin_failures
    WHERE account = %(account)s AND locked_until_ms > %(now)s
), cleared AS (
    DELETE FROM pin_failures
    WHERE account = %(account)s AND %(matches)s AND NOT EXISTS (SELECT 1 FROM locked){{go}}
), pruned AS (
    DELETE FROM pin_failures WHERE account IN (
        SELECT account FROM pin_failures
        WHERE last_failure_ms <= %(forgotten)s AND coalesce(locked_until_ms, 0) <= %(now)s
            AND account <> %(account)s
        ORDER BY last_failure_ms LIMIT %(prune)s FOR UPDATE SKIP LOCKED
    ) AND NOT %(matches)s AND NOT EXISTS (SELECT 1 FROM locked){{go}}
), failed AS (
    INSERT INTO pin_failures AS p (account, failures, locked_until_ms, last_failure_ms)
    SELECT %(account)s, 1, CASE WHEN 1 >= %(tries)s THEN %(until)s END, %(now)s
    WHERE NOT %(matches)s AND NOT EXISTS (SELECT 1 FROM locked){{go}}
    ON CONFLICT (account) DO UPDATE SET
        failures = {_FRESH_COUNT},
        locked_until_ms = CASE WHEN {_FRESH_COUNT} >= %(tries)s THEN %(until)s END,
        last_failure_ms = %(now)s
    WHERE p.locked_until_ms IS NULL OR p.locked_until_ms <= %(now)s
    RETURNING locked_until_ms
){{changed}}
SELECT (SELECT locked_until_ms FROM locked), EXISTS (SELECT 1 FROM failed),
    (SELECT locked_until_ms FROM failed){{fenced_column}}
"""
_PIN_SQL = _PIN_CHECK_SQL.format(fenced="", go="", changed="", fenced_column="")
_NOT_FENCED = " AND NOT (SELECT fenced FROM fenced)"
_PIN_CHANGE_SQL = _PIN_CHECK_SQL.format(
    fenced=_FENCED + ", ", go=_NOT_FENCED, fenced_column=", (SELECT fenced FROM fenced)",
    changed=f""", changed AS (
    UPDATE accounts SET pin_salt = %(new_salt)s, pin_hmac = %(new_hmac)s
    WHERE account = %(account)s AND %(matches)s AND NOT EXISTS (SELECT 1 FROM locked)
        {_NOT_FENCED}
)""")
"""One PIN check's bookkeeping as one statement, given whether the PIN matched (hashed
in Python with the salt read before the batch: the key never reaches the database).
Like ``Store._check_pin``: a lock in force answers LOCKED and changes nothing; a match
clears the failures; a miss prunes a few forgotten rows and counts, locking at the
limit. The upsert counts from the row's latest version, so two processes checking one
account at once both count. A PIN change (``_PIN_CHANGE_SQL``) is the same check plus,
on a match, the new salt and keyed hash, made in Python like every hash; and with a
stale fence (``_FENCED``) it writes nothing at all, not even a failure, and says so in
a fourth column."""


_FRESH_MISSES = (
    "CASE WHEN d.locked_until_ms IS NOT NULL"
    " OR d.last_miss_ms <= %(forgotten)s THEN 1 ELSE d.misses + 1 END"
)
"""A transfer miss's count: one more, or the first if the lock expired or the last miss
is forgotten (``_FRESH_COUNT``'s rule for wrong PINs)."""


def _transfer_sql() -> str:
    """One transfer as one statement, after its two account rows were locked in account
    order (``_LOCK_ACCOUNTS_SQL``), so its reads are the latest and cannot change under
    it: every check of ``Store._transfer_one`` in its order, then both legs under
    ``bank.store``'s rules, the transaction and both entries (source first). A leg its
    rule refused after the checks passed (a bug) divides by zero, which rolls the
    whole batch back rather than commit one leg.

    The source's transfer lock (``destination_misses``) is read after the replay and
    the fence, and a transfer to no account that passed every earlier check (``missing``)
    counts one miss, pruning a few forgotten rows, as ``_PIN_CHECK_SQL`` counts a wrong
    PIN. The source's row lock serialises this with any other transfer from it, in any
    process, so the count is never lost."""
    debit = _named(_BALANCE_CHANGES[-1].sql)
    credit = _named(_BALANCE_CHANGES[+1].sql).replace("%(account)s", "%(to)s")
    return f"""
{_PRIOR_AND_FENCED}, source AS (
    SELECT balance_cents FROM accounts WHERE account = %(account)s
), destination AS (
    SELECT balance_cents FROM accounts WHERE account = %(to)s
), locked AS (
    SELECT locked_until_ms FROM destination_misses
    WHERE account = %(account)s AND locked_until_ms > %(now_ms)s
), missing AS (
    SELECT coalesce(NOT EXISTS (SELECT 1 FROM prior) AND NOT (SELECT fenced FROM fenced)
        AND NOT EXISTS (SELECT 1 FROM locked)
        AND %(account)s <> %(to)s AND %(amount)s::bigint <= %(limit)s::bigint
        AND (SELECT balance_cents FROM source) >= %(amount)s::bigint
        AND NOT EXISTS (SELECT 1 FROM destination), false) AS missing
), pruned AS (
    DELETE FROM destination_misses WHERE account IN (
        SELECT account FROM destination_misses
        WHERE last_miss_ms <= %(forgotten)s AND coalesce(locked_until_ms, 0) <= %(now_ms)s
            AND account <> %(account)s
        ORDER BY last_miss_ms LIMIT %(prune)s FOR UPDATE SKIP LOCKED
    ) AND (SELECT missing FROM missing)
), missed AS (
    INSERT INTO destination_misses AS d (account, misses, locked_until_ms, last_miss_ms)
    SELECT %(account)s, 1, CASE WHEN 1 >= %(tries)s THEN %(until)s::bigint END, %(now_ms)s
    WHERE (SELECT missing FROM missing)
    ON CONFLICT (account) DO UPDATE SET
        misses = {_FRESH_MISSES},
        locked_until_ms = CASE WHEN {_FRESH_MISSES} >= %(tries)s THEN %(until)s::bigint END,
        last_miss_ms = %(now_ms)s
    RETURNING locked_until_ms
), allowed AS (
    SELECT coalesce(NOT EXISTS (SELECT 1 FROM prior) AND NOT (SELECT fenced FROM fenced)
        AND NOT EXISTS (SELECT 1 FROM locked)
        AND %(account)s <> %(to)s AND %(amount)s::bigint <= %(limit)s::bigint
        AND (SELECT balance_cents FROM source) >= %(amount)s::bigint
        AND (SELECT balance_cents FROM destination) <= %(max)s::bigint - %(amount)s::bigint,
        false) AS allowed
), debited AS (
    {debit} AND (SELECT allowed FROM allowed)
    RETURNING balance_cents
), credited AS (
    {credit} AND (SELECT allowed FROM allowed)
    RETURNING balance_cents
), booked AS (
    INSERT INTO transactions
        (txn_id, kind, account, counterparty, amount_cents, time_ms, terminal)
    SELECT %(txn_id)s, {TRANSFER_TXN_KIND}, %(account)s, %(to)s, %(amount)s, %(now_ms)s,
        %(terminal)s
    FROM debited, credited
), legs AS (
    SELECT 1 AS leg, %(account)s AS account, {int(TRANSFER.debit)} AS kind, balance_cents
    FROM debited
    UNION ALL
    SELECT 2, %(to)s, {int(TRANSFER.credit)}, balance_cents FROM credited
), entry AS (
    INSERT INTO entries (account, txn_id, kind, amount_cents, balance_cents, time_ms, terminal)
    SELECT account, %(txn_id)s, kind, %(amount)s, balance_cents, %(now_ms)s, %(terminal)s
    FROM legs ORDER BY leg
    RETURNING entry_id, account, balance_cents
)
SELECT p.account, p.kind, p.counterparty, p.amount_cents, p.entry_id, p.balance_cents,
    p.time_ms, (SELECT fenced FROM fenced), (SELECT locked_until_ms FROM locked),
    (SELECT balance_cents FROM source),
    EXISTS (SELECT 1 FROM destination), (SELECT balance_cents FROM destination),
    (SELECT locked_until_ms FROM missed), e.entry_id, e.balance_cents,
    1 / CASE WHEN (SELECT allowed FROM allowed)
        AND (SELECT count(*) FROM debited) + (SELECT count(*) FROM credited) <> 2
        THEN 0 ELSE 1 END
FROM (SELECT 1) AS one LEFT JOIN prior p ON true
LEFT JOIN entry e ON e.account = %(account)s
"""


_TRANSFER_SQL = _transfer_sql()
_LOCK_ACCOUNTS_SQL = (
    "SELECT 1 FROM accounts WHERE account = ANY(%(accounts)s) ORDER BY account FOR UPDATE"
)
"""A transfer's two account rows, locked in account order: two opposite transfers (in
two processes) then wait for each other instead of deadlocking."""

_HISTORY_SQL = """
SELECT a.account IS NOT NULL, e.entry_id, e.time_ms, e.kind, e.amount_cents, e.balance_cents
FROM (SELECT 1) AS one
LEFT JOIN accounts a ON a.account = %(account)s
LEFT JOIN LATERAL (
    SELECT entry_id, time_ms, kind, amount_cents, balance_cents FROM entries
    WHERE account = %(account)s ORDER BY entry_id DESC LIMIT %(count)s
) e ON a.account IS NOT NULL
"""

T = TypeVar("T")

_ENTRY_OF_TRANSACTION = "e.txn_id = t.txn_id"
"""How an entry ``e`` names its transaction ``t`` in this schema: by the id (SQLite's
names it by ``txn_no``; ``bank.store``'s schema says why there)."""

_ENTRIES = f"entries AS e JOIN transactions AS t ON {_ENTRY_OF_TRANSACTION}"
"""Entries with their transaction, for ``bank.store._ENTRY_COLUMNS``'s id and counterparty."""
Decode = Callable[[list[tuple[Any, ...]]], Outcome]


@dataclass(frozen=True, slots=True)
class _Statement:
    """A request as one statement, and how its rows become the request's outcome."""

    sql: str
    params: dict[str, object]
    decode: Decode
    before: tuple[tuple[str, dict[str, object]], ...] = ()
    """Statements sent just before it, whose rows nobody reads (a transfer's locks)."""


def connect(conninfo: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection in autocommit mode (transactions are explicit) with the session
    settings every bank connection has; psycopg.OperationalError if PostgreSQL is down."""
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        keepalives=1,
        keepalives_idle=KEEPALIVES_IDLE_S,
        keepalives_interval=KEEPALIVES_INTERVAL_S,
        keepalives_count=KEEPALIVES_COUNT,
        tcp_user_timeout=TCP_USER_TIMEOUT_MS,
        application_name="bank",
    )
    try:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{LOCK_TIMEOUT_MS}ms", f"{IDLE_IN_TRANSACTION_TIMEOUT_MS}ms"),
        )
    except BaseException:
        conn.close()
        raise
    return conn


class PgStore:
    """The bank's accounts, ledger and PIN failures in one PostgreSQL database."""

    driver_errors: tuple[type[Exception], ...] = (psycopg.Error,)
    """What a failing database raises (``bank.batch_ledger`` makes it StorageError)."""
    connections = 1
    """One connection, used by one thread at a time; reopened after it breaks."""
    statements_on_loop = False
    """Every statement is a round trip to the server: the whole batch runs in a thread."""

    def __init__(
        self, conninfo: str | os.PathLike[str], key: bytes, *, seed_demo: bool = True,
        create: bool = True,
    ) -> None:
        """Connect and create (seeding, if ``seed_demo``) or migrate the schema; with
        ``create`` false a database without the bank's schema is a StoreError and
        nothing is written (operator commands never create a bank)."""
        self._conninfo = os.fspath(conninfo)
        self._key = key
        self._dummy_salt = new_salt()
        self._dummy_hmac = bytes(PIN_HMAC_BYTES)
        self._closed = False
        self.created = False
        """Whether this open created the schema."""
        self.seeded: tuple[str, ...] = ()
        """The demo accounts this open seeded into the new database."""
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = connect(self._conninfo)
        try:
            self._migrate(seed_demo=seed_demo, create=create)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PgStore({redact_db(self._conninfo)!r})"

    # -- customer operations -------------------------------------------------------------

    def verify_pin(self, account: str, pin: str, now_ms: int, policy: PinPolicy) -> PinResult:
        """As ``Store.verify_pin``."""
        outcome = self._one(PinCheck(account, pin, policy), now_ms)
        assert isinstance(outcome, PinVerdict)
        return outcome.result

    def balance(self, account: str) -> int:
        outcome = self._one(BalanceQuery(account), 0)
        assert isinstance(outcome, int)
        return outcome

    def history(self, account: str, count: int) -> list[HistoryEntry]:
        outcome = self._one(HistoryQuery(account, count), 0)
        assert isinstance(outcome, list)
        return outcome

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
        """As ``Store.post``, and FENCED if ``fence`` is given and no longer the lease's."""
        request = PostRequest(
            account, txn_id, EntryKind(kind), amount_cents, limit_cents, terminal, fence
        )
        outcome = self._one(request, now_ms)
        assert isinstance(outcome, Posting)
        return outcome

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
        fence: int | None = None,
    ) -> Posting:
        """As ``Store.transfer``, and FENCED (after the replay check, before the transfer
        lock) for a stale fence, which counts no miss."""
        request = TransferRequest(
            account, txn_id, to_account, amount_cents, limit_cents, policy, terminal, fence
        )
        outcome = self._one(request, now_ms)
        assert isinstance(outcome, Posting)
        return outcome

    def change_pin(
        self, account: str, pin: str, new_pin: str, now_ms: int, policy: PinPolicy, *,
        fence: int | None = None,
    ) -> PinChangeVerdict:
        """As ``Store.change_pin``, and FENCED, writing nothing, for a stale ``fence``."""
        outcome = self._one(PinChange(account, pin, new_pin, policy, fence), now_ms)
        assert isinstance(outcome, PinChangeVerdict)
        return outcome

    def _one(self, request: BatchRequest, now_ms: int) -> Outcome:
        (outcome,) = self.execute_batch([request], now_ms)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def execute_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]:
        """Run requests in order in ONE transaction, as ``Store.execute_batch``: each gets
        the outcome it would get alone in this order, an invalid one (ValueError,
        UnknownAccount) its exception, and a database error fails the whole batch."""
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                return self._execute_batch(requests, now_ms)
            except _RACES:
                if attempt == BATCH_ATTEMPTS_MAX:
                    raise
        raise AssertionError("unreachable")

    def _execute_batch(self, requests: Sequence[BatchRequest], now_ms: int) -> list[Outcome]:
        try:
            salts = self._salts(
                [r.account for r in requests if isinstance(r, PinCheck | PinChange)]
            )
            plans: list[_Statement | Outcome] = []
            for request in requests:
                try:
                    plans.append(self._plan(request, now_ms, salts))
                except (StoreError, ValueError) as error:
                    plans.append(error)
            grouped = _grouped_posts(requests, plans, now_ms)
            statements = {
                index: plan for index, plan in enumerate(plans) if isinstance(plan, _Statement)
            }
            if grouped is not None:  # one statement at the first post's place, for all
                first, statement = grouped
                statements = {
                    index: plan for index, plan in statements.items()
                    if not isinstance(requests[index], PostRequest)
                }
                statements[first] = statement
            balances = _grouped_balances(requests, plans)
            if balances is not None:  # one statement at the first read's place, for them
                readers, statement = balances
                for index in readers:
                    del statements[index]
                statements[readers[0]] = statement
            conn = self._connection()
            cursors = {}
            with conn.pipeline(), conn.transaction():
                for index in sorted(statements):
                    for sql, params in statements[index].before:
                        conn.execute(sql, params)
                    cursors[index] = conn.execute(statements[index].sql, statements[index].params)
            results = {index: cursor.fetchall() for index, cursor in cursors.items()}
        except psycopg.OperationalError:
            self._drop_connection()
            raise
        if grouped is not None:  # each post's row, decoded as its own statement's would be
            for index, *row in results.pop(grouped[0]):
                results[index] = [tuple(row)]
        if balances is not None:  # each read's row, or none for an unknown account
            readers = balances[0]
            for index, (balance_cents,) in zip(readers, results.pop(readers[0]), strict=True):
                results[index] = [] if balance_cents is None else [(balance_cents,)]
        outcomes: list[Outcome] = []
        for index, plan in enumerate(plans):
            if isinstance(plan, _Statement):
                try:
                    outcomes.append(plan.decode(results[index]))
                except (StoreError, ValueError) as error:
                    outcomes.append(error)
            else:
                outcomes.append(plan)
        return outcomes

    def _salts(self, accounts: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """The (salt, keyed hash) of each existing account among ``accounts``."""
        names = []
        for account in accounts:
            try:
                names.append(canonical_account(account))
            except ValueError:
                continue  # its PinCheck gets the ValueError
        if not names:
            return {}
        rows = self._connection().execute(
            "SELECT account, pin_salt, pin_hmac FROM accounts WHERE account = ANY(%s)",
            (names,),
        ).fetchall()
        return {account: (bytes(salt), bytes(pin_hmac)) for account, salt, pin_hmac in rows}

    def _plan(
        self, request: BatchRequest, now_ms: int, salts: dict[str, tuple[bytes, bytes]]
    ) -> _Statement | Outcome:
        match request:
            case PostRequest():
                return self._plan_post(request, now_ms)
            case TransferRequest():
                return self._plan_transfer(request, now_ms)
            case PinCheck():
                return self._plan_pin_check(request, now_ms, salts)
            case PinChange():
                return self._plan_pin_change(request, now_ms, salts)
            case BalanceQuery(account):
                account = canonical_account(account)
                return _Statement(
                    "SELECT balance_cents FROM accounts WHERE account = %(account)s",
                    {"account": account},
                    lambda rows: _balance(rows, account),
                )
            case HistoryQuery(account, count):
                account = canonical_account(account)
                if count < 0:
                    raise ValueError("count must be >= 0")
                return _Statement(
                    _HISTORY_SQL, {"account": account, "count": count},
                    lambda rows: _history(rows, account),
                )
        raise TypeError(f"not a batch request: {request!r}")

    def _plan_post(self, request: PostRequest, now_ms: int) -> _Statement | Outcome:
        account = canonical_account(request.account)
        _check_txn_id(request.txn_id)
        amount_cents = request.amount_cents
        if type(amount_cents) is not int or not 1 <= amount_cents <= AMOUNT_CENTS_MAX:
            return Posting(PostResult.AMOUNT_OUT_OF_RANGE)
        kind = EntryKind(request.kind)
        sign = KIND_OF_ENTRY[kind].sign
        params: dict[str, object] = {
            "txn_id": request.txn_id, "account": account, "kind": int(kind),
            "txn_kind": int(kind), "amount": amount_cents,
            "limit": request.limit_cents, "fence": request.fence, "now_ms": now_ms,
            "terminal": request.terminal, "max": BALANCE_CENTS_MAX,
        }

        def decode(rows: list[tuple[Any, ...]]) -> Outcome:
            ((*prior, fenced, known, entry_id, balance_cents),) = rows
            if prior[0] is not None:
                return _replay(_prior(prior), (int(kind), account, None, amount_cents))
            if fenced:
                return Posting(PostResult.FENCED)
            if amount_cents > request.limit_cents:
                return Posting(PostResult.OVER_LIMIT)
            if not known:
                raise UnknownAccount(account)
            if entry_id is None:
                return Posting(_BALANCE_CHANGES[sign].refusal)
            return Posting(PostResult.BOOKED, int(balance_cents), int(entry_id), now_ms)

        return _Statement(_POST_SQL[sign], params, decode)

    def _plan_transfer(self, request: TransferRequest, now_ms: int) -> _Statement | Outcome:
        policy = request.policy
        source = canonical_account(request.account)
        destination = canonical_account(request.to_account)
        _check_txn_id(request.txn_id)
        amount_cents = request.amount_cents
        if type(amount_cents) is not int or not 1 <= amount_cents <= AMOUNT_CENTS_MAX:
            return Posting(PostResult.AMOUNT_OUT_OF_RANGE)
        params: dict[str, object] = {
            "txn_id": request.txn_id, "account": source, "to": destination,
            "amount": amount_cents, "limit": request.limit_cents, "fence": request.fence,
            "now_ms": now_ms, "terminal": request.terminal, "max": BALANCE_CENTS_MAX,
            "forgotten": now_ms - policy.lockout_ms, "until": now_ms + policy.lockout_ms,
            "tries": policy.tries_max, "prune": DESTINATION_MISSES_PRUNED_MAX,
        }

        def decode(rows: list[tuple[Any, ...]]) -> Outcome:
            ((*prior, fenced, locked_until_ms, source_cents, known, destination_cents,
              missed_until_ms, entry_id, balance_cents, _),) = rows
            if prior[0] is not None:
                content = (TRANSFER_TXN_KIND, source, destination, amount_cents)
                return _replay(_prior(prior), content)
            if fenced:
                return Posting(PostResult.FENCED)
            if locked_until_ms is not None:
                return Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=int(locked_until_ms))
            if source == destination:
                return Posting(PostResult.SAME_ACCOUNT)
            if amount_cents > request.limit_cents:
                return Posting(PostResult.OVER_LIMIT)
            if source_cents is None:
                raise UnknownAccount(source)
            if source_cents < amount_cents:
                return Posting(PostResult.INSUFFICIENT_FUNDS)
            if not known:
                if missed_until_ms is not None:  # this miss locked
                    return Posting(
                        PostResult.TRANSFERS_LOCKED, locked_until_ms=int(missed_until_ms)
                    )
                return Posting(PostResult.UNKNOWN_DESTINATION)
            if destination_cents > BALANCE_CENTS_MAX - amount_cents:
                return Posting(PostResult.BALANCE_FULL)
            return Posting(PostResult.BOOKED, int(balance_cents), int(entry_id), now_ms)

        lock: tuple[str, dict[str, object]] = (
            _LOCK_ACCOUNTS_SQL, {"accounts": sorted({source, destination})}
        )
        return _Statement(_TRANSFER_SQL, params, decode, before=(lock,))

    def _plan_pin_change(
        self, change: PinChange, now_ms: int, salts: dict[str, tuple[bytes, bytes]]
    ) -> _Statement | Outcome:
        account = canonical_account(change.account)
        check_pin(change.pin)
        if is_trivial_pin(change.new_pin):
            return PinChangeVerdict(PinChangeResult.TRIVIAL)
        _, new_salt, new_hmac, _, _ = new_account_row(self._key, account, change.new_pin, 0)
        check = self._plan_pin_check(PinCheck(account, change.pin, change.policy), now_ms, salts)

        def decode(rows: list[tuple[Any, ...]]) -> Outcome:
            ((*checked, fenced),) = rows
            if fenced:
                return PinChangeVerdict(PinChangeResult.FENCED)
            verdict = check.decode([tuple(checked)])
            assert isinstance(verdict, PinVerdict)
            if verdict.result is PinResult.LOCKED:
                return PinChangeVerdict(PinChangeResult.LOCKED, verdict.locked_until_ms)
            if verdict.result is PinResult.WRONG:
                return PinChangeVerdict(PinChangeResult.WRONG)
            return PinChangeVerdict(PinChangeResult.CHANGED)

        params = {
            **check.params, "new_salt": new_salt, "new_hmac": new_hmac, "fence": change.fence,
        }
        return _Statement(_PIN_CHANGE_SQL, params, decode)

    def _plan_pin_check(
        self, check: PinCheck, now_ms: int, salts: dict[str, tuple[bytes, bytes]]
    ) -> _Statement:
        account, policy = canonical_account(check.account), check.policy
        known = account in salts
        salt, expected = salts.get(account, (self._dummy_salt, self._dummy_hmac))
        # One HMAC whether or not the account exists; a malformed PIN is a ValueError.
        matches = verify(self._key, salt, account, check.pin, expected) and known
        params: dict[str, object] = {
            "account": account, "matches": matches, "now": now_ms,
            "forgotten": now_ms - policy.lockout_ms, "until": now_ms + policy.lockout_ms,
            "tries": policy.tries_max, "prune": PIN_FAILURES_PRUNED_MAX,
        }

        def decode(rows: list[tuple[Any, ...]]) -> Outcome:
            ((locked_until_ms, failed, failed_until_ms),) = rows
            if locked_until_ms is not None:
                return PinVerdict(PinResult.LOCKED, known, int(locked_until_ms))
            if matches:
                return PinVerdict(PinResult.MATCHED)
            if not failed:  # another process locked it a moment ago
                return PinVerdict(PinResult.LOCKED, known)
            if failed_until_ms is not None:
                return PinVerdict(PinResult.LOCKED, known, int(failed_until_ms))
            return PinVerdict(PinResult.WRONG, known)

        return _Statement(_PIN_SQL, params, decode)

    # -- operator operations -------------------------------------------------------------

    def add_account(self, account: str, pin: str, opening_cents: int) -> None:
        """Open an account; AccountExists if the number is taken (never overwritten)."""
        with self._transaction() as conn:
            self._insert_account(conn, canonical_account(account), pin, opening_cents)

    def add_accounts(self, records: Sequence[AccountRecord]) -> int:
        """Open every account in ``records``, all or nothing; returns how many."""
        with self._transaction() as conn:
            for record in records:
                self._insert_account(conn, record.account, record.pin, record.balance_cents)
        return len(records)

    def reset_pin(self, account: str, pin: str) -> None:
        """Set a new PIN (with a new salt) and lift any lock on the account."""
        account = canonical_account(account)
        _, salt, pin_hmac, _, _ = new_account_row(self._key, account, pin, 0)
        with self._transaction() as conn:
            changed = conn.execute(
                "UPDATE accounts SET pin_salt = %s, pin_hmac = %s WHERE account = %s",
                (salt, pin_hmac, account),
            ).rowcount
            if changed != 1:
                raise UnknownAccount(account)
            conn.execute("DELETE FROM pin_failures WHERE account = %s", (account,))

    def unlock(self, account: str) -> Forgotten:
        """Clear the account's PIN failures and lock, and its transfers to no account
        and their lock; returns what was cleared."""
        account = canonical_account(account)
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM accounts WHERE account = %s", (account,)).fetchone() \
                    is None:
                raise UnknownAccount(account)
            row = conn.execute(
                "DELETE FROM pin_failures WHERE account = %s RETURNING failures, locked_until_ms",
                (account,),
            ).fetchone()
            misses = conn.execute(
                "DELETE FROM destination_misses WHERE account = %s"
                " RETURNING misses, locked_until_ms",
                (account,),
            ).fetchone()
        failures, locked_until_ms = (0, None) if row is None else (int(row[0]), row[1])
        missed, transfers_until_ms = (0, None) if misses is None else (int(misses[0]), misses[1])
        return Forgotten(failures, locked_until_ms, missed, transfers_until_ms)

    def close(self) -> None:
        """Close the connection; safe to call twice. Later calls fail (psycopg errors)."""
        self._closed = True
        self._drop_connection()

    # -- checks for tests and tools --------------------------------------------------------

    def integrity_ok(self) -> bool:
        """What the foreign keys cannot say: every transaction has its entry (the
        source's, on the transaction's own account). PostgreSQL checks its pages itself."""
        row = self._connection().execute(
            "SELECT NOT EXISTS (SELECT 1 FROM transactions t WHERE NOT EXISTS ("
            " SELECT 1 FROM entries e WHERE e.txn_id = t.txn_id AND e.account = t.account))"
        ).fetchone()
        return row is not None and bool(row[0])

    def check_invariants(self) -> list[str]:
        """As ``Store.check_invariants``, in one snapshot (REPEATABLE READ)."""
        books, transactions = self._read(
            lambda conn: (_read_books(conn), transaction_problems(conn, _ENTRY_OF_TRANSACTION))
        )
        problems: list[str] = []
        by_account: dict[str, list[tuple[int, EntryKind, int, int]]] = {}
        for entry in books.entries:
            by_account.setdefault(entry.account, []).append(
                (entry.entry_id, entry.kind, entry.amount_cents, entry.balance_cents)
            )
        for account, opening_cents in books.opening_cents.items():
            problems += account_problems(
                account, opening_cents, books.balance_cents[account], by_account.get(account, [])
            )
        return problems + transactions

    # -- internals -----------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The open connection, or a new one if the last broke (PostgreSQL restarted)."""
        if self._closed:
            raise psycopg.InterfaceError("the store is closed")
        if self._conn is None or self._conn.broken or self._conn.closed:
            self._drop_connection()
            self._conn = connect(self._conninfo)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        conn = self._connection()
        try:
            with conn.transaction():
                yield conn
        except psycopg.OperationalError:
            self._drop_connection()
            raise

    def _read(self, reader: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        conn = self._connection()
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        try:
            with conn.transaction():
                return reader(conn)
        except psycopg.OperationalError:
            self._drop_connection()
            raise
        finally:
            if self._conn is not None:
                self._conn.isolation_level = None

    def _insert_account(
        self, conn: psycopg.Connection[tuple[Any, ...]], account: str, pin: str,
        opening_cents: int,
    ) -> None:
        row = new_account_row(self._key, account, pin, opening_cents)
        inserted = conn.execute(
            "INSERT INTO accounts (account, pin_salt, pin_hmac, opening_cents, balance_cents)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account) DO NOTHING",
            row,
        ).rowcount
        if inserted != 1:
            raise AccountExists(account)

    def _migrate(self, *, seed_demo: bool, create: bool) -> None:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            version = _schema_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than {SCHEMA_VERSION}"
                )
            if version == SCHEMA_VERSION:
                return
            if version == 0 and not create:
                raise StoreError(f"{redact_db(self._conninfo)} is not a bank database")
            if version == 0:
                conn.execute(
                    "CREATE TABLE schema_version ("
                    " version integer NOT NULL CHECK (version > 0),"
                    " only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row))"
                )
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (min(MIGRATIONS),))
                version = min(MIGRATIONS) - 1
            for step in sorted(MIGRATIONS):
                if step > version:
                    conn.execute(MIGRATIONS[step].encode())
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            if version == min(MIGRATIONS) - 1:
                self.created = True
                if seed_demo:
                    for account, pin, balance_cents in DEMO_ACCOUNTS:
                        self._insert_account(conn, account, pin, balance_cents)
                    self.seeded = tuple(account for account, _, _ in DEMO_ACCOUNTS)


def _prior(row: list[Any]) -> _Prior:
    """A booked transaction from a statement's (account, kind, counterparty, amount,
    entry_id, balance_cents, time_ms) columns, as ``bank.store._replay`` judges it."""
    account, kind, counterparty, amount, entry_id, balance_cents, time_ms = row
    return _Prior(
        (int(kind), account, counterparty, int(amount)), int(entry_id), int(balance_cents),
        int(time_ms),
    )


def _schema_version(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """The database's schema version; 0 for one without the bank's schema."""
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if exists is None or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _balance(rows: list[tuple[Any, ...]], account: str) -> int:
    if not rows:
        raise UnknownAccount(account)
    return int(rows[0][0])


def _history(rows: list[tuple[Any, ...]], account: str) -> list[HistoryEntry]:
    if not rows or not rows[0][0]:
        raise UnknownAccount(account)
    return [
        HistoryEntry(int(e), int(t), EntryKind(k), int(a), int(b))
        for _, e, t, k, a, b in rows
        if e is not None
    ]


# -- Reading the books from outside: operator commands and bank.tools.chaos's checker -----


@contextmanager
def _read_only(conninfo: str | os.PathLike[str]) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A read-only connection in one snapshot that creates and migrates nothing: a
    database without the bank's schema is a StoreError, one of another version a
    SchemaError (an older one lacks what the readers read, ``destination_misses`` since
    version 6), one that cannot be reached a psycopg.OperationalError."""
    with connect(os.fspath(conninfo)) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            version = _schema_version(conn)
            if version == 0:
                raise StoreError(f"{redact_db(conninfo)} is not a bank database")
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:  # as bank.store's readers: this one only
                raise SchemaError(
                    f"database schema version {version} is older than {SCHEMA_VERSION}: start"
                    " the server (or run any command that writes) once to migrate it"
                )
            yield conn


def _read_books(conn: psycopg.Connection[tuple[Any, ...]]) -> Books:
    accounts = conn.execute(
        "SELECT account, opening_cents, balance_cents FROM accounts ORDER BY account"
    ).fetchall()
    entries = conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} ORDER BY e.entry_id"
    ).fetchall()
    return Books(
        opening_cents={account: int(opening) for account, opening, _ in accounts},
        balance_cents={account: int(balance) for account, _, balance in accounts},
        entries=tuple(_book_entry(row) for row in entries),
    )


def read_books(conninfo: str | os.PathLike[str]) -> Books:
    """The whole ledger in one snapshot, read-only (see ``bank.store.read_books``)."""
    with _read_only(conninfo) as conn:
        return _read_books(conn)


def read_accounts_summary(conninfo: str | os.PathLike[str]) -> list[AccountSummary]:
    with _read_only(conninfo) as conn:
        rows = conn.execute(ACCOUNTS_SUMMARY_SQL).fetchall()
    return [
        AccountSummary(
            account, int(balance), None if locked is None else int(locked),
            None if transfers is None else int(transfers),
        )
        for account, balance, locked, transfers in rows
    ]


def read_statement(
    conninfo: str | os.PathLike[str], account: str, limit: int
) -> list[BookEntry]:
    account = canonical_account(account)
    if limit < 1:
        raise ValueError("a statement's limit is at least 1")
    with _read_only(conninfo) as conn:
        if conn.execute("SELECT 1 FROM accounts WHERE account = %s", (account,)).fetchone() \
                is None:
            raise UnknownAccount(account)
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE e.account = %s"
            " ORDER BY e.entry_id DESC LIMIT %s",
            (account, limit),
        ).fetchall()
    return [_book_entry(row) for row in rows]


def read_entries_by_txn_id(
    conninfo: str | os.PathLike[str], txn_id: bytes
) -> tuple[BookEntry, ...]:
    """As ``bank.store.read_entries_by_txn_id``: a transfer's source first."""
    _check_txn_id(txn_id)
    with _read_only(conninfo) as conn:
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE e.txn_id = %s ORDER BY e.entry_id",
            (txn_id,),
        ).fetchall()
    return tuple(_book_entry(row) for row in rows)
