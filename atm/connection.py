"""One TCP connection to the bank: the Trio shell around the sans-IO ``wire.Connection``.

The protocol engine checks the conversation (HELLO first, each reply answering our
request with its reply type, notices, the session's state); this shell moves bytes,
bounds every wait, and turns what goes wrong into sentences for the customer.

Everything the network can do wrong comes out of here as an ``atm.errors.SessionEnded``
subclass, never as a Trio or OS exception, and every wait is bounded, so the session
above can print one clear sentence and exit with a meaningful status.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from typing import NoReturn, TypeVar

import trio

from atm.errors import (
    ConnectFailed,
    ConnectionLost,
    IncompatibleVersion,
    ReplyTimeout,
    ServerBusy,
    ServerShutdown,
    SessionExpired,
    TlsFailed,
)
from bank.tls import TlsFailure, describe_verification_error
from wire import (
    Answer,
    Error,
    Feature,
    Frame,
    Hello,
    RemoteProtocolError,
    Reply,
    Request,
    Sender,
    Shutdown,
    State,
    Status,
    WireError,
)
from wire import Connection as Engine
from wire import SessionExpired as SessionExpiredNotice

CONNECT_TIMEOUT_S = 10
"""How long a TCP connect may take before we tell the customer the bank is unreachable."""

HELLO_TIMEOUT_S = 10
"""How long the bank may take to greet us after the TCP connect."""

REPLY_TIMEOUT_S = 15
"""How long one request may wait for its reply; longer than the bank's usual frame timeout."""

STILL_WORKING_AFTER_S = 2
"""How long a reply may take before the customer is told the ATM is still working on it
(``request``'s ``on_slow``): long enough that a quick answer needs no word of waiting."""

CLOSE_TIMEOUT_S = 2
"""How long closing may take; closing runs shielded, so it needs its own bound."""

RECEIVE_BYTES_MAX = 4096
"""Bytes asked of the socket per read; a whole frame is at most about 1 KiB."""

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

ReplyT = TypeVar("ReplyT", bound=Reply)

PLAINTEXT_SILENCE_HINT = "if the bank serves TLS, start this ATM with --tls-ca"
"""Added to a plaintext connection's silent greeting: a TLS bank waits for a TLS hello
that a plaintext ATM never sends, while this ATM waits for the bank's HELLO, so the
mismatch shows as silence only (the other way round the ATM can name it)."""


class _NoGreeting(ConnectFailed):
    """The bank accepted the connection and said nothing within the greeting's time."""


class Connection:
    """A greeted connection: ``hello`` holds the bank's limits.

    Build one with ``open`` (TCP) or ``handshake`` (any Trio stream, which is how the
    tests use memory streams). After any ``SessionEnded`` the connection is unusable
    and should be closed.
    """

    def __init__(self, stream: trio.abc.Stream, *, reply_timeout_s: float) -> None:
        self._stream = stream
        self._engine = Engine(Sender.CLIENT)
        self._reply_timeout_s = reply_timeout_s
        self.shutdown: Shutdown | None = None
        """A SHUTDOWN that arrived while we waited for a reply; the session ends after it."""
        self.features: Feature | None = None
        """What the bank answered FEATURES with on this connection; None until asked."""

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> Connection:
        """Connect over TCP (inside TLS with ``tls``, the server's certificate checked for
        ``host``) and read the bank's HELLO."""
        with trio.move_on_after(connect_timeout_s) as scope:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as error:
                reason = _describe(_root_cause(error))
                raise ConnectFailed(f"could not reach {host}:{port}: {reason}") from None
            except ValueError as error:  # UnicodeError: a label over 63 characters, ...
                reason = _describe(error.__cause__ or error)
                raise ConnectFailed(
                    f"could not reach {host}:{port}: not a valid host name ({reason})"
                ) from None
            if tls is not None:
                secure = await _secure(stream, tls, host)
        if scope.cancelled_caught:
            raise ConnectFailed(f"could not reach {host}:{port} within {connect_timeout_s} s")
        try:
            return await cls.handshake(
                secure if tls is not None else stream,
                hello_timeout_s=hello_timeout_s, reply_timeout_s=reply_timeout_s,
            )
        except _NoGreeting as silent:
            if tls is not None:
                raise
            raise ConnectFailed(f"{silent.reason} ({PLAINTEXT_SILENCE_HINT})") from None

    @classmethod
    async def handshake(
        cls,
        stream: trio.abc.Stream,
        *,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> Connection:
        """Wrap ``stream`` and wait for HELLO; the stream is closed if that fails."""
        connection = cls(stream, reply_timeout_s=reply_timeout_s)
        try:
            await connection._receive_hello(hello_timeout_s)
        except ConnectionLost as lost:
            await connection.aclose()
            # Under TLS 1.3 the bank's refusal of this terminal comes after the handshake:
            # the first read fails, or simply ends. (Not a timeout: ConnectFailed.)
            if isinstance(stream, trio.SSLStream) and type(lost) is ConnectionLost:
                raise _tls_failure(lost) from None
            raise
        except BaseException:
            await connection.aclose()
            raise
        return connection

    async def _receive_hello(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            message = (await self._receive_event()).message
            if isinstance(message, Error) and message.status is Status.SERVER_BUSY:
                raise ServerBusy("the bank is busy")
            if isinstance(message, Error):
                raise ConnectFailed("the bank refused the connection", status=message.status)
            return
        raise _NoGreeting(f"the bank did not answer within {timeout_s} s")

    @property
    def session_token(self) -> bytes | None:
        """The token that resumes this connection's session elsewhere, once the bank has
        sent it (after an approved LOGIN or RESUME) and while the session is open."""
        return self._engine.session_token

    @property
    def hello(self) -> Hello | None:
        """The bank's greeting, with its limits: never None once ``handshake`` returned."""
        return self._engine.hello

    @property
    def amount_cents_max(self) -> int:
        """The largest amount the bank accepts, from its HELLO."""
        assert self.hello is not None, "a Connection is only handed out after HELLO"
        return self.hello.amount_cents_max

    @property
    def history_entries_max(self) -> int:
        """The most history entries one request may ask for, from the bank's HELLO."""
        assert self.hello is not None, "a Connection is only handed out after HELLO"
        return self.hello.history_entries_max

    @property
    def idle_timeout_s(self) -> int:
        """How long the bank keeps an idle session (and its lease), from its HELLO."""
        assert self.hello is not None, "a Connection is only handed out after HELLO"
        return self.hello.idle_timeout_s

    async def request(self, message: Request, reply_type: type[ReplyT], *,
                      on_slow: Callable[[], object] | None = None) -> ReplyT | Error:
        """Send ``message`` and return the bank's answer to it: ``reply_type``, which the
        engine has checked, or an ERROR frame when the bank could not decode the request
        (its status is never APPROVED, so checking ``status`` covers both).

        ``on_slow`` is called once if the answer takes over ``STILL_WORKING_AFTER_S``.
        A SHUTDOWN met on the way is kept in ``self.shutdown``: the bank still answers
        requests during its grace period, so the reply is worth waiting for.
        """
        with trio.move_on_after(self._reply_timeout_s):
            try:
                data = self._engine.send(message)
            except WireError as error:  # LocalProtocolError: the session has ended
                raise ConnectionLost("the session has ended", detail=error.detail) from None
            await self._send(data)
            if on_slow is not None:
                # Cancelling the wait loses nothing: see ``watch``.
                with trio.move_on_after(STILL_WORKING_AFTER_S):
                    return await self._receive_answer(reply_type)
                on_slow()
            return await self._receive_answer(reply_type)
        raise ReplyTimeout(f"no reply within {self._reply_timeout_s} s")

    async def _receive_answer(self, reply_type: type[ReplyT]) -> ReplyT | Error:
        while True:
            event = await self._receive_event()
            if isinstance(event, Answer):
                answer = event.message
                assert isinstance(answer, (reply_type, Error)), "the engine checks the type"
                return answer
            self._take_notice(event)

    def _take_notice(self, frame: Frame) -> None:
        """Remember a SHUTDOWN; raise for a notice that ends the session now."""
        message = frame.message
        if isinstance(message, Shutdown):
            self.shutdown = message
        elif isinstance(message, SessionExpiredNotice):
            raise SessionExpired("idle timeout")
        elif isinstance(message, Error) and self._engine.state is State.CLOSED:
            raise ConnectionLost("the bank reported an error", status=message.status)
        # Anything else (a second HELLO, an ERROR about a frame that was not ours and
        # left the session open) carries nothing we act on.

    def raise_if_shutting_down(self) -> None:
        """End the session if a SHUTDOWN arrived while we were busy with a request."""
        if self.shutdown is not None:
            raise ServerShutdown(self.shutdown.grace_s)

    async def watch(self) -> NoReturn:
        """Wait for a notice while the customer thinks; raises when the session must end.

        Cancelling this is safe: a cancelled read loses no bytes, and a partly received
        frame stays in the decoder for the next read.
        """
        while True:
            self.raise_if_shutting_down()
            event = await self._receive_event()
            if isinstance(event, Frame):
                self._take_notice(event)

    async def _receive_event(self) -> Frame | Answer:
        while True:
            try:
                event = self._engine.next_event()
            except RemoteProtocolError as error:
                # Only the greeting is judged for its version: after an accepted HELLO a
                # changed version byte is damage, and reconnecting meets a real change
                # at the next HELLO.
                if error.status is Status.UNSUPPORTED_VERSION and self.hello is None:
                    raise IncompatibleVersion(error.detail) from None
                if not error.fatal:
                    continue  # One intact frame we do not know (a newer peer's): skip it.
                if self.hello is None:
                    raise ConnectFailed("the bank answered in a way this ATM cannot read",
                                        detail=error.detail) from None
                raise ConnectionLost("the bank's answer could not be read",
                                     detail=error.detail) from None
            if event is not None:
                return event
            await self._receive_some()

    async def _receive_some(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
        except _STREAM_ERRORS as error:
            lost = ConnectionLost(f"the connection broke ({_describe(error)})")
            lost.__cause__ = error  # a TLS failure is read from it (``_tls_failure``)
            raise lost from error
        if not data:
            raise ConnectionLost("the bank closed the connection")
        self._engine.receive_data(data)

    async def _send(self, frame: bytes) -> None:
        try:
            await self._stream.send_all(frame)
        except _STREAM_ERRORS as error:
            raise ConnectionLost(f"the connection broke ({_describe(error)})") from None

    async def aclose(self) -> None:
        """Close the stream; never raises, never hangs, and runs even while cancelled."""
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            with contextlib.suppress(*_STREAM_ERRORS):
                await self._stream.aclose()


async def _secure(stream: trio.SocketStream, tls: ssl.SSLContext, host: str) -> trio.abc.Stream:
    """TLS over ``stream``, the server's certificate verified for ``host``.

    https_compatible: an end of stream without close_notify reads as an end of stream,
    safe here since every frame carries its own length and CRC (spec section 10).
    """
    secure = trio.SSLStream(stream, tls, server_hostname=host, https_compatible=True)
    try:
        await secure.do_handshake()
    except trio.BrokenResourceError as error:
        await trio.aclose_forcefully(secure)
        kind, sentence = describe_verification_error(error)
        raise TlsFailed(sentence, kind=kind) from None
    except BaseException:
        await trio.aclose_forcefully(secure)
        raise
    return secure


def _tls_failure(lost: ConnectionLost) -> TlsFailed:
    """What the bank's refusal of this terminal looks like under TLS 1.3: the handshake
    completes, and the first read fails (or, as trio's server sends no alert, ends)."""
    if lost.__cause__ is not None:
        kind, sentence = describe_verification_error(lost.__cause__)
        return TlsFailed(sentence, kind=kind)
    return TlsFailed(
        "the bank closed the connection as the secure channel opened (it may not accept"
        " this terminal's certificate, or want one)",
        kind=TlsFailure.CONNECTION_CLOSED,
    )


def _root_cause(error: OSError) -> BaseException:
    """The first underlying error: trio reports a failed connect as "all attempts to
    connect failed" caused by a group holding each address's own error."""
    cause = error.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return cause if cause is not None else error


def _describe(error: BaseException) -> str:
    """A short phrase for a stream error: the OS's words if there are any.

    From the errno where there is one: trio words a failed connect as "Error connecting
    to ('127.0.0.1', 47399): Connection refused", a Python tuple a customer need not read.
    A broken stream is the OS's error too: trio raises BrokenResourceError("socket
    connection broken: [Errno 104] Connection reset by peer") from the OSError, so its
    cause is described.
    """
    if not isinstance(error, OSError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    if isinstance(error, OSError) and error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # name lookups: their errno is negative, their words right
    return str(error) or type(error).__name__
