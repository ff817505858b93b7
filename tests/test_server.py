"""The bank server end to end over loopback TCP, speaking the wire protocol directly.

Covers the session state table (login first, one login per connection, logout), PIN
checks and lockout, leases (one ATM per account, released on logout, disconnect and
errors), money (deposit, withdraw, overdraft, limits, idempotent retries, history),
bad frames, pipelining, the connection limit, timeouts and graceful shutdown.
Timeouts use ``mock_clock`` with explicit jumps: autojump would leap past deadlines
while SQLite works in its thread.
"""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest
import trio
import trio.testing

from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.leases import Leases
from bank.resumption import SessionRegistry
from bank.server import REFUSALS_MAX, Connection, DeadlineSweeper
from bank.session import Session
from bank.transport import SocketTransport, StreamTransport, Transport
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RECEIVE_TIMEOUT_S,
    RunningServer,
    WireClient,
    logged_in,
    start_server,
    txn_id,
)
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    EntryKind,
    Error,
    Frame,
    History,
    HistoryReply,
    Logout,
    LogoutReply,
    Ping,
    PingReply,
    Reply,
    Request,
    SessionExpired,
    Shutdown,
    Status,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire._codec import frame_bytes


def arm_receive_guard(mock_clock: trio.testing.MockClock) -> None:
    """After the last explicit jump: let time run, so a frame the server failed to send
    trips the client's receive timeout instead of hanging the test forever. Only where
    no SQLite work follows: autojump would leap while the server waits on its thread."""
    mock_clock.autojump_threshold = 0


# -- Connect, login, state table ------------------------------------------------------


async def test_hello_announces_the_servers_limits(bank: RunningServer, config: ServerConfig):
    client = await WireClient.connect(bank.port)
    hello = await client.hello()
    assert hello.idle_timeout_s == config.idle_timeout_s
    assert hello.login_timeout_s == config.login_timeout_s
    assert hello.frame_timeout_s == config.frame_timeout_s
    assert hello.amount_cents_max == config.amount_cents_max


async def test_requests_before_login_are_refused_and_the_connection_stays(bank: RunningServer):
    client = await bank.client()
    for request in (Balance(), Deposit(txn_id(), 100), Withdraw(txn_id(), 100), History(5)):
        reply = await client.request(request)
        assert reply.status is Status.NOT_LOGGED_IN
    assert isinstance(await client.request(Ping()), PingReply)
    assert await client.login() is Status.APPROVED
    assert await client.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)


async def test_account_number_is_case_insensitive(bank: RunningServer):
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT.lower(), DEMO_PIN) is Status.APPROVED


async def test_wrong_pin_and_unknown_account_get_the_same_status(bank: RunningServer):
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.login("QQ-00000", "1234") is Status.INCORRECT_PIN


async def test_a_second_login_on_one_connection_is_refused(bank: RunningServer):
    client = await logged_in(bank)
    assert await client.login(OTHER_ACCOUNT, OTHER_PIN) is Status.ALREADY_LOGGED_IN
    assert bank.server.leases.held() == {DEMO_ACCOUNT}


async def test_logout_releases_the_lease_and_closes(bank: RunningServer):
    client = await logged_in(bank)
    assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    assert await client.closed()
    assert bank.server.leases.held() == frozenset()


async def test_failed_logins_close_the_connection_at_the_limit(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    bank = await start_server(nursery, config, ledger, login_attempts_max=2, pin_tries_max=5)
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.closed()


async def test_three_wrong_pins_lock_the_account_even_with_the_right_pin(bank: RunningServer):
    statuses = []
    for _ in range(3):
        client = await bank.client()
        statuses.append(await client.login(DEMO_ACCOUNT, "0000"))
        await client.aclose()
    assert statuses[:2] == [Status.INCORRECT_PIN, Status.INCORRECT_PIN]
    assert statuses[2] in {Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED}
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.PIN_TRIES_EXCEEDED
    assert bank.server.leases.held() == frozenset()


# -- Leases: one ATM per account -------------------------------------------------------


async def test_second_atm_is_refused_while_the_first_holds_the_account(bank: RunningServer):
    first = await logged_in(bank)
    second = await bank.client()
    assert await second.login() is Status.ACCOUNT_IN_USE
    assert await first.request(Logout()) == LogoutReply(Status.APPROVED)
    assert await first.closed()
    assert await second.login() is Status.APPROVED


async def test_the_pin_is_checked_before_the_lease(bank: RunningServer):
    await logged_in(bank)
    intruder = await bank.client()
    # Without the PIN nobody learns that the account is in use.
    assert await intruder.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN


async def test_disconnect_releases_the_lease(bank: RunningServer):
    first = await logged_in(bank)
    await first.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the server has seen the disconnect
    second = await bank.client()
    assert await second.login() is Status.APPROVED


async def test_a_fatal_frame_error_releases_the_lease(bank: RunningServer):
    client = await logged_in(bank)
    await client.send_raw(b"garbage!!!!!!!!")
    frame = await client.receive()
    assert frame is not None and frame.message == Error(Status.FORMAT_ERROR)
    assert await client.closed()
    assert bank.server.leases.held() == frozenset()


async def test_different_accounts_are_served_at_once(bank: RunningServer):
    first = await logged_in(bank)
    second = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
    assert bank.server.leases.held() == {DEMO_ACCOUNT, OTHER_ACCOUNT}
    assert (await first.request(Balance())).status is Status.APPROVED
    assert (await second.request(Balance())).status is Status.APPROVED


# -- Money ------------------------------------------------------------------------------


async def test_deposit_and_withdraw_move_money_and_give_receipts(bank: RunningServer):
    client = await logged_in(bank)
    deposit = await client.request(Deposit(txn_id(), 500_00))
    assert isinstance(deposit, DepositReply) and deposit.status is Status.APPROVED
    assert deposit.balance_cents == DEMO_BALANCE_CENTS + 500_00
    assert deposit.entry_id > 0 and deposit.time_ms > 0
    withdraw = await client.request(Withdraw(txn_id(), 24_32))
    assert isinstance(withdraw, WithdrawReply) and withdraw.status is Status.APPROVED
    assert withdraw.balance_cents == DEMO_BALANCE_CENTS + 500_00 - 24_32
    assert withdraw.entry_id > deposit.entry_id
    balance = await client.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, withdraw.balance_cents)


async def test_overdraft_is_refused_and_moves_nothing(bank: RunningServer):
    client = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
    balance = await client.request(Balance())
    reply = await client.request(Withdraw(txn_id(), balance.balance_cents + 1))
    assert reply == WithdrawReply(Status.INSUFFICIENT_FUNDS)
    assert await client.request(Balance()) == balance
    assert (await client.request(Withdraw(txn_id(), balance.balance_cents))).balance_cents == 0


async def test_withdrawal_over_the_servers_limit_is_refused(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    bank = await start_server(nursery, config, ledger, withdrawal_cents_max=100_00)
    client = await logged_in(bank)
    assert await client.request(Withdraw(txn_id(), 100_01)) == WithdrawReply(
        Status.EXCEEDS_WITHDRAWAL_LIMIT
    )
    assert (await client.request(Withdraw(txn_id(), 100_00))).status is Status.APPROVED


async def test_retry_with_the_same_txn_id_returns_the_original_outcome(bank: RunningServer):
    client = await logged_in(bank)
    key = txn_id()
    first = await client.request(Deposit(key, 10_00))
    await client.request(Logout())
    again = await logged_in(bank)
    assert await again.request(Deposit(key, 10_00)) == first
    assert await again.request(Balance()) == BalanceReply(
        Status.APPROVED, DEMO_BALANCE_CENTS + 10_00
    )


async def test_a_retry_keeps_its_original_outcome_when_the_limit_changed(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    before = await start_server(nursery, config, ledger, withdrawal_cents_max=500_00)
    client = await logged_in(before)
    key = txn_id()
    original = await client.request(Withdraw(key, 400_00))
    assert original.status is Status.APPROVED
    await client.aclose()
    after = await start_server(nursery, config, ledger, withdrawal_cents_max=100_00)
    again = await logged_in(after)
    assert await again.request(Withdraw(key, 400_00)) == original  # not "over the limit"
    assert await again.request(Withdraw(txn_id(), 400_00)) == WithdrawReply(
        Status.EXCEEDS_WITHDRAWAL_LIMIT
    )
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS - 400_00


async def test_same_txn_id_with_different_content_is_a_duplicate(bank: RunningServer):
    client = await logged_in(bank)
    key = txn_id()
    await client.request(Deposit(key, 10_00))
    assert await client.request(Deposit(key, 11_00)) == DepositReply(
        Status.DUPLICATE_TRANSMISSION
    )
    assert await client.request(Withdraw(key, 10_00)) == WithdrawReply(
        Status.DUPLICATE_TRANSMISSION
    )


async def test_history_lists_recent_entries_newest_first(bank: RunningServer):
    client = await logged_in(bank)
    for cents in (1_00, 2_00, 3_00):
        await client.request(Deposit(txn_id(), cents))
    await client.request(Withdraw(txn_id(), 4_00))
    reply = await client.request(History(3))
    assert isinstance(reply, HistoryReply) and reply.status is Status.APPROVED
    assert [(e.kind, e.amount_cents) for e in reply.entries] == [
        (EntryKind.WITHDRAWAL, 4_00),
        (EntryKind.DEPOSIT, 3_00),
        (EntryKind.DEPOSIT, 2_00),
    ]
    assert reply.entries[0].balance_cents == DEMO_BALANCE_CENTS + 2_00


# -- Bad input --------------------------------------------------------------------------


async def test_unknown_opcode_is_answered_and_the_connection_goes_on(bank: RunningServer):
    client = await logged_in(bank)
    await client.send_raw(frame_bytes(0x3E, 77, b""))
    frame = await client.receive()
    assert frame is not None and frame.request_id == 77
    assert frame.message == Error(Status.INVALID_TRANSACTION)
    assert (await client.request(Balance())).status is Status.APPROVED


async def test_amount_out_of_range_is_answered_and_the_connection_goes_on(bank: RunningServer):
    client = await logged_in(bank)
    zero_amount = txn_id() + (0).to_bytes(8, "big")
    await client.send_raw(frame_bytes(Deposit.OPCODE, 5, zero_amount))
    frame = await client.receive()
    assert frame is not None and (frame.request_id, frame.message) == (
        5, Error(Status.INVALID_AMOUNT)
    )
    assert await client.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)


async def test_bad_crc_gets_a_format_error_and_close(bank: RunningServer):
    client = await bank.client()
    frame = bytearray(encode(Balance(), 9))
    frame[-1] ^= 0xFF
    await client.send_raw(bytes(frame))
    reply = await client.receive()
    assert reply is not None and (reply.request_id, reply.message) == (
        9, Error(Status.FORMAT_ERROR)
    )
    assert await client.closed()


async def test_unsupported_version_is_named_in_the_answer(bank: RunningServer):
    client = await bank.client()
    await client.send_raw(b"AT\x09" + bytes(20))
    reply = await client.receive()
    assert reply is not None and reply.message == Error(Status.UNSUPPORTED_VERSION)
    assert await client.closed()


async def test_pipelined_requests_are_answered_in_order(bank: RunningServer):
    client = await logged_in(bank)
    requests = [Deposit(txn_id(), 1_00) for _ in range(20)] + [Balance()]
    await client.send_raw(b"".join(encode(r, 100 + i) for i, r in enumerate(requests)))
    replies = [await client.receive() for _ in requests]
    assert [f.request_id for f in replies] == [100 + i for i in range(len(requests))]
    assert replies[-1].message == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS + 20_00)


async def test_random_bytes_do_not_hurt_other_sessions(bank: RunningServer):
    honest = await logged_in(bank)
    for seed in range(20):
        attacker = await WireClient.connect(bank.port)
        await attacker.send_raw(bytes((seed * 37 + i * 11) % 256 for i in range(300)))
        await attacker.aclose()
    assert (await honest.request(Balance())).status is Status.APPROVED


# -- Capacity, timeouts, shutdown -----------------------------------------------------


async def test_beyond_the_connection_limit_a_client_is_told_busy(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    bank = await start_server(nursery, config, ledger, connections_max=1)
    first = await logged_in(bank)  # logged in: never evicted to make room
    second = await WireClient.connect(bank.port)
    frame = await second.receive()
    assert frame is not None and (frame.request_id, frame.message) == (
        0, Error(Status.SERVER_BUSY)
    )
    assert await second.closed()
    assert isinstance(await first.request(Ping()), PingReply)


async def test_a_peer_that_resets_before_it_is_accepted_hurts_nobody(bank: RunningServer):
    honest = await logged_in(bank)
    for _ in range(5):
        # Connect and reset without yielding to trio, so the server accepts a dead socket.
        doomed = socket.create_connection(("127.0.0.1", bank.port))
        doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.close()
    await trio.testing.wait_all_tasks_blocked()
    assert (await honest.request(Balance())).status is Status.APPROVED
    newcomer = await bank.client()
    assert await newcomer.login(OTHER_ACCOUNT, OTHER_PIN) is Status.APPROVED


async def test_refusals_in_progress_are_bounded(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger,
):
    bank = await start_server(nursery, config, ledger, connections_max=1)
    holder = await logged_in(bank)  # holds the only slot (kept referenced: GC would close it)
    lingering = [holder]
    for _ in range(REFUSALS_MAX):  # each refusal waits (time is frozen) for our EOF
        refused = await WireClient.connect(bank.port)
        frame = await refused.receive()
        assert frame is not None and frame.message == Error(Status.SERVER_BUSY)
        lingering.append(refused)
    beyond = await WireClient.connect(bank.port)
    assert await beyond.closed()  # closed at once, without a frame


async def test_idle_session_expires_and_releases_its_lease(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig
):
    client = await logged_in(bank)
    for _ in range(2):  # alive at twice the timeout since login: each reply restarts it
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(config.idle_timeout_s - 1)
        await trio.testing.wait_all_tasks_blocked()  # a deadline that passed is enforced now
        assert isinstance(await client.request(Ping()), PingReply)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.idle_timeout_s)
    arm_receive_guard(mock_clock)
    frame = await client.receive()
    assert frame is not None and (frame.request_id, frame.message) == (0, SessionExpired())
    assert await client.closed()
    assert bank.server.leases.held() == frozenset()


async def test_a_connection_that_never_logs_in_is_closed(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="bank.server")
    client = await bank.client()
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.login_timeout_s)
    arm_receive_guard(mock_clock)
    frame = await client.receive()
    assert frame is not None and frame.message == SessionExpired()
    assert await client.closed()
    # The operator reads the login deadline, not the idle timeout of a logged-in session.
    said = ": closed: login timeout: not logged in in time"
    for _ in range(CLOSE_LOG_WAITS_MAX):  # the server logs once its closing is done
        if any(r.getMessage().endswith(said) for r in caplog.records):
            break
        mock_clock.jump(1)
        await trio.testing.wait_all_tasks_blocked()
    assert any(r.getMessage().endswith(said) for r in caplog.records)


CLOSE_LOG_WAITS_MAX = 30
"""Bound on the clock's one-second steps until a closed connection's log line appears."""


async def test_pinging_does_not_extend_the_login_deadline(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig
):
    client = await bank.client()
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.login_timeout_s - 1)
    await trio.testing.wait_all_tasks_blocked()  # a deadline that passed is enforced now
    assert isinstance(await client.request(Ping()), PingReply)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(1)
    arm_receive_guard(mock_clock)
    frame = await client.receive()
    assert frame is not None and frame.message == SessionExpired()
    assert await client.closed()


async def test_trickled_partial_frames_do_not_extend_the_login_deadline(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger,
):
    bank = await start_server(nursery, config, ledger, login_timeout_s=5, frame_timeout_s=10)
    client = await bank.client()
    ping = encode(Ping(), 1)
    await client.send_raw(ping + ping[:5])  # a whole frame, then one begun
    assert (await client.receive()).message == PingReply(Status.APPROVED)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(5)
    arm_receive_guard(mock_clock)
    frame = await client.receive()
    assert frame is not None and frame.message == SessionExpired()  # not the frame timeout
    assert await client.closed()


async def test_an_answered_bad_frame_counts_as_activity(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig
):
    client = await logged_in(bank)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.idle_timeout_s - 1)
    await trio.testing.wait_all_tasks_blocked()  # a deadline that passed is enforced now
    await client.send_raw(frame_bytes(0x3E, 8, b""))
    frame = await client.receive()
    assert frame is not None and frame.message == Error(Status.INVALID_TRANSACTION)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.idle_timeout_s - 1)
    await trio.testing.wait_all_tasks_blocked()
    arm_receive_guard(mock_clock)
    assert isinstance(await client.request(Ping()), PingReply)  # still in session


async def test_a_frame_that_never_completes_is_dropped_and_others_are_served(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig
):
    honest = await logged_in(bank)
    slow = await bank.client()
    await slow.send_raw(encode(Balance(), 1)[:5])
    assert (await honest.request(Balance())).status is Status.APPROVED  # served meanwhile
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.frame_timeout_s)
    arm_receive_guard(mock_clock)  # no SQLite work after this: autojump cannot misfire
    frame = await slow.receive()
    assert frame is not None and frame.message == Error(Status.FORMAT_ERROR)
    assert await slow.closed()


async def test_a_frame_behind_a_refused_one_gets_its_own_frame_timeout(
    mock_clock: trio.testing.MockClock, bank: RunningServer, config: ServerConfig
):
    """The frame deadline of bytes left behind a refused frame counts from when that
    frame was answered, not from when the refused frame began."""
    assert config.frame_timeout_s > 4
    client = await bank.client()
    refused, ping = frame_bytes(0x3E, 8, b""), encode(Ping(), 9)
    await client.send_raw(refused[:5])
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(config.frame_timeout_s - 2)  # the refused frame completes in time...
    await client.send_raw(refused[5:] + ping[:3])  # ...with a PING begun behind it
    frame = await client.receive()
    assert frame is not None and frame.message == Error(Status.INVALID_TRANSACTION)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(4)  # past frame_timeout_s since the refused frame began, not the PING
    await trio.testing.wait_all_tasks_blocked()
    await client.send_raw(ping[3:])
    arm_receive_guard(mock_clock)
    frame = await client.receive()
    assert frame is not None and frame.request_id == 9
    assert frame.message == PingReply(Status.APPROVED)


async def test_shutdown_notifies_refuses_new_work_and_lets_clients_log_out(
    config: ServerConfig, ledger: BatchLedger
):
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bank = await start_server(nursery, config, ledger)
            client = await logged_in(bank)
            bank.server.shutdown()
            frame = await client.receive()
            assert frame is not None and frame.request_id == 0
            assert frame.message == Shutdown(config.shutdown_grace_s)
            assert (await client.request(Deposit(txn_id(), 1_00))).status is (
                Status.ISSUER_UNAVAILABLE
            )
            assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
            assert await client.closed()
            await client.aclose()
        # serve() returned by itself: the nursery closed without a cancel.
    assert bank.server.leases.held() == frozenset()
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS


async def test_shutdown_closes_lingering_sessions_after_the_grace_period(
    mock_clock: trio.testing.MockClock, config: ServerConfig, ledger: BatchLedger
):
    # Beyond the jumped grace period; fires once autojump is armed if serve() never ends.
    with trio.fail_after(config.shutdown_grace_s + RECEIVE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bank = await start_server(nursery, config, ledger)
            client = await logged_in(bank)
            bank.server.shutdown()
            frame = await client.receive()
            assert frame is not None and isinstance(frame.message, Shutdown)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(config.shutdown_grace_s)
            arm_receive_guard(mock_clock)
            assert await client.closed()
            await client.aclose()
    assert bank.server.leases.held() == frozenset()
    assert bank.server.connection_count == 0


def connection_and_client(
    config: ServerConfig, ledger: BatchLedger
) -> tuple[Connection, WireClient]:
    """One server ``Connection`` (not yet running) and a client, over a socketpair."""
    server_socket, client_socket = trio.socket.socketpair()
    session = Session(
        ledger=ledger, leases=Leases(), config=config, name="test", sessions=SessionRegistry()
    )
    connection = Connection(
        SocketTransport(trio.SocketStream(server_socket)), session=session, config=config,
        name="test", sweeper=DeadlineSweeper(),
    )
    return connection, WireClient(trio.SocketStream(client_socket))


@pytest.mark.parametrize("transport", ["socket", "stream"])
async def test_a_whole_session_is_served_over_either_transport(
    config: ServerConfig, ledger: BatchLedger, transport: str
):
    """The plaintext fast path (the socket's descriptor) and the path TLS takes (any
    trio stream, here a memory stream) serve the same conversation and close alike."""
    session = Session(
        ledger=ledger, leases=Leases(), config=config, name="test", sessions=SessionRegistry()
    )
    if transport == "socket":
        server_socket, client_socket = trio.socket.socketpair()
        server_end: Transport = SocketTransport(trio.SocketStream(server_socket))
        client_stream: trio.abc.Stream = trio.SocketStream(client_socket)
    else:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server_end = StreamTransport(server_stream)
    connection = Connection(
        server_end, session=session, config=config, name="test", sweeper=DeadlineSweeper()
    )
    client = WireClient(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        assert await client.hello() == config.hello()
        assert await client.login() is Status.APPROVED
        deposit = await client.request(Deposit(txn_id(), 1_00))
        assert deposit.status is Status.APPROVED
        assert deposit.balance_cents == DEMO_BALANCE_CENTS + 1_00
        assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
        assert await client.closed()
    assert session.account is None


async def test_a_cancelled_connection_still_closes_its_socket(
    config: ServerConfig, ledger: BatchLedger
):
    """The shutdown backstop cancels connections still open after the grace period:
    their sockets must close then too, not linger until garbage collection."""
    connection, client = connection_and_client(config, ledger)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        nursery.cancel_scope.cancel()
    assert await client.closed()


def awaited_locals(coro: object) -> list[object]:
    """The local variables of every coroutine frame a task waits in, outermost first."""
    values: list[object] = []
    while coro is not None and hasattr(coro, "cr_frame"):
        if coro.cr_frame is not None:
            values.extend(coro.cr_frame.f_locals.values())
        coro = coro.cr_await
    return values


async def test_a_waiting_connection_holds_no_request_or_reply(
    config: ServerConfig, ledger: BatchLedger
):
    """Between requests the connection's task keeps nothing of the last one: 10,000 idle
    sessions would each hold theirs in memory, and after a LOGIN that is its PIN."""
    connection, client = connection_and_client(config, ledger)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        assert await client.login() is Status.APPROVED
        assert await client.request(Ping()) == PingReply(Status.APPROVED)
        await trio.testing.wait_all_tasks_blocked()
        [task] = nursery.child_tasks
        held = awaited_locals(task.coro)
        assert connection in held  # the walk reached the connection's own frames
        assert [value for value in held if isinstance(value, Frame | Request | Reply)] == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("refused", [False, True], ids=["answered", "refused"])
async def test_pipelined_requests_do_not_hold_the_event_loop(
    config: ServerConfig, ledger: BatchLedger, refused: bool
):
    """Sends do not yield (``Connection._send_bytes``), so a burst of pipelined frames
    that need no storage (PINGs, or frames of an unknown opcode, each answered with an
    ERROR) must yield once per frame, as a read would: other tasks run between them."""
    burst = 50
    connection, client = connection_and_client(config, ledger)
    turns = 0
    answered = trio.Event()

    async def another_task() -> None:
        nonlocal turns
        while not answered.is_set():
            turns += 1
            await trio.lowlevel.checkpoint()

    def request(n: int) -> bytes:
        return frame_bytes(0x3E, n, b"") if refused else encode(Ping(), n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        await client.send_raw(b"".join(request(n) for n in range(1, burst + 1)))
        nursery.start_soon(another_task)
        for n in range(1, burst + 1):
            frame = await client.receive()
            assert frame is not None and frame.request_id == n
        answered.set()
        nursery.cancel_scope.cancel()
    assert turns > burst // 2  # about one turn per request; none at all without the yield


@pytest.mark.parametrize("pipelined", [False, True], ids=["alone", "pipelined"])
async def test_a_deadline_passing_as_a_reply_goes_out_ends_as_a_send_timeout(
    config: ServerConfig, ledger: BatchLedger, pipelined: bool
):
    """If the send deadline is enforced just as the send completes, the connection ends
    as a send timeout: a request already buffered behind it is not started (its reply
    could be cut off), and the client is not told it was idle, though the connection
    went on to wait for a request before the interrupt was handled."""
    connection, client = connection_and_client(config, ledger)
    send = connection._send_bytes
    replies = 0

    async def send_then_expire(data: bytes) -> None:
        nonlocal replies
        await send(data)
        replies += 1
        if replies == 2:  # HELLO, then the first PING's reply
            connection.expire()  # as the sweeper would, in the same scheduler step

    connection._send_bytes = send_then_expire  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        await client.send_raw(encode(Ping(), 1) + (encode(Ping(), 2) * pipelined))
        frame = await client.receive()
        assert frame is not None and (frame.request_id, frame.message) == (
            1, PingReply(Status.APPROVED)
        )
        assert await client.closed()  # no reply to PING 2, and no SESSION_EXPIRED
    assert replies == 2


async def test_a_read_woken_with_nothing_to_read_waits_again(
    config: ServerConfig, ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    """Readiness can be reported with nothing to read after all (EAGAIN): the connection
    waits again instead of treating it as a broken socket."""
    connection, client = connection_and_client(config, ledger)
    read = os.read
    spurious = [connection._transport._fd]  # type: ignore[attr-defined]

    def read_after_a_spurious_wakeup(fd: int, max_bytes: int) -> bytes:
        if fd in spurious:
            spurious.remove(fd)
            raise BlockingIOError
        return read(fd, max_bytes)

    monkeypatch.setattr(os, "read", read_after_a_spurious_wakeup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        assert await client.request(Ping()) == PingReply(Status.APPROVED)
        nursery.cancel_scope.cancel()
    assert spurious == []  # the spurious wakeup did happen


async def test_replies_wait_for_room_when_the_client_reads_slowly(
    config: ServerConfig, ledger: BatchLedger
):
    """With small socket buffers, a burst of pipelined requests fills the server's send
    buffer: each write that finds it full waits for room and goes on, losing nothing."""
    burst = 2_000
    connection, client = connection_and_client(config, ledger)
    connection._transport.stream.socket.setsockopt(  # type: ignore[attr-defined]
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    requests = b"".join(encode(Ping(), n) for n in range(1, burst + 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        nursery.start_soon(client.send_raw, requests)
        await trio.testing.wait_all_tasks_blocked()  # the server now waits for room
        for n in range(1, burst + 1):
            frame = await client.receive()
            assert frame is not None and frame.request_id == n
        nursery.cancel_scope.cancel()


def shut_down_on_read(connection: Connection) -> None:
    """Make the connection's reads return their bytes just as the server begins shutting
    down: the interrupt and the request arrive together."""
    receive = connection._receive_bytes

    async def receive_then_shut_down() -> bytes:
        data = await receive()
        if data and connection.session.account is not None:  # logged in
            connection.begin_shutdown(trio.current_time() + 10)
        return data

    connection._receive_bytes = receive_then_shut_down  # type: ignore[method-assign]


async def test_a_request_read_as_shutdown_begins_is_answered_not_lost(
    config: ServerConfig, ledger: BatchLedger
):
    connection, client = connection_and_client(config, ledger)
    shut_down_on_read(connection)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.hello()
        assert await client.login() is Status.APPROVED
        request_id = await client.send(Balance())
        answer, notice = await client.receive(), await client.receive()
        assert answer is not None and answer.request_id == request_id
        assert answer.message == BalanceReply(Status.ISSUER_UNAVAILABLE)  # shutting down
        assert notice is not None and isinstance(notice.message, Shutdown)
        assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
        assert await client.closed()
