"""The ATM's keys ``t`` (transfer) and ``p`` (change PIN) against the fake bank.

Covers the confirmation line (masked destination and amount), the receipt with the
source's balance only, cancelling, refusals in plain words, a lost transfer reply
confirmed by its id, a bank without the optional requests, and the PIN change: hidden
prompts, a mismatch or trivial PIN refused at the ATM, and the bank's answer.
"""

from __future__ import annotations

from datetime import UTC

import trio

from atm import text
from atm.errors import ExitCode
from atm.session import run_atm
from tests.helpers import ACCOUNT, PIN, START_BALANCE_CENTS, FakeAccount, FakeBank, ScriptedConsole
from wire import ChangePin, Feature, Features, History, Status, Transfer

OTHER = "WF-14351"
OTHER_BALANCE_CENTS = 5_00
LOGIN_LINES = [ACCOUNT, PIN]


async def run(lines: list[str], bank_setup=None) -> tuple[ExitCode, ScriptedConsole, FakeBank]:
    console = ScriptedConsole(lines)
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        bank.accounts[OTHER] = FakeAccount("9834", OTHER_BALANCE_CENTS)
        if bank_setup is not None:
            bank_setup(bank)
        code = await run_atm(console, bank.connect, tz=UTC)
        nursery.cancel_scope.cancel()
    return code, console, bank


async def test_a_transfer_is_confirmed_and_its_receipt_shows_only_the_source() -> None:
    code, console, bank = await run([*LOGIN_LINES, "t", "wf-14351", "12.50", "y", "x"])
    assert code is ExitCode.OK
    assert console.prompts[-2][0] == "Transfer $12.50 to WF-***51? [y/n]: "
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS - 12_50
    assert bank.accounts[OTHER].balance_cents == OTHER_BALANCE_CENTS + 12_50
    (receipt,) = [line for line in console.output if "RECEIPT" in line]
    assert "WF-***51" in receipt and "$87.50" in receipt
    assert "$17.50" not in receipt  # never the destination's balance
    assert bank.sent(Features)  # asked before the first TRANSFER on the connection


async def test_a_transfer_can_be_cancelled_at_each_step() -> None:
    for lines in (["t", ""], ["t", OTHER, ""], ["t", OTHER, "5", "n"]):
        code, console, bank = await run([*LOGIN_LINES, *lines, "x"])
        assert code is ExitCode.OK and bank.sent(Transfer) == []
        assert text.CANCELLED in console.output


async def test_refused_transfers_are_said_in_plain_words() -> None:
    _, console, bank = await run([*LOGIN_LINES, "t", "QQ-00000", "5", "y",
                                  "t", ACCOUNT, "t", OTHER, "500", "y", "x"])
    assert text.refused(text.TRANSFER_NOUN, Status.INVALID_TO_ACCOUNT) in console.output
    assert text.refused(text.TRANSFER_NOUN, Status.SAME_ACCOUNT) in console.output  # at the ATM
    assert text.refused(text.TRANSFER_NOUN, Status.INSUFFICIENT_FUNDS) in console.output
    assert len(bank.sent(Transfer)) == 2
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS


async def test_a_lost_transfer_reply_is_confirmed_with_the_same_id(autojump_clock) -> None:
    def lose_one(bank: FakeBank) -> None:
        bank.lose_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "t", OTHER, "20", "y", "x"], lose_one)
    assert code is ExitCode.OK
    first, retry = bank.sent(Transfer)
    assert first == retry
    assert bank.accounts[OTHER].balance_cents == OTHER_BALANCE_CENTS + 20_00
    assert "...confirmed, your transfer went through once, reference 1." in console.output
    assert len(bank.sent(Features)) == 2  # asked again on the new connection


async def test_history_names_transfers() -> None:
    _, console, bank = await run([*LOGIN_LINES, "t", OTHER, "1", "y", "h", "x"])
    assert bank.sent(History)
    assert any("Transfer out" in line and "-$1.00" in line for line in console.output)


async def test_a_transfer_lock_is_said_in_plain_words_and_settles_the_transfer() -> None:
    def locked(bank: FakeBank) -> None:
        bank.transfers_locked = True

    code, console, bank = await run([*LOGIN_LINES, "t", OTHER, "5", "y", "b", "x"], locked)
    assert code is ExitCode.OK
    assert bank.sent(Features)[0].features & Feature.FREQUENCY_LIMIT  # the ATM announces it
    assert text.refused(text.TRANSFER_NOUN, Status.EXCEEDS_FREQUENCY_LIMIT) in console.output
    assert "try again later or ask the bank (65)" in text.status_sentence(
        Status.EXCEEDS_FREQUENCY_LIMIT
    )
    assert len(bank.sent(Transfer)) == 1  # settled: not resent to confirm it
    assert bank.accounts[OTHER].balance_cents == OTHER_BALANCE_CENTS


async def test_a_bank_without_the_optional_requests_is_not_asked_them() -> None:
    def old_bank(bank: FakeBank) -> None:
        bank.served_features = 0

    _, console, bank = await run([*LOGIN_LINES, "t", "p", "x"], old_bank)
    assert console.output.count(text.NOT_OFFERED) == 2
    assert bank.sent(Transfer) == [] and bank.sent(ChangePin) == []


async def test_a_pin_change_asks_three_hidden_pins_and_the_new_one_logs_in_next() -> None:
    code, console, bank = await run([*LOGIN_LINES, "p", PIN, "2580", "2580", "x"])
    assert code is ExitCode.OK
    assert [secret for prompt, secret in console.prompts if "PIN" in prompt] == [True] * 4
    assert text.PIN_CHANGED in console.output
    assert bank.accounts[ACCOUNT].pin == "2580"
    assert not any("2580" in line for line in console.output)


async def test_a_mismatch_or_trivial_pin_is_refused_at_the_atm() -> None:
    _, console, bank = await run([*LOGIN_LINES, "p", PIN, "2580", "2581",
                                  "p", PIN, "1111", "1111", "x"])
    assert text.PINS_DIFFER in console.output
    assert text.pin_change_refused(Status.PIN_NOT_ALLOWED) in console.output
    assert bank.sent(ChangePin) == []
    assert bank.accounts[ACCOUNT].pin == PIN


async def test_a_wrong_current_pin_is_the_banks_answer() -> None:
    _, console, bank = await run([*LOGIN_LINES, "p", "0000", "2580", "2580", "x"])
    assert text.pin_change_refused(Status.INCORRECT_PIN) in console.output
    assert bank.accounts[ACCOUNT].pin == PIN


async def test_a_lost_pin_change_reply_is_confirmed_with_the_new_pin(autojump_clock) -> None:
    def lose_one(bank: FakeBank) -> None:
        bank.lose_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "p", PIN, "2580", "2580", "x"], lose_one)
    assert code is ExitCode.OK
    # The fake forgets the session with its connection, so the old PIN no longer logs
    # in: the new one does, and asking for the PIN it already is confirms the change.
    assert bank.sent(ChangePin) == [ChangePin(PIN, "2580"), ChangePin("2580", "2580")]
    assert text.PIN_CHANGED in console.output
    assert bank.accounts[ACCOUNT].pin == "2580"
