"""The posting path of ``Store.execute_batch`` as it was made cheaper: an account's
existence asked only once the balance UPDATE refuses, a transfer's balances read once,
and SQLite's WAL checkpointed at a named size.

What each must keep: an unknown account is UnknownAccount (before the rule's refusal,
after OVER_LIMIT) and writes nothing, so the rest of its batch commits; a later request
in a batch sees the earlier ones (balances, the same id replayed); the WAL stays within
its limit. Tests that take ``store`` run on SQLite and on PostgreSQL, as test_store.py's.
"""

import struct
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from bank import store as store_module
from bank.ledger import Posting, PostResult
from bank.pg_store import PgStore
from bank.pins import KEY_BYTES
from bank.store import (
    DEMO_ACCOUNTS,
    WAL_AUTOCHECKPOINT_PAGES,
    BalanceQuery,
    PostRequest,
    Store,
    TransferRequest,
    UnknownAccount,
)
from tests.helpers import DESTINATIONS
from tests.pg import open_store
from wire import EntryKind
from wire._limits import AMOUNT_CENTS_MAX, BALANCE_CENTS_MAX

MAX = AMOUNT_CENTS_MAX
"""A transfer request's limit when the limit is not what is tested."""

KEY = bytes(range(KEY_BYTES))
T0 = 1_700_000_000_000
DEPOSIT = EntryKind.DEPOSIT
WITHDRAWAL = EntryKind.WITHDRAWAL

AnyStore = Store | PgStore


def txn(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def store(any_db: str) -> Iterator[AnyStore]:
    with open_store(any_db, KEY) as opened:
        yield opened


def count(store: AnyStore, table: str) -> int:
    conn = store._conn
    assert conn is not None
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.mark.parametrize(
    ("kind", "amount_cents"),
    [
        (DEPOSIT, 100),
        (WITHDRAWAL, 100),
        # Amounts the rule would refuse for any account: existence is still what answers.
        (WITHDRAWAL, AMOUNT_CENTS_MAX),
        (DEPOSIT, AMOUNT_CENTS_MAX),
    ],
)
def test_an_unknown_account_is_refused_as_such_and_its_batch_commits(
    store: AnyStore, kind: EntryKind, amount_cents: int
):
    if amount_cents == AMOUNT_CENTS_MAX and kind is DEPOSIT:
        store.add_account("RR-00001", "2580", BALANCE_CENTS_MAX)  # a full one beside it
    outcomes = store.execute_batch(
        [
            PostRequest("WF-14351", txn(1), DEPOSIT, 100, AMOUNT_CENTS_MAX),
            PostRequest("QQ-00000", txn(2), kind, amount_cents, AMOUNT_CENTS_MAX),
            PostRequest("AC-12345", txn(3), WITHDRAWAL, 200_000, AMOUNT_CENTS_MAX),
            PostRequest("WF-14351", txn(4), WITHDRAWAL, 50, AMOUNT_CENTS_MAX),
        ],
        T0,
    )
    assert outcomes[0] == Posting(PostResult.BOOKED, 542_922, 1, T0)
    assert isinstance(outcomes[1], UnknownAccount)
    assert outcomes[2] == Posting(PostResult.INSUFFICIENT_FUNDS)
    assert outcomes[3] == Posting(PostResult.BOOKED, 542_872, 2, T0)
    assert count(store, "transactions") == count(store, "entries") == 2
    assert store.check_invariants() == []
    # Nothing of the refused one was recorded: its id is free for a real account.
    assert store.post(
        account="AC-12345", txn_id=txn(2), kind=DEPOSIT, amount_cents=1, now_ms=T0,
        limit_cents=AMOUNT_CENTS_MAX,
    ).result is PostResult.BOOKED


def test_an_unknown_account_over_the_limit_is_over_the_limit(store: AnyStore):
    """OVER_LIMIT is judged before the account is looked up, as it always was."""
    (outcome,) = store.execute_batch(
        [PostRequest("QQ-00000", txn(1), WITHDRAWAL, 501, 500)], T0
    )
    assert outcome == Posting(PostResult.OVER_LIMIT)


def test_refusals_by_the_rule_write_nothing_between_bookings(store: AnyStore):
    store.add_account("RR-00001", "2580", BALANCE_CENTS_MAX - 10)
    outcomes = store.execute_batch(
        [
            PostRequest("RR-00001", txn(1), DEPOSIT, 10, AMOUNT_CENTS_MAX),
            PostRequest("RR-00001", txn(2), DEPOSIT, 1, AMOUNT_CENTS_MAX),
            PostRequest("BC-01373", txn(3), WITHDRAWAL, 4_573, AMOUNT_CENTS_MAX),
            PostRequest("BC-01373", txn(4), WITHDRAWAL, 4_572, AMOUNT_CENTS_MAX),
            PostRequest("BC-01373", txn(5), WITHDRAWAL, 1, AMOUNT_CENTS_MAX),
        ],
        T0,
    )
    assert [o.result for o in outcomes if isinstance(o, Posting)] == [
        PostResult.BOOKED, PostResult.BALANCE_FULL, PostResult.INSUFFICIENT_FUNDS,
        PostResult.BOOKED, PostResult.INSUFFICIENT_FUNDS,
    ]
    assert store.balance("RR-00001") == BALANCE_CENTS_MAX
    assert store.balance("BC-01373") == 0
    assert count(store, "entries") == 2
    assert store.check_invariants() == []


def test_transfers_in_a_batch_see_the_postings_before_them(store: AnyStore):
    """A transfer's balances are read once, at its turn: after every earlier request of
    the batch, and its entries and receipt carry them moved by its amount."""
    outcomes = store.execute_batch(
        [
            PostRequest("BC-01373", txn(1), DEPOSIT, 10_000, AMOUNT_CENTS_MAX),
            TransferRequest("BC-01373", txn(2), "AC-12345", 14_000, MAX, DESTINATIONS),
            TransferRequest("AC-12345", txn(3), "BC-01373", 116_432, MAX, DESTINATIONS),
            TransferRequest("BC-01373", txn(4), "AC-12345", 117_005, MAX, DESTINATIONS),
            PostRequest("AC-12345", txn(5), WITHDRAWAL, 1, AMOUNT_CENTS_MAX),
            TransferRequest("BC-01373", txn(2), "AC-12345", 14_000, MAX, DESTINATIONS),
            BalanceQuery("BC-01373"),
            BalanceQuery("AC-12345"),
        ],
        T0,
    )
    assert outcomes == [
        Posting(PostResult.BOOKED, 14_572, 1, T0),
        Posting(PostResult.BOOKED, 572, 2, T0),  # entries 2 (source) and 3
        Posting(PostResult.BOOKED, 0, 4, T0),  # AC's whole balance: 102,432 + 14,000
        Posting(PostResult.INSUFFICIENT_FUNDS),
        Posting(PostResult.INSUFFICIENT_FUNDS),
        Posting(PostResult.REPLAYED, 572, 2, T0),  # the same id again in the batch
        117_004,
        0,
    ]
    statement = store.history("AC-12345", 10)
    assert [(e.entry_id, e.kind, e.balance_cents) for e in statement] == [
        (4, EntryKind.TRANSFER_OUT, 0),
        (3, EntryKind.TRANSFER_IN, 116_432),
    ]
    assert store.check_invariants() == []


def test_a_transfer_to_a_full_destination_in_a_batch(store: AnyStore):
    store.add_account("RR-00001", "2580", BALANCE_CENTS_MAX - 100)
    outcomes = store.execute_batch(
        [
            PostRequest("RR-00001", txn(1), DEPOSIT, 50, AMOUNT_CENTS_MAX),
            TransferRequest("AC-12345", txn(2), "RR-00001", 51, MAX, DESTINATIONS),
            TransferRequest("AC-12345", txn(3), "RR-00001", 50, MAX, DESTINATIONS),
            TransferRequest("AC-12345", txn(4), "QQ-00000", 50, MAX, DESTINATIONS),
        ],
        T0,
    )
    assert outcomes == [
        Posting(PostResult.BOOKED, BALANCE_CENTS_MAX - 50, 1, T0),
        Posting(PostResult.BALANCE_FULL),
        Posting(PostResult.BOOKED, 102_382, 2, T0),
        Posting(PostResult.UNKNOWN_DESTINATION),
    ]
    assert store.balance("RR-00001") == BALANCE_CENTS_MAX
    assert store.check_invariants() == []


# -- SQLite's WAL checkpoints ---------------------------------------------------------------

WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24


def wal_state(db_path: Path, page_bytes: int) -> tuple[int, int]:
    """(the WAL file's size in frames, its checkpoint sequence number): SQLite's file
    format puts the number, which each restart of the WAL from its beginning
    increments, at bytes 12..16 of the header."""
    wal = db_path.with_name(db_path.name + "-wal")
    data = wal.read_bytes()
    frames = (len(data) - WAL_HEADER_BYTES) // (page_bytes + WAL_FRAME_HEADER_BYTES)
    return frames, struct.unpack(">I", data[12:16])[0]


def test_the_store_checkpoints_at_its_named_limit(tmp_path: Path):
    with Store(tmp_path / "bank.db", KEY) as store:
        pragma = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert pragma == (WAL_AUTOCHECKPOINT_PAGES,)


def run_batch(store: Store, n: int) -> None:
    """Batch ``n``: ten new deposits, spread over the demo accounts."""
    requests = [
        PostRequest(DEMO_ACCOUNTS[i % 7][0], txn(n * 10 + i), DEPOSIT, 1, AMOUNT_CENTS_MAX)
        for i in range(10)
    ]
    assert all(
        isinstance(o, Posting) and o.result is PostResult.BOOKED
        for o in store.execute_batch(requests, T0)
    )


def wal_after_each_batch(db_path: Path, batches: int) -> list[tuple[int, int]]:
    """``wal_state`` after each of ``batches`` batches on a new store at ``db_path``,
    its WAL emptied of the schema's frames first."""
    states = []
    with Store(db_path, KEY) as store:
        page_bytes = store._conn.execute("PRAGMA page_size").fetchone()[0]
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for n in range(batches):
            run_batch(store, n)
            states.append(wal_state(db_path, page_bytes))
        assert store.check_invariants() == []
    return states


def test_the_wal_stays_within_its_limit_plus_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same batches twice. With checkpoints off (0) the WAL only grows, which gives
    each batch's frames; with a small limit it restarts again and again and its file
    never outgrows the limit plus the largest batch."""
    batches, limit_pages = 40, 8
    monkeypatch.setattr(store_module, "WAL_AUTOCHECKPOINT_PAGES", 0)
    unlimited = wal_after_each_batch(tmp_path / "unlimited.db", batches)
    frames = [unlimited[0][0]] + [b[0] - a[0] for a, b in pairwise(unlimited)]
    assert {sequence for _, sequence in unlimited} == {unlimited[0][1]}  # never restarted
    monkeypatch.setattr(store_module, "WAL_AUTOCHECKPOINT_PAGES", limit_pages)
    limited = wal_after_each_batch(tmp_path / "limited.db", batches)
    assert max(size for size, _ in limited) <= limit_pages + max(frames)
    assert len({sequence for _, sequence in limited}) > batches // 4
    assert sum(frames) > 4 * (limit_pages + max(frames))  # a bound the WAL would pass


# -- the account check's fast path (SQLite's Store._canonical) ------------------------------


def test_account_numbers_are_checked_as_canonical_account_checks_them(tmp_path: Path):
    """A remembered canonical number is taken as is; any other is checked, so a lower
    case one is booked under its upper case form and a malformed one is a ValueError,
    before and after the canonical form was remembered."""
    with Store(tmp_path / "bank.db", KEY) as store:
        outcomes = store.execute_batch(
            [
                PostRequest("ac-12345", txn(1), DEPOSIT, 1, AMOUNT_CENTS_MAX),
                PostRequest("AC-12345", txn(2), DEPOSIT, 1, AMOUNT_CENTS_MAX),
                PostRequest("ac-12345", txn(3), DEPOSIT, 1, AMOUNT_CENTS_MAX),
                PostRequest("AC-1234", txn(4), DEPOSIT, 1, AMOUNT_CENTS_MAX),
                PostRequest("AC-12345 ", txn(5), DEPOSIT, 1, AMOUNT_CENTS_MAX),
                TransferRequest("AC-12345", txn(6), "wf-14351", 1, MAX, DESTINATIONS),
                TransferRequest("AC-12345", txn(7), "WF-1435", 1, MAX, DESTINATIONS),
                BalanceQuery("ac-12345"),
            ],
            T0,
        )
        assert [getattr(o, "result", o) for o in outcomes[:3]] == [PostResult.BOOKED] * 3
        assert isinstance(outcomes[3], ValueError) and isinstance(outcomes[4], ValueError)
        assert outcomes[5] == Posting(PostResult.BOOKED, 102_434, 4, T0)
        assert isinstance(outcomes[6], ValueError)
        assert outcomes[7] == 102_434
        assert store._canonical_accounts == {"AC-12345"}  # given in canonical form
        assert store.check_invariants() == []


def test_the_remembered_account_numbers_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(store_module, "CANONICAL_ACCOUNTS_REMEMBERED_MAX", 3)
    with Store(tmp_path / "bank.db", KEY) as store:
        for n in range(20):
            outcome = store.execute_batch([BalanceQuery(f"QQ-{n:05d}")], T0)[0]
            assert isinstance(outcome, UnknownAccount)
            assert 1 <= len(store._canonical_accounts) <= 3
        assert store.balance("AC-12345") == 102_432
