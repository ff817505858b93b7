"""What a customer typed, checked and converted: pure functions, no I/O.

These catch typos before they cost a round trip; the bank still decides whether an
account, PIN or amount is acceptable. A rejected input raises ``InputError`` whose text
is the sentence to show before asking again.
"""

from __future__ import annotations

import re
from enum import Enum

from atm import text
from wire import (
    canonical_account,
    check_pin,
    parse_dollars,
)


class InputError(ValueError):
    """A typo the customer can fix; ``str(error)`` is the sentence to show."""


_WITHOUT_HYPHEN = re.compile(r"([A-Za-z]{2})([0-9]{5})")
"""An account number typed without its hyphen (ASCII only, as on the wire)."""


def parse_account(line: str) -> str:
    """``ac-12345`` or ``ac12345`` -> ``AC-12345``; the wire accepts any case, receipts
    show upper."""
    typed = line.strip()
    if without_hyphen := _WITHOUT_HYPHEN.fullmatch(typed):
        typed = "-".join(without_hyphen.groups())
    try:
        return canonical_account(typed)
    except ValueError:
        raise InputError(text.ACCOUNT_FORMAT_HINT) from None


def parse_pin(line: str) -> str:
    try:
        return check_pin(line.strip())
    except ValueError:
        raise InputError(text.PIN_FORMAT_HINT) from None


def parse_amount(line: str, *, amount_cents_max: int) -> int:
    """Dollars typed by a person to integer cents, within ``1..amount_cents_max``."""
    try:
        amount_cents = parse_dollars(line)
    except ValueError:
        if line.strip().startswith("-"):
            raise InputError(text.AMOUNT_NOT_POSITIVE) from None
        raise InputError(text.AMOUNT_HINT) from None
    if amount_cents <= 0:
        raise InputError(text.AMOUNT_NOT_POSITIVE)
    if amount_cents > amount_cents_max:
        raise InputError(text.amount_too_large(amount_cents_max))
    return amount_cents


class Choice(Enum):
    """A menu key. Whole words work too ("balance"), in any case."""

    BALANCE = "b"
    DEPOSIT = "d"
    WITHDRAW = "w"
    HISTORY = "h"
    TRANSFER = "t"
    CHANGE_PIN = "p"
    EXIT = "x"


_WORDS = {"balance": Choice.BALANCE, "deposit": Choice.DEPOSIT, "withdraw": Choice.WITHDRAW,
          "history": Choice.HISTORY, "transfer": Choice.TRANSFER, "pin": Choice.CHANGE_PIN,
          "exit": Choice.EXIT, "quit": Choice.EXIT,
          "q": Choice.EXIT, "logout": Choice.EXIT}


def parse_choice(line: str) -> Choice | None:
    """The menu choice typed, or None for anything unknown (the caller shows help)."""
    key = line.strip().lower()
    try:
        return Choice(key)
    except ValueError:
        return _WORDS.get(key)
