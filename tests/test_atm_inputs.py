"""What a customer types: account numbers, PINs, dollar amounts and menu keys.

Pure functions, so plain tests plus one Hypothesis property: every amount the ATM
prints (``format_cents``) reads back to the same integer cents.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atm import text
from atm.inputs import Choice, InputError, parse_account, parse_amount, parse_choice, parse_pin
from wire import AMOUNT_CENTS_MAX
from wire._money import format_cents


@pytest.mark.parametrize(("typed", "account"), [
    ("AC-12345", "AC-12345"), ("ac-12345", "AC-12345"), ("  Zz-00001 \t", "ZZ-00001"),
    ("ac12345", "AC-12345"), (" AC12345 ", "AC-12345"),  # the hyphen may be left out
])
def test_accounts_in_any_case(typed: str, account: str) -> None:
    assert parse_account(typed) == account


@pytest.mark.parametrize("typed", ["", "A112345", "A1-12345", "AC-1234", "AC-123456", "ÄC-12345",
                                   "AC-\uff11\uff12\uff13\uff14\uff15", "AC1234",
                                   "AC123456", "ÄC12345", "AC\uff11\uff12\uff13\uff14\uff15",
                                   "AC 12345", "AC--12345"])
def test_account_typos(typed: str) -> None:
    with pytest.raises(InputError, match="two letters"):
        parse_account(typed)


def test_pin() -> None:
    assert parse_pin(" 0042 ") == "0042"


@pytest.mark.parametrize("typed", ["", "123", "12345", "12a4", "\u0661\u0662\u0663\u0664"])
def test_pin_typos(typed: str) -> None:
    with pytest.raises(InputError, match=text.PIN_FORMAT_HINT):
        parse_pin(typed)


@pytest.mark.parametrize(("typed", "cents"), [
    ("20", 20_00), ("20.5", 20_50), ("20.50", 20_50), ("$1,000.00", 1_000_00), (".01", 1),
    (" 7 ", 7_00), ("100000", AMOUNT_CENTS_MAX),
])
def test_amounts_become_exact_cents(typed: str, cents: int) -> None:
    assert parse_amount(typed, amount_cents_max=AMOUNT_CENTS_MAX) == cents


@pytest.mark.parametrize(("typed", "sentence"), [
    ("0", text.AMOUNT_NOT_POSITIVE),
    ("0.00", text.AMOUNT_NOT_POSITIVE),
    ("-5", text.AMOUNT_NOT_POSITIVE),
    ("abc", text.AMOUNT_HINT),
    ("1.234", text.AMOUNT_HINT),
    ("1e3", text.AMOUNT_HINT),
    ("1,00", text.AMOUNT_HINT),
    ("", text.AMOUNT_HINT),
    ("100000.01", text.amount_too_large(AMOUNT_CENTS_MAX)),
])
def test_bad_amounts_are_explained(typed: str, sentence: str) -> None:
    with pytest.raises(InputError) as raised:
        parse_amount(typed, amount_cents_max=AMOUNT_CENTS_MAX)
    assert str(raised.value) == sentence


def test_amount_limit_is_the_callers() -> None:
    assert parse_amount("50", amount_cents_max=50_00) == 50_00
    with pytest.raises(InputError, match=r"\$50\.00"):
        parse_amount("50.01", amount_cents_max=50_00)


@given(st.integers(min_value=1, max_value=AMOUNT_CENTS_MAX))
def test_printed_amounts_read_back_exactly(cents: int) -> None:
    assert parse_amount(format_cents(cents), amount_cents_max=AMOUNT_CENTS_MAX) == cents


@pytest.mark.parametrize(("typed", "choice"), [
    ("b", Choice.BALANCE), (" D ", Choice.DEPOSIT), ("w", Choice.WITHDRAW),
    ("H", Choice.HISTORY), ("x", Choice.EXIT), ("balance", Choice.BALANCE),
    ("Exit", Choice.EXIT), ("q", Choice.EXIT), ("?", None), ("", None), ("bd", None),
])
def test_menu_keys(typed: str, choice: Choice | None) -> None:
    assert parse_choice(typed) is choice
