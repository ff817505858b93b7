"""The course's ``accounts.txt``: one ``account, pin, balance`` per line.

Example::

    # account, PIN, opening balance in dollars
    ac-12345, 1324, 1024.32

Fields are comma separated with optional whitespace; ``#`` starts a comment; blank lines
are ignored. The whole file is checked before anything is imported, and every bad line
is reported with its number, so an operator fixes the file in one pass. Messages never
echo a PIN, since this file is the one place PINs exist in plaintext.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wire import (
    BALANCE_CENTS_MAX,
    canonical_account,
    check_pin,
    parse_dollars,
)

FIELDS_PER_LINE = 3
ACCOUNTS_FILE_BYTES_MAX = 16 * 1024 * 1024
"""Largest accounts file read: far above any course file, far below memory trouble."""


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One valid line: canonical (uppercase) account, PIN, opening balance in cents."""

    account: str
    pin: str = field(repr=False)  # Kept out of reprs so it never reaches a log.
    balance_cents: int
    line_number: int = 0


class AccountsFileError(ValueError):
    """The file has bad lines; ``problems`` lists (line number, message) for each."""

    def __init__(self, source: str, problems: list[tuple[int, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {source}:{number}: {message}" for number, message in problems)
        super().__init__(f"{len(problems)} bad line(s) in {source}:\n{lines}")


class UnreadableAccountsFile(AccountsFileError):
    """The file cannot be read as text at all: missing, a directory, not UTF-8..."""

    def __init__(self, source: str, reason: str) -> None:
        ValueError.__init__(self, f"cannot read {source}: {reason}")
        self.source = source
        self.problems = []


def read_accounts(path: str | os.PathLike[str]) -> list[AccountRecord]:
    """Parse the accounts file at ``path``; AccountsFileError lists every bad line, or
    (UnreadableAccountsFile) says why the file cannot be read."""
    path = Path(path)
    try:
        if path.stat().st_size > ACCOUNTS_FILE_BYTES_MAX:
            raise AccountsFileError(
                str(path), [(0, f"file exceeds {ACCOUNTS_FILE_BYTES_MAX} bytes")]
            )
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UnreadableAccountsFile(str(path), error.strerror or str(error)) from None
    except UnicodeDecodeError as error:
        raise UnreadableAccountsFile(
            str(path), f"it is not UTF-8 text (see byte {error.start})"
        ) from None
    return parse_accounts(text, source=str(path))


def parse_accounts(text: str, *, source: str = "<accounts>") -> list[AccountRecord]:
    """Every record in ``text``, in file order; all bad lines reported at once."""
    records: list[AccountRecord] = []
    problems: list[tuple[int, str]] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            record = parse_line(content, line_number=number)
        except ValueError as error:
            problems.append((number, str(error)))
            continue
        if record.account in first_line_of:
            first = first_line_of[record.account]
            problems.append((number, f"{record.account} already defined on line {first}"))
            continue
        first_line_of[record.account] = number
        records.append(record)
    if problems:
        raise AccountsFileError(source, problems)
    return records


def parse_line(content: str, *, line_number: int = 0) -> AccountRecord:
    """One ``account, pin, balance`` line without its comment; ValueError says what is wrong.

    Messages name the bad field but never quote a value: with columns swapped, the
    value in the account or balance position could be someone's PIN.
    """
    fields = [part.strip() for part in content.split(",")]
    if len(fields) != FIELDS_PER_LINE:
        raise ValueError(
            f"expected 3 comma-separated fields (account, pin, balance), found {len(fields)}"
        )
    account_text, pin, balance_text = fields
    try:
        account = canonical_account(account_text)
    except ValueError:
        raise ValueError("account is not AA-NNNNN (two letters, hyphen, five digits)") from None
    try:
        check_pin(pin)
    except ValueError:
        raise ValueError("PIN must be exactly 4 digits") from None
    return AccountRecord(account, pin, _parse_balance(balance_text), line_number)


def _parse_balance(text: str) -> int:
    try:
        cents = parse_dollars(text)
    except ValueError:
        raise ValueError(
            "balance is not a dollar amount with at most two decimals (no sign, no commas)"
        ) from None
    if cents > BALANCE_CENTS_MAX:
        raise ValueError("balance exceeds the largest balance")
    return cents
