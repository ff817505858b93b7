"""Checks of the fake bank (``tests.helpers.FakeBank``) itself: it keeps the contract
of the real server that the ATM's tests rely on."""

from __future__ import annotations

import trio

from tests.helpers import ACCOUNT, HELLO, PIN, START_BALANCE_CENTS, FakeBank, with_version
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    Login,
    LoginReply,
    Status,
    Withdraw,
    WithdrawReply,
    encode,
)

# -- The fake keeps the contract the ATM relies on --------------------------------------


async def test_fake_bank_answers_a_retried_deposit_with_the_original_outcome() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        assert (await connection.request(Login(ACCOUNT, PIN), LoginReply)).status is Status.APPROVED
        deposit = Deposit(b"t" * 16, 5_00)
        first = await connection.request(deposit, DepositReply)
        again = await connection.request(deposit, DepositReply)
        assert first == again
        assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 5_00
        await connection.aclose()


async def test_fake_bank_judges_a_retried_refusal_afresh() -> None:
    """As the real bank (spec section 9): a refused transaction is not recorded."""
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        assert (await connection.request(Login(ACCOUNT, PIN), LoginReply)).status is Status.APPROVED
        withdraw = Withdraw(b"w" * 16, START_BALANCE_CENTS + 1)
        refused = await connection.request(withdraw, WithdrawReply)
        assert refused.status is Status.INSUFFICIENT_FUNDS
        await connection.request(Deposit(b"d" * 16, 1), DepositReply)
        approved = await connection.request(withdraw, WithdrawReply)
        assert approved.status is Status.APPROVED and approved.balance_cents == 0
        await connection.aclose()


async def test_fake_bank_refuses_requests_before_login() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        reply = await connection.request(Balance(), BalanceReply)
        assert reply == BalanceReply(Status.NOT_LOGGED_IN)
        await connection.aclose()


def test_with_version_keeps_the_frame_intact_but_the_version() -> None:
    frame = encode(HELLO)
    changed = with_version(frame, 2)
    assert changed[2] == 2
    assert changed[:2] == frame[:2]
    assert changed[3:-4] == frame[3:-4]
