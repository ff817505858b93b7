"""``bank.transport.TlsTransport`` on its own, against the ATM's kind of client
(``trio.SSLStream``, https_compatible) over a socket pair.

The transport drives an ``ssl.SSLObject`` itself instead of wrapping the connection in
``trio.SSLStream``, so what ``SSLStream`` would do for it is checked here: records split
across reads and several in one read, TLS 1.3 session tickets held until the first send,
TLS 1.2's last flight sent, both ends of stream, a damaged record, a failed handshake
(no alert) and a peer gone mid-handshake; and a connection whose TLS broke closes at
once, without the drain an intact one gets. The whole server over TLS is tested in
``test_tls.py``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from bank.tls import TlsFiles, client_context, init_ca_and_server, issue_terminal, server_context
from bank.transport import HandshakeFailed, TlsTransport

HANG_S = 10
"""A bound on each test's waits: reached only if the transport hangs."""


@pytest.fixture
def pki(tmp_path: Path) -> TlsFiles:
    return init_ca_and_server(tmp_path / "tls", ["127.0.0.1"])


@pytest.fixture
def terminal(pki: TlsFiles, tmp_path: Path) -> TlsFiles:
    return issue_terminal(tmp_path / "tls", "atm-7")


class Tap(trio.abc.Stream):
    """The client's side of the socket, able to hold back what the client sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.held: bytearray | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.held is None:
            await self.stream.send_all(data)
        else:
            self.held += data
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


def pair(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext, *, https_compatible: bool = True
) -> tuple[TlsTransport, trio.SSLStream[Tap], Tap]:
    server_socket, client_socket = trio.socket.socketpair()
    tap = Tap(trio.SocketStream(client_socket))
    client = trio.SSLStream(
        tap, client_tls, server_hostname="127.0.0.1", https_compatible=https_compatible
    )
    return TlsTransport(trio.SocketStream(server_socket), server_tls), client, tap


async def handshake(server: TlsTransport, client: trio.SSLStream[Tap]) -> str | None:
    identity = None

    async def serve() -> None:
        nonlocal identity
        identity = await server.handshake()

    with trio.fail_after(HANG_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(client.do_handshake)
    return identity


async def receive_exactly(server: TlsTransport, count: int) -> bytes:
    data = b""
    with trio.fail_after(HANG_S):
        while len(data) < count:
            chunk = await server.receive_some()
            assert chunk, f"end of stream after {data!r}"
            data += chunk
    return data


async def closes_at_once(server: TlsTransport) -> bool:
    """Whether ``aclose`` is done before anything else happens: no drain of the peer."""
    closed = trio.Event()

    async def close() -> None:
        await server.aclose()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        at_once = closed.is_set()
        nursery.cancel_scope.cancel()
    return at_once


def mutual(pki: TlsFiles) -> ssl.SSLContext:
    return server_context(pki.cert, pki.key, client_ca=pki.ca)


def atm(pki: TlsFiles, terminal: TlsFiles | None) -> ssl.SSLContext:
    if terminal is None:
        return client_context(pki.ca, cert=None, key=None)
    return client_context(pki.ca, cert=terminal.cert, key=terminal.key)


async def test_requests_and_replies_cross_in_records_however_they_are_read(
    pki: TlsFiles, terminal: TlsFiles
) -> None:
    server, client, tap = pair(mutual(pki), atm(pki, terminal))
    assert await handshake(server, client) == "CN=atm-7"
    # The first send carries the session tickets held since the handshake: the client
    # reads past them to the data.
    await server.send_all(b"HELLO")
    assert await client.receive_some() == b"HELLO"
    # Three records in one read of the socket.
    for part in (b"one", b"two", b"three"):
        await client.send_all(part)
    assert await receive_exactly(server, 11) == b"onetwothree"
    # One record in two reads: the first part alone gives nothing.
    tap.held = bytearray()
    await client.send_all(b"a request")
    record, tap.held = bytes(tap.held), None
    received: list[bytes] = []

    async def receive() -> None:
        received.append(await server.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await tap.stream.send_all(record[:7])
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        await tap.stream.send_all(record[7:])
    assert received == [b"a request"]
    await server.send_all(b"a reply")
    assert await client.receive_some() == b"a reply"
    await client.aclose()
    await server.aclose()


async def test_tls_1_2_handshake_sends_the_servers_last_flight(
    pki: TlsFiles, terminal: TlsFiles
) -> None:
    client_tls = atm(pki, terminal)
    client_tls.maximum_version = ssl.TLSVersion.TLSv1_2
    server_tls = server_context(pki.cert, pki.key, client_ca=pki.ca, tls12=True)
    server, client, _tap = pair(server_tls, client_tls)
    assert await handshake(server, client) == "CN=atm-7"
    assert client.version() == "TLSv1.2"
    await client.send_all(b"ping")
    assert await receive_exactly(server, 4) == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("close_notify", [False, True])
async def test_the_peers_end_of_stream_ends_it_with_or_without_close_notify(
    pki: TlsFiles, terminal: TlsFiles, close_notify: bool
) -> None:
    server, client, _tap = pair(mutual(pki), atm(pki, terminal), https_compatible=not close_notify)
    await handshake(server, client)
    await client.send_all(b"bye")
    await client.aclose()  # sends close_notify unless https_compatible
    assert await receive_exactly(server, 3) == b"bye"
    with trio.fail_after(HANG_S):
        assert await server.receive_some() == b""
    await server.aclose()


async def test_a_damaged_record_is_an_error_and_the_connection_closes_at_once(
    pki: TlsFiles, terminal: TlsFiles
) -> None:
    server, client, tap = pair(mutual(pki), atm(pki, terminal))
    await handshake(server, client)
    await server.send_all(b"HELLO")
    assert await client.receive_some() == b"HELLO"
    tap.held = bytearray()
    await client.send_all(b"a deposit of $20.00")
    record = bytearray(tap.held)
    record[-1] ^= 0x01  # the authentication tag no longer matches
    await tap.stream.send_all(record)
    with trio.fail_after(HANG_S), pytest.raises(ssl.SSLError):
        await server.receive_some()
    assert await closes_at_once(server)  # no drain: the peer is not honest
    await client.aclose()


async def test_an_intact_connection_is_drained_before_it_closes(
    pki: TlsFiles, terminal: TlsFiles
) -> None:
    server, client, _tap = pair(mutual(pki), atm(pki, terminal))
    await handshake(server, client)
    assert not await closes_at_once(server)  # lingers for the client's last bytes
    await client.aclose()


async def test_a_terminal_without_a_certificate_fails_the_handshake_and_gets_no_alert(
    pki: TlsFiles,
) -> None:
    server, client, _tap = pair(mutual(pki), atm(pki, None))
    with trio.fail_after(HANG_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)  # TLS 1.3: completes on its side
            with pytest.raises(HandshakeFailed, match="certificate"):
                await server.handshake()
    assert await closes_at_once(server)
    with trio.fail_after(HANG_S):
        assert await client.receive_some() == b""  # an end of stream, not an alert
    await client.aclose()


async def test_a_peer_gone_mid_handshake_is_named_as_such(pki: TlsFiles) -> None:
    server_socket, client_socket = trio.socket.socketpair()
    server = TlsTransport(trio.SocketStream(server_socket), mutual(pki))
    await client_socket.send(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
    client_socket.close()
    with trio.fail_after(HANG_S), pytest.raises(HandshakeFailed, match="closed the connection"):
        await server.handshake()
    assert await closes_at_once(server)


class AlwaysWantsToRead:
    """An SSL object that never finishes its handshake, even at the end of the stream."""

    def do_handshake(self) -> None:
        raise ssl.SSLWantReadError


async def test_a_handshake_that_waits_past_the_end_of_stream_fails_instead_of_spinning(
    pki: TlsFiles,
) -> None:
    """OpenSSL raises SSLEOFError once the peer has gone; the loop is bounded anyway."""
    server_socket, client_socket = trio.socket.socketpair()
    server = TlsTransport(trio.SocketStream(server_socket), mutual(pki))
    server._tls = AlwaysWantsToRead()  # type: ignore[assignment]
    client_socket.close()
    with trio.fail_after(HANG_S), pytest.raises(HandshakeFailed, match="closed the connection"):
        await server.handshake()
    await server.aclose()
