"""A fault-injecting TCP proxy, for tests that put a bad network between a real ATM and
a real bank.

The ATM under test (``python -m atm`` in a subprocess, or a ``WireClient``) connects to
the proxy instead of the bank; the proxy listens on 127.0.0.1 at a free port and opens
one new connection to the bank for each connection it accepts, relaying bytes both ways
at once, as they arrive. A *plan* says what goes wrong on each connection, in the order
the proxy accepts them; connections beyond the plan are relayed cleanly::

    proxy = FaultProxy(bank_port, [
        Cut(Opcode.DEPOSIT_REPLY, action=Action.RST),  # connection 0: reset after the reply
        None,                                           # connection 1: clean
        [Delay(0.5, jitter_s=0.2), Cut(Opcode.LOGIN, forward_bytes=0)],  # connection 2
    ])
    port = await nursery.start(proxy.serve)
    ...  # point the ATM at port
    event = await proxy.wait_for_fault()  # no sleeping: returns once the cut happened

The faults:

- ``Delay``: every chunk of data, in both directions, is held back ``seconds`` plus a
  random extra of up to ``jitter_s`` (from a ``random.Random`` seeded per proxy,
  connection and direction, so a run is reproducible) before it is forwarded.
- ``Cut``: when the ``nth`` frame with ``opcode`` arrives, forward it whole, or only its
  first ``forward_bytes`` (0: none of it, the frame is lost), and then do ``action``:
  close both sides with FIN or with RST; a *silent* cut that closes (or resets) the
  client's side but holds the bank's side open and idle, as in a WAN partition where the
  bank never learns the connection ended; or a stall, where nothing more crosses in
  either direction and both sides are held open. A held side stays open until the proxy
  stops (or ``HOLD_S_MAX`` passes).

The proxy forwards bytes as it received them. It finds frames only to know where one
ends: each direction's bytes are copied into a ``wire.Decoder`` (``Sender.CLIENT``
toward the bank, ``Sender.SERVER`` toward the client). Bytes it cannot decode are
relayed all the same, and frame faults on that direction can no longer fire. While a
cut that forwards only part of a frame (``forward_bytes`` set) waits for its frame in
a direction, the proxy holds back that direction's incomplete frame until it is whole,
so that it can stop at the chosen byte.

Every injected fault is recorded as a ``FaultEvent`` in ``proxy.events`` (which
connection, which fault, which direction, after how many frames) and wakes
``wait_for_fault``. A broken connection (a peer's reset, a refused upstream connect)
never raises into the test: the proxy logs it and closes that pair, mirroring a reset
to the other side. ``stop()``, or cancelling the nursery that runs ``serve``, closes
every connection, the held ones included. Every wait inside the proxy is bounded by one
of the constants below; note that an autojump clock reaches those bounds as soon as
every task waits, so a test on one should not leave a connection idle or held.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import trio

from wire import MESSAGE_TYPES, Decoder, Opcode, Sender, WireError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""How long the proxy waits for the bank to accept its upstream connection."""

IDLE_TIMEOUT_S = 300.0
"""A relayed connection on which no byte moved either way for this long is closed."""

HOLD_S_MAX = 600.0
"""How long a silently cut or stalled connection's sides are held open at most."""

DELAY_S_MAX = 60.0
"""The most a ``Delay`` may hold one chunk (``seconds + jitter_s``)."""

FAULT_WAIT_S_MAX = 30.0
"""How long ``wait_for_fault`` waits for the faults it expects."""

STOP_TIMEOUT_S = 10.0
"""How long ``stop`` waits for every connection to be closed."""

CHUNK_BYTES_MAX = 65536
"""The most bytes read from a socket at once."""

DRAIN_READS_MAX = 64
"""Reads of unread data before a FIN close (data left unread makes the kernel reset)."""


class Action(enum.Enum):
    """What a ``Cut`` does once its frame (or the part of it) has been forwarded."""

    FIN = "fin"
    """Close both sides with FIN."""
    RST = "rst"
    """Reset both sides (SO_LINGER 0)."""
    SILENT_FIN = "silent-fin"
    """Close the client's side with FIN; hold the bank's side open and idle."""
    SILENT_RST = "silent-rst"
    """Reset the client's side; hold the bank's side open and idle."""
    STALL = "stall"
    """Forward nothing more either way; hold both sides open."""


class Direction(enum.Enum):
    TO_BANK = "to bank"
    TO_CLIENT = "to client"

    @property
    def sender(self) -> Sender:
        """Who sends the frames travelling this way."""
        return Sender.CLIENT if self is Direction.TO_BANK else Sender.SERVER


@dataclass(frozen=True)
class Delay:
    """Hold every chunk of data, both ways, ``seconds`` plus up to ``jitter_s`` more."""

    seconds: float
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.seconds, self.jitter_s) < 0 or self.seconds + self.jitter_s > DELAY_S_MAX:
            raise ValueError(f"{self}: seconds and jitter_s >= 0, together <= {DELAY_S_MAX}")


@dataclass(frozen=True)
class Cut:
    """At the ``nth`` frame with ``opcode`` on the connection, forward the frame (all of
    it, or its first ``forward_bytes``; 0 drops it) and then do ``action``. The opcode
    says the direction: a request's travels to the bank, a reply's or notice's to the
    client."""

    opcode: Opcode
    nth: int = 1
    action: Action = Action.FIN
    forward_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.opcode not in MESSAGE_TYPES:
            raise ValueError(f"{self}: no message has opcode {self.opcode!r}")
        if self.nth < 1 or (self.forward_bytes is not None and self.forward_bytes < 0):
            raise ValueError(f"{self}: nth counts from 1, forward_bytes from 0")

    @property
    def direction(self) -> Direction:
        sender = MESSAGE_TYPES[self.opcode].SENDER
        return Direction.TO_BANK if sender is Sender.CLIENT else Direction.TO_CLIENT


Fault = Delay | Cut
PlanEntry = Fault | Sequence[Fault] | None
"""One connection's faults: one, several (at most one ``Delay``; the first ``Cut`` to
fire ends the connection), or None for a clean relay."""


@dataclass(frozen=True)
class FaultEvent:
    """One injected fault. ``frames_forwarded`` counts the whole frames forwarded in
    ``direction`` before it happened (for a cut: including its frame if it went whole);
    ``partial_bytes`` is how much of a cut's frame went when it did not go whole."""

    connection: int
    """The connection's position in accept order, from 0, as in the plan."""
    fault: Fault
    direction: Direction
    frames_forwarded: int
    partial_bytes: int = 0
    delay_s: float = 0.0
    """For a ``Delay``: how long this chunk is held (recorded as the hold begins)."""


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that injects ``plan``'s
    faults, connection by connection; see the module's docstring."""

    def __init__(
        self, upstream_port: int, plan: Sequence[PlanEntry] = (), *,
        upstream_host: str = "127.0.0.1", seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = [_faults(entry) for entry in plan]
        self.seed = seed
        self.port: int | None = None
        self.events: list[FaultEvent] = []
        self._recorded = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen at a free port on 127.0.0.1 (``task_status`` gets it) and relay until
        cancelled or stopped."""
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        try:
            with trio.CancelScope() as self._scope:
                async with listener, trio.open_nursery() as nursery:
                    self.port = listener.socket.getsockname()[1]
                    task_status.started(self.port)
                    for index in itertools.count():
                        stream = await listener.accept()
                        nursery.start_soon(self._handle, stream, index)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Close every connection, held ones too, and stop listening; returns when done."""
        if self._scope is None:
            return
        self._scope.cancel()
        with trio.move_on_after(STOP_TIMEOUT_S) as waited:
            await self._done.wait()
        if waited.cancelled_caught:
            raise AssertionError(f"the proxy did not stop within {STOP_TIMEOUT_S} s")

    async def wait_for_fault(self, n: int = 1) -> FaultEvent:
        """Wait until ``n`` faults are recorded (each delayed chunk is one); the nth."""
        with trio.move_on_after(FAULT_WAIT_S_MAX):
            while len(self.events) < n:
                await self._recorded.wait()
        if len(self.events) < n:
            raise AssertionError(
                f"{len(self.events)} fault(s) after {FAULT_WAIT_S_MAX} s, not {n}: "
                f"{self.events}"
            )
        return self.events[n - 1]

    def _record(self, event: FaultEvent) -> None:
        logger.info("fault: %s", event)
        self.events.append(event)
        self._recorded.set()
        self._recorded = trio.Event()

    def _faults_of(self, index: int) -> tuple[Fault, ...]:
        return self.plan[index] if index < len(self.plan) else ()

    async def _handle(self, client: trio.SocketStream, index: int) -> None:
        bank: trio.SocketStream | None = None
        try:
            with trio.move_on_after(CONNECT_TIMEOUT_S):
                bank = await trio.open_tcp_stream(*self.upstream)
            if bank is None:
                logger.warning("connection %d: bank did not accept within %s s",
                               index, CONNECT_TIMEOUT_S)
                _reset(client)
                return
            link = _Link(self, index, client, bank, self._faults_of(index))
            await link.run()
        except OSError as error:
            logger.warning("connection %d: cannot reach the bank: %s", index, error)
            _reset(client)
        finally:
            await trio.aclose_forcefully(client)
            if bank is not None:
                await trio.aclose_forcefully(bank)


def _faults(entry: PlanEntry) -> tuple[Fault, ...]:
    faults: tuple[Fault, ...]
    if entry is None:
        faults = ()
    elif isinstance(entry, Delay | Cut):
        faults = (entry,)
    else:
        faults = tuple(entry)
    if sum(isinstance(fault, Delay) for fault in faults) > 1:
        raise ValueError(f"at most one Delay per connection: {entry}")
    if not all(isinstance(fault, Delay | Cut) for fault in faults):
        raise TypeError(f"a connection's faults are Delay and Cut: {entry}")
    return faults


@dataclass
class _Decision:
    """The cut that fired, and what the event will say."""

    cut: Cut
    direction: Direction
    frames_forwarded: int
    partial_bytes: int


class _Link:
    """One accepted connection and its upstream: two pumps, then the cut's action."""

    def __init__(
        self, proxy: FaultProxy, index: int, client: trio.SocketStream,
        bank: trio.SocketStream, faults: tuple[Fault, ...],
    ) -> None:
        self.proxy = proxy
        self.index = index
        self.client = client
        self.bank = bank
        self.delay = next((f for f in faults if isinstance(f, Delay)), None)
        self.cuts = [f for f in faults if isinstance(f, Cut)]
        self.counts: Counter[Opcode] = Counter()
        self.decision: _Decision | None = None
        self.broken = False
        self.pumps: dict[Direction, trio.CancelScope] = {}
        self.idle = trio.CancelScope()

    def touch(self) -> None:
        self.idle.deadline = trio.current_time() + IDLE_TIMEOUT_S

    async def run(self) -> None:
        self.touch()
        with self.idle:
            async with trio.open_nursery() as nursery:
                for direction in Direction:
                    self.pumps[direction] = trio.CancelScope()
                    nursery.start_soon(self._pump, direction)
        if self.idle.cancelled_caught:
            logger.warning("connection %d: idle for %s s, closed", self.index, IDLE_TIMEOUT_S)
        elif self.broken:
            _reset(self.client)
            _reset(self.bank)
        elif self.decision is not None:
            await self._act(self.decision)
        # Otherwise both directions ended with EOF: the caller closes both sides.

    async def _act(self, decision: _Decision) -> None:
        action = decision.cut.action
        if action in (Action.RST, Action.SILENT_RST):
            _reset(self.client)
        elif action in (Action.FIN, Action.SILENT_FIN):
            _drain(self.client)
        if action is Action.RST:
            _reset(self.bank)
        elif action is Action.FIN:
            _drain(self.bank)
        if action is not Action.STALL:
            await trio.aclose_forcefully(self.client)
        if action in (Action.FIN, Action.RST):
            await trio.aclose_forcefully(self.bank)
        self.proxy._record(FaultEvent(
            self.index, decision.cut, decision.direction,
            decision.frames_forwarded, decision.partial_bytes,
        ))
        if action in (Action.SILENT_FIN, Action.SILENT_RST, Action.STALL):
            with trio.move_on_after(HOLD_S_MAX):
                await trio.sleep_forever()
            logger.warning("connection %d: held for %s s, closed", self.index, HOLD_S_MAX)

    async def _pump(self, direction: Direction) -> None:
        source, sink = (
            (self.client, self.bank) if direction is Direction.TO_BANK
            else (self.bank, self.client)
        )
        flow = _Flow(self, direction)
        with self.pumps[direction]:
            try:
                while True:
                    data = await source.receive_some(CHUNK_BYTES_MAX)
                    self.touch()
                    if not data:
                        await sink.send_eof()
                        return
                    if self.delay is not None:
                        await trio.sleep(flow.delay_s(self.delay))
                    ended = await flow.forward(data, sink)
                    self.touch()
                    if ended:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                logger.info("connection %d: %s broke: %r", self.index, direction.value, error)
                self.broken = True
                self.stop_other(direction)

    def stop_other(self, direction: Direction) -> None:
        for other, scope in self.pumps.items():
            if other is not direction:
                scope.cancel()


class _Flow:
    """One direction's bytes: where its frames end, and whether a cut fires in them.

    Offsets count bytes of the direction's stream from 0: ``sent`` bytes have been
    forwarded, ``fed`` given to the decoder, and ``frame_start`` is where the frame
    being received begins. Bytes from ``sent`` to ``fed`` are ``held``."""

    def __init__(self, link: _Link, direction: Direction) -> None:
        self.link = link
        self.direction = direction
        self.decoder: Decoder | None = Decoder(direction.sender)
        self.cuts = [cut for cut in link.cuts if cut.direction is direction]
        self.random = random.Random(f"{link.proxy.seed}:{link.index}:{direction.value}")
        self.frames = 0
        self.sent = self.fed = self.frame_start = 0
        self.held = bytearray()

    def delay_s(self, delay: Delay) -> float:
        seconds = delay.seconds + self.random.uniform(0, delay.jitter_s)
        self.link.proxy._record(FaultEvent(
            self.link.index, delay, self.direction, self.frames, delay_s=seconds,
        ))
        return seconds

    async def forward(self, data: bytes, sink: trio.SocketStream) -> bool:
        """Forward ``data`` up to any cut it triggers; True once a cut has fired."""
        if self.link.decision is not None:  # the other direction's cut came first
            return True
        self.held += data
        self.fed += len(data)
        if self.decoder is not None:
            self.decoder.receive_data(data)
        for frame_end, opcode in self._frames():
            cut = self._cut_at(opcode)
            if cut is not None:
                whole = (cut.forward_bytes is None
                         or cut.forward_bytes >= frame_end - self.frame_start)
                stop = frame_end if whole else self.frame_start + (cut.forward_bytes or 0)
                self.link.decision = _Decision(
                    cut, self.direction, self.frames if whole else self.frames - 1,
                    0 if whole else stop - self.frame_start,
                )
                self.link.stop_other(self.direction)
                await self._send(sink, stop)
                return True
            self.frame_start = frame_end
        holding = self.decoder is not None and any(
            cut.forward_bytes is not None for cut in self.cuts
        )
        await self._send(sink, self.frame_start if holding else self.fed)
        return False

    def _frames(self) -> Iterator[tuple[int, Opcode | None]]:
        """Each frame the bytes fed so far complete, decoded as it is asked for: the
        offset where it ends, and its opcode (None for an intact frame of an opcode
        that does not travel this way)."""
        while self.decoder is not None:
            try:
                frame = self.decoder.next_frame()
            except WireError as error:
                if error.fatal:
                    logger.info("connection %d: %s is not frames from here on (%s); relayed",
                                self.link.index, self.direction.value, error)
                    self.decoder = None
                    return
                opcode = None
            else:
                if frame is None:
                    return
                opcode = frame.message.OPCODE
            yield self.fed - self.decoder.buffered_bytes, opcode

    def _cut_at(self, opcode: Opcode | None) -> Cut | None:
        """Count the frame whose end was just listed; the cut it fires, if any."""
        self.frames += 1
        if opcode is None:
            return None
        self.link.counts[opcode] += 1
        for cut in self.cuts:
            if cut.opcode is opcode and cut.nth == self.link.counts[opcode]:
                return cut
        return None

    async def _send(self, sink: trio.SocketStream, stop: int) -> None:
        if stop > self.sent:
            chunk = bytes(self.held[: stop - self.sent])
            del self.held[: stop - self.sent]
            self.sent = stop
            await sink.send_all(chunk)


def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _drain(stream: trio.SocketStream) -> None:
    """Discard what the peer sent and the proxy did not read, so that the coming close
    sends FIN: Linux resets a connection closed with unread data. The socket is
    non-blocking; an empty one raises ``BlockingIOError``."""
    with contextlib.suppress(OSError):
        for _ in range(DRAIN_READS_MAX):
            if not os.read(stream.socket.fileno(), CHUNK_BYTES_MAX):
                return
