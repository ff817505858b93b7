"""Account numbers and PINs (wire._credentials): the one format LOGIN, the bank's storage,
its accounts file and operator commands, and the ATM's input checks all use."""

import pytest

from wire import Login, Status, WireError
from wire._credentials import canonical_account, check_pin, mask_account


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
