"""The ATM at a real terminal (pexpect): whatever ends it, its last line is ended, so the
shell's prompt that follows starts on a line of its own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from bank.tools import launcher
from tests.helpers import DEMO_ACCOUNT, bank_process_args

ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 30


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        yield server.port


@pytest.mark.parametrize("key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
@pytest.mark.parametrize("at_pin", [False, True], ids=["account", "pin"])
def test_the_last_line_is_ended_however_the_atm_is_left(
    port: int, key: str, at_pin: bool
) -> None:
    atm = pexpect.spawn(sys.executable, ["-m", "atm", "--port", str(port)], cwd=str(ROOT),
                        encoding="utf-8", timeout=PROCESS_TIMEOUT_S)
    atm.expect_exact("Account number (AA-NNNNN): ")
    if at_pin:
        atm.sendline(DEMO_ACCOUNT)
        atm.expect_exact("PIN (4 digits): ")
    atm.send(key)
    atm.expect(pexpect.EOF)
    atm.close()
    assert atm.before.endswith("\n"), repr(atm.before)
