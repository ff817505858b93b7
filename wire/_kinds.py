"""Every way money moves, and what the protocol says about each: one row per kind.

A kind's request and reply messages, the ledger entry it is recorded as and which way
that entry moves the balance are stated once, here, as TigerBeetle states each kind of
transfer's rules in one place. The bank, the ATM and the tools look a kind up instead of
branching on deposit versus withdrawal, so a new kind of one-account posting is a new
row; tests/test_kinds.py fails until every table keyed by kind elsewhere has it too (the
server's limits in ``bank.session``, the ATM's words in ``atm.text``), since what is the
server's policy or the ATM's wording is theirs to say, not the protocol's.

A transfer is not a row of MONEY_KINDS: it names two accounts and books two entries, a
debit of the source (TRANSFER_OUT) and a credit of the destination (TRANSFER_IN), so it
is ``TRANSFER``. Every entry kind's sign, the transfer's
two included, is ``ENTRY_SIGN``: what a checker replays a ledger with.
"""

from __future__ import annotations

from dataclasses import dataclass

from wire._messages import (
    Deposit,
    DepositReply,
    EntryKind,
    MoneyReply,
    MoneyRequest,
    Withdraw,
    WithdrawReply,
)


@dataclass(frozen=True, slots=True)
class MoneyKind:
    """One way money moves into or out of an account."""

    entry_kind: EntryKind
    """How its ledger entries are recorded, and shown in a HISTORY reply."""
    request: type[MoneyRequest]
    reply: type[MoneyReply]
    sign: int
    """+1 if its amount is added to the balance (a credit), -1 if taken from it (a debit)."""

    def balance_change_cents(self, amount_cents: int) -> int:
        """What an entry of this kind for ``amount_cents`` does to the balance."""
        return self.sign * amount_cents


DEPOSIT = MoneyKind(EntryKind.DEPOSIT, Deposit, DepositReply, sign=+1)
WITHDRAWAL = MoneyKind(EntryKind.WITHDRAWAL, Withdraw, WithdrawReply, sign=-1)

MONEY_KINDS: tuple[MoneyKind, ...] = (DEPOSIT, WITHDRAWAL)

KIND_OF_ENTRY: dict[EntryKind, MoneyKind] = {kind.entry_kind: kind for kind in MONEY_KINDS}
"""The kind a ledger entry records; an int works as a key too, as a database row has it."""

KIND_OF_REQUEST: dict[type[MoneyRequest], MoneyKind] = {
    kind.request: kind for kind in MONEY_KINDS
}
"""The kind a request asks for, by its class: ``KIND_OF_REQUEST[type(request)]``."""


@dataclass(frozen=True, slots=True)
class TransferKind:
    """Money moved from the session's account to another: two entries under one id."""

    debit: EntryKind
    """The source's entry (its balance falls)."""
    credit: EntryKind
    """The destination's entry (its balance rises)."""


TRANSFER = TransferKind(EntryKind.TRANSFER_OUT, EntryKind.TRANSFER_IN)

ENTRY_SIGN: dict[EntryKind, int] = {
    **{kind.entry_kind: kind.sign for kind in MONEY_KINDS},
    TRANSFER.debit: -1,
    TRANSFER.credit: +1,
}
"""+1 if an entry of this kind adds its amount to the balance, -1 if it takes it away:
every kind's, so that a ledger's entries replay to its balances (an int key works too)."""


def entry_change_cents(kind: EntryKind | int, amount_cents: int) -> int:
    """What one ledger entry of ``kind`` for ``amount_cents`` does to its balance."""
    return ENTRY_SIGN[kind] * amount_cents  # type: ignore[index]  # IntEnum keys hash as ints
