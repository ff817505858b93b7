"""The narrow interface between sessions and storage: sessions know no SQL.

A ledger answers in wire statuses and integer cents. Every method is async so that a
backend can run its blocking work off the event loop (SQLite in a worker thread today,
a PostgreSQL pool or several server processes later) without the session noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from wire import EntryKind, HistoryEntry, Status


class StorageError(Exception):
    """The store could not do its work (disk, lock, corruption): the bank is unavailable.

    Sessions answer it with ISSUER_UNAVAILABLE and carry on; no money moved.
    """


@dataclass(frozen=True, slots=True)
class Posting:
    """The outcome of a deposit or withdrawal.

    When ``status`` is APPROVED, the entry's id, time and the balance right after it:
    the data of a receipt. A replay of an already-applied transaction id returns the
    original entry unchanged. Otherwise (INSUFFICIENT_FUNDS, DUPLICATE_TRANSMISSION)
    nothing moved and the other fields are 0.
    """

    status: Status
    balance_cents: int = 0
    entry_id: int = 0
    time_ms: int = 0


class Ledger(Protocol):
    async def verify_pin(self, account: str, pin: str) -> Status:
        """APPROVED, INCORRECT_PIN (also for an unknown account), or PIN_TRIES_EXCEEDED.

        Counts consecutive failures and locks the account after too many; a success
        resets the count. Unknown accounts and wrong PINs take comparable time.
        """
        ...

    async def balance(self, account: str) -> int:
        """The account's balance in cents."""
        ...

    async def post(
        self,
        *,
        account: str,
        txn_id: bytes,
        kind: EntryKind,
        amount_cents: int,
        limit_cents: int,
    ) -> Posting:
        """Apply a deposit or withdrawal once, durably, before returning.

        The balance change and its ledger entry commit in one transaction; a
        withdrawal that would overdraw is refused (INSUFFICIENT_FUNDS). ``txn_id`` is
        unique: the same id with the same account, kind and amount returns the
        original outcome; with different content it is DUPLICATE_TRANSMISSION.
        A new transaction over ``limit_cents`` (the server's own limit) is refused:
        EXCEEDS_WITHDRAWAL_LIMIT for a withdrawal, INVALID_AMOUNT for a deposit. The
        limit is checked after the transaction id, so a retry of an applied
        transaction gets its original outcome even if the limit changed since.
        """
        ...

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        """The account's ``count`` most recent entries, newest first."""
        ...

    async def aclose(self) -> None:
        """Finish outstanding work and close the store cleanly."""
        ...
