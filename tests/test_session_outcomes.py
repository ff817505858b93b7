"""The session's one mapping from storage outcomes to wire statuses (bank.session).

Storage answers in its own terms (``PinResult``, ``PostResult``); every outcome must have
a status, for every kind of transaction, and it must be the status whose meaning
spec/PROTOCOL.md's status table prints for that situation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bank.ledger import PinResult, PostResult
from bank.session import PIN_STATUS, POST_STATUS
from wire import MONEY_KINDS, EntryKind, Status

PROTOCOL = (Path(__file__).resolve().parent.parent / "spec" / "PROTOCOL.md").read_text("utf-8")

PIN_ANSWERS: dict[PinResult, tuple[Status, str]] = {
    PinResult.MATCHED: (Status.APPROVED, "the request was carried out"),
    PinResult.WRONG: (Status.INCORRECT_PIN, "unknown account or wrong PIN"),
    PinResult.LOCKED: (Status.PIN_TRIES_EXCEEDED, "the account is locked"),
}
"""Each PIN check outcome, its status, and the words of that status's meaning in the spec."""

POST_ANSWERS: dict[PostResult, tuple[Status, str]] = {
    PostResult.BOOKED: (Status.APPROVED, "the request was carried out"),
    PostResult.REPLAYED: (Status.APPROVED, "the request was carried out"),
    PostResult.TXN_ID_REUSED: (
        Status.DUPLICATE_TRANSMISSION,
        "a transaction id already used with a different account, kind or amount",
    ),
    PostResult.AMOUNT_OUT_OF_RANGE: (Status.INVALID_AMOUNT, "amount 0 or over the maximum"),
    PostResult.INSUFFICIENT_FUNDS: (
        Status.INSUFFICIENT_FUNDS, "withdrawal larger than the balance"
    ),
    PostResult.BALANCE_FULL: (
        Status.INVALID_AMOUNT, "would take the balance past 9223372036854775807"
    ),
    PostResult.FENCED: (Status.ISSUER_UNAVAILABLE, "retry later"),
}
"""Each post outcome but OVER_LIMIT, its status, and the words of that status's meaning."""

OVER_LIMIT_ANSWERS: dict[EntryKind, tuple[Status, str]] = {
    EntryKind.DEPOSIT: (
        Status.INVALID_AMOUNT, "a new deposit over the server's own `amount_cents_max`"
    ),
    EntryKind.WITHDRAWAL: (
        Status.EXCEEDS_WITHDRAWAL_LIMIT, "withdrawal over the server's per-transaction limit"
    ),
}
"""OVER_LIMIT, the one outcome answered differently by kind: each kind has its own limit."""


def post_answers(kind: EntryKind) -> dict[PostResult, tuple[Status, str]]:
    return {**POST_ANSWERS, PostResult.OVER_LIMIT: OVER_LIMIT_ANSWERS[kind]}


def status_meanings() -> dict[Status, str]:
    """The "meaning" column of PROTOCOL.md's status table (§4), by status."""
    meanings = {}
    for line in PROTOCOL.splitlines():
        if line.startswith("| 0x"):
            _hex, _dec, name, _iso, meaning, _closes = (
                cell.strip() for cell in line.strip("| ").split(" | ")
            )
            meanings[Status[name]] = meaning
    return meanings


def test_every_pin_outcome_has_the_status_the_spec_gives_it():
    expected = {outcome: status for outcome, (status, _) in PIN_ANSWERS.items()}
    assert expected == PIN_STATUS
    assert set(PIN_STATUS) == set(PinResult)


NOT_A_POST_OUTCOME = frozenset(
    {PostResult.UNKNOWN_DESTINATION, PostResult.SAME_ACCOUNT, PostResult.TRANSFERS_LOCKED}
)
"""A transfer's own outcomes, which a deposit or withdrawal never has."""

@pytest.mark.parametrize("kind", [kind.entry_kind for kind in MONEY_KINDS])
def test_every_post_outcome_of_every_kind_has_the_status_the_spec_gives_it(kind: EntryKind):
    expected = {outcome: status for outcome, (status, _) in post_answers(kind).items()}
    assert POST_STATUS[kind] == expected
    assert set(POST_STATUS[kind]) == set(PostResult) - NOT_A_POST_OUTCOME


def test_the_spec_gives_those_statuses_those_meanings():
    meanings = status_meanings()
    answers = [*PIN_ANSWERS.values(), *POST_ANSWERS.values(), *OVER_LIMIT_ANSWERS.values()]
    for status, words in answers:
        assert words in meanings[status], (status.name, words)
