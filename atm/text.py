"""Every sentence the ATM shows a customer, in one place.

Keeping the words apart from the flow means a test can check that every wire status has a
sentence, a translator has one file to work on, and the flow code reads as control flow.
Statuses are always shown with their numeric code ("Insufficient funds (51)") so a
customer reading one out to the bank is understood; the codes follow ISO 8583.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import Enum

import wire
from atm.errors import (
    ConnectFailed,
    ConnectionLost,
    ExitCode,
    IncompatibleVersion,
    LoginRefused,
    ReplyTimeout,
    ServerBusy,
    ServerShutdown,
    SessionEnded,
    SessionExpired,
    TlsFailed,
    TransactionUnconfirmed,
)
from wire import (
    EntryKind,
    HistoryEntry,
    Status,
    format_cents,
    mask_account,
)

STATUS_SENTENCES: dict[Status, str] = {
    Status.APPROVED: "Approved",
    Status.INVALID_TRANSACTION: "The bank does not offer that transaction",
    Status.INVALID_AMOUNT: "Invalid amount",
    Status.FORMAT_ERROR: "The bank could not read the request",
    Status.INSUFFICIENT_FUNDS: "Insufficient funds",
    Status.INCORRECT_PIN: "Incorrect PIN",
    Status.EXCEEDS_WITHDRAWAL_LIMIT: "It is over the bank's limit for one withdrawal",
    Status.EXCEEDS_FREQUENCY_LIMIT: (
        "Too many transfers to account numbers that do not exist: transfers from this"
        " account are stopped for a while \N{EM DASH} try again later or ask the bank"
    ),
    Status.PIN_TRIES_EXCEEDED: (
        "Too many incorrect PINs: the account is locked for a while"
        " \N{EM DASH} try again later or ask the bank"
    ),
    Status.ISSUER_UNAVAILABLE: "The bank is unavailable; please try again later",
    Status.DUPLICATE_TRANSMISSION: "Duplicate transaction",
    Status.SYSTEM_MALFUNCTION: "The bank had a system malfunction; please try again later",
    Status.ACCOUNT_IN_USE: "This account is in use at another ATM",
    Status.NOT_LOGGED_IN: "Not logged in",
    Status.ALREADY_LOGGED_IN: "Already logged in",
    Status.SERVER_BUSY: "The bank is busy; please try again in a moment",
    Status.UNSUPPORTED_VERSION: "The bank does not work with this version of the ATM",
    Status.UNKNOWN_SESSION: "The previous session could not be resumed; please log in again",
    Status.INVALID_TO_ACCOUNT: "There is no account with that number",
    Status.SAME_ACCOUNT: "Money cannot be moved from an account to itself",
    Status.PIN_NOT_ALLOWED: (
        "That PIN is too easy to guess: choose one that is not four equal digits"
        " or four digits in a row"
    ),
}


def status_sentence(status: Status) -> str:
    """``Insufficient funds (51)``: the sentence with the code a bank clerk can look up."""
    return f"{STATUS_SENTENCES[status]} ({status.value})"


# -- Prompts and short lines ----------------------------------------------------------

WELCOME = "Welcome to the ATM."
ACCOUNT_PROMPT = "Account number (AA-NNNNN): "
PIN_PROMPT = "PIN (4 digits): "
ACCOUNT_FORMAT_HINT = "An account number is two letters, a hyphen and five digits, like AC-12345."
PIN_FORMAT_HINT = "A PIN is exactly four digits."
TRY_AGAIN = "Please try again."
MENU_PROMPT = "[b]alance  [d]eposit  [w]ithdraw  [t]ransfer  [h]istory  [p]IN  e[x]it: "
MENU_HELP = (
    "Type b for balance, d to deposit, w to withdraw, t to transfer to another account,"
    " h for history, p to change your PIN or x to exit."
)
DESTINATION_PROMPT = "Transfer to account number (AA-NNNNN, empty line to cancel): "
TRANSFER_AMOUNT_PROMPT = "Amount to transfer in dollars (empty line to cancel): "
CONFIRM_HINT = "Please type y to go ahead or n to cancel."
CURRENT_PIN_PROMPT = "Current PIN (4 digits): "
NEW_PIN_PROMPT = "New PIN (4 digits): "
REPEAT_PIN_PROMPT = "New PIN again: "
PINS_DIFFER = "The two new PINs differ; your PIN is unchanged."
PIN_CHANGED = "Your PIN is changed. Use the new one from now on."
NOT_OFFERED = "This bank does not offer that here."
AMOUNT_HINT = "Type an amount in dollars with at most two decimals, like 20, 20.50 or $1,000.00."
AMOUNT_NOT_POSITIVE = "The amount must be more than $0.00."
CANCELLED = "Cancelled."
GOODBYE = "Logged out. Thank you, goodbye."
LOGOUT_UNCONFIRMED = "The bank did not confirm the logout, but your session has ended. Goodbye."
INTERRUPTED = "Interrupted; the session has ended."
STILL_WORKING = "Still working on it; waiting for the bank..."
NO_HISTORY = "No transactions yet."


def logged_in(account: str) -> str:
    return f"Logged in to {mask_account(account)}."


def amount_prompt(kind: TransactionKind) -> str:
    return f"Amount to {kind.verb} in dollars (empty line to cancel): "


def amount_too_large(amount_cents_max: int) -> str:
    return f"The most one transaction can move is {format_cents(amount_cents_max)}."


def balance(balance_cents: int) -> str:
    return f"Your balance is {format_cents(balance_cents)}."


def refused(kind: TransactionKind | str, status: Status) -> str:
    """A transaction the bank declined: no money moved."""
    return f"Your {noun(kind)} was declined: {status_sentence(status)}."


TRANSFER_NOUN = "transfer"
"""A transfer in sentences shared with deposits and withdrawals (``noun``)."""


def noun(kind: TransactionKind | str) -> str:
    """``deposit``, ``withdrawal``, or a transfer's ``TRANSFER_NOUN``."""
    return kind if isinstance(kind, str) else kind.noun


def transfer_confirmation(destination: str, amount_cents: int) -> str:
    """The question before a transfer: the masked destination and the amount."""
    return f"Transfer {format_cents(amount_cents)} to {mask_account(destination)}? [y/n]: "


def pin_change_refused(status: Status) -> str:
    return f"Your PIN was not changed: {status_sentence(status)}."


def request_failed(status: Status) -> str:
    return f"The bank declined the request: {status_sentence(status)}."


# -- Receipts and history -------------------------------------------------------------


class TransactionKind(Enum):
    """Each way money moves (``wire._kinds``), with the words the ATM uses for it."""

    DEPOSIT = (wire.DEPOSIT, "deposit", "deposit", "Deposit")
    WITHDRAWAL = (wire.WITHDRAWAL, "withdrawal", "withdraw", "Withdrawal")

    def __init__(self, money: wire.MoneyKind, noun: str, verb: str, title: str) -> None:
        self.money = money
        self.noun = noun
        self.verb = verb
        self.title = title


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a receipt shows; built from an approved deposit or withdrawal reply."""

    kind: TransactionKind
    account: str
    amount_cents: int
    balance_cents: int
    entry_id: int
    time_ms: int


RECEIPT_WIDTH = 36


def local_time(time_ms: int, tz: tzinfo | None = None) -> datetime:
    """The bank's Unix milliseconds as an aware datetime in ``tz`` (default: local time).

    Built from integer milliseconds with timedelta so no float rounding creeps in.
    Raises OverflowError (or ValueError, OSError) for a time past year 9999, which the
    protocol allows (up to 2**63-1 ms); ``format_time`` shows such a time another way.
    """
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=time_ms)).astimezone(tz)


def raw_time(time_ms: int) -> str:
    """A time no calendar here can show, as the bank sent it."""
    return f"{time_ms} ms Unix time"


def format_time(time_ms: int, tz: tzinfo | None = None, *,
                pattern: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
    """``time_ms`` in ``tz`` by ``pattern``; the raw milliseconds if it is out of range."""
    try:
        return local_time(time_ms, tz).strftime(pattern).rstrip()
    except (OverflowError, ValueError, OSError):
        return raw_time(time_ms)


@dataclass(frozen=True, slots=True)
class TransferReceipt:
    """What a transfer's receipt shows: the source's new balance, never the destination's."""

    account: str
    destination: str
    amount_cents: int
    balance_cents: int
    entry_id: int
    time_ms: int


def format_transfer_receipt(receipt: TransferReceipt, tz: tzinfo | None = None) -> str:
    rows = [
        ("Transfer", format_cents(receipt.amount_cents)),
        ("From", mask_account(receipt.account)),
        ("To", mask_account(receipt.destination)),
        ("New balance", format_cents(receipt.balance_cents)),
        ("Reference", str(receipt.entry_id)),
        ("Time", format_time(receipt.time_ms, tz)),
    ]
    return _receipt_lines(rows)


def format_receipt(receipt: Receipt, tz: tzinfo | None = None) -> str:
    """A fixed-width receipt, one labelled value per line."""
    rows = [
        (receipt.kind.title, format_cents(receipt.amount_cents)),
        ("Account", mask_account(receipt.account)),
        ("New balance", format_cents(receipt.balance_cents)),
        ("Reference", str(receipt.entry_id)),
        ("Time", format_time(receipt.time_ms, tz)),
    ]
    return _receipt_lines(rows)


def _receipt_lines(rows: list[tuple[str, str]]) -> str:
    lines = [" RECEIPT ".center(RECEIPT_WIDTH, "-")]
    lines += [f"{label:<12}{value:>{RECEIPT_WIDTH - 12}}" for label, value in rows]
    lines.append("-" * RECEIPT_WIDTH)
    return "\n".join(lines)


ENTRY_TITLES: dict[EntryKind, str] = {
    **{kind.money.entry_kind: kind.title for kind in TransactionKind},
    EntryKind.TRANSFER_OUT: "Transfer out",
    EntryKind.TRANSFER_IN: "Transfer in",
}
"""What a history line calls each kind of entry."""


def format_history(entries: tuple[HistoryEntry, ...], tz: tzinfo | None = None) -> str:
    """Recent entries newest first, as the bank sends them; each amount signed by what it
    did to the balance, so withdrawals show negative. Each time names its zone, as on a
    receipt (entries either side of a daylight-saving change are in different ones)."""
    if not entries:
        return NO_HISTORY
    times = [format_time(entry.time_ms, tz) for entry in entries]
    width = max(len(time) for time in times) + 1
    lines = [f"{'Time':<{width}}{'Type':<12}{'Amount':>14}{'Balance':>16}  Reference"]
    for entry, time in zip(entries, times, strict=True):
        change_cents = wire.entry_change_cents(entry.kind, entry.amount_cents)
        lines.append(
            f"{time:<{width}}{ENTRY_TITLES[entry.kind]:<12}{format_cents(change_cents):>14}"
            f"{format_cents(entry.balance_cents):>16}  {entry.entry_id}"
        )
    return "\n".join(lines)


# -- Retrying a transaction whose reply was lost --------------------------------------


GETTING_BALANCE = "get your balance"
GETTING_HISTORY = "get your history"
LOGGING_IN = "log you in"


def connection_dropped(cause: SessionEnded) -> str:
    """Said when the connection drops while the customer is choosing: nothing was in
    flight, and the next choice goes out on a new connection."""
    return "The connection to the bank dropped; your next choice will reconnect."


def login_waiting(retry_in_s: int) -> str:
    """Logging in again after a cut LOGIN: the bank still holds the session the lost
    LOGIN opened, until it notices that connection is gone."""
    return (f"The bank still holds the session of the login that was cut off; "
            f"trying again in {retry_in_s} s.")


def confirming(kind: TransactionKind | str) -> str:
    return f"confirm your {noun(kind)}"


def reconnecting(purpose: str, cause: SessionEnded | Status) -> str:
    """Said when a request's connection is lost, or a deposit or withdrawal was answered
    with a status that does not settle it (``cause``); ``purpose`` is ``GETTING_BALANCE``,
    ``GETTING_HISTORY`` or ``confirming(kind)``."""
    if isinstance(cause, Status):
        return (f'The bank\'s answer "{status_sentence(cause)}" does not say whether it '
                f"went through; reconnecting to {purpose}...")
    opening = (
        "The bank did not answer in time"
        if isinstance(cause, ReplyTimeout)
        else "The connection dropped"
    )
    return f"{opening}; reconnecting to {purpose}..."


NOT_SETTLED = "the bank did not settle it"


def login_not_yet(status: Status) -> str:
    """Why logging in again to confirm did not work yet (a status waiting may change)."""
    if status is Status.ACCOUNT_IN_USE:
        return "the bank still holds the old session"
    return "the bank could not log in again yet"


def retry_failed(attempt: int, problem: SessionEnded | Status, *,
                 retry_in_s: int | None = None) -> str:
    """One reconnect that did not settle the request: it failed, or the bank answered with
    a status that says nothing about the first attempt (``problem``)."""
    if isinstance(problem, Status):
        sentence = f"Attempt {attempt} got no clear answer: {status_sentence(problem)}"
    else:
        sentence = f"Attempt {attempt} failed: {ending_reason(problem)}"
    return f"{sentence}." if retry_in_s is None else f"{sentence}; trying again in {retry_in_s} s."


def confirmed(kind: TransactionKind | str, entry_id: int) -> str:
    return f"...confirmed, your {noun(kind)} went through once, reference {entry_id}."


CONFIRMING_PIN_CHANGE = "confirm your PIN change"
PIN_CHANGE_UNCONFIRMED = (
    "We could not confirm your PIN change: next time, try your new PIN first, then the old one."
)


# -- How a session ended --------------------------------------------------------------


def ending_reason(ended: SessionEnded) -> str:
    """A short clause for why the session (or one retry) ended."""
    match ended:
        case ServerShutdown(grace_s=grace_s):
            return f"the bank is shutting down (closing in {grace_s} s)"
        case SessionExpired():
            return "the session expired after being idle too long"
        case ServerBusy():
            return status_sentence(Status.SERVER_BUSY)
        case IncompatibleVersion():
            return status_sentence(Status.UNSUPPORTED_VERSION)
        case TlsFailed(reason=reason):
            return reason
        case LoginRefused(status=status):
            return status_sentence(status)
        case ConnectionLost(reason=reason, status=Status() as status):
            return f"{reason}: {status_sentence(status)}"
        case ConnectionLost(reason=reason):
            return reason
    return str(ended)


def ending(ended: SessionEnded) -> str:
    """The last thing a customer reads when a session ends in an error."""
    match ended:
        case TransactionUnconfirmed(kind=kind, amount_cents=amount_cents, txn_id=txn_id):
            return (
                f"We could not confirm your {kind} of {format_cents(amount_cents)}. "
                f"It was made at most once; ask the bank about transaction {txn_id.hex()}."
            )
        case ConnectFailed():
            return f"Could not connect to the bank: {ending_reason(ended)}."
        case IncompatibleVersion():
            return (
                f"This ATM cannot talk to this bank: {ending_reason(ended)}. "
                "The ATM software needs updating."
            )
        case TlsFailed():
            return (
                f"Could not open a secure connection to the bank: {ending_reason(ended)}. "
                "Ask the bank's operator to check this ATM's TLS settings."
            )
        case LoginRefused():
            return f"Login refused: {ending_reason(ended)}. Session ended."
        case ConnectionLost():
            return f"The connection to the bank was lost: {ending_reason(ended)}."
    return f"Session ended: {ending_reason(ended)}."


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "logged out normally, or input ended",
    ExitCode.CONNECTION_LOST: "could not connect, or the connection was lost",
    ExitCode.USAGE: "bad command line",
    ExitCode.LOGIN_REFUSED: "login refused (e.g. too many incorrect PINs on one connection)",
    ExitCode.ACCOUNT_LOCKED: "account locked after too many incorrect PINs",
    ExitCode.ACCOUNT_IN_USE: "account in use at another ATM",
    ExitCode.SERVER_UNAVAILABLE: "bank busy or shutting down",
    ExitCode.SESSION_EXPIRED: "session expired after being idle",
    ExitCode.INCOMPATIBLE_VERSION: "the bank speaks another protocol version",
    ExitCode.UNCONFIRMED_TRANSACTION: "a deposit, withdrawal or transfer could not be confirmed",
    ExitCode.TLS_FAILED: "no secure connection: a certificate problem (unknown CA, wrong host"
    " name, expired, no terminal certificate) or no TLS at the other end",
    ExitCode.INTERRUPTED: "interrupted with Ctrl-C, or stopped by SIGTERM or SIGHUP",
    ExitCode.OUTPUT_CLOSED: "the screen went away (output was piped into a program that quit)",
}


def exit_code_table() -> str:
    """The exit codes for ``--help``."""
    lines = ["exit status:"]
    lines += [f"  {code.value:>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items()]
    return "\n".join(lines)
