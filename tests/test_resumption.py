"""Session resumption in the server: an ATM takes over its own session from a new
connection with the token it was given, at once, even when the bank never saw the old
connection end; nobody else can, and a token works once and dies with its session.

Driven with the wire-level test client against the in-process server; the ATM's side
(resuming on reconnect) is in tests/test_atm_session.py and, through a faulty network,
tests/test_e2e_network.py.
"""

from __future__ import annotations

import trio
import trio.testing

from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.leases import Leases
from bank.resumption import SessionRegistry
from bank.session import RESUME_TAKEOVER_S, Session
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    OTHER_ACCOUNT,
    FaultyLedger,
    RunningServer,
    WireClient,
    logged_in,
    settle,
    start_server,
    txn_id,
)
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    Resume,
    ResumeReply,
    SessionExpired,
    Status,
)


async def resume(bank: RunningServer, account: str, token: bytes) -> tuple[WireClient, Status]:
    client = await bank.client()
    reply = await client.request(Resume(account, token))
    assert isinstance(reply, ResumeReply)
    if reply.status is Status.APPROVED:
        await client.token()
    return client, reply.status


async def test_an_atm_resumes_its_session_at_once_and_the_old_connection_ends(
    mock_clock: trio.testing.MockClock, bank: RunningServer
):
    """The old connection is silent and open, as after a cut the bank never saw: the
    frozen clock proves no idle timeout was needed."""
    mock_clock.autojump_threshold = 5.0  # a hang moves the clock, and fails below
    old = await logged_in(bank)
    token = old.tokens[-1]
    started = trio.current_time()
    new, status = await resume(bank, DEMO_ACCOUNT, token)
    assert status is Status.APPROVED
    assert trio.current_time() == started
    assert new.tokens[-1] != token  # a fresh token for the resumed session
    frame = await old.receive()
    assert frame is not None and frame.message == SessionExpired()
    assert await old.closed()
    assert await new.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    await settle()
    assert bank.server.leases.held() == {DEMO_ACCOUNT}
    assert len(bank.server.sessions) == 1


async def test_a_token_works_once(bank: RunningServer):
    old = await logged_in(bank)
    token = old.tokens[-1]
    first, status = await resume(bank, DEMO_ACCOUNT, token)
    assert status is Status.APPROVED
    again, status = await resume(bank, DEMO_ACCOUNT, token)
    assert status is Status.UNKNOWN_SESSION
    assert await first.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    for client in (old, first, again):
        await client.aclose()


async def test_a_wrong_token_or_another_account_resumes_nothing(bank: RunningServer):
    holder = await logged_in(bank)
    token = holder.tokens[-1]
    guesser, status = await resume(bank, DEMO_ACCOUNT, bytes(16))
    assert status is Status.UNKNOWN_SESSION
    elsewhere, status = await resume(bank, OTHER_ACCOUNT, token)
    assert status is Status.UNKNOWN_SESSION
    # Neither guess used the token up or disturbed its session.
    assert await holder.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    owner, status = await resume(bank, DEMO_ACCOUNT, token)
    assert status is Status.APPROVED
    for client in (holder, guesser, elsewhere, owner):
        await client.aclose()


async def test_failed_resumes_count_toward_the_login_limit(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    bank = await start_server(nursery, config, ledger, login_attempts_max=2)
    guesser = await bank.client()
    for _ in range(2):
        reply = await guesser.request(Resume(DEMO_ACCOUNT, bytes(16)))
        assert reply == ResumeReply(Status.UNKNOWN_SESSION)
    assert await guesser.closed()


async def test_the_token_dies_with_the_session(bank: RunningServer):
    client = await logged_in(bank)
    token = client.tokens[-1]
    await client.aclose()  # the bank sees the connection end: the lease goes, and the token
    await settle()
    assert bank.server.leases.held() == frozenset()
    late, status = await resume(bank, DEMO_ACCOUNT, token)
    assert status is Status.UNKNOWN_SESSION
    assert len(bank.server.sessions) == 0
    await late.aclose()


async def test_a_request_in_hand_is_answered_before_the_session_moves(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    """The old connection is working on a deposit when the ATM resumes elsewhere: the
    deposit completes (and is booked once), then the old connection ends and the new one
    takes the lease; a replay of the deposit on the new connection finds it booked."""
    faulty = FaultyLedger(ledger)
    gate = trio.Event()
    post = faulty.post

    async def held_post(**posting: object) -> object:
        await gate.wait()
        return await post(**posting)

    faulty.post = held_post  # type: ignore[method-assign]
    bank = await start_server(nursery, config, faulty)  # type: ignore[arg-type]
    old = await logged_in(bank)
    deposit, queued = Deposit(txn_id(), 12_34), Deposit(txn_id(), 1_00)
    await old.send(deposit)
    await settle()  # the deposit waits at the gate
    await old.send(queued)  # pipelined behind it: never carried out once superseded
    await settle()
    async with trio.open_nursery() as resuming:
        outcome: list[tuple[WireClient, Status]] = []

        async def take_over() -> None:
            outcome.append(await resume(bank, DEMO_ACCOUNT, old.tokens[-1]))

        resuming.start_soon(take_over)
        await settle()
        assert outcome == []  # waiting for the old connection to finish its deposit
        gate.set()
    new, status = outcome[0]
    assert status is Status.APPROVED
    answered = await old.receive()
    assert answered is not None and isinstance(answered.message, DepositReply)
    replayed = await new.request(deposit)
    assert replayed == answered.message  # booked once, by the old connection
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 12_34
    frames = []
    while (frame := await old.receive()) is not None:
        frames.append(frame.message)
    assert frames == [SessionExpired()]  # and nothing for the queued deposit


async def test_a_session_that_never_lets_go_is_not_taken_over(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger,
):
    faulty = FaultyLedger(ledger)

    async def stuck_post(**_posting: object) -> object:
        await trio.sleep_forever()

    faulty.post = stuck_post  # type: ignore[method-assign]
    bank = await start_server(nursery, config, faulty)  # type: ignore[arg-type]
    old = await logged_in(bank)
    await old.send(Deposit(txn_id(), 1_00))
    outcome: list[Status] = []

    async def take_over() -> None:
        outcome.append((await resume(bank, DEMO_ACCOUNT, old.tokens[-1]))[1])

    async with trio.open_nursery() as resuming:
        resuming.start_soon(take_over)
        await settle()  # (the clock is moved by hand: SQLite's thread is never raced)
        mock_clock.jump(RESUME_TAKEOVER_S - 0.001)
        await settle()
        assert outcome == []
        mock_clock.jump(0.001)
    assert outcome == [Status.UNKNOWN_SESSION]
    assert bank.server.leases.held() == {DEMO_ACCOUNT}  # still the stuck session's
    nursery.cancel_scope.cancel()


async def test_a_successor_waits_for_a_held_session_and_not_for_an_ended_one(
    config: ServerConfig, ledger: BatchLedger
):
    """``wait_released`` (which a RESUME awaits) returns once the session has ended, and
    at once, after a checkpoint, for a session that ended before anyone waited (its
    event is made only for a wait)."""
    session = Session(
        ledger=ledger, leases=Leases(), config=config, name="test", sessions=SessionRegistry()
    )
    released = False

    async def successor() -> None:
        nonlocal released
        await session.wait_released()
        released = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(successor)
        await trio.testing.wait_all_tasks_blocked()
        assert not released
        session.end()
    assert released
    with trio.testing.assert_checkpoints():
        await session.wait_released()
