"""The ATM's customer flow end to end against the fake bank, over memory streams.

Covers login (typos, wrong PIN, lockout, account in use), the menu, amounts, receipts,
refusals shown with their code, notices ending the session, lost connections, and the
exactly-once retry of a deposit or withdrawal whose reply was lost. Timeouts and
reconnect back-offs run on ``autojump_clock``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC

import pytest
import trio
import trio.testing

from atm import text
from atm.connection import Connection
from atm.errors import ConnectFailed, ConnectionLost, ExitCode, TransactionUnconfirmed
from atm.session import (
    RECONNECT_BACKOFF_S,
    RECONNECT_MARGIN_S,
    RECONNECT_WAIT_S_MAX,
    run_atm,
)
from tests.helpers import (
    ACCOUNT,
    HELLO,
    PIN,
    START_BALANCE_CENTS,
    FakeBank,
    ScriptedConsole,
    WaitFor,
)
from wire import (
    Balance,
    ChangePin,
    Deposit,
    Error,
    Hello,
    History,
    Login,
    Logout,
    Resume,
    SessionExpired,
    Shutdown,
    Status,
    Withdraw,
)

LOGIN_LINES = [ACCOUNT, PIN]


async def run(
    lines: list[str], *, then_wait: bool = False, bank_setup=None, during=None,
    hello: Hello = HELLO,
) -> tuple[ExitCode, ScriptedConsole, FakeBank]:
    """Run one ATM session; ``bank_setup(bank)`` first, ``during(bank)`` alongside it."""
    console = ScriptedConsole(lines, then_wait=then_wait)
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery, hello=hello)
        if bank_setup is not None:
            bank_setup(bank)
        if during is not None:
            nursery.start_soon(during, bank)
        code = await run_atm(console, bank.connect, tz=UTC)
        nursery.cancel_scope.cancel()
    return code, console, bank


# -- Login ----------------------------------------------------------------------------


async def test_each_failed_connect_is_said_before_the_next_try(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Three tries of up to 10 s each must not pass in silence."""
    console = ScriptedConsole(["x"])
    silent = ConnectFailed("the bank did not answer within 10 s")

    async def never_greets() -> Connection:
        raise silent

    code = await run_atm(console, never_greets, tz=UTC)
    assert code is ExitCode.CONNECTION_LOST
    assert console.output == [
        text.retry_failed(1, silent, retry_in_s=RECONNECT_BACKOFF_S),
        text.retry_failed(2, silent, retry_in_s=RECONNECT_BACKOFF_S),
        text.ending(silent),
    ]
    assert console.output[0] == (
        "Attempt 1 failed: the bank did not answer within 10 s; trying again in 1 s."
    )



async def test_balance_then_exit() -> None:
    code, console, bank = await run(["ac-12345", PIN, "b", "x"])
    assert code is ExitCode.OK
    assert text.balance(START_BALANCE_CENTS) in console.output
    assert console.output[-1] == text.GOODBYE
    assert bank.sent(Login) == [Login(ACCOUNT, PIN)]
    assert len(bank.sent(Logout)) == 1


async def test_pin_is_asked_as_a_secret_and_the_account_is_not() -> None:
    _, console, _ = await run([*LOGIN_LINES, "x"])
    assert console.prompts[:2] == [(text.ACCOUNT_PROMPT, False), (text.PIN_PROMPT, True)]


async def test_typos_are_caught_locally_and_asked_again() -> None:
    code, console, bank = await run(["A-1", ACCOUNT, "12", "12345", PIN, "x"])
    assert code is ExitCode.OK
    assert console.output.count(text.ACCOUNT_FORMAT_HINT) == 1
    assert console.output.count(text.PIN_FORMAT_HINT) == 2
    assert len(bank.sent(Login)) == 1


async def test_wrong_pin_may_be_retried() -> None:
    code, console, bank = await run([ACCOUNT, "9999", ACCOUNT, PIN, "x"])
    assert code is ExitCode.OK
    assert "Incorrect PIN (55)" in console.text
    assert len(bank.sent(Login)) == 2


async def test_three_wrong_pins_end_the_session() -> None:
    code, console, _ = await run([ACCOUNT, "9999"] * 3)
    assert code is ExitCode.LOGIN_REFUSED
    assert console.output[-1] == "Login refused: Incorrect PIN (55). Session ended."


async def test_locked_account_is_refused() -> None:
    def lock(bank: FakeBank) -> None:
        bank.accounts[ACCOUNT].locked = True

    code, console, _ = await run(LOGIN_LINES, bank_setup=lock)
    assert code is ExitCode.ACCOUNT_LOCKED
    assert "(75)" in console.output[-1]


async def test_account_in_use_is_refused() -> None:
    def lease(bank: FakeBank) -> None:
        bank.leases.add(ACCOUNT)

    code, console, _ = await run(LOGIN_LINES, bank_setup=lease)
    assert code is ExitCode.ACCOUNT_IN_USE
    assert "This account is in use at another ATM (160)" in console.output[-1]


async def test_end_of_input_before_login_exits_cleanly() -> None:
    code, _, bank = await run([])
    assert code is ExitCode.OK
    assert bank.requests == []


# -- Menu and money ---------------------------------------------------------------------


async def test_deposit_prints_a_receipt() -> None:
    code, console, bank = await run([*LOGIN_LINES, "d", "20.50", "x"])
    assert code is ExitCode.OK
    receipt = next(line for line in console.output if "RECEIPT" in line)
    assert "Deposit" in receipt and "$20.50" in receipt and "$120.50" in receipt
    assert "AC-***45" in receipt
    assert "Reference" in receipt and "2023-11-14 22:13:20 UTC" in receipt
    assert [r.amount_cents for r in bank.sent(Deposit)] == [20_50]


async def test_overdraft_is_refused_with_its_code() -> None:
    code, console, bank = await run([*LOGIN_LINES, "w", "$1,000", "w", "30", "x"])
    assert code is ExitCode.OK
    assert "Your withdrawal was declined: Insufficient funds (51)." in console.output
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS - 30_00


async def test_bad_amounts_are_refused_locally_and_asked_again() -> None:
    lines = [*LOGIN_LINES, "d", "0", "-5", "abc", "1.234", "100000.01", "5", "x"]
    code, console, bank = await run(lines)
    assert code is ExitCode.OK
    assert console.output.count(text.AMOUNT_NOT_POSITIVE) == 2
    assert console.output.count(text.AMOUNT_HINT) == 2
    assert text.amount_too_large(HELLO.amount_cents_max) in console.output
    assert [r.amount_cents for r in bank.sent(Deposit)] == [5_00]


async def test_amount_limit_comes_from_the_banks_hello() -> None:
    hello = Hello(1024, 20, 50_00, 10, 30, 120)
    _, console, bank = await run([*LOGIN_LINES, "d", "50.01", "50", "x"], hello=hello)
    assert "The most one transaction can move is $50.00." in console.output
    assert [r.amount_cents for r in bank.sent(Deposit)] == [50_00]


async def test_empty_amount_cancels() -> None:
    _, console, bank = await run([*LOGIN_LINES, "w", "", "x"])
    assert text.CANCELLED in console.output
    assert bank.sent(Withdraw) == []


async def test_unknown_key_gets_help_and_any_order_works() -> None:
    lines = [*LOGIN_LINES, "?", "h", "d", "10", "w", "2.5", "B", "history", "x"]
    code, console, _ = await run(lines)
    assert code is ExitCode.OK
    assert console.output.count(text.MENU_HELP) == 1
    assert text.NO_HISTORY in console.output
    assert text.balance(START_BALANCE_CENTS + 10_00 - 2_50) in console.output
    history = console.output[-2]
    assert history.index("-$2.50") < history.index("$10.00")  # Newest first.


async def test_an_error_frame_is_shown_and_the_session_goes_on() -> None:
    def break_balance(bank: FakeBank) -> None:
        bank.error_instead_of.add(Balance)

    code, console, _ = await run([*LOGIN_LINES, "b", "x"], bank_setup=break_balance)
    assert code is ExitCode.OK
    assert "The bank does not offer that transaction (12)" in console.text
    assert console.output[-1] == text.GOODBYE


async def test_end_of_input_logs_out() -> None:
    code, console, bank = await run([*LOGIN_LINES, "b"])
    assert code is ExitCode.OK
    assert len(bank.sent(Logout)) == 1
    assert console.output[-1] == text.GOODBYE


async def test_end_of_input_at_an_amount_prompt_logs_out() -> None:
    code, _, bank = await run([*LOGIN_LINES, "d"])
    assert code is ExitCode.OK
    assert bank.sent(Deposit) == []
    assert len(bank.sent(Logout)) == 1


# -- Notices and faults -----------------------------------------------------------------


async def notify_after_login(bank: FakeBank, notice) -> None:
    await bank.logged_in.wait()
    await bank.send_notice(notice)


async def test_shutdown_notice_while_idle_ends_the_session() -> None:
    async def shut_down(bank: FakeBank) -> None:
        await notify_after_login(bank, Shutdown(5))

    code, console, _ = await run(LOGIN_LINES, then_wait=True, during=shut_down)
    assert code is ExitCode.SERVER_UNAVAILABLE
    assert console.output[-1] == "Session ended: the bank is shutting down (closing in 5 s)."


@pytest.mark.parametrize("typed", [[], [ACCOUNT]], ids=["account", "pin"])
async def test_a_shutdown_notice_before_login_is_shown_at_once(
    autojump_clock, typed: list[str]
) -> None:
    """The bank is watched from the first prompt: a customer still typing the account
    number or PIN hears of a SHUTDOWN at once, not after sending the LOGIN."""
    async def shut_down(bank: FakeBank) -> None:
        await trio.testing.wait_all_tasks_blocked()  # the ATM waits for an answer
        await bank.send_notice(Shutdown(5))

    with trio.fail_after(60):
        code, console, bank = await run(typed, then_wait=True, during=shut_down)
    assert code is ExitCode.SERVER_UNAVAILABLE
    assert len(console.prompts) == len(typed) + 1
    assert console.output == [text.WELCOME,
                              "Session ended: the bank is shutting down (closing in 5 s)."]
    assert not bank.sent(Login)


@pytest.mark.parametrize("typed", [["x"], []], ids=["exit", "end of input"])
async def test_a_shutdown_met_while_logging_out_is_not_announced(typed: list[str]) -> None:
    """The bank announces SHUTDOWN to every connection in any state (spec §3.10), so it
    can cross the ATM's LOGOUT and arrive just before its LOGOUT_REPLY. The customer is
    leaving: the visit ends with the goodbye, exit status 0, not 'shutting down'. (After
    the LOGOUT_REPLY the ATM reads nothing more, and the bank closes; §5.)"""
    def announce(bank: FakeBank) -> None:
        bank.notice_before_reply[Logout] = Shutdown(3)

    code, console, bank = await run([*LOGIN_LINES, *typed], bank_setup=announce)
    assert code is ExitCode.OK
    assert console.output[-1] == text.GOODBYE
    assert not any("shutting down" in line for line in console.output)
    assert bank.notice_before_reply == {}  # the notice was sent, and read


async def test_session_expired_notice_ends_the_session() -> None:
    async def expire(bank: FakeBank) -> None:
        await notify_after_login(bank, SessionExpired())

    code, console, _ = await run(LOGIN_LINES, then_wait=True, during=expire)
    assert code is ExitCode.SESSION_EXPIRED
    assert "idle" in console.output[-1]


async def test_shutdown_during_a_request_ends_the_session_after_its_reply() -> None:
    def announce(bank: FakeBank) -> None:
        bank.notice_before_reply[Balance] = Shutdown(3)

    code, console, bank = await run([*LOGIN_LINES, "b", "b"], bank_setup=announce)
    assert code is ExitCode.SERVER_UNAVAILABLE
    assert console.output[-2:] == [
        text.balance(START_BALANCE_CENTS),
        "Session ended: the bank is shutting down (closing in 3 s).",
    ]
    assert len(bank.sent(Balance)) == 1


async def test_a_connection_lost_at_the_menu_is_resumed_for_the_next_choice() -> None:
    """The connection is cut while the customer is choosing, and the bank does not see
    it (it keeps the session, as after a silent cut): the customer is told, the next
    choice goes out on a new connection that resumes the session at once (no second
    LOGIN, no PIN asked again), and the visit ends normally."""
    async def hang_up(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        bank.lease_kept_after_close_s = RECONNECT_WAIT_S_MAX  # a LOGIN would meet 160
        await bank.streams[-1].aclose()

    lines = [*LOGIN_LINES, WaitFor("The connection to the bank dropped"), "b", "x"]
    code, console, bank = await run(lines, during=hang_up)
    assert code is ExitCode.OK
    assert text.connection_dropped(ConnectionLost("")) in console.output
    assert text.balance(START_BALANCE_CENTS) in console.output
    assert console.output[-1] == text.GOODBYE
    assert len(bank.sent(Login)) == 1 and len(bank.sent(Resume)) == 1
    assert [prompt for prompt, _ in console.prompts].count(text.PIN_PROMPT) == 1


@pytest.mark.parametrize(("key", "kind"), [("d", "deposit"), ("w", "withdrawal")])
async def test_money_chosen_after_a_drop_is_sent_once_and_not_called_a_confirmation(
    key: str, kind: str,
) -> None:
    """The customer was told the connection dropped before choosing: the request goes out
    for the first time on a new connection, so nothing is 'confirmed' or 'went through
    once' (the words of a resend); it gets its receipt like any other."""
    async def hang_up(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        await bank.streams[-1].aclose()

    lines = [*LOGIN_LINES, WaitFor("The connection to the bank dropped"), key, "20", "x"]
    code, console, bank = await run(lines, during=hang_up)
    assert code is ExitCode.OK
    assert len(bank.money_requests()) == 1
    assert not any("confirm" in line for line in console.output), console.output
    assert any("RECEIPT" in line for line in console.output)
    assert bank.connections == 2


async def test_a_pin_change_chosen_after_a_drop_is_sent_once_even_when_refused() -> None:
    """Sent for the first time on the new connection, a wrong current PIN is simply
    refused: no 'confirming', and no probe with the new PIN (a second wrong PIN)."""
    async def hang_up(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        await bank.streams[-1].aclose()

    lines = [*LOGIN_LINES, WaitFor("The connection to the bank dropped"),
             "p", "0000", "4826", "4826", "x"]
    code, console, bank = await run(lines, during=hang_up)
    assert code is ExitCode.OK
    assert bank.sent(ChangePin) == [ChangePin("0000", "4826")]
    assert text.pin_change_refused(Status.INCORRECT_PIN) in console.output
    assert not any("confirm" in line for line in console.output), console.output


async def test_without_a_resumable_session_the_next_choice_logs_in_again() -> None:
    """The bank saw the connection close and ended the session: RESUME finds nothing,
    and the ATM logs in again with the credentials it holds."""
    async def hang_up(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        await bank.streams[-1].aclose()

    lines = [*LOGIN_LINES, WaitFor("The connection to the bank dropped"), "b", "x"]
    code, console, bank = await run(lines, during=hang_up)
    assert code is ExitCode.OK
    assert text.balance(START_BALANCE_CENTS) in console.output
    assert len(bank.sent(Resume)) == 1 and len(bank.sent(Login)) == 2


@pytest.mark.parametrize(("key", "request_type", "noun"),
                         [("b", Balance, "balance"), ("h", History, "history")])
async def test_a_read_whose_connection_is_lost_is_asked_again(
    key: str, request_type: type, noun: str
) -> None:
    def drop_once(bank: FakeBank) -> None:
        bank.close_once_instead_of.add(request_type)

    code, console, bank = await run([*LOGIN_LINES, key, "x"], bank_setup=drop_once)
    assert code is ExitCode.OK
    assert f"The connection dropped; reconnecting to get your {noun}..." in console.output
    assert len(bank.sent(request_type)) == 2 and bank.connections == 2
    if request_type is Balance:
        assert text.balance(START_BALANCE_CENTS) in console.output
    assert console.output[-1] == text.GOODBYE


async def test_a_balance_that_keeps_losing_its_connection_ends_the_session(
    autojump_clock,
) -> None:
    def drop_balance(bank: FakeBank) -> None:
        bank.close_instead_of.add(Balance)

    start = trio.current_time()
    code, console, bank = await run([*LOGIN_LINES, "b", "x"], bank_setup=drop_balance)
    waited_s = trio.current_time() - start
    assert code is ExitCode.CONNECTION_LOST
    assert console.output[-1].startswith("The connection to the bank was lost")
    window_s = HELLO.idle_timeout_s + RECONNECT_MARGIN_S
    assert window_s <= waited_s < window_s + 1  # the last attempt is at the window's end
    assert len(bank.sent(Balance)) == sum("failed" in line for line in console.output) + 1


async def test_lost_deposit_reply_is_confirmed_with_the_same_txn_id(autojump_clock) -> None:
    def lose_one(bank: FakeBank) -> None:
        bank.lose_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "b", "x"], bank_setup=lose_one)
    assert code is ExitCode.OK
    first, retry = bank.sent(Deposit)
    assert first == retry  # Same txn_id and amount.
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert "The connection dropped; reconnecting to confirm your deposit..." in console.output
    assert "...confirmed, your deposit went through once, reference 1." in console.output
    assert any("RECEIPT" in line and "$120.00" in line for line in console.output)
    assert text.balance(START_BALANCE_CENTS + 20_00) in console.output
    assert bank.connections == 2


async def test_a_slow_typist_is_logged_in_on_a_fresh_connection() -> None:
    def expire_first_login(bank: FakeBank) -> None:
        bank.expire_before_login = 1

    code, console, bank = await run([*LOGIN_LINES, "b", "x"], bank_setup=expire_first_login)
    assert code is ExitCode.OK
    assert bank.connections == 2 and len(bank.sent(Login)) == 2
    assert text.balance(START_BALANCE_CENTS) in console.output


class GatedConsole(ScriptedConsole):
    """Holds the answer to ``prompt`` until ``gate`` is set: a customer still typing."""

    def __init__(self, lines: list[str | WaitFor], *, prompt: str) -> None:
        super().__init__(lines)
        self.prompt = prompt
        self.asked = trio.Event()
        self.gate = trio.Event()

    async def read_line(self, prompt: str, *, secret: bool = False) -> str | None:
        if prompt == self.prompt and not self.gate.is_set():
            self.asked.set()
            await self.gate.wait()
        return await super().read_line(prompt, secret=secret)


async def test_the_banks_login_deadline_passing_while_the_customer_types_is_not_worded(
) -> None:
    """The bank's login deadline runs from connect, so an ATM left waiting for a customer
    has its connection expired (notice, then close) before anyone types: that is no drop
    the customer should hear of; the LOGIN simply goes out on a new connection."""
    console = GatedConsole([*LOGIN_LINES, "x"], prompt=text.PIN_PROMPT)
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)

        async def expire_while_typing() -> None:
            await console.asked.wait()
            await bank.send_notice(SessionExpired())
            await bank.streams[-1].aclose()
            await trio.testing.wait_all_tasks_blocked()  # the ATM has read the notice
            console.gate.set()

        nursery.start_soon(expire_while_typing)
        code = await run_atm(console, bank.connect, tz=UTC)
        nursery.cancel_scope.cancel()
    assert code is ExitCode.OK
    assert bank.connections == 2 and len(bank.sent(Login)) == 1
    assert console.output == [text.WELCOME, text.logged_in(ACCOUNT), text.GOODBYE]


async def test_an_unavailable_bank_while_confirming_is_not_a_refusal(autojump_clock) -> None:
    """A 91 to the resent deposit says nothing about the first attempt, which went
    through: the ATM must try again, never tell the customer it was declined."""

    def lose_then_unavailable(bank: FakeBank) -> None:
        bank.lose_replies = 1
        bank.unavailable_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"],
                                    bank_setup=lose_then_unavailable)
    assert code is ExitCode.OK
    assert len(set(bank.sent(Deposit))) == 1 and len(bank.sent(Deposit)) == 3
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert not any("declined" in line or "did not go through" in line
                   for line in console.output)
    assert "...confirmed, your deposit went through once, reference 1." in console.output


async def test_withdrawal_without_reply_is_confirmed_after_timeout(autojump_clock) -> None:
    def hang_one(bank: FakeBank) -> None:
        bank.hang_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "w", "30", "x"], bank_setup=hang_one)
    assert code is ExitCode.OK
    assert len(set(bank.sent(Withdraw))) == 1
    assert len(bank.sent(Withdraw)) == 2
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS - 30_00
    timed_out = console.output.index(
        "The bank did not answer in time; reconnecting to confirm your withdrawal..."
    )
    assert console.output[timed_out - 1] == text.STILL_WORKING  # said once, after 2 s
    assert console.output.count(text.STILL_WORKING) == 1
    assert any(line.startswith("...confirmed") for line in console.output)


async def test_a_quick_reply_needs_no_word_of_waiting(autojump_clock) -> None:
    code, console, _ = await run([*LOGIN_LINES, "b", "w", "30", "h", "x"])
    assert code is ExitCode.OK
    assert text.STILL_WORKING not in console.output


@pytest.mark.parametrize(("idle_timeout_s", "window_s"), [
    (HELLO.idle_timeout_s, HELLO.idle_timeout_s + RECONNECT_MARGIN_S),
    (65_535, RECONNECT_WAIT_S_MAX),  # a HELLO's word does not keep an ATM waiting for hours
])
async def test_unconfirmed_deposit_ends_the_session_naming_its_txn_id(
    autojump_clock, idle_timeout_s: int, window_s: int
) -> None:
    """Reconnecting goes on, with growing pauses, for as long as the bank may still hold
    the old session (its idle timeout and a margin), then gives up and says so."""

    def lose_and_refuse(bank: FakeBank) -> None:
        bank.lose_replies = 1
        bank.busy_after_connections = 1

    start = trio.current_time()
    code, console, bank = await run(
        [*LOGIN_LINES, "d", "20"], bank_setup=lose_and_refuse,
        hello=dataclasses.replace(HELLO, idle_timeout_s=idle_timeout_s),
    )
    waited_s = trio.current_time() - start
    assert code is ExitCode.UNCONFIRMED_TRANSACTION
    assert window_s <= waited_s < window_s + 1  # the last attempt is at the window's end
    (deposit,) = bank.sent(Deposit)
    failures = [line for line in console.output if "failed" in line]
    assert len(failures) == bank.connections - 1 > 3
    assert all("trying again" in line for line in failures[:-1])
    assert "trying again" not in failures[-1]
    assert deposit.txn_id.hex() in console.output[-1]
    assert "$20.00" in console.output[-1]
    assert sum(deposit.txn_id.hex() in line for line in console.output) == 1  # told once


async def test_a_bank_that_never_looks_the_deposit_up_leaves_it_unconfirmed(
    autojump_clock,
) -> None:
    """Every resend is answered 91 (storage down): nothing settles it within the window,
    so the ATM ends saying the deposit is unconfirmed, never that it was declined."""

    def lose_then_always_unavailable(bank: FakeBank) -> None:
        bank.lose_replies = 1
        bank.unavailable_replies = 1_000

    code, console, bank = await run([*LOGIN_LINES, "d", "20"],
                                    bank_setup=lose_then_always_unavailable)
    assert code is ExitCode.UNCONFIRMED_TRANSACTION
    unsettled = [line for line in console.output if "got no clear answer" in line]
    assert len(unsettled) == len(bank.sent(Deposit)) - 1 > 3
    assert "trying again" not in unsettled[-1]
    assert bank.sent(Deposit)[0].txn_id.hex() in console.output[-1]
    assert not any("declined" in line for line in console.output)


@pytest.mark.parametrize("answer", [
    Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION, Error(Status.FORMAT_ERROR),
])
async def test_a_first_answer_that_does_not_settle_a_deposit_is_confirmed(
    autojump_clock, answer: Status | Error,
) -> None:
    """The bank may answer 91 or 96 (or an ERROR frame) after the money was committed: a
    first answer like that is confirmed as a lost one is, never shown as declined (the
    customer would try again under a new id and the money would move twice)."""

    def commit_then_fail(bank: FakeBank) -> None:
        bank.unsettled_replies.append(answer)

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"], bank_setup=commit_then_fail)
    assert code is ExitCode.OK
    first, retry = bank.sent(Deposit)
    assert first == retry
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert not any("declined" in line for line in console.output)
    assert any("does not say whether it went through; reconnecting to confirm your deposit"
               in line for line in console.output)
    assert "...confirmed, your deposit went through once, reference 1." in console.output
    assert any("RECEIPT" in line and "$120.00" in line for line in console.output)


async def test_an_error_invalid_amount_settles_a_deposit_without_a_resend(autojump_clock) -> None:
    """Spec §6: ERROR INVALID_AMOUNT refused the amount before anything could move, and a
    resend would only get it again; so it settles, unlike any other ERROR, and the ATM
    shows the refusal once instead of reconnecting to confirm."""

    def refuse_the_amount(bank: FakeBank) -> None:
        bank.unsettled_replies.append(Error(Status.INVALID_AMOUNT))

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"], bank_setup=refuse_the_amount)
    assert code is ExitCode.OK
    assert len(bank.sent(Deposit)) == 1
    assert not any("reconnecting" in line for line in console.output)
    assert any("(13)" in line for line in console.output)


async def test_a_91_after_a_shutdown_notice_is_confirmed_too(autojump_clock) -> None:
    """A shutting-down bank refuses without booking, but that 91 can reach the ATM before
    the SHUTDOWN notice as well as after it, so the ATM cannot tell it from a 91 after a
    commit: it confirms it like any other."""

    def shut_down_during_the_deposit(bank: FakeBank) -> None:
        bank.notice_before_reply[Deposit] = Shutdown(10)
        bank.unavailable_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"],
                                    bank_setup=shut_down_during_the_deposit)
    assert code is ExitCode.OK
    assert len(bank.sent(Deposit)) == 2
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert not any("declined" in line for line in console.output)


async def test_a_first_answer_that_never_settles_ends_unconfirmed(autojump_clock) -> None:
    def always_unavailable(bank: FakeBank) -> None:
        bank.unavailable_replies = 1_000

    code, console, bank = await run([*LOGIN_LINES, "d", "20"], bank_setup=always_unavailable)
    assert code is ExitCode.UNCONFIRMED_TRANSACTION
    assert len(set(bank.sent(Deposit))) == 1 and len(bank.sent(Deposit)) > 3
    txn_hex = bank.sent(Deposit)[0].txn_id.hex()
    assert txn_hex in console.output[-1]
    assert sum(txn_hex in line for line in console.output) == 1
    assert not any("declined" in line for line in console.output)


async def test_the_last_attempt_is_made_when_the_window_ends(autojump_clock) -> None:
    """The bank releases a lease it kept at its idle timeout, near the window's end, and
    cannot resume sessions: the ATM shortens its last pause so that one attempt falls at
    the end and gets in."""
    window_s = HELLO.idle_timeout_s + RECONNECT_MARGIN_S

    def keep_the_lease_nearly_the_whole_window(bank: FakeBank) -> None:
        bank.resumes_refused = True
        bank.lose_replies = 1
        bank.lease_kept_after_close_s = window_s - RECONNECT_BACKOFF_S / 2

    start = trio.current_time()
    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"],
                                    bank_setup=keep_the_lease_nearly_the_whole_window)
    assert code is ExitCode.OK, console.text
    assert trio.current_time() - start == pytest.approx(window_s)
    assert len(bank.sent(Deposit)) == 2
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert "...confirmed, your deposit went through once, reference 1." in console.output


async def test_a_login_answered_91_while_confirming_is_retried(autojump_clock) -> None:
    """The bank's storage blinks (or it is shutting down) as the ATM logs in again to
    confirm: like a lease still held, that is worth another try within the window."""

    def lose_one(bank: FakeBank) -> None:
        bank.lose_replies = 1

    async def unavailable_for_two_logins(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        bank.unavailable_logins = 2

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"], bank_setup=lose_one,
                                    during=unavailable_for_two_logins)
    assert code is ExitCode.OK, console.text
    assert sum("(91); trying again" in line for line in console.output) == 2
    assert len(bank.sent(Deposit)) == 2
    assert "...confirmed, your deposit went through once, reference 1." in console.output


async def test_a_bad_version_byte_after_hello_is_a_lost_reply(autojump_clock) -> None:
    """Only the greeting's version is judged: a damaged reply later is a broken
    connection, so the deposit is confirmed, not ended as "this ATM needs updating"."""

    def damage_one(bank: FakeBank) -> None:
        bank.wrong_version_replies = 1

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"], bank_setup=damage_one)
    assert code is ExitCode.OK, console.text
    first, retry = bank.sent(Deposit)
    assert first == retry
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert "...confirmed, your deposit went through once, reference 1." in console.output


@pytest.mark.parametrize("failure", [
    KeyboardInterrupt(),
    BaseExceptionGroup("Ctrl-C inside trio.open_tcp_stream", [KeyboardInterrupt()]),
    RuntimeError("a bug"),
], ids=["ctrl-c", "ctrl-c-grouped", "bug"])
async def test_anything_ending_an_unsettled_deposit_names_its_txn_id(
    failure: BaseException,
) -> None:
    """However the session ends while the ATM reconnects to confirm, the customer leaves
    knowing the transaction id, and the exception still ends the session."""
    console = ScriptedConsole([*LOGIN_LINES, "d", "20"])
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        bank.lose_replies = 1

        async def connect() -> Connection:
            if bank.connections:  # the reconnect
                raise failure
            return await bank.connect()

        try:
            await run_atm(console, connect, tz=UTC)
        except BaseException as error:  # what the test is about
            raised = error
        nursery.cancel_scope.cancel()
    assert raised is failure
    (deposit,) = bank.sent(Deposit)
    assert console.output[-1] == text.ending(TransactionUnconfirmed(
        kind="deposit", amount_cents=20_00, txn_id=deposit.txn_id
    ))
    assert sum(deposit.txn_id.hex() in line for line in console.output) == 1


async def test_an_interrupt_before_a_deposit_settles_names_its_txn_id() -> None:
    """Ctrl-C while the ATM reconnects to confirm: the customer leaves knowing the id."""
    console = ScriptedConsole([*LOGIN_LINES, "d", "20"])
    interrupted = False
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        bank.lose_replies = 1

        async def connect() -> Connection:
            if bank.connections:  # the reconnect: here the customer presses Ctrl-C
                raise KeyboardInterrupt
            return await bank.connect()

        try:
            await run_atm(console, connect, tz=UTC)
        except KeyboardInterrupt:
            interrupted = True
        nursery.cancel_scope.cancel()
    assert interrupted  # the interrupt still ends the session (exit 130 in atm.__main__)
    (deposit,) = bank.sent(Deposit)
    assert console.output[-1] == text.ending(TransactionUnconfirmed(
        kind="deposit", amount_cents=20_00, txn_id=deposit.txn_id
    ))


async def test_after_a_silent_cut_a_deposit_is_confirmed_at_once_by_resuming(
    autojump_clock,
) -> None:
    """The deposit's reply is lost and the bank keeps the session (it did not see the
    cut): the ATM resumes its session on a new connection and confirms the deposit at
    once, where logging in would wait for the bank's idle timeout."""

    def lose_and_keep_the_lease(bank: FakeBank) -> None:
        bank.lose_replies = 1
        bank.lease_kept_after_close_s = HELLO.idle_timeout_s

    start = trio.current_time()
    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"],
                                    bank_setup=lose_and_keep_the_lease)
    assert code is ExitCode.OK, console.text
    assert trio.current_time() - start < RECONNECT_BACKOFF_S  # no pause was needed
    first, retry = bank.sent(Deposit)
    assert first == retry
    assert len(bank.sent(Resume)) == 1 and len(bank.sent(Login)) == 1
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert "...confirmed, your deposit went through once, reference 1." in console.output


async def test_a_lease_the_bank_still_holds_is_waited_out(autojump_clock) -> None:
    """The bank did not see the connection close and keeps the account until the idle
    timeout, and the session cannot be resumed (a bank without RESUME, or the token
    was lost with the LOGIN's notice): the ATM keeps logging in until it may, then
    confirms the deposit."""

    def lose_and_keep_the_lease(bank: FakeBank) -> None:
        bank.resumes_refused = True
        bank.lose_replies = 1
        bank.lease_kept_after_close_s = 40

    code, console, bank = await run([*LOGIN_LINES, "d", "20", "x"],
                                    bank_setup=lose_and_keep_the_lease)
    assert code is ExitCode.OK
    first, retry = bank.sent(Deposit)
    assert first == retry
    assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 20_00
    assert sum("failed: the bank still holds the old session" in line
               for line in console.output) >= 4
    assert "...confirmed, your deposit went through once, reference 1." in console.output


async def test_incompatible_version_is_refused_clearly() -> None:
    def speak_version_2(bank: FakeBank) -> None:
        bank.hello_version = 2

    code, console, bank = await run(LOGIN_LINES, bank_setup=speak_version_2)
    assert code is ExitCode.INCOMPATIBLE_VERSION
    assert "(164)" in console.output[-1]
    assert bank.requests == []


async def test_busy_bank_is_reported() -> None:
    def busy(bank: FakeBank) -> None:
        bank.busy_after_connections = 0

    code, console, _ = await run(LOGIN_LINES, bank_setup=busy)
    assert code is ExitCode.SERVER_UNAVAILABLE
    assert "The bank is busy; please try again in a moment (163)" in console.output[-1]


async def test_refused_login_while_confirming_reports_the_unconfirmed_txn() -> None:
    def lose_one(bank: FakeBank) -> None:
        bank.lose_replies = 1

    async def lock_after_login(bank: FakeBank) -> None:
        await bank.logged_in.wait()
        bank.accounts[ACCOUNT].locked = True

    code, console, bank = await run(
        [*LOGIN_LINES, "d", "20"], bank_setup=lose_one, during=lock_after_login
    )
    assert code is ExitCode.UNCONFIRMED_TRANSACTION
    assert "(75)" in console.output[-2]
    assert bank.sent(Deposit)[0].txn_id.hex() in console.output[-1]
