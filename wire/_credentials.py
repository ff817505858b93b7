"""Account numbers and PINs as the protocol defines them: the one source of their format.

An account number is ``AA-NNNNN`` in either letter case, and both cases name the same
account, so every peer works with its canonical (upper case) form. A PIN is four ASCII
digits. LOGIN checks its fields with these functions, and so do the bank's storage,
accounts file and operator commands and the ATM's input checks, so the format cannot
drift between them.
"""

from __future__ import annotations

import re

from wire._errors import WireError
from wire._status import Status

ACCOUNT_PATTERN = re.compile(r"[A-Za-z]{2}-[0-9]{5}", re.ASCII)
PIN_PATTERN = re.compile(r"[0-9]{4}", re.ASCII)

ACCOUNT_DIGITS_SHOWN = 2
"""Digits of an account number left visible on receipts and in operator logs."""


def canonical_account(account: str) -> str:
    """``ac-12345`` -> ``AC-12345``: the form an account is stored, hashed and shown in.

    Anything that is not ``AA-NNNNN`` is a WireError (a ValueError) with FORMAT_ERROR,
    the status a LOGIN carrying it is refused with.
    """
    if not isinstance(account, str) or not ACCOUNT_PATTERN.fullmatch(account):
        raise WireError(Status.FORMAT_ERROR, "account is not AA-NNNNN")
    return account.upper()


def check_pin(pin: str) -> str:
    """``pin`` if it is four ASCII digits, else a WireError that never shows the PIN."""
    if not isinstance(pin, str) or not PIN_PATTERN.fullmatch(pin):
        raise WireError(Status.FORMAT_ERROR, "PIN is not four digits")
    return pin


TRIVIAL_PINS: frozenset[str] = frozenset(
    {digit * 4 for digit in "0123456789"}
    | {"0123456789"[start : start + 4] for start in range(7)}
    | {"9876543210"[start : start + 4] for start in range(7)}
)
"""The PINs a customer may not choose (CHANGE_PIN): the 24 that a guesser tries first.

Exactly these: four equal digits (0000, 1111, ... 9999); four digits each one more than
the one before (0123, 1234, ... 6789); four digits each one less than the one before
(9876, 8765, ... 3210). No wrap-around (7890 and 8901 are allowed). An operator choosing
a PIN (``python -m bank add-account``, ``reset-pin``) is held to it too; PINs that exist
already are not (``import`` migrates them with a warning, and the demo account ZZ-99999
has 9999), so an account whose PIN is trivial keeps working until it is changed. The bank
and the ATM both check it with ``is_trivial_pin``, the ATM so that its customer hears at
once, the bank because only its word counts."""


def is_trivial_pin(pin: str) -> bool:
    """Whether ``pin`` (a well-formed PIN, ``check_pin``) is one of ``TRIVIAL_PINS``."""
    return check_pin(pin) in TRIVIAL_PINS


def mask_account(account: str) -> str:
    """``ac-12345`` -> ``AC-***45``: enough to recognise an account, not to use it."""
    prefix, _, digits = canonical_account(account).partition("-")
    hidden = len(digits) - ACCOUNT_DIGITS_SHOWN
    return f"{prefix}-{'*' * hidden}{digits[hidden:]}"
