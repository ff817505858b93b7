"""The ATM's words: every wire status has a sentence, receipts, history, endings, --help.

Times are rendered in an explicit time zone so the expected text does not depend on
the machine running the tests.
"""

from __future__ import annotations

from datetime import UTC, timedelta, timezone

import pytest

from atm import text
from atm.__main__ import build_parser
from atm.errors import (
    ConnectFailed,
    ConnectionLost,
    ExitCode,
    IncompatibleVersion,
    LoginRefused,
    ReplyTimeout,
    ServerShutdown,
    SessionExpired,
    TransactionUnconfirmed,
)
from atm.text import Receipt, TransactionKind
from tests.helpers import assert_customer_words
from wire import EntryKind, HistoryEntry, Status

TIME_MS = 1_700_000_000_123  # 2023-11-14 22:13:20.123 UTC


@pytest.mark.parametrize("status", list(Status))
def test_every_status_has_a_sentence_with_its_code(status: Status) -> None:
    sentence = text.status_sentence(status)
    assert sentence.endswith(f" ({status.value})")
    assert len(sentence) > len(f" ({status.value})") + 5


def test_the_table_covers_exactly_the_wire_statuses() -> None:
    assert set(text.STATUS_SENTENCES) == set(Status)


def test_iso_codes_read_as_bank_staff_expect() -> None:
    assert text.status_sentence(Status.INSUFFICIENT_FUNDS) == "Insufficient funds (51)"
    assert text.status_sentence(Status.INCORRECT_PIN) == "Incorrect PIN (55)"


@pytest.mark.parametrize(("account", "masked"), [
    ("AC-12345", "AC-***45"), ("ac-00001", "AC-***01"),
])
def test_account_mask_keeps_only_the_last_digits(account: str, masked: str) -> None:
    assert text.mask_account(account) == masked


def test_receipt() -> None:
    receipt = Receipt(kind=TransactionKind.WITHDRAWAL, account="AC-12345", amount_cents=20_50,
                      balance_cents=1_234_56, entry_id=42, time_ms=TIME_MS)
    assert text.format_receipt(receipt, UTC).splitlines() == [
        "------------- RECEIPT --------------",
        "Withdrawal                    $20.50",
        "Account                     AC-***45",
        "New balance                $1,234.56",
        "Reference                         42",
        "Time         2023-11-14 22:13:20 UTC",
        "------------------------------------",
    ]


def test_receipt_time_is_local_time() -> None:
    tz = timezone(timedelta(hours=2), "EET")
    assert text.format_time(TIME_MS, tz) == "2023-11-15 00:13:20 EET"


LAST_MS_OF_YEAR_9999 = 253_402_300_799_999  # 9999-12-31 23:59:59.999 UTC


@pytest.mark.parametrize(("time_ms", "tz"), [
    (2**63 - 1, UTC),  # the protocol's largest time
    (2**63 - 1, None),
    (LAST_MS_OF_YEAR_9999 + 1, UTC),
    (LAST_MS_OF_YEAR_9999, timezone(timedelta(hours=2), "EET")),  # past 9999 locally
])
def test_a_time_no_calendar_can_show_is_shown_raw(time_ms: int, tz) -> None:
    """A booked deposit's receipt must print whatever time the bank sent."""
    receipt = Receipt(kind=TransactionKind.DEPOSIT, account="AC-12345", amount_cents=1,
                      balance_cents=1, entry_id=1, time_ms=time_ms)
    assert f"{time_ms} ms Unix time" in text.format_receipt(receipt, tz)
    entry = HistoryEntry(1, time_ms, EntryKind.DEPOSIT, 1, 1)
    assert text.format_history((entry,), tz).splitlines()[1].startswith(f"{time_ms} ms")


def test_the_earliest_and_latest_showable_times() -> None:
    assert text.format_time(0, UTC) == "1970-01-01 00:00:00 UTC"
    assert text.format_time(LAST_MS_OF_YEAR_9999, UTC) == "9999-12-31 23:59:59 UTC"
    entry = HistoryEntry(1, 0, EntryKind.DEPOSIT, 1, 1)
    assert text.format_history((entry,), UTC).splitlines()[1].split()[:3] == [
        "1970-01-01", "00:00:00", "UTC"
    ]


def test_history_is_newest_first_with_withdrawals_negative() -> None:
    entries = (
        HistoryEntry(2, TIME_MS + 1000, EntryKind.WITHDRAWAL, 5_00, 15_00),
        HistoryEntry(1, TIME_MS, EntryKind.DEPOSIT, 20_00, 20_00),
    )
    lines = text.format_history(entries, UTC).splitlines()
    assert lines[1].split() == [
        "2023-11-14", "22:13:21", "UTC", "Withdrawal", "-$5.00", "$15.00", "2"
    ]
    assert lines[2].split() == [
        "2023-11-14", "22:13:20", "UTC", "Deposit", "$20.00", "$20.00", "1"
    ]
    assert text.format_history((), UTC) == text.NO_HISTORY


def test_history_times_name_their_zone_as_receipts_do() -> None:
    tz = timezone(timedelta(hours=1), "CET")
    entry = HistoryEntry(1, TIME_MS, EntryKind.DEPOSIT, 20_00, 20_00)
    receipt = Receipt(kind=TransactionKind.DEPOSIT, account="AC-12345", amount_cents=20_00,
                      balance_cents=20_00, entry_id=1, time_ms=TIME_MS)
    row = text.format_history((entry,), tz).splitlines()[1]
    assert row.startswith("2023-11-14 23:13:20 CET ")
    assert "2023-11-14 23:13:20 CET" in text.format_receipt(receipt, tz)


@pytest.mark.parametrize(("ended", "expected"), [
    (ConnectionLost("the bank closed the connection"),
     "The connection to the bank was lost: the bank closed the connection."),
    (ConnectFailed("could not reach 127.0.0.1:1: Connection refused"),
     "Could not connect to the bank: could not reach 127.0.0.1:1: Connection refused."),
    (ServerShutdown(10), "Session ended: the bank is shutting down (closing in 10 s)."),
    (SessionExpired("idle"), "Session ended: the session expired after being idle too long."),
    (LoginRefused(Status.PIN_TRIES_EXCEEDED),
     "Login refused: Too many incorrect PINs: the account is locked for a while \N{EM DASH} "
     "try again later or ask the bank (75). Session ended."),
    (IncompatibleVersion("protocol version 2"),
     "This ATM cannot talk to this bank: The bank does not work with this version of the "
     "ATM (164). The ATM software needs updating."),
    (TransactionUnconfirmed(kind="deposit", amount_cents=20_00, txn_id=bytes(range(16))),
     "We could not confirm your deposit of $20.00. It was made at most once; ask the bank "
     "about transaction 000102030405060708090a0b0c0d0e0f."),
])
def test_endings(ended: Exception, expected: str) -> None:
    assert text.ending(ended) == expected


def test_reconnecting_says_what_happened() -> None:
    assert text.reconnecting("get your balance", ConnectionLost("x")) == (
        "The connection dropped; reconnecting to get your balance..."
    )
    assert text.reconnecting("confirm your deposit", Status.ISSUER_UNAVAILABLE) == (
        "The bank's answer \"The bank is unavailable; please try again later (91)\" does "
        "not say whether it went through; reconnecting to confirm your deposit..."
    )
    assert text.reconnecting("x", ReplyTimeout("x")).startswith("The bank did not answer")


def test_a_failed_retry_says_whether_another_follows() -> None:
    lost = ConnectionLost("the bank closed the connection")
    assert text.retry_failed(2, lost, retry_in_s=4) == (
        "Attempt 2 failed: the bank closed the connection; trying again in 4 s."
    )
    assert text.retry_failed(3, Status.ISSUER_UNAVAILABLE) == (
        f"Attempt 3 got no clear answer: {text.status_sentence(Status.ISSUER_UNAVAILABLE)}."
    )


@pytest.mark.parametrize("status", [Status.PIN_TRIES_EXCEEDED, Status.ACCOUNT_IN_USE])
def test_login_refusals_have_their_own_exit_codes(status: Status) -> None:
    assert LoginRefused(status).exit_code is not ExitCode.LOGIN_REFUSED


def test_help_documents_every_exit_code() -> None:
    help_text = build_parser().format_help()
    for code in ExitCode:
        assert f"{code.value:>3}  {text.EXIT_CODE_MEANINGS[code]}" in help_text
    for key in ("ATM_HOST", "ATM_PORT", "balance", "deposit", "withdraw", "history"):
        assert key in help_text


def _customer_sentences() -> list[str]:
    """Every fixed sentence in ``atm.text``, and each kind of retry and ending line."""
    constants = [value for name, value in vars(text).items()
                 if name.isupper() and isinstance(value, str)]
    lost = ConnectionLost("the bank closed the connection")
    return [
        *constants,
        *(text.status_sentence(status) for status in Status),
        *(text.ending(LoginRefused(status)) for status in Status),
        text.login_waiting(3),
        text.login_not_yet(Status.ACCOUNT_IN_USE),
        text.login_not_yet(Status.ISSUER_UNAVAILABLE),
        text.connection_dropped(lost),
        text.reconnecting(text.LOGGING_IN, lost),
        text.reconnecting(text.confirming(TransactionKind.DEPOSIT), Status.SYSTEM_MALFUNCTION),
        text.retry_failed(1, lost, retry_in_s=1),
        text.retry_failed(2, Status.ISSUER_UNAVAILABLE),
        text.ending(IncompatibleVersion("version 2")),
        text.ending(ServerShutdown(5)),
        text.ending(SessionExpired("idle")),
    ]


@pytest.mark.parametrize("sentence", _customer_sentences())
def test_customer_sentences_have_no_protocol_words(sentence: str) -> None:
    assert_customer_words(sentence)


def test_the_withdrawal_limit_and_the_lock_are_said_plainly() -> None:
    assert text.refused(TransactionKind.WITHDRAWAL, Status.EXCEEDS_WITHDRAWAL_LIMIT) == (
        "Your withdrawal was declined: It is over the bank's limit for one withdrawal (61)."
    )
    assert text.status_sentence(Status.PIN_TRIES_EXCEEDED) == (
        "Too many incorrect PINs: the account is locked for a while \N{EM DASH} try again "
        "later or ask the bank (75)."[:-1]
    )
