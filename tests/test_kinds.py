"""The money-kind table (wire._kinds): one row per kind, its messages, entry and sign; and
every table keyed by kind elsewhere (the server's limits and answers, the store's
balance updates, the ATM's words, the state table) has each kind, so a new kind cannot
be added in one place only."""

from __future__ import annotations

import pytest

from atm.text import TransactionKind
from bank import store
from bank.session import POST_STATUS, SERVER_LIMITS
from wire import MESSAGE_TYPES, PERMITTED, EntryKind, Message, State
from wire._kinds import (
    DEPOSIT,
    ENTRY_SIGN,
    KIND_OF_ENTRY,
    KIND_OF_REQUEST,
    MONEY_KINDS,
    TRANSFER,
    WITHDRAWAL,
    entry_change_cents,
)
from wire._messages import MoneyReply, MoneyRequest, reply_type


def messages_of(base: type[Message]) -> set[type[Message]]:
    """The protocol's message classes (one per opcode) that are a ``base``."""
    return {cls for cls in MESSAGE_TYPES.values() if issubclass(cls, base)}


def test_every_entry_kind_and_money_message_has_exactly_one_row():
    transfer_entries = [TRANSFER.debit, TRANSFER.credit]
    assert sorted([kind.entry_kind for kind in MONEY_KINDS] + transfer_entries) == list(EntryKind)
    assert set(KIND_OF_REQUEST) == messages_of(MoneyRequest)
    assert {kind.reply for kind in MONEY_KINDS} == messages_of(MoneyReply)
    assert set(ENTRY_SIGN) == set(EntryKind)


def test_a_transfer_debits_its_source_and_credits_its_destination_alike():
    assert entry_change_cents(TRANSFER.debit, 5_00) == -5_00
    assert entry_change_cents(TRANSFER.credit, 5_00) == 5_00


@pytest.mark.parametrize("kind", MONEY_KINDS)
def test_a_kind_is_answered_by_its_own_reply(kind):
    assert reply_type(kind.request(bytes(16), 1)) is kind.reply


def test_a_deposit_credits_and_a_withdrawal_debits():
    assert DEPOSIT.balance_change_cents(5_00) == 5_00
    assert WITHDRAWAL.balance_change_cents(5_00) == -5_00
    assert {kind.sign for kind in MONEY_KINDS} <= {+1, -1}


def test_every_table_keyed_by_kind_has_every_kind():
    assert set(SERVER_LIMITS) == set(POST_STATUS) == set(KIND_OF_ENTRY)
    assert {kind.sign for kind in MONEY_KINDS} <= set(store._BALANCE_CHANGES)
    assert {kind.money for kind in TransactionKind} == set(MONEY_KINDS)
    assert set(KIND_OF_REQUEST) <= PERMITTED[State.AUTHENTICATED]
