"""The narrow interface between sessions and storage: sessions know no SQL.

A ledger answers in integer cents and in outcomes of its own (``PinResult``,
``PostResult``) named after what happened in the books; which status a customer gets
for each is the session's business (``bank.session``), not the storage's. Every method
is async so that a backend can run its blocking work off the event loop (SQLite in a
worker thread today, a PostgreSQL pool or several server processes later) without the
session noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from wire import EntryKind, HistoryEntry


class StorageError(Exception):
    """The store could not do its work (disk, lock, corruption): the bank is unavailable.

    Sessions answer it with ISSUER_UNAVAILABLE and carry on; no money moved.
    """


class PinResult(Enum):
    """What a PIN check found."""

    MATCHED = auto()
    """The PIN is the account's and the account is not locked; its failures are cleared."""
    WRONG = auto()
    """A wrong PIN, or no such account (the two are indistinguishable); one more failure
    is counted."""
    LOCKED = auto()
    """The account is locked, by earlier failures or by this one; the PIN was not
    checked, or was wrong."""


@dataclass(frozen=True, slots=True)
class PinVerdict:
    """A PIN check's outcome, with what only the operator's log may learn of it: the
    customer is told ``result`` alone, the same for an unknown account as a known one."""

    result: PinResult
    account_known: bool = True
    """False when there is no such account (``result`` is then WRONG or LOCKED)."""
    locked_until_ms: int | None = None
    """When ``result`` is LOCKED: when the lock ends (Unix milliseconds)."""


class PostResult(Enum):
    """What a deposit, withdrawal or transfer did to the books."""

    BOOKED = auto()
    """A new entry was written and the balance moved."""
    REPLAYED = auto()
    """The transaction id was booked before with the same account, kind and amount: its
    original entry, and nothing moved again."""
    TXN_ID_REUSED = auto()
    """The transaction id was booked before with a different account, kind or amount."""
    AMOUNT_OUT_OF_RANGE = auto()
    """The amount is not 1..AMOUNT_CENTS_MAX cents, so it cannot be booked at all."""
    OVER_LIMIT = auto()
    """A new transaction over the limit the caller gave."""
    INSUFFICIENT_FUNDS = auto()
    """A debit larger than the balance."""
    BALANCE_FULL = auto()
    """A credit that would take the balance past BALANCE_CENTS_MAX (for a transfer: the
    destination's)."""
    UNKNOWN_DESTINATION = auto()
    """A transfer to an account that does not exist."""
    SAME_ACCOUNT = auto()
    """A transfer from an account to itself: it would move nothing, so it is refused."""
    TRANSFERS_LOCKED = auto()
    """The source's transfers are locked: ``destination_tries_max`` of its transfers were
    answered UNKNOWN_DESTINATION, each within ``destination_lockout_s`` of the one before,
    this one perhaps the last of them (``Posting.locked_until_ms`` says until when). A
    walk through account numbers is bounded as PIN guessing is; nothing moved."""
    FENCED = auto()
    """The session's lease was taken over or expired (PostgreSQL's fencing check,
    /work/coord/DESIGN.md): nothing moved. SQLite, one process, never answers it."""


class PinChangeResult(Enum):
    """What a customer's PIN change did."""

    CHANGED = auto()
    """The current PIN matched and the new one is stored (new salt, new keyed hash); the
    account's PIN failures are cleared. Changing to the PIN it already is, as a retry of
    a change that went through does with its new PIN as both, is CHANGED too."""
    WRONG = auto()
    """The current PIN is wrong: one more failure counted, as for a LOGIN."""
    LOCKED = auto()
    """The account is locked, by earlier failures or by this one; nothing changed."""
    TRIVIAL = auto()
    """The new PIN is one of ``wire._credentials.TRIVIAL_PINS``; refused before the
    current PIN is checked, so it counts nothing and changes nothing."""
    FENCED = auto()
    """The session's cluster lease was taken over or expired (PostgreSQL's fence, as
    ``PostResult.FENCED``): nothing was checked, counted or changed. SQLite, one process,
    never answers it."""


@dataclass(frozen=True, slots=True)
class PinChangeVerdict:
    """A PIN change's outcome, with when a lock ends for the operator's log."""

    result: PinChangeResult
    locked_until_ms: int | None = None
    """When ``result`` is LOCKED: when the lock ends (Unix milliseconds)."""


@dataclass(frozen=True, slots=True)
class Posting:
    """The outcome of a deposit, withdrawal or transfer, as the ledger records it.

    When ``result`` is BOOKED or REPLAYED, the entry's id, time and the balance right
    after it: the data of a receipt (a replay's are the original entry's; a transfer's
    are its source entry's, never the destination's). Otherwise
    nothing moved, nothing was recorded (but a transfer's miss, ``PostResult``), and the
    other fields are 0 (``locked_until_ms`` None but for TRANSFERS_LOCKED).
    """

    result: PostResult
    balance_cents: int = 0
    entry_id: int = 0
    time_ms: int = 0
    locked_until_ms: int | None = None
    """When ``result`` is TRANSFERS_LOCKED: when the lock ends (Unix milliseconds), for
    the operator's log, as ``PinVerdict.locked_until_ms``."""


class Ledger(Protocol):
    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        """MATCHED, WRONG (also for an unknown account), or LOCKED, with whether the
        account exists and until when it is locked, for the operator's log.

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
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        """Apply a deposit or withdrawal once, durably, before returning.

        The balance change and its ledger entry commit in one transaction; a
        withdrawal that would overdraw is refused (INSUFFICIENT_FUNDS). ``txn_id`` is
        unique: the same id with the same account, kind and amount is REPLAYED with
        the original entry; with different content it is TXN_ID_REUSED. A new
        transaction over ``limit_cents`` (the server's own limit for its kind) is
        OVER_LIMIT. The limit is checked after the transaction id, so a retry of an
        applied transaction gets its original entry even if the limit changed since.
        ``terminal`` (the ATM's TLS identity, if known) is recorded with a new entry.
        With ``fence`` (the session's cluster lease), a new transaction is FENCED unless
        the lease still holds it; a replay is answered as ever.
        """
        ...

    async def transfer(
        self,
        *,
        account: str,
        txn_id: bytes,
        to_account: str,
        amount_cents: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        """Move money from ``account`` to ``to_account`` once, durably: both balances,
        the transaction and its two entries commit together, or nothing does.

        Idempotent under ``txn_id`` as ``post`` is (the same source, destination and
        amount is REPLAYED with the source's original entry). A new transfer is refused
        TRANSFERS_LOCKED (the source's transfers are locked, see ``PostResult``),
        SAME_ACCOUNT, OVER_LIMIT (``limit_cents``), INSUFFICIENT_FUNDS, then
        UNKNOWN_DESTINATION, then BALANCE_FULL (the destination's), in that order.
        Refusals record nothing, but for UNKNOWN_DESTINATION, which counts one miss
        against the source (the ledger's ``destination_tries_max`` and
        ``destination_lockout_s``), and is TRANSFERS_LOCKED instead when it is the miss
        that locks. The destination may be leased by another session: a lease stops a
        second session, not incoming money.
        """
        ...

    async def change_pin(
        self, account: str, pin: str, new_pin: str, *, fence: int | None = None
    ) -> PinChangeVerdict:
        """Replace the PIN if ``pin`` is the current one, which is checked as a LOGIN's
        is (a wrong one counts toward the lockout); a trivial ``new_pin`` is refused
        first (TRIVIAL), counting nothing. With ``fence`` (the session's cluster lease),
        FENCED, with nothing checked or counted, unless the lease still holds it."""
        ...

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        """The account's ``count`` most recent entries, newest first."""
        ...

    async def aclose(self) -> None:
        """Finish outstanding work and close the store cleanly."""
        ...
