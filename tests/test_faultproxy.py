"""The fault-injecting proxy (tests/faultproxy.py) in front of the real bank, or of a
small echo server where the bytes need not be frames: it relays cleanly, delays in
virtual time, cuts at a chosen frame with FIN or RST, cuts silently, stalls or resets
mid-frame, consumes its plan connection by connection, and records what it did."""

from __future__ import annotations

import functools
import random
import socket
import struct
import time

import pytest
import trio
import trio.testing

from bank.batch_ledger import BatchLedger
from tests.faultproxy import Action, Cut, Delay, Direction, FaultEvent, FaultProxy
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    HELLO,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RECEIVE_TIMEOUT_S,
    RunningServer,
    WireClient,
    legit_session,
    settle,
    txn_id,
)
from wire import (
    MAGIC,
    PROTOCOL_VERSION,
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    Login,
    LoginReply,
    Opcode,
    Ping,
    Status,
    encode,
)

STUCK_S = 1.0
"""Real seconds of every task waiting after which the hand-moved clock jumps by itself,
so that a broken test fails at a deadline instead of hanging."""

READS_MAX = 1000
"""Bound on the reads of one raw exchange; far above what any test needs."""

AMOUNT_CENTS = 25_00


# -- Helpers ------------------------------------------------------------------------------


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A clock the test moves with ``jump``; pytest-trio runs the test on it."""
    return trio.testing.MockClock(autojump_threshold=STUCK_S)


class Upstream:
    """A stand-in for the bank on loopback: greets each connection with ``greeting``,
    then records all it receives and how the connection ended."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[tuple[bytes, str]] = []
        self.ended = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(self.greeting)
            self.received.append(await read_to_end(stream))
            self.ended.set()

    async def start(self, nursery: trio.Nursery) -> int:
        serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, self.handle, 0)
        return int(listeners[0].socket.getsockname()[1])


async def echo(stream: trio.SocketStream) -> None:
    """Send back every byte received; close after the peer's EOF."""
    async with stream:
        for _ in range(READS_MAX):
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(data)


async def start_echo(nursery: trio.Nursery) -> int:
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, echo, 0)
    return int(listeners[0].socket.getsockname()[1])


async def start_proxy(nursery: trio.Nursery, proxy: FaultProxy) -> int:
    return int(await nursery.start(proxy.serve))


async def read_to_end(stream: trio.abc.ReceiveStream) -> tuple[bytes, str]:
    """Every byte until the stream ends, and how it ended: "eof" or "reset"."""
    received = bytearray()
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        for _ in range(READS_MAX):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return bytes(received), "reset"
            if not data:
                return bytes(received), "eof"
            received += data
    raise AssertionError(f"still open after {READS_MAX} reads")


async def read_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    received = bytearray()
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        for _ in range(READS_MAX):
            if len(received) >= count:
                return bytes(received)
            data = await stream.receive_some(count - len(received))
            assert data, f"closed after {len(received)} of {count} bytes"
            received += data
    raise AssertionError(f"{len(received)} of {count} bytes after {READS_MAX} reads")


async def nothing_arrives(stream: trio.abc.ReceiveStream) -> None:
    """No byte (nor EOF) reaches ``stream`` while every task and thread settles."""
    received: list[bytes] = []

    async def read() -> None:
        received.append(await stream.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await settle()
        nursery.cancel_scope.cancel()
    assert received == []


async def logged_in_through(
    port: int, account: str = DEMO_ACCOUNT, pin: str = DEMO_PIN
) -> WireClient:
    client = await WireClient.connect(port)
    await client.hello()
    assert await client.login(account, pin) is Status.APPROVED
    return client


def free_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- The plan -----------------------------------------------------------------------------


def test_a_plan_says_what_it_means() -> None:
    assert Cut(Opcode.DEPOSIT_REPLY).direction is Direction.TO_CLIENT
    assert Cut(Opcode.LOGIN).direction is Direction.TO_BANK
    with pytest.raises(ValueError, match="nth"):
        Cut(Opcode.LOGIN, nth=0)
    with pytest.raises(ValueError, match="forward_bytes"):
        Cut(Opcode.LOGIN, forward_bytes=-1)
    with pytest.raises(ValueError, match="jitter_s"):
        Delay(-1.0)
    with pytest.raises(ValueError, match="at most one Delay"):
        FaultProxy(1, [[Delay(1.0), Delay(2.0)]])


# -- A clean relay ------------------------------------------------------------------------


async def test_a_clean_relay_carries_a_whole_session(
    nursery: trio.Nursery, bank: RunningServer
) -> None:
    proxy = FaultProxy(bank.port)
    port = await start_proxy(nursery, proxy)
    await legit_session(RunningServer(bank.server, port))
    await legit_session(RunningServer(bank.server, port))
    assert proxy.events == []


async def test_bytes_that_are_not_frames_are_relayed_as_they_are(nursery: trio.Nursery) -> None:
    proxy = FaultProxy(await start_echo(nursery), [Cut(Opcode.DEPOSIT, forward_bytes=0)])
    stream = await trio.open_tcp_stream("127.0.0.1", await start_proxy(nursery, proxy))
    payload = random.Random(0).randbytes(256 * 1024)  # no frames: the decoder gives up
    async with trio.open_nursery() as writers:

        async def send_then_eof() -> None:
            await stream.send_all(payload)
            await stream.send_eof()  # half-close: the echo's answer still comes back

        writers.start_soon(send_then_eof)
        assert await read_to_end(stream) == (payload, "eof")
    await stream.aclose()
    assert proxy.events == []


# -- Delay --------------------------------------------------------------------------------


async def ping_through_delay(nursery: trio.Nursery, echo_port: int, seed: int) -> list[float]:
    """One round trip through a proxy that delays it; the delays it recorded."""
    proxy = FaultProxy(echo_port, [Delay(30.0, jitter_s=5.0)], seed=seed)
    stream = await trio.open_tcp_stream("127.0.0.1", await start_proxy(nursery, proxy))
    start = trio.current_time()
    await stream.send_all(b"ping")
    assert await stream.receive_some(64) == b"ping"
    elapsed = trio.current_time() - start
    assert [event.direction for event in proxy.events] == [Direction.TO_BANK, Direction.TO_CLIENT]
    delays = [event.delay_s for event in proxy.events]
    assert all(30.0 <= delay <= 35.0 for delay in delays)
    assert elapsed == pytest.approx(sum(delays))
    await stream.aclose()
    await proxy.stop()
    return delays


async def test_delay_holds_each_chunk_in_virtual_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    echo_port = await start_echo(nursery)
    real_start = time.monotonic()
    first = await ping_through_delay(nursery, echo_port, seed=7)
    assert time.monotonic() - real_start < 30.0  # the clock jumped; nobody waited
    assert await ping_through_delay(nursery, echo_port, seed=7) == first
    assert await ping_through_delay(nursery, echo_port, seed=8) != first


# -- Cuts at a frame ----------------------------------------------------------------------


@pytest.mark.parametrize(("action", "end"), [(Action.FIN, "eof"), (Action.RST, "reset")])
async def test_a_cut_after_the_first_deposit_reply(
    nursery: trio.Nursery, bank: RunningServer, ledger: BatchLedger, action: Action, end: str
) -> None:
    cut = Cut(Opcode.DEPOSIT_REPLY, action=action)
    proxy = FaultProxy(bank.port, [cut])
    client = await logged_in_through(await start_proxy(nursery, proxy))
    reply = await client.request(Deposit(txn_id(), AMOUNT_CENTS))
    assert isinstance(reply, DepositReply) and reply.status is Status.APPROVED
    assert await read_to_end(client.stream) == (b"", end)
    # HELLO, LOGIN_REPLY, SESSION_TOKEN, DEPOSIT_REPLY went to the client, then the cut.
    assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_CLIENT, 4)
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + AMOUNT_CENTS
    await settle()
    assert bank.server.connection_count == 0  # the bank saw its side end too
    await client.aclose()


async def test_a_cut_instead_of_the_first_deposit_loses_it(
    nursery: trio.Nursery, bank: RunningServer, ledger: BatchLedger
) -> None:
    cut = Cut(Opcode.DEPOSIT, forward_bytes=0)
    proxy = FaultProxy(bank.port, [cut])
    client = await logged_in_through(await start_proxy(nursery, proxy))
    await client.send(Deposit(txn_id(), AMOUNT_CENTS))
    assert await client.closed()
    assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_BANK, 1)
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS  # never reached the bank
    await client.aclose()


# -- A silent cut -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "end"), [(Action.SILENT_FIN, "eof"), (Action.SILENT_RST, "reset")]
)
async def test_a_silent_cut_holds_the_bank_side_until_the_proxy_stops(
    nursery: trio.Nursery, bank: RunningServer, action: Action, end: str
) -> None:
    cut = Cut(Opcode.LOGIN_REPLY, action=action)
    proxy = FaultProxy(bank.port, [cut])
    client = await WireClient.connect(await start_proxy(nursery, proxy))
    await client.hello()
    assert await client.request(Login(DEMO_ACCOUNT, DEMO_PIN)) == LoginReply(Status.APPROVED)
    assert await read_to_end(client.stream) == (b"", end)  # not even its SESSION_TOKEN
    assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_CLIENT, 2)
    await settle()
    assert bank.server.connection_count == 1  # the bank never learnt: its session lives on
    direct = await bank.client()
    assert await direct.login() is Status.ACCOUNT_IN_USE
    await direct.aclose()

    await proxy.stop()
    await settle()
    assert bank.server.connection_count == 0
    direct = await bank.client()
    assert await direct.login() is Status.APPROVED  # the session ended, its lease too
    await direct.aclose()
    await client.aclose()


# -- Partial frames -----------------------------------------------------------------------


async def test_a_partial_frame_then_a_stall_until_the_nursery_is_cancelled(
    bank: RunningServer, ledger: BatchLedger
) -> None:
    cut = Cut(Opcode.DEPOSIT_REPLY, forward_bytes=5, action=Action.STALL)
    proxy = FaultProxy(bank.port, [cut])
    async with trio.open_nursery() as proxy_nursery:
        client = await logged_in_through(await start_proxy(proxy_nursery, proxy))
        await client.send(Deposit(txn_id(), AMOUNT_CENTS))
        head = await read_exactly(client.stream, 5)
        assert head[:4] == MAGIC + bytes([PROTOCOL_VERSION, Opcode.DEPOSIT_REPLY])
        assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_CLIENT, 3, 5)
        await nothing_arrives(client.stream)
        assert bank.server.connection_count == 1
        assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + AMOUNT_CENTS
        proxy_nursery.cancel_scope.cancel()  # not stop(): cancelling closes all as well
    assert await read_to_end(client.stream) == (b"", "eof")
    await settle()
    assert bank.server.connection_count == 0
    await client.aclose()


async def test_a_reset_in_the_middle_of_a_frame(
    nursery: trio.Nursery, bank: RunningServer
) -> None:
    cut = Cut(Opcode.DEPOSIT_REPLY, forward_bytes=10, action=Action.RST)
    proxy = FaultProxy(bank.port, [cut])
    client = await logged_in_through(await start_proxy(nursery, proxy))
    await client.send(Deposit(txn_id(), AMOUNT_CENTS))
    head, end = await read_to_end(client.stream)
    assert (len(head), end) == (10, "reset")  # a whole header, then the reset
    assert head[:4] == MAGIC + bytes([PROTOCOL_VERSION, Opcode.DEPOSIT_REPLY])
    assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_CLIENT, 3, 10)
    await client.aclose()


async def test_a_frame_that_arrives_in_pieces_is_cut_at_the_chosen_byte(
    nursery: trio.Nursery,
) -> None:
    upstream = Upstream()
    cut = Cut(Opcode.LOGIN, forward_bytes=3)
    proxy = FaultProxy(await upstream.start(nursery), [cut])
    stream = await trio.open_tcp_stream("127.0.0.1", await start_proxy(nursery, proxy))
    ping, login = encode(Ping(), 1), encode(Login(DEMO_ACCOUNT, DEMO_PIN), 2)
    for byte in ping + login:  # one chunk each: the proxy reads each before the next
        await stream.send_all(bytes([byte]))
        await settle()
    await upstream.ended.wait()
    assert upstream.received == [(ping + login[:3], "eof")]
    assert await proxy.wait_for_fault() == FaultEvent(0, cut, Direction.TO_BANK, 1, 3)
    await stream.aclose()


async def test_a_fin_cut_sends_fin_even_with_bytes_left_unread(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    """Linux resets a connection closed with bytes unread; the proxy reads them first.
    The delay keeps the bytes unread: the proxy is asleep holding the frame before."""
    hello = encode(HELLO)
    upstream = Upstream(greeting=hello)
    delay, cut = Delay(3.0), Cut(Opcode.LOGIN, forward_bytes=0)
    proxy = FaultProxy(await upstream.start(nursery), [[delay, cut]])
    stream = await trio.open_tcp_stream("127.0.0.1", await start_proxy(nursery, proxy))
    await settle()
    clock.jump(3.0)
    assert await read_exactly(stream, len(hello)) == hello
    await stream.send_all(encode(Login(DEMO_ACCOUNT, DEMO_PIN), 1))
    await settle()  # the proxy has read the LOGIN and holds it for 3 s
    await stream.send_all(encode(Ping(), 2))
    await settle()
    clock.jump(3.0)
    assert await read_to_end(stream) == (b"", "eof")
    await upstream.ended.wait()
    assert upstream.received == [(b"", "eof")]
    await proxy.wait_for_fault(3)
    assert proxy.events == [
        FaultEvent(0, delay, Direction.TO_CLIENT, 0, delay_s=3.0),
        FaultEvent(0, delay, Direction.TO_BANK, 0, delay_s=3.0),
        FaultEvent(0, cut, Direction.TO_BANK, 0),
    ]
    await stream.aclose()


# -- The plan, connection by connection, and the record -----------------------------------


async def test_the_plan_is_consumed_connection_by_connection(
    nursery: trio.Nursery, bank: RunningServer
) -> None:
    reset_login = Cut(Opcode.LOGIN, forward_bytes=0, action=Action.RST)
    second_balance = Cut(Opcode.BALANCE_REPLY, nth=2)
    proxy = FaultProxy(bank.port, [None, reset_login, [second_balance]])

    port = await start_proxy(nursery, proxy)
    first = await logged_in_through(port)  # connection 0: clean
    second = await WireClient.connect(port)  # connection 1: its LOGIN never arrives
    await second.hello()
    with pytest.raises(trio.BrokenResourceError):
        await second.login(OTHER_ACCOUNT, OTHER_PIN)
    third = await logged_in_through(port, OTHER_ACCOUNT, OTHER_PIN)  # connection 2
    for _ in range(2):
        assert isinstance(await third.request(Balance()), BalanceReply)
    assert await third.closed()  # after the second reply
    fourth = await logged_in_through(port, OTHER_ACCOUNT, OTHER_PIN)  # beyond the plan
    for _ in range(3):
        assert isinstance(await fourth.request(Balance()), BalanceReply)

    await proxy.wait_for_fault(2)
    assert proxy.events == [
        FaultEvent(1, reset_login, Direction.TO_BANK, 0),
        FaultEvent(2, second_balance, Direction.TO_CLIENT, 5),
    ]
    for client in (first, second, third, fourth):
        await client.aclose()


# -- Broken connections -------------------------------------------------------------------


async def test_a_bank_that_refuses_resets_only_that_connection(nursery: trio.Nursery) -> None:
    proxy = FaultProxy(free_port())
    port = await start_proxy(nursery, proxy)
    for _ in range(2):  # the proxy outlives each refusal
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        assert await read_to_end(stream) == (b"", "reset")
        await stream.aclose()
    assert proxy.events == []


async def test_a_reset_is_passed_on_to_the_other_side(nursery: trio.Nursery) -> None:
    upstream = Upstream()
    proxy = FaultProxy(await upstream.start(nursery))
    stream = await trio.open_tcp_stream("127.0.0.1", await start_proxy(nursery, proxy))
    await stream.send_all(b"before")
    await settle()
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    await upstream.ended.wait()
    assert upstream.received == [(b"before", "reset")]
    assert proxy.events == []
