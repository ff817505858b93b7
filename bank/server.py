"""The bank server: one Trio task per connection, around the sans-IO ``wire.Connection``.

``Connection`` is the thin I/O shell of one session: it reads bytes under the
configured deadlines, feeds the protocol engine, asks the ``Session`` for the reply to
each request the engine lets through (the engine's refusal answers the rest) and
writes it back. ``BankServer`` accepts connections up to a limit (refusing, never
queueing, beyond it) and shuts down gracefully: stop accepting, SHUTDOWN to every
connection, a grace period, then a backstop cancel.

Connections that have not logged in cannot take every slot, so that a flood of idle
connections (which needs no account) cannot lock the ATMs out:

- one peer address (for IPv6, one /64, what a single host is usually given) may hold
  at most ``preauth_per_address_max`` connections that have not logged in; beyond it a
  new one gets SERVER_BUSY and is closed;
- when all ``connections_max`` slots are taken, a new connection evicts the oldest one
  that has not logged in and is waiting on its peer (it gets SESSION_EXPIRED, as at its
  login deadline, and is closed) instead of being refused. A logged-in session is never
  evicted; only when every slot holds one is a new connection refused.

Refusals and evictions are logged at WARNING at most once per address (or reason) per
``WARNING_INTERVAL_S``, with a count of those not logged, so a flood cannot flood the log.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import itertools
import logging
import math
import resource
import socket
import ssl
import time
from collections import Counter
from typing import Any, NoReturn, Protocol

import trio

from bank.admin import Metrics, open_admin_listeners, serve_admin
from bank.cluster_leases import ClusterLeases
from bank.config import ServerConfig
from bank.leases import Leases
from bank.ledger import Ledger
from bank.resumption import SessionRegistry
from bank.session import LeaseLost, Session
from bank.transport import (
    CLOSE_LINGER_S,
    HandshakeFailed,
    SocketTransport,
    TlsTransport,
    Transport,
    close_gracefully,
)
from wire import Connection as Engine
from wire import (
    Error,
    LoginReply,
    Message,
    RemoteProtocolError,
    Reply,
    Request,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    State,
    Status,
)

log = logging.getLogger("bank.server")

REFUSALS_MAX = 64
"""SERVER_BUSY refusals in progress at once; beyond it a socket is closed at once."""

SHUTDOWN_BACKSTOP_S = CLOSE_LINGER_S + 1.0
"""Seconds after the grace period at which connections still open are cancelled."""

EVICTIONS_MAX = 64
"""Evicted connections still closing at once; beyond it a new connection is refused,
since each one holds its socket for up to CLOSE_LINGER_S after its notice."""

WARNING_INTERVAL_S = 60.0
"""Least seconds between two WARNING lines for the same address or reason."""

WARNED_KEYS_MAX = 1024
"""Addresses (or reasons) remembered for WARNING_INTERVAL_S; the oldest are forgotten
beyond it, so a flood from many addresses cannot grow the table."""

IPV6_PREFIX_BITS = 64
"""An IPv6 peer is counted by its /64: one host usually holds a whole /64."""

OPEN_FILES_RESERVED = 32
"""Open files the server needs besides its connections' sockets: standard streams,
listeners, the database with its WAL and shared-memory files, trio's own (12 measured)."""


SWEEP_INTERVAL_S = 0.25
"""Least seconds between two sweeps of the connections' deadlines: a deadline is
enforced when it passes, or up to this much later when another was enforced just before.
Timeouts are whole seconds, so this is well inside their precision."""


class Ending(enum.Enum):
    """Why a connection ends before its session does; the value is for the operator log."""

    PEER_CLOSED = "peer closed the connection"
    IDLE = "idle timeout"
    LOGIN_TIMEOUT = "login timeout: not logged in in time"
    FRAME_TIMEOUT = "frame not completed in time"
    GRACE_OVER = "shutdown grace period over"
    SEND_TIMEOUT = "peer did not read a reply in time"
    EVICTED = "evicted: not logged in, and the server is full"
    HANDSHAKE_TIMEOUT = "TLS handshake not completed in time"
    HANDSHAKE_FAILED = "TLS handshake failed"
    SUPERSEDED = "superseded: the ATM resumed its session on a new connection"
    LEASE_LOST = "lease lost: another bank process took the account's session over"


class ConnectionEnded(Exception):
    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.value)
        self.ending = ending


class Interrupt(enum.Enum):
    """Why a connection's serving scope was cancelled."""

    DEADLINE = "deadline"  # the sweeper found the current wait's deadline passed
    SHUTDOWN = "shutdown"  # begin_shutdown woke a read so that the notice goes out now


class Watched(Protocol):
    """What the sweeper needs of a connection."""

    deadline: float
    """When the current wait gives up (trio clock); infinity when nothing waits."""

    def expire(self) -> None:
        """``deadline`` has passed: interrupt the wait."""
        ...


class DeadlineSweeper:
    """One task enforces every connection's deadline, instead of a timer per wait.

    A connection waits on its peer twice per request: to read it and to send the reply.
    A ``trio.CancelScope`` with a deadline around each wait cost about an eighth of the
    server's time per request under 100 sessions (BENCHMARKS.md). Here a wait costs two
    attribute writes: the connection sets its ``deadline`` and the sweeper, asleep until
    the soonest one, calls ``expire`` on each connection whose deadline has passed. A
    sweep reads every watched connection, so sweeps are at least ``SWEEP_INTERVAL_S``
    apart.
    """

    def __init__(self) -> None:
        self._watched: set[Watched] = set()
        self.wake_at = math.inf
        self._earliest_wake = -math.inf
        self._sleep = trio.CancelScope()

    def watch(self, connection: Watched) -> None:
        self._watched.add(connection)
        self.hurry(connection.deadline)

    def forget(self, connection: Watched) -> None:
        self._watched.discard(connection)

    def hurry(self, deadline: float) -> None:
        """A watched deadline moved: wake by then if that is sooner than planned."""
        if deadline < self.wake_at:
            self.wake_at = max(deadline, self._earliest_wake)
            self._sleep.deadline = self.wake_at

    async def run(self) -> None:
        """Sweep whenever a deadline is due, until cancelled."""
        while True:
            now = trio.current_time()
            soonest = math.inf
            for connection in self._watched:
                if connection.deadline <= now:
                    connection.expire()
                elif connection.deadline < soonest:
                    soonest = connection.deadline
            self._earliest_wake = now + SWEEP_INTERVAL_S
            self.wake_at = max(soonest, self._earliest_wake)
            with trio.CancelScope(deadline=self.wake_at) as self._sleep:
                await trio.sleep_forever()


# The states and status the loop compares with on every request: an enum member looked
# up on its class costs about 0.1 us (timeit), a module constant a fraction of that.
_CLOSED = State.CLOSED
_AUTHENTICATED = State.AUTHENTICATED
_APPROVED = Status.APPROVED

_LOGIN_REPLIES = (LoginReply, ResumeReply)
"""Replies after which an approved session has logged in."""


class ConnectionEvents(Protocol):
    """What a connection tells its server (``BankServer``); one object for all of them,
    not a callback per connection, which an idle session would pay for in memory."""

    def on_login(self, connection: Connection) -> None:
        """``connection`` has just logged in (or resumed a session)."""
        ...

    def on_handshake_failed(self, connection: Connection, reason: str) -> None:
        """``connection``'s TLS handshake failed, for ``reason`` (one sentence)."""
        ...

    def on_bad_frame(self, connection: Connection, problem: str) -> None:
        """``connection``'s peer sent a frame the engine refused."""
        ...


class _NoEvents:
    """Events no one listens to: a connection served without a ``BankServer``."""

    def on_login(self, connection: Connection) -> None:
        pass

    def on_handshake_failed(self, connection: Connection, reason: str) -> None:
        pass

    def on_bad_frame(self, connection: Connection, problem: str) -> None:
        pass


NO_EVENTS: ConnectionEvents = _NoEvents()


class Connection:
    """Serves one connection: reads requests, asks the session, sends replies.

    Every wait on the peer has a deadline in ``deadline`` (infinity while the session
    works on a request), enforced by a ``DeadlineSweeper`` through ``expire``: the
    read of a request by the session's idle or login deadline, a begun frame's frame
    deadline and the shutdown grace period, whichever comes first; the send of a reply
    by frame_timeout_s. Both cancel ``_scope``, which lasts until such an interrupt.

    What a request costs is kept flat (BENCHMARKS.md, "Where the bank's CPU per
    operation goes"): one coroutine answers and sends, so that no layer of awaits is
    paid on every request; the clock is read through the run's clock object, not
    ``trio.current_time()`` (whose wrapper cost three times as much); and the instance
    has slots, since 10,000 idle sessions each pay for every attribute in memory.
    """

    __slots__ = (
        "_clock",
        "_config",
        "_connected_at",
        "_ending",
        "_engine",
        "_events",
        "_evicted",
        "_expired_as",
        "_frame_started_at",
        "_greeted",
        "_handshaken",
        "_handshaking",
        "_interrupt",
        "_last_reply_at",
        "_metrics",
        "_reading",
        "_receive_bytes",
        "_scope",
        "_send_bytes",
        "_shutdown_at",
        "_shutdown_notified",
        "_superseded",
        "_sweeper",
        "_transport",
        "address",
        "connected_perf",
        "deadline",
        "ended_because",
        "last_request_perf",
        "name",
        "peer",
        "session",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        session: Session,
        config: ServerConfig,
        name: str,
        sweeper: DeadlineSweeper,
        events: ConnectionEvents = NO_EVENTS,
        metrics: Metrics | None = None,
        peer: str = "",
        address: str = "",
    ) -> None:
        self.name = name
        self.peer = peer
        self.address = address
        """What the server counts the peer by (``address_key``), for its warnings."""
        self._metrics = metrics or Metrics()
        self.connected_perf = time.perf_counter()
        self.last_request_perf: float | None = None
        """When the last request's frame was whole (time.perf_counter), for /sessions."""
        self.session = session
        self.ended_because: str | None = None
        """Why the connection ended, for the operator's "closed" line; None when its
        session closed it in the ordinary way (LOGOUT)."""
        self._events = events
        self._handshaking = False
        self._handshaken = False
        self._superseded: Ending | None = None
        """Set once the session moved elsewhere: SUPERSEDED, or LEASE_LOST."""
        self._evicted = False
        session.on_supersede = self.supersede
        session.on_lease_lost = self.lose_lease
        self.deadline = math.inf
        """When the current wait on the peer gives up (trio clock), read by the sweeper."""
        self._ending = Ending.IDLE
        """What passing ``deadline`` means."""
        self._expired_as = Ending.IDLE
        """What ``deadline`` meant when it passed: ``_ending`` may move on before the
        interrupt is handled (a read can begin as a send's deadline passes)."""
        self._transport = transport
        self._receive_bytes = transport.receive_some
        """What the peer sent next (empty at its end); a cancelled wait loses nothing.
        The transport's own method, awaited with no layer between (a test wraps it)."""
        self._send_bytes = transport.send_all
        """Send one frame, as the transport does (a test wraps it)."""
        self._config = config
        self._sweeper = sweeper
        self._clock = trio.lowlevel.current_clock()
        self._engine = Engine(Sender.SERVER, login_attempts_max=config.login_attempts_max)
        self._scope = trio.CancelScope()
        self._interrupt: Interrupt | None = None
        self._reading = False
        self._greeted = False
        self._frame_started_at = 0.0
        self._connected_at = self._last_reply_at = self._clock.current_time()
        self._shutdown_at: float | None = None
        self._shutdown_notified = False

    def expire(self) -> None:
        """Called by the sweeper once ``deadline`` has passed: interrupt the wait."""
        self._interrupt = Interrupt.DEADLINE
        self._expired_as = self._ending
        self._scope.cancel()

    @property
    def waiting_on_peer(self) -> bool:
        """True while the connection waits for its peer's next bytes (or for its TLS
        handshake to complete), doing nothing else."""
        return self._reading or self._handshaking

    @property
    def logged_in(self) -> bool:
        return self._engine.state is _AUTHENTICATED

    def evict(self) -> None:
        """Called by the server while ``waiting_on_peer``: tell the peer its session
        expired, and close at once, without lingering. (Only a wait is interrupted,
        never a request in hand.)"""
        self._evicted = True
        self._interrupt = Interrupt.DEADLINE
        self._expired_as = Ending.EVICTED
        self._scope.cancel()

    def supersede(self, ending: Ending = Ending.SUPERSEDED) -> None:
        """The session moved to a new connection (RESUME), here or in another process
        (LEASE_LOST): end this one now if it waits on its peer, or else at its next
        wait, once the request in hand is answered."""
        if self._superseded is None:
            self._superseded = ending
        if self.deadline < math.inf:
            self._interrupt = Interrupt.DEADLINE
            self._expired_as = self._superseded
            self._scope.cancel()

    def lose_lease(self) -> None:
        """Another process took the session's lease over: ``supersede``, as LEASE_LOST."""
        self.supersede(Ending.LEASE_LOST)

    def begin_shutdown(self, close_at: float) -> None:
        """Called by the server: send SHUTDOWN soon, serve only LOGOUT, close at ``close_at``."""
        self._shutdown_at = close_at
        self._engine.begin_shutdown()
        if self._reading and self._interrupt is None:
            self._interrupt = Interrupt.SHUTDOWN
            self._scope.cancel()  # wake the read so the notice goes out now

    async def run(self) -> None:
        """Serve until the session closes or the connection ends; always release the lease.

        Until an interrupt (the sweeper's ``expire``, ``evict``, ``supersede`` or
        ``begin_shutdown``) cancels ``_scope``, ``_serve_until_interrupted`` answers
        requests; then the interrupt is handled here and, unless it ended the
        connection, serving goes on in a new scope.
        """
        engine = self._engine
        try:
            while engine.state is not _CLOSED:
                self._interrupt = None
                with trio.CancelScope() as self._scope:
                    await self._serve_until_interrupted()
                self._reading = False
                self.deadline = math.inf
                if self._interrupt is Interrupt.DEADLINE:
                    await self._end_at_deadline(self._expired_as)
                # Otherwise the session closed, or shutdown woke a read: the loop says which.
        except ConnectionEnded as end:
            self.ended_because = end.ending.value
        except (trio.BrokenResourceError, OSError) as error:
            self.ended_because = f"connection lost: {error}"
        finally:
            self.deadline = math.inf
            engine.close()
            self.session.end()
            if self._evicted:  # no lingering: its slot already went to a newcomer
                await self._transport.abort()
            else:
                await self._transport.aclose()  # also when cancelled: it always closes

    async def _serve_until_interrupted(self) -> None:
        """Read a request, answer it and send the reply, until an interrupt or the
        session's end; the read, the answer and the send are all in this one coroutine.

        A read that completes as an interrupt comes keeps its bytes but starts on no
        request (the next checkpoint would cancel it); each request's frame_timeout_s
        counts from its first byte, or from the reply before it if it was buffered then.
        """
        if not self._greeted:
            await self._greet()
        engine, session, clock = self._engine, self.session, self._clock
        while engine.state is not _CLOSED:
            if self._superseded:  # not even a request already buffered is carried out
                await self._end_at_deadline(self._superseded)
            try:
                while (frame := engine.next_event()) is None:
                    if self._shutdown_at is not None and not self._shutdown_notified:
                        await self._notify_shutdown()
                    self._wait_until(*self._read_deadline())
                    self._reading = True
                    try:
                        data = await self._receive_bytes()
                    finally:
                        self._reading = False
                    self.deadline = math.inf
                    if not data:
                        raise ConnectionEnded(Ending.PEER_CLOSED)
                    if not engine.buffered_bytes:
                        self._frame_started_at = clock.current_time()
                    engine.receive_data(data)
                    # Interrupted as the read completed: no request is started. (Every
                    # interrupt sets _interrupt as it cancels _scope, and reading the flag
                    # costs a tenth of CancelScope.cancel_called, which reads the clock.)
                    if self._interrupt is not None:
                        return
            except RemoteProtocolError as error:
                self._events.on_bad_frame(self, f"{error} ({self.name})")
                await self._send_data(engine.send_error(error))
                if error.fatal:
                    return
            else:
                request = frame.message
                assert isinstance(request, Request), "a server's engine yields only requests"
                self.last_request_perf = started = time.perf_counter()
                try:
                    reply = await session.answer(engine, request)
                except LeaseLost:  # its fence refused a money write: nothing moved
                    await self._fenced(request)
                if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the check
                    log.debug(
                        "%s: %s -> %s %s", self.name, request.OPCODE.name, reply.OPCODE.name,
                        reply.status.name,
                    )
                self._wait_until(
                    clock.current_time() + self._config.frame_timeout_s, Ending.SEND_TIMEOUT
                )
                await self._send_bytes(engine.send(reply))
                self.deadline = math.inf
                self._answered(request, reply, started)
                if isinstance(reply, _LOGIN_REPLIES) and engine.state is _AUTHENTICATED:
                    await self._logged_in()
                # Not kept while the next read waits: an idle session would hold it in
                # memory (after a LOGIN, its PIN).
                del frame, request, reply
            self._last_reply_at = clock.current_time()
            if engine.buffered_bytes:
                # The next frame has begun already (pipelined, or sent behind a refused
                # one): its frame_timeout_s counts from now, not from the frame before.
                self._frame_started_at = self._last_reply_at
                # Sends do not yield: yield once per request, as a read would, so that a
                # client pipelining many cannot hold the loop. No frame has left the
                # decoder, so a cancellation here loses nothing.
                await trio.lowlevel.checkpoint()

    async def _greet(self) -> None:
        """The transport's handshake, then HELLO: what a connection begins with."""
        await self._handshake()
        self._greeted = True
        await self._send(self._config.hello())

    def _answered(self, request: Request, reply: Reply, started: float) -> None:
        """``reply`` to ``request`` has been sent: count it and, if the engine closed the
        connection after a refusal (the last login attempt, say), note why."""
        self._metrics.observe_request(request.OPCODE, reply.status, time.perf_counter() - started)
        if self._engine.state is _CLOSED and reply.status is not _APPROVED:
            self.ended_because = f"after {reply.OPCODE.name} {reply.status.name}"

    async def _handshake(self) -> None:
        """The transport's handshake (TLS), bounded by the login deadline: a connection
        that never completes one is as one that never logs in. A failure is reported
        to the server (which logs it, once per address per interval) and ends it."""
        deadline = self._connected_at + self._config.login_timeout_s
        ending = Ending.HANDSHAKE_TIMEOUT
        if self._shutdown_at is not None and self._shutdown_at < deadline:
            deadline, ending = self._shutdown_at, Ending.GRACE_OVER
        self._wait_until(deadline, ending)
        self._handshaking = True
        try:
            terminal = await self._transport.handshake()
        except HandshakeFailed as failure:
            self._events.on_handshake_failed(self, str(failure))
            raise ConnectionEnded(Ending.HANDSHAKE_FAILED) from None
        finally:
            self._handshaking = False
        self.deadline = math.inf
        self._handshaken = True
        if terminal is not None:
            self.name = f"{self.name} {terminal}"
            self.session.identify(self.name, terminal)

    async def _notify_shutdown(self) -> None:
        """Tell the peer the server is shutting down, and in how many seconds it closes."""
        assert self._shutdown_at is not None
        self._shutdown_notified = True
        grace_s = max(0, round(self._shutdown_at - self._clock.current_time()))
        await self._send(Shutdown(grace_s))

    async def _logged_in(self) -> None:
        """A LOGIN or RESUME was approved: send the session's token, tell the server."""
        if self.session.token is not None:
            log.debug("%s: -> SESSION_TOKEN", self.name)
            await self._send(SessionToken(self.session.token))
        self._events.on_login(self)

    async def _fenced(self, request: Request) -> NoReturn:
        """The lease's fence refused ``request``'s write (money, or a PIN change): the
        session ends."""
        self._metrics.fenced_writes += 1
        log.warning(
            "%s: %s FENCED: the lease was taken over; nothing was done, the session ends",
            self.name, request.OPCODE.name,
        )
        await self._end_at_deadline(Ending.LEASE_LOST)

    def _read_deadline(self) -> tuple[float, Ending]:
        """When the current read gives up, and why: the earliest deadline that applies.

        The session's deadline always applies; a begun frame's deadline and shutdown can
        only bring it forward, so trickling partial frames extends nothing.
        """
        if self._engine.state is _AUTHENTICATED:
            deadline = self._last_reply_at + self._config.idle_timeout_s
            ending = Ending.IDLE
        else:  # counted from connect, so pinging cannot hold a slot without logging in
            deadline = self._connected_at + self._config.login_timeout_s
            ending = Ending.LOGIN_TIMEOUT
        if self._engine.buffered_bytes:
            frame_deadline = self._frame_started_at + self._config.frame_timeout_s
            if frame_deadline < deadline:
                deadline, ending = frame_deadline, Ending.FRAME_TIMEOUT
        if self._shutdown_at is not None and self._shutdown_at < deadline:
            deadline, ending = self._shutdown_at, Ending.GRACE_OVER
        return deadline, ending

    def _wait_until(self, deadline: float, ending: Ending) -> None:
        """Bound the next wait on the peer: past ``deadline``, the connection ends so.
        A superseded connection's next wait ends at once."""
        if self._superseded:
            deadline, ending = self._clock.current_time(), self._superseded
        self.deadline = deadline
        self._ending = ending
        if deadline < self._sweeper.wake_at:
            self._sweeper.hurry(deadline)

    async def _end_at_deadline(self, ending: Ending) -> NoReturn:
        """Tell the peer why, where the protocol has a word for it, then end.

        The word is best effort: a peer that does not take it in frame_timeout_s
        does not get it.
        """
        notice: Message | None = None
        if ending in {Ending.IDLE, Ending.LOGIN_TIMEOUT, Ending.EVICTED, Ending.SUPERSEDED,
                      Ending.LEASE_LOST}:
            notice = SessionExpired()
        elif ending is Ending.FRAME_TIMEOUT:
            notice = Error(Status.FORMAT_ERROR)
        if notice is not None and self._handshaken:  # no word over half a TLS handshake
            data = self._engine.send(notice)
            with trio.move_on_after(self._config.frame_timeout_s):
                await self._send_bytes(data)
        raise ConnectionEnded(ending)

    async def _send(self, message: Message) -> None:
        """Send one message through the engine, which checks it and gives its request id."""
        await self._send_data(self._engine.send(message))

    async def _send_data(self, data: bytes) -> None:
        """Send one frame; a peer that does not take it within frame_timeout_s is dropped.
        (A reply is sent so by ``_serve_until_interrupted`` itself.)"""
        self._wait_until(
            self._clock.current_time() + self._config.frame_timeout_s, Ending.SEND_TIMEOUT
        )
        await self._send_bytes(data)
        self.deadline = math.inf


class BankServer:
    """Accepts ATM connections and runs one ``Connection`` task for each."""

    def __init__(
        self, config: ServerConfig, ledger: Ledger, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.config = config
        self._tls = tls
        self.leases = cluster_or_local_leases(config)
        self.sessions = SessionRegistry()
        self._ledger = ledger
        self._refusals = trio.CapacityLimiter(REFUSALS_MAX)
        self._connections: set[Connection] = set()
        """Every connection being served, evicted ones that are still closing included."""
        self._slotted: set[Connection] = set()
        """The connections that hold one of the ``connections_max`` slots."""
        self._preauth: dict[Connection, str] = {}
        """Slotted connections not logged in, oldest first, with their address key."""
        self._preauth_per_address: Counter[str] = Counter()
        self._evicting: set[Connection] = set()
        self._warnings = OncePerInterval(WARNING_INTERVAL_S, WARNED_KEYS_MAX)
        self._sweeper = DeadlineSweeper()
        self._numbers = itertools.count(1)
        self._stop = trio.Event()
        self._shutdown_at: float | None = None
        self._hurried = False
        self._backstop: trio.CancelScope | None = None
        """The handlers' scope, whose deadline is the shutdown backstop, once shutting down."""
        self.metrics = Metrics(ledger)
        self._admin_listeners: list[trio.SocketListener] = []

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[Connection]:
        """Every connection being served, for the admin endpoint."""
        return list(self._connections)

    def shutdown(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns when it is complete."""
        self._stop.set()

    def hurry(self) -> None:
        """End the shutdown grace period now (an operator's second signal): connections
        still open are cancelled at once, as at the backstop, and ``serve`` returns.

        Safe: a commit that started finishes first (the ledger shields it), and an ATM
        that has sent a transaction learns its outcome by its id on reconnecting."""
        self._hurried = True
        self._stop.set()
        if self._backstop is not None:
            self._backstop.deadline = trio.current_time()

    async def listen(self) -> list[trio.SocketListener]:
        """Bind the configured address (and the admin port, if configured); raises
        OSError (e.g. the port is in use)."""
        listeners, self._admin_listeners = await bind(self.config)
        return listeners

    def adopt_admin_listeners(self, admin_listeners: list[trio.SocketListener]) -> None:
        """Serve the admin endpoint on these, bound by ``bind`` before the server was made."""
        self._admin_listeners = admin_listeners

    async def serve(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shutdown`` has run its course; binds first unless given listeners."""
        if listeners is None:
            listeners = await self.listen()
        for listener in listeners:
            log.info("listening on %s", _address(listener.socket.getsockname()))
        async with trio.open_nursery() as sweeping:
            sweeping.start_soon(self._sweeper.run)
            if isinstance(self.leases, ClusterLeases):  # liveness lock before any login
                await sweeping.start(self.leases.run)
            if self._admin_listeners:  # serves until every connection has closed
                await sweeping.start(serve_admin, self, self._admin_listeners)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    acceptors.start_soon(
                        functools.partial(
                            trio.serve_listeners, self._handle, listeners,
                            handler_nursery=handlers,
                        )
                    )
                    task_status.started(listeners)
                    await self._stop.wait()
                    acceptors.cancel_scope.cancel()  # stop accepting; closes the listeners
                self._shutdown_at = trio.current_time() + self.config.shutdown_grace_s
                count = len(self._connections)
                log.info(
                    "shutting down: %d %s %s %d s", count,
                    "connection" if count == 1 else "connections",
                    "gets" if count == 1 else "get", self.config.shutdown_grace_s,
                )
                for connection in self._connections:
                    connection.begin_shutdown(self._shutdown_at)
                self._backstop = handlers.cancel_scope
                handlers.cancel_scope.deadline = (
                    trio.current_time() if self._hurried
                    else self._shutdown_at + SHUTDOWN_BACKSTOP_S
                )
            sweeping.cancel_scope.cancel()  # every connection it watched has closed
        log.info("all connections closed")

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One accepted socket, served in this coroutine (an idle session pays for each
        frame it waits in). Nothing may escape: it would end serve() for everyone."""
        host = _peer_host(stream)
        peer = _peer_address(stream)
        name = f"conn {next(self._numbers)} {peer}"
        address = address_key(host) if host is not None else "(peer gone)"
        if self._preauth_per_address[address] >= self.config.preauth_per_address_max:
            self._warnings.warn(
                address, "refused connections from %s: %d not logged in already",
                address, self._preauth_per_address[address],
            )
            self.metrics.refusals["per_address_cap"] += 1
            await self._refuse_busy(stream)
            return
        if len(self._slotted) >= self.config.connections_max and not self._evict_one():
            self._warnings.warn(
                "full", "refused connections: all %d slots hold logged-in sessions"
                " or connections busy with a request", len(self._slotted),
            )
            self.metrics.refusals["busy"] += 1
            await self._refuse_busy(stream)
            return
        session = Session(
            ledger=self._ledger, leases=self.leases, config=self.config, name=name,
            sessions=self.sessions,
        )
        transport: Transport = (
            TlsTransport(stream, self._tls) if self._tls else SocketTransport(stream)
        )
        connection = Connection(
            transport, session=session, config=self.config, name=name,
            sweeper=self._sweeper, events=self, metrics=self.metrics,
            peer=peer, address=address,
        )
        self._connections.add(connection)
        self._slotted.add(connection)
        self._preauth[connection] = address
        self._preauth_per_address[address] += 1
        self._sweeper.watch(connection)
        if self._shutdown_at is not None:
            connection.begin_shutdown(self._shutdown_at)
        log.info("%s: connected", name)
        try:
            await connection.run()
        except Exception:
            log.exception("%s: unexpected error", name)
        finally:
            self._sweeper.forget(connection)
            self._release_slot(connection)
            self._evicting.discard(connection)
            self._connections.discard(connection)
            if connection.ended_because is None:
                log.info("%s: closed", connection.name)
            else:
                log.info("%s: closed: %s", connection.name, connection.ended_because)

    # -- ConnectionEvents: what the connections tell the server -----------------------

    def on_login(self, connection: Connection) -> None:
        """``connection`` logged in: it no longer counts against its address, and is
        never evicted."""
        self._forget_preauth(connection)

    def on_handshake_failed(self, connection: Connection, reason: str) -> None:
        self.metrics.refusals["tls_handshake_failed"] += 1
        self._warnings.warn(
            f"tls {connection.address}", "TLS handshakes from %s fail: %s",
            connection.address, reason,
        )

    def on_bad_frame(self, connection: Connection, problem: str) -> None:
        self._warnings.warn(
            f"frame {connection.address}", "bad frames from %s: %s", connection.address,
            problem,
        )

    def _evict_one(self) -> bool:
        """Free a slot by evicting the oldest connection that has not logged in and is
        waiting on its peer; False if there is none (or too many are still closing)."""
        if len(self._evicting) >= EVICTIONS_MAX:
            return False
        victim = next((c for c in self._preauth if c.waiting_on_peer), None)
        if victim is None:
            return False
        self._warnings.warn(
            "evicting", "server full (%d slots): evicting connections that have not"
            " logged in, oldest first (%s)", self.config.connections_max, victim.name,
        )
        self.metrics.refusals["evicted"] += 1
        self._release_slot(victim)
        self._evicting.add(victim)
        victim.evict()
        return True

    def _release_slot(self, connection: Connection) -> None:
        self._forget_preauth(connection)
        self._slotted.discard(connection)

    def _forget_preauth(self, connection: Connection) -> None:
        address = self._preauth.pop(connection, None)
        if address is not None:
            self._preauth_per_address[address] -= 1
            if not self._preauth_per_address[address]:
                del self._preauth_per_address[address]

    async def _refuse_busy(self, stream: trio.SocketStream) -> None:
        """SERVER_BUSY, then close; past REFUSALS_MAX at once, close without a word, so
        a connect flood cannot pile up refusals that each hold a socket for seconds."""
        try:
            self._refusals.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            with (
                trio.move_on_after(CLOSE_LINGER_S),
                contextlib.suppress(trio.BrokenResourceError, OSError),
            ):
                await stream.send_all(Engine(Sender.SERVER).send(Error(Status.SERVER_BUSY)))
            await close_gracefully(stream)
        finally:
            self._refusals.release()


class OncePerInterval:
    """Log a WARNING for a key at most once per ``interval_s``, counting the rest.

    At most ``keys_max`` keys are remembered (the longest-unwarned are forgotten first):
    the keys are peer addresses, which a flood controls."""

    def __init__(self, interval_s: float, keys_max: int) -> None:
        self._interval_s = interval_s
        self._keys_max = keys_max
        self._last: dict[str, tuple[float, int]] = {}
        """Per key: when it was last logged, and how many times it was not since."""

    def warn(self, key: str, message: str, *args: object) -> None:
        now = trio.current_time()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        unlogged = last[1] if last is not None else 0
        if unlogged:
            message += " (and %d times more since the last such warning)"
            args = (*args, unlogged)
        log.warning(message, *args)
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        while len(self._last) > self._keys_max:
            del self._last[next(iter(self._last))]


def cluster_or_local_leases(config: ServerConfig) -> Leases:
    """Over PostgreSQL the account leases are the cluster's (any number of processes may
    share the database); over SQLite, this process's lock is the whole lease."""
    if config.uses_postgresql:
        return ClusterLeases(
            config.db, expiry_s=config.lease_expiry_s, session_idle_s=config.idle_timeout_s
        )
    return Leases()


def address_key(host: str) -> str:
    """What ``preauth_per_address_max`` counts by: the IPv4 address, or the /64 of an
    IPv6 one (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone index
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX_BITS), strict=False))
    return str(ip)


async def bind(
    config: ServerConfig, *, reuse_port: bool = False
) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
    """Bind the bank's address and, if configured, the admin port: both or neither.
    Raises OSError (e.g. a port in use), naming the admin port when it is that one.
    ``reuse_port``: share the address with the other workers of one ``--workers`` parent
    (SO_REUSEPORT: the kernel spreads new connections over every listening socket)."""
    admin: list[trio.SocketListener] = []
    if config.admin_port is not None:
        try:
            admin = await open_admin_listeners(config.admin_port)
        except OSError as error:
            words = error.strerror or str(error)
            raise OSError(error.errno, f"admin port {config.admin_port}: {words}") from None
    try:
        if reuse_port:
            return await open_reuse_port_listeners(config.port, config.host), admin
        return await trio.open_tcp_listeners(config.port, host=config.host), admin
    except OSError:
        for listener in admin:  # never to be served
            await listener.aclose()
        raise


async def reuse_port_sockets(port: int, host: str) -> list[trio.socket.SocketType]:
    """Bound (not listening) SO_REUSEPORT sockets on every address of ``host``; port 0
    picks one free port for all of them. OSError if one cannot be bound."""
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, resolved in addresses:
            sockaddr = resolved
            sock = trio.socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
            if family == trio.socket.AF_INET6:
                sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # the port the first one was given
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            await sock.bind(sockaddr)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def open_reuse_port_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """Listeners on ``host``:``port`` that other processes may listen on too."""
    sockets = await reuse_port_sockets(port, host)
    try:
        for sock in sockets:
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return [trio.SocketListener(sock) for sock in sockets]


def open_files_needed(connections_max: int) -> int:
    """Open files a server with ``connections_max`` uses at most: each connection's
    socket, the refusals and evictions in progress, and the rest. Past the process's
    limit, accept fails (EMFILE) and clients wait in the backlog instead of being
    refused as busy."""
    return connections_max + REFUSALS_MAX + EVICTIONS_MAX + OPEN_FILES_RESERVED


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft limit on open files toward ``needed`` (as far as the
    hard limit allows; never lower it), and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return needed  # no limit: whatever is needed fits
    if soft < needed and soft != hard:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def _peer_host(stream: trio.SocketStream) -> str | None:
    """The peer's IP address; None for a peer that reset before we asked."""
    try:
        host: str = stream.socket.getpeername()[0]
    except OSError:
        return None
    return host


def _peer_address(stream: trio.SocketStream) -> str:
    """The peer's address for the log; a peer that reset before we asked has none."""
    try:
        return _address(stream.socket.getpeername())
    except OSError:
        return "(peer gone)"


def _address(sockaddr: tuple[Any, ...]) -> str:
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
