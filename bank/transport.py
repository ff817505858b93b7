"""How a server connection moves bytes: one small interface, two ways.

``SocketTransport`` is the plaintext fast path: it reads and writes a TCP socket's file
descriptor directly. ``StreamTransport`` works on any ``trio.abc.Stream``: TLS
(``trio.SSLStream``) in production, memory streams in tests. ``bank.server.Connection``
sees only ``Transport``, so both paths run the same conversation code.

TLS streams are opened with ``https_compatible=True``: an end of stream without a TLS
close_notify is read as an ordinary end of stream, and closing sends none. That is safe
here because every frame carries its own length and CRC: a cut can only lose whole
frames, never make a partial one look complete, and a lost frame is what a dropped TCP
connection also loses (spec/PROTOCOL.md section 10). It lets a TLS connection close
exactly as a plaintext one does: a TCP end of stream, a bounded drain, then the close.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import Protocol

import trio

from bank.tls import describe_verification_error, peer_identity

RECEIVE_BYTES_MAX = 4096
"""Bytes asked of the peer per read: bounds what one read can add to the buffer."""

CLOSE_LINGER_S = 1.0
"""Seconds spent draining a peer's unread bytes before closing, so that our last frame
is not destroyed by a TCP reset (closing a socket with unread input sends RST)."""

CLOSE_DRAIN_BYTES_MAX = 64 * 1024
"""Most bytes read and discarded while lingering before close."""


class Transport(Protocol):
    async def handshake(self) -> str | None:
        """Set up what the stream needs before the protocol starts (a TLS handshake);
        the peer's verified identity, if it has one. Raises ``HandshakeFailed``."""
        ...

    async def receive_some(self) -> bytes | bytearray:
        """What the peer sent next, at most RECEIVE_BYTES_MAX bytes; empty at its end.
        Cancelling a wait loses no bytes."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Send all of ``data``; a cancelled send leaves the transport unusable."""
        ...

    async def aclose(self) -> None:
        """End the stream, drain the peer (bounded), close; runs even when cancelled."""
        ...


class SocketTransport:
    """A plain TCP socket, read and written through its file descriptor.

    ``os.read`` and ``os.write`` after trio's ``wait_readable`` and ``wait_writable``,
    as ``trio.lowlevel.FdStream`` does; a socket is a file descriptor on POSIX, which
    this server (like the ATM's terminal handling) requires. trio's socket methods
    instead try the call first and checkpoint after it: a request's read usually failed
    first (the next request has rarely arrived just after a reply), and each checkpoint
    is a trip through the scheduler (BENCHMARKS.md has what this saved). Sends do not
    yield unless the socket's buffer is full. A socket error is an ``OSError``.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._socket = stream.socket
        self._fd = self._socket.fileno()

    async def handshake(self) -> None:
        return None

    async def receive_some(self) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self._socket)
            try:
                return os.read(self._fd, RECEIVE_BYTES_MAX)
            except BlockingIOError:  # woken with nothing to read after all: wait again
                continue

    async def send_all(self, data: bytes) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += os.write(self._fd, view[sent:])
                except BlockingIOError:  # the peer is not reading: wait for room
                    await trio.lowlevel.wait_writable(self._socket)

    async def aclose(self) -> None:
        await close_gracefully(self.stream)


class StreamTransport:
    """Any Trio stream: a memory stream in tests, or, as ``TlsTransport``, TLS."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def handshake(self) -> str | None:
        return None

    async def receive_some(self) -> bytes | bytearray:
        return await self.stream.receive_some(RECEIVE_BYTES_MAX)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await close_gracefully(self.stream)


class HandshakeFailed(Exception):
    """The TLS handshake failed; the message is one plain sentence for the operator."""


class TlsTransport(StreamTransport):
    """TLS over a TCP socket, as ``trio.SSLStream`` does it (https_compatible: see the
    module docstring). The handshake is explicit, so that the server bounds it by the
    connection's login deadline and knows the terminal before the protocol starts."""

    stream: trio.SSLStream[trio.SocketStream]

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext) -> None:
        super().__init__(trio.SSLStream(stream, context, server_side=True, https_compatible=True))

    async def handshake(self) -> str | None:
        """The terminal's identity from its verified certificate (None without one)."""
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as error:
            _kind, sentence = describe_verification_error(error)
            raise HandshakeFailed(sentence) from None
        return peer_identity(self.stream)


async def close_gracefully(stream: trio.abc.Stream) -> None:
    """Send an end of stream, drain what the peer still sends (bounded), then close.

    Closing a socket with unread input makes the kernel send RST, which can destroy the
    last frame we sent before the peer reads it. Under TLS the end of stream is the TCP
    one (see the module docstring), and the drain reads, and drops, TLS records.
    """
    half: trio.abc.Stream = stream.transport_stream if isinstance(stream, trio.SSLStream) \
        else stream
    try:
        with (
            trio.move_on_after(CLOSE_LINGER_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            if isinstance(half, trio.abc.HalfCloseableStream):
                await half.send_eof()
            drained = 0
            while drained < CLOSE_DRAIN_BYTES_MAX:
                data = await stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    break
                drained += len(data)
    finally:
        await trio.aclose_forcefully(stream)  # closes even when cancelled
