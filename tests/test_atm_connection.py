"""``atm.connection`` on its own: greeting, request ids, replies, notices and faults.

A hand-driven peer on a memory stream plays the bank so each fault can be produced
exactly: silence (on ``autojump_clock``), garbage, an unknown opcode, a closed stream.
Two tests use a real TCP socket on 127.0.0.1 to cover ``Connection.open``.
"""

from __future__ import annotations

import errno
import struct
import zlib

import pytest
import trio
import trio.testing

from atm import text
from atm.connection import (
    HELLO_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    STILL_WORKING_AFTER_S,
    Connection,
    _describe,
)
from atm.errors import (
    ConnectFailed,
    ConnectionLost,
    IncompatibleVersion,
    ReplyTimeout,
    ServerBusy,
    ServerShutdown,
    SessionExpired,
)
from tests.helpers import HELLO, FakeBank, assert_customer_words, listen_on_loopback, with_version
from wire import (
    Balance,
    BalanceReply,
    Decoder,
    Error,
    Ping,
    PingReply,
    Sender,
    Shutdown,
    Status,
    encode,
)
from wire import SessionExpired as SessionExpiredNotice


class Peer:
    """The bank's end of a memory stream, driven step by step by the test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = Decoder(Sender.CLIENT)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_request_id(self) -> int:
        while (frame := self.decoder.next_frame()) is None:
            self.decoder.receive_data(await self.stream.receive_some(4096))
        return frame.request_id


async def greeted() -> tuple[Connection, Peer]:
    client, server = trio.testing.memory_stream_pair()
    peer = Peer(server)
    await peer.send(encode(HELLO))
    return await Connection.handshake(client), peer


def unknown_opcode_frame(opcode: int = 0x50) -> bytes:
    body = b"AT" + struct.pack(">BBIH", 1, opcode, 0, 0)
    return body + zlib.crc32(body).to_bytes(4, "big")


async def test_handshake_keeps_the_banks_limits() -> None:
    connection, _ = await greeted()
    assert connection.hello == HELLO
    assert connection.amount_cents_max == HELLO.amount_cents_max


async def test_request_ids_are_fresh_and_nonzero() -> None:
    connection, peer = await greeted()
    seen = []
    for _ in range(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.request, Ping(), PingReply)
            request_id = await peer.receive_request_id()
            seen.append(request_id)
            await peer.send(encode(PingReply(Status.APPROVED), request_id))
    assert seen == [1, 2, 3]  # the engine's counter; its wrap is in tests/test_state.py


async def test_reply_is_matched_past_notices_and_unknown_frames() -> None:
    connection, peer = await greeted()

    async def answer() -> None:
        request_id = await peer.receive_request_id()
        await peer.send(unknown_opcode_frame())
        await peer.send(encode(Error(Status.INVALID_TRANSACTION), request_id + 1))  # Not ours.
        await peer.send(encode(Shutdown(7)))
        await peer.send(encode(BalanceReply(Status.APPROVED, 5), request_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        reply = await connection.request(Balance(), BalanceReply)
    assert reply == BalanceReply(Status.APPROVED, 5)
    with pytest.raises(ServerShutdown) as raised:
        connection.raise_if_shutting_down()
    assert raised.value.grace_s == 7


async def test_a_reply_to_another_request_id_breaks_the_connection() -> None:
    """The bank answers in order, so a reply that does not answer our request is a
    broken bank: the session reconnects rather than wait for a reply that may not come."""
    connection, peer = await greeted()

    async def answer() -> None:
        request_id = await peer.receive_request_id()
        await peer.send(encode(PingReply(Status.APPROVED), request_id + 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(ConnectionLost, match="out of order"):
            await connection.request(Ping(), PingReply)


async def test_a_reply_of_another_type_breaks_the_connection() -> None:
    connection, peer = await greeted()

    async def answer() -> None:
        await peer.send(encode(BalanceReply(Status.APPROVED, 1), await peer.receive_request_id()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(ConnectionLost, match="PING answered with BALANCE_REPLY"):
            await connection.request(Ping(), PingReply)


async def test_a_greeting_that_is_not_hello_fails_the_connect() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(encode(Shutdown(3)))
    with pytest.raises(ConnectFailed, match="not HELLO") as raised:
        await Connection.handshake(client)
    assert_customer_words(text.ending(raised.value))  # the engine's words are for debugging


async def test_error_frame_answers_the_request() -> None:
    connection, peer = await greeted()

    async def answer() -> None:
        await peer.send(encode(Error(Status.FORMAT_ERROR), await peer.receive_request_id()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert await connection.request(Ping(), PingReply) == Error(Status.FORMAT_ERROR)


async def test_session_expired_during_a_request_raises() -> None:
    connection, peer = await greeted()

    async def expire() -> None:
        await peer.receive_request_id()
        await peer.send(encode(SessionExpiredNotice()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expire)
        with pytest.raises(SessionExpired):
            await connection.request(Ping(), PingReply)


async def test_reply_timeout(autojump_clock: trio.abc.Clock) -> None:
    connection, _ = await greeted()
    start = trio.current_time()
    with pytest.raises(ReplyTimeout):
        await connection.request(Ping(), PingReply)
    assert trio.current_time() - start == pytest.approx(REPLY_TIMEOUT_S)


async def test_hello_timeout(autojump_clock: trio.abc.Clock) -> None:
    client, _server = trio.testing.memory_stream_pair()
    with pytest.raises(ConnectFailed, match="did not answer within") as raised:
        await Connection.handshake(client)
    assert_customer_words(text.ending(raised.value))
    assert trio.current_time() == pytest.approx(HELLO_TIMEOUT_S)


async def test_a_silent_plaintext_greeting_suggests_tls() -> None:
    """A bank serving TLS accepts a plaintext ATM and waits for a TLS hello that never
    comes: silence is all the ATM sees, so the sentence names the likely cause."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _say_nothing, listeners)
        with pytest.raises(ConnectFailed) as raised:
            await Connection.open("127.0.0.1", port, hello_timeout_s=0.2)
        nursery.cancel_scope.cancel()
    assert raised.value.reason == (
        "the bank did not answer within 0.2 s (if the bank serves TLS, start this ATM"
        " with --tls-ca)"
    )
    assert_customer_words(text.ending(raised.value))


async def _say_nothing(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


async def test_busy_bank_refuses_the_connection() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(encode(Error(Status.SERVER_BUSY)))
    with pytest.raises(ServerBusy):
        await Connection.handshake(client)


async def test_other_protocol_version_is_refused() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(with_version(encode(HELLO), 2))
    with pytest.raises(IncompatibleVersion, match="version 2"):
        await Connection.handshake(client)


async def test_a_bad_version_after_hello_is_a_broken_connection() -> None:
    """Only the greeting is judged for its version; later, it is damage."""
    connection, peer = await greeted()

    async def answer() -> None:
        request_id = await peer.receive_request_id()
        await peer.send(with_version(encode(PingReply(Status.APPROVED), request_id), 2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(ConnectionLost, match="could not be read") as raised:
            await connection.request(Ping(), PingReply)
    assert_customer_words(text.ending(raised.value))


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "closed the connection"), (b"HTTP/1.1 400\r\n", "could not be read")],
)
async def test_closed_or_garbled_connection_is_lost(data: bytes, match: str) -> None:
    connection, peer = await greeted()
    await peer.send(data)
    await peer.stream.aclose()
    with pytest.raises(ConnectionLost, match=match):
        await connection.watch()


async def test_watch_raises_on_notices() -> None:
    connection, peer = await greeted()
    await peer.send(encode(SessionExpiredNotice()))
    with pytest.raises(SessionExpired):
        await connection.watch()


async def test_open_reports_a_refused_connect() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # Bound but not listening: connects are refused.
        port = sock.getsockname()[1]
        with pytest.raises(ConnectFailed) as raised:
            await Connection.open("127.0.0.1", port)
    assert raised.value.reason == f"could not reach 127.0.0.1:{port}: Connection refused"


def test_an_os_error_is_described_in_the_oss_words_only() -> None:
    """trio words a refused connect with a Python tuple; the customer gets the reason."""
    error = OSError(errno.ECONNREFUSED,
                    "Error connecting to ('127.0.0.1', 47399): Connection refused")
    assert _describe(error) == "Connection refused"


def test_a_broken_stream_is_described_in_the_oss_words_only() -> None:
    """trio words a reset connection as "socket connection broken: [Errno 104] ...",
    raised from the OSError; the customer reads the OS's words alone."""
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        except OSError as reset:
            raise trio.BrokenResourceError(f"socket connection broken: {reset}") from reset
    except trio.BrokenResourceError as error:
        assert _describe(error) == "Connection reset by peer"


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "bank..example"])
async def test_open_reports_a_host_name_that_cannot_be_looked_up(host: str) -> None:
    with pytest.raises(ConnectFailed, match="not a valid host name") as raised:
        await Connection.open(host, 65432)
    assert raised.value.reason.startswith(f"could not reach {host}:65432: ")


async def test_open_over_tcp() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        connection = await Connection.open("127.0.0.1", port)
        assert connection.hello == HELLO
        assert await connection.request(Ping(), PingReply) == PingReply(Status.APPROVED)
        await connection.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("reply_after_s", "told_at"), [
    (STILL_WORKING_AFTER_S - 1, []),
    (STILL_WORKING_AFTER_S + 3, [STILL_WORKING_AFTER_S]),  # once, however long it takes
])
async def test_a_slow_reply_is_announced_once(
    autojump_clock: trio.abc.Clock, reply_after_s: float, told_at: list[float]
) -> None:
    connection, peer = await greeted()
    start = trio.current_time()
    told: list[float] = []

    async def answer() -> None:
        request_id = await peer.receive_request_id()
        await trio.sleep(reply_after_s)
        await peer.send(encode(PingReply(Status.APPROVED), request_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        reply = await connection.request(
            Ping(), PingReply, on_slow=lambda: told.append(trio.current_time() - start)
        )
    assert reply == PingReply(Status.APPROVED)
    assert told == pytest.approx(told_at)
