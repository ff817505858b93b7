"""Account numbers and PINs (wire._credentials): the one format LOGIN, the bank's storage,
its accounts file and operator commands, and the ATM's input checks all use."""

import itertools

import pytest

from wire import Login, Status, WireError
from wire._credentials import (
    TRIVIAL_PINS,
    canonical_account,
    check_pin,
    is_trivial_pin,
    mask_account,
)


@pytest.mark.parametrize(("account", "canonical"), [
    ("AC-12345", "AC-12345"), ("ac-12345", "AC-12345"), ("zZ-00001", "ZZ-00001"),
])
def test_an_account_in_either_case_has_one_canonical_form(account: str, canonical: str):
    assert canonical_account(account) == canonical
    assert Login(account, "1324").account == canonical  # LOGIN keeps the same form


@pytest.mark.parametrize("account", [
    "AC12345", "A1-12345", "AC-1234", "AC-123456", "", " AC-12345", "ÄC-12345",
    "AC-\uff11\uff12\uff13\uff14\uff15", 12345,
])
def test_anything_else_is_a_format_error(account: object):
    with pytest.raises(WireError) as caught:
        canonical_account(account)  # type: ignore[arg-type]
    assert caught.value.status is Status.FORMAT_ERROR
    assert isinstance(caught.value, ValueError)  # what storage and file checks catch


def test_a_pin_is_four_ascii_digits():
    assert check_pin("0042") == "0042"


@pytest.mark.parametrize("pin", ["123", "12345", "12a4", "١٢٣٤", " 123", "", None])
def test_a_bad_pin_is_refused_without_echoing_it(pin: object):
    with pytest.raises(WireError, match="four digits") as caught:
        check_pin(pin)  # type: ignore[arg-type]
    assert caught.value.status is Status.FORMAT_ERROR
    if pin:
        assert str(pin) not in str(caught.value)


@pytest.mark.parametrize(("account", "masked"), [
    ("AC-12345", "AC-***45"), ("ac-00001", "AC-***01"),
])
def test_a_masked_account_keeps_only_its_last_digits(account: str, masked: str):
    assert mask_account(account) == masked


TRIVIAL = ["0000", "1111", "9999", "0123", "1234", "6789", "9876", "5432", "3210"]
ALLOWED = ["1324", "7890", "8901", "2109", "1122", "1233", "0124", "2580", "1357", "9998"]


@pytest.mark.parametrize("pin", TRIVIAL)
def test_the_trivial_pins_are_refused(pin: str):
    assert is_trivial_pin(pin)


@pytest.mark.parametrize("pin", ALLOWED)
def test_pins_near_a_trivial_one_are_allowed(pin: str):
    assert not is_trivial_pin(pin)


def test_the_trivial_pins_are_exactly_the_24_documented():
    """Four equal digits (10), a rising run (7) and a falling run (7), no wrap-around."""
    def kind(pin: str) -> str | None:
        steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
        return {frozenset({0}): "same", frozenset({1}): "up", frozenset({-1}): "down"}.get(
            frozenset(steps))

    every_pin = [f"{n:04d}" for n in range(10_000)]
    assert {pin for pin in every_pin if kind(pin)} == TRIVIAL_PINS
    assert len(TRIVIAL_PINS) == 24


def test_a_malformed_pin_is_a_format_error_not_trivial():
    with pytest.raises(WireError):
        is_trivial_pin("12a4")
