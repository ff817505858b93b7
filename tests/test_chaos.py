"""``python -m bank.chaos``: a short real run with kill -9 crashes, and the checker itself.

The run starts the real server, crashes it twice under three concurrent ATM sessions and
must find nothing lost or duplicated. The checker is then fed fabricated histories (a
lost acknowledgement, a duplicate, a refused operation that was applied, an entry nobody
issued) and a real database, to prove it can fail and not only pass.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import trio

from bank.pins import load_or_create_key
from bank.store import BookEntry, Books, Store, read_books
from bank.tools import chaos
from bank.tools.chaos import (
    BankState,
    Operation,
    Outcome,
    check_history,
    main,
    read_bank_state,
)
from tests.helpers import DESTINATIONS
from tests.pg import pg_cluster, pg_db
from wire import EntryKind, Status
from wire._limits import AMOUNT_CENTS_MAX

__all__ = ["pg_cluster", "pg_db"]

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 60
"""Bound on the chaos subprocess: 4 s of load plus restarts; well under this when well."""

ACCOUNT, OPENING_CENTS = "AC-12345", 1_000_00


def txn(number: int) -> bytes:
    return number.to_bytes(16, "big")


def acked(number: int, kind: EntryKind, amount_cents: int, balance_cents: int) -> Operation:
    return Operation(
        txn(number), ACCOUNT, kind, amount_cents, Outcome.ACKNOWLEDGED, Status.APPROVED,
        entry_id=number, balance_cents=balance_cents, attempts=1,
    )


def ledger_entry(number: int, kind: EntryKind, amount_cents: int, balance_cents: int) -> BookEntry:
    """The ledger's row for txn(number), with entry id ``number``."""
    return BookEntry(number, ACCOUNT, txn(number), kind, amount_cents, balance_cents, time_ms=0)


def entry_for(op: Operation) -> BookEntry:
    return BookEntry(
        op.entry_id, op.account, op.txn_id, op.kind, op.amount_cents, op.balance_cents,
        time_ms=0,
    )


def state(*entries: BookEntry, balance_cents: int) -> BankState:
    return BankState(Books({ACCOUNT: OPENING_CENTS}, {ACCOUNT: balance_cents}, entries))


def clean_history() -> list[Operation]:
    return [
        acked(1, EntryKind.DEPOSIT, 500, OPENING_CENTS + 500),
        acked(2, EntryKind.WITHDRAWAL, 200, OPENING_CENTS + 300),
    ]


async def test_a_short_run_with_crashes_loses_and_duplicates_nothing(tmp_path: Path):
    workdir = tmp_path / "run"
    command = [
        sys.executable, "-m", "bank.chaos", "--seconds", "4", "--crashes", "2",
        "--clients", "3", "--seed", "1", "--keep", str(workdir),
    ]
    with trio.fail_after(RUN_TIMEOUT_S):
        result = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stdout + stderr
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["invariant_ok"] is True
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["crashes"] == 2
    assert figures["acknowledged"] > 0
    assert figures["unknown_unresolved"] == 0
    assert figures["operations"] == (
        figures["acknowledged"] + figures["refused"] + figures["unknown_unresolved"]
    )
    history = (workdir / "history.jsonl").read_text().splitlines()
    assert len(history) == figures["operations"]
    assert any(json.loads(line)["to_account"] for line in history)  # transfers ran too
    assert "crash 2: kill -9" in stderr
    assert "SIGTERM received" in (workdir / "server-3.log").read_text()  # the clean stop


async def test_a_cluster_run_with_crashes_and_a_freeze_loses_and_duplicates_nothing(
    tmp_path: Path, pg_db: str
):
    """Three servers on one PostgreSQL: kill -9s, one SIGSTOP past the leases' expiry,
    clients failing over with RESUME and replays; stale writes are fenced, one of them
    certainly (--fence-probe: otherwise the thawed server's overdue heartbeat may end
    its stale sessions before their writes reach the fence)."""
    command = [
        sys.executable, "-m", "bank.chaos", "--db", pg_db, "--servers", "3",
        "--seconds", "6", "--crashes", "2", "--clients", "4", "--seed", "1",
        "--fence-probe", "--keep", str(tmp_path / "run"),
    ]
    with trio.fail_after(RUN_TIMEOUT_S):
        result = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stdout + stderr
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["ok"] is True and figures["invariant_ok"] is True
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert (figures["crashes"], figures["servers"], figures["freezes"]) == (2, 3, 1)
    assert figures["unknown_unresolved"] == 0 and figures["acknowledged"] > 0
    assert figures["fence_probes"] == 1 and figures["fenced_writes"] >= 1
    assert "fence probe: the stale deposit was refused by the fence" in stderr
    assert "freeze: SIGSTOP" in stderr and "thaw: SIGCONT" in stderr


def test_the_checker_passes_a_consistent_history():
    ops = clean_history()
    verdict = check_history(ops, state(*map(entry_for, ops), balance_cents=OPENING_CENTS + 300))
    assert verdict.ok, verdict.problems


def test_the_checker_reports_a_lost_acknowledgement_and_a_duplicate():
    ops = clean_history()
    deposit = ops[0]
    entries = (entry_for(deposit), entry_for(deposit))  # applied twice; withdrawal lost
    verdict = check_history(ops, state(*entries, balance_cents=OPENING_CENTS + 1000))
    assert verdict.lost == 1
    assert verdict.duplicated == 1
    assert not verdict.ok
    assert any("acknowledged but not in the ledger" in p for p in verdict.problems)
    assert any("applied 2 times" in p for p in verdict.problems)
    assert any("history says" in p for p in verdict.problems)  # the money is off too


def test_the_checker_reports_refused_applied_unexpected_and_wrong_receipts():
    ops = clean_history()
    refused = Operation(txn(3), ACCOUNT, EntryKind.WITHDRAWAL, 50, Outcome.REFUSED,
                        Status.INSUFFICIENT_FUNDS)
    stranger = ledger_entry(4, EntryKind.DEPOSIT, 7, OPENING_CENTS + 257)
    wrong_receipt = ledger_entry(2, EntryKind.WITHDRAWAL, 200, 1)
    entries = (
        entry_for(ops[0]), wrong_receipt,
        ledger_entry(3, EntryKind.WITHDRAWAL, 50, OPENING_CENTS + 250),
        stranger,
    )
    verdict = check_history([*ops, refused], state(*entries, balance_cents=OPENING_CENTS + 257))
    assert verdict.refused_applied == 1
    assert verdict.unexpected == 1
    assert verdict.mismatched == 1
    assert not verdict.ok


def test_the_checker_reports_store_invariants_integrity_and_negative_balances():
    broken = BankState(
        Books({ACCOUNT: 0}, {ACCOUNT: -5}, ()), invariant_problems=("replay differs",),
        integrity_ok=False,
    )
    verdict = check_history([], broken)
    assert any("negative balance" in p for p in verdict.problems)
    assert any("invariant: replay differs" in p for p in verdict.problems)
    assert any("integrity_check" in p for p in verdict.problems)


def test_an_unresolved_unknown_may_have_happened_or_not():
    unknown = Operation(txn(5), ACCOUNT, EntryKind.DEPOSIT, 100, was_unknown=True, attempts=1)
    applied = ledger_entry(5, EntryKind.DEPOSIT, 100, OPENING_CENTS + 100)
    assert check_history([unknown], state(balance_cents=OPENING_CENTS)).ok
    assert check_history([unknown], state(applied, balance_cents=OPENING_CENTS + 100)).ok


def test_the_checker_reads_a_real_database(tmp_path: Path):
    """Through read_bank_state: an acknowledged op that was never posted is lost, and a
    posted one nobody issued is unexpected, in a database the Store wrote."""
    db, key_file = tmp_path / "bank.db", tmp_path / "bank.key"
    with Store(db, load_or_create_key(key_file)) as store:
        posted = store.post(account=ACCOUNT, txn_id=txn(1), kind=EntryKind.DEPOSIT,
                            amount_cents=500, now_ms=1, limit_cents=AMOUNT_CENTS_MAX)
        store.post(account=ACCOUNT, txn_id=txn(9), kind=EntryKind.DEPOSIT,
                   amount_cents=1, now_ms=2, limit_cents=AMOUNT_CENTS_MAX)
    ops = [
        acked(1, EntryKind.DEPOSIT, 500, posted.balance_cents),
        acked(2, EntryKind.DEPOSIT, 300, posted.balance_cents + 300),
    ]
    ops[0].entry_id = posted.entry_id
    final = read_bank_state(db, key_file)
    assert final.integrity_ok and final.invariant_problems == ()
    verdict = check_history(ops, final)
    assert (verdict.lost, verdict.unexpected, verdict.mismatched) == (1, 1, 0)


def test_keep_refuses_a_directory_with_a_database(tmp_path: Path, capsys):
    (tmp_path / "bank.db").write_bytes(b"")
    assert main(["--keep", str(tmp_path), "--seconds", "1"]) == 2
    assert "fresh database" in capsys.readouterr().err


def test_the_checker_judges_both_legs_of_a_transfer(tmp_path: Path):
    with Store(tmp_path / "bank.db", bytes(32)) as store:
        moved = store.transfer(account=ACCOUNT, txn_id=txn(1), to_account="WF-14351",
                               amount_cents=500, now_ms=0, limit_cents=10**6,
                               policy=DESTINATIONS)
    books = read_books(tmp_path / "bank.db")
    op = Operation(txn(1), ACCOUNT, EntryKind.TRANSFER_OUT, 500, Outcome.ACKNOWLEDGED,
                   Status.APPROVED, moved.entry_id, moved.balance_cents, attempts=1,
                   to_account="WF-14351")
    assert check_history([op], BankState(books)).problems == []
    # A credit lost (or sent elsewhere) is caught, and so is the money it leaves out.
    one_leg = dataclasses.replace(books, entries=books.entries[:1])
    assert any("one leg" in p for p in check_history([op], BankState(one_leg)).problems)
    elsewhere = dataclasses.replace(op, to_account="TN-13731")
    assert check_history([elsewhere], BankState(books)).problems


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--seconds", "abc", "not a number of seconds: 'abc'"),
     ("--servers", "abc", "not a whole number: 'abc'"),
     ("--seed", "x", "not a whole number: 'x'")],
)
def test_a_malformed_number_is_refused_in_a_sentence(
    flag: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        chaos.build_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {said}" in err and "invalid" not in err
