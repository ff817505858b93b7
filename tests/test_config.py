"""ServerConfig's limits: the PIN lockout is bounded so a lock's end always fits SQLite."""

from __future__ import annotations

import pytest

from bank.__main__ import build_parser
from bank.config import PIN_LOCKOUT_S_MAX, ServerConfig, from_arguments
from bank.limits import LOCKOUT_MS_MAX


def test_the_lockout_limit_is_one_year_and_the_stores_own():
    assert PIN_LOCKOUT_S_MAX == 365 * 24 * 60 * 60
    assert PIN_LOCKOUT_S_MAX * 1000 == LOCKOUT_MS_MAX


@pytest.mark.parametrize("seconds", [0, 900, PIN_LOCKOUT_S_MAX])
def test_a_lockout_up_to_the_limit_is_accepted(seconds: int):
    assert ServerConfig(pin_lockout_s=seconds).pin_lockout_s == seconds


@pytest.mark.parametrize("seconds", [-1, PIN_LOCKOUT_S_MAX + 1, 2**63])
def test_a_lockout_past_the_limit_is_refused(seconds: int):
    with pytest.raises(ValueError, match=rf"pin_lockout_s must be 0\.\.{PIN_LOCKOUT_S_MAX} "):
        ServerConfig(pin_lockout_s=seconds)


def test_the_flag_and_the_env_var_are_held_to_the_limit(monkeypatch: pytest.MonkeyPatch):
    # Through the parser, not main(): were the check lost, main() would start serving.
    past_the_limit = str(PIN_LOCKOUT_S_MAX + 1)
    with pytest.raises(ValueError, match="pin_lockout_s"):
        from_arguments(build_parser().parse_args(["--pin-lockout-s", past_the_limit]))
    monkeypatch.setenv("BANK_PIN_LOCKOUT_S", past_the_limit)
    with pytest.raises(ValueError, match="pin_lockout_s"):
        from_arguments(build_parser().parse_args([]))
