"""How a server connection moves bytes: one small interface, three ways.

``SocketTransport`` is the plaintext fast path: it reads and writes a TCP socket's file
descriptor directly. ``TlsTransport`` is TLS on that same path: the records go through
the descriptor, and an ``ssl.SSLObject`` encrypts and decrypts them in memory.
``StreamTransport`` works on any ``trio.abc.Stream``: memory streams in tests, or
``trio.SSLStream``. ``bank.server.Connection`` sees only ``Transport``, so every path
runs the same conversation code.

TLS is served as ``trio.SSLStream`` serves it with ``https_compatible=True``: an end of
stream without a TLS close_notify is read as an ordinary end of stream, and closing
sends none. That is safe
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

    async def abort(self) -> None:
        """Close at once, without the drain: for a connection not worth a lingering
        socket (one evicted to make room). Our last frame may be lost to a reset."""
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

    trio is given the descriptor itself to wait on, not the socket (whose ``fileno()``
    it would call on every wait); the socket stays open as long as this transport
    waits, since only ``aclose`` or ``abort`` closes it, after the last wait.
    """

    __slots__ = ("_fd", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()

    async def handshake(self) -> None:
        return None

    async def receive_some(self) -> bytes:
        fd = self._fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, RECEIVE_BYTES_MAX)
            except BlockingIOError:  # woken with nothing to read after all: wait again
                continue

    async def send_all(self, data: bytes) -> None:
        try:
            sent = os.write(self._fd, data)  # a reply nearly always fits at once
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await self._send_rest(data, sent)

    async def _send_rest(self, data: bytes, sent: int) -> None:
        """The socket's buffer is full (``sent`` bytes of ``data`` went): wait for room,
        as often as it takes."""
        with memoryview(data) as view:
            while sent < len(view):
                await trio.lowlevel.wait_writable(self._fd)
                try:
                    sent += os.write(self._fd, view[sent:])
                except BlockingIOError:  # woken with no room after all: wait again
                    continue

    async def aclose(self) -> None:
        await close_gracefully(self.stream)

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)


class StreamTransport:
    """Any Trio stream: a memory stream in tests, or ``trio.SSLStream``."""

    __slots__ = ("stream",)

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

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)


class HandshakeFailed(Exception):
    """The TLS handshake failed; the message is one plain sentence for the operator."""


class TlsTransport:
    """TLS over a TCP socket, as ``trio.SSLStream`` does it (https_compatible: see the
    module docstring). The handshake is explicit, so that the server bounds it by the
    connection's login deadline and knows the terminal before the protocol starts.

    It drives an ``ssl.SSLObject`` over two memory BIOs itself, as ``SSLStream`` does,
    but moves the records with ``SocketTransport``'s reads and writes of the descriptor.
    ``SSLStream`` cost the server more per request than the rest of the TLS path together
    (BENCHMARKS.md, section TLS): a lock, and with it a trip through the scheduler, on
    every read and every send, and before every read a failed read of the socket and a
    failed read of the TLS object, each an exception. What ``SSLStream`` does that
    matters here is kept: a TLS 1.3 server's session tickets wait for its first send, as
    OpenSSL's own timing of them can deadlock a client (trio issue 819); a failed
    handshake sends no alert; only a connection whose TLS is intact is drained before
    it closes. Reads never send: what reading makes TLS owe the peer (a key update's
    answer) leaves with the next send, the reply. Sends do not yield unless the socket's
    buffer is full, as on the plaintext path.
    """

    __slots__ = ("_incoming", "_intact", "_outgoing", "_socket", "_tls", "stream")

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.stream = stream
        self._socket = SocketTransport(stream)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._intact = False
        """Handshake done, and no TLS error or cut-short send since: only then does
        closing drain the peer (as ``SSLStream``, which is broken otherwise)."""

    async def handshake(self) -> str | None:
        """The terminal's identity from its verified certificate (None without one)."""
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if self._incoming.eof:  # a bound: OpenSSL raises SSLEOFError instead
                        raise HandshakeFailed(
                            "the other side closed the connection during the TLS handshake"
                        ) from None
                    await self._flush()
                    if not await self._receive_records():
                        self._incoming.write_eof()  # do_handshake now says how it failed
            if self._tls.version() != "TLSv1.3":
                await self._flush()  # TLS 1.2: the server's Finished, which the peer awaits
        except OSError as error:  # ssl.SSLError, or the socket's own (a reset, say)
            _kind, sentence = describe_verification_error(error)
            raise HandshakeFailed(sentence) from None
        self._intact = True
        return peer_identity(self._tls)

    async def receive_some(self) -> bytes:
        while True:
            # Only with bytes at hand: a read of the TLS object that can only fail costs
            # an exception. At a close_notify it returns b"".
            if self._incoming.pending or self._tls.pending():
                try:
                    return self._tls.read(RECEIVE_BYTES_MAX)
                except ssl.SSLWantReadError:  # part of a record: read on
                    pass
                except ssl.SSLError:
                    self._intact = False
                    raise
            data = await self._socket.receive_some()  # _receive_records, a layer less
            if not data:
                return b""  # the TCP end of stream, with or without a close_notify
            self._incoming.write(data)

    async def send_all(self, data: bytes) -> None:
        try:
            self._tls.write(data)  # into the memory BIO: never blocks
            records = self._outgoing.read()  # _flush, a layer less per reply
            if records:
                await self._socket.send_all(records)
        except BaseException:
            self._intact = False
            raise

    async def aclose(self) -> None:
        if self._intact:
            await self._socket.aclose()
        else:
            await self.abort()

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def _flush(self) -> None:
        """Send what TLS has written into the outgoing BIO."""
        records = self._outgoing.read()
        if records:
            await self._socket.send_all(records)

    async def _receive_records(self) -> int:
        """Move the peer's next bytes into the incoming BIO; how many (0 at its end)."""
        data = await self._socket.receive_some()
        self._incoming.write(data)
        return len(data)


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
