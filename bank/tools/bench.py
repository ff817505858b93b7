"""``python -m bank.bench``: the bank server's own load tool, in the manner of pgbench.

Load mode (the default) opens ``--sessions`` logged-in ATM sessions on each server it
measures and runs a request mix, each session closed-loop (one request at a time). The
servers are the bank and a bare Trio echo server, which answers every request with a
pre-encoded reply frame of the bank's reply type and size (request id and CRC patched
in) and does nothing else. They take turns in windows of about WINDOW_S, ``--seconds``
in all each, the order rotating every round, so that the machine's load while the run
goes on reaches both alike; their ratio is the number to compare between runs.

The load generator must not be what is measured. It builds each request from a
pre-encoded template (patching only the request id, the transaction id and the CRC),
splits replies by their length field and decodes only what its check needs: magic,
version, opcode, request id, length, CRC and status, which is enough to know that the
reply is intact and answers the request it was sent for. Plaintext sessions are driven
by one ``select.epoll`` loop per generator process over the sockets' descriptors, not
by a task per session. The generator's CPU per operation is reported next to each
server's (100 % is one core), and ``--generators K`` spreads the sessions over K
processes. Each server's CPU is read from /proc for its whole process tree (``--workers``
makes the bank several processes).

With ``--tls`` a second bank serves TLS (1.3, requiring a terminal certificate, as a
deployment would; the run's CA and certificates are made with ``bank.tls``), a third
target taking its turns; ``tls_ratio`` is TLS over plaintext. Its sessions use
``trio.SSLStream``, as the ATM does, with the same templates and checks. With
``--compare-db URL`` a second plaintext bank on that database takes turns too;
``compare_ratio`` is it over the first (``--db``). Connecting, TLS handshakes and logins
happen before the first window, and their rate is reported apart. Every run also times
fsync on the database's file system (``fsync_p50_ms``): a durable post waits for one.

With ``--floor`` the floor (``bank.tools.floor``) takes turns too: a server that answers
through the same protocol engine as the bank (``wire.Connection``) from a dict, and does
nothing else. ``floor_ratio`` and ``floor_cpu_ratio`` are it over echo: what the engine
costs; ``bank_floor_ratio`` is the bank over it: what the banking costs.

Idle mode (``--idle N``) holds N logged-in sessions that send nothing, and measures the
server's resident memory per session and one more session's round-trip latency while
they are held.

By default the bank is a real ``python -m bank`` subprocess on a temporary SQLite
database, with its log at WARNING so that logging is not what is measured;
``bank.tools.launcher`` starts it and the echo server. ``--db`` starts it on that
database instead (a path, or a ``postgresql://`` URL), after adding the bench accounts
it lacks; ``--workers N`` is passed to it. ``--port`` targets a bank already running on
this machine instead; its accounts ``BN-00001``.. (one per session, plus one for idle
mode's probe) must exist with the bench PIN: create them with
``python -m bank.bench --create-accounts N --db bank.db --key-file bank.key``.
Only loopback addresses are accepted: the echo baseline runs here, so the ratio means
something only for a bank on the same machine.

Logins speak the wire package's protocol engine (``wire.Connection``), so HELLO and the
login are checked in full; the ATM client is not used, so that its screen logic is not in
the figures. The last line printed is JSON, for scripts.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import functools
import ipaddress
import itertools
import json
import multiprocessing
import os
import platform
import random
import resource
import select
import ssl
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import trio

from bank.config import is_postgresql
from bank.pg_store import PgStore
from bank.pins import load_or_create_key
from bank.readiness import listening_addresses, write_ready_file
from bank.server import raise_open_files_limit
from bank.store import AccountExists, Store
from bank.tls import TlsError, client_context, init_ca_and_server, issue_terminal
from bank.tools import launcher
from bank.transport import SocketTransport
from wire import (
    AMOUNT_CENTS_MAX,
    DEPOSIT,
    HISTORY_ENTRIES_MAX,
    MAGIC,
    MONEY_KINDS,
    PAYLOAD_BYTES_MAX,
    PROTOCOL_VERSION,
    REPLY_STATUSES,
    REQUEST_ID_MAX,
    WITHDRAWAL,
    Answer,
    Balance,
    BalanceReply,
    EntryKind,
    Error,
    Frame,
    Hello,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    MoneyKind,
    Opcode,
    Ping,
    PingReply,
    Reply,
    Request,
    Sender,
    SessionToken,
    Status,
    WireError,
    encode,
    frame_bytes,
)
from wire import Connection as Engine
from wire._layout import CRC_BYTES, FAST_CRC, FAST_HEADER, HEADER_BYTES
from wire._messages import reply_type

EXIT_OK, EXIT_FAILURE = 0, 1

ACCOUNT_PREFIX = "BN-"
ACCOUNTS_MAX = 99_999
"""Bench accounts are ``BN-00001``..``BN-99999``: the account format has five digits."""

BENCH_PIN = "4321"
OPENING_CENTS = 1_000_000_000_000
"""$10,000,000,000.00 per bench account: withdrawals of AMOUNT_CENTS never run it dry."""

AMOUNT_CENTS = 2_000
"""Every deposit and withdrawal moves $20.00, so balances drift slowly both ways."""

HISTORY_COUNT = 10
DEFAULT_MIX = "balance=50,deposit=25,withdraw=25"

SESSIONS_DEFAULT = 100
SECONDS_DEFAULT = 10
SECONDS_MAX = 3_600
"""Longest load run: a bound on the run time, whatever the flags say."""

GENERATORS_MAX = 16
"""Most load generator processes: beyond the cores of any machine this runs on."""

WORKERS_MAX = 64
"""Most bank processes ``--workers`` may ask for (the bank has its own limits)."""

SETUP_CONCURRENCY_MAX = 100
"""Sessions connecting and logging in at once; more only queue in the listen backlog."""

REPLY_TIMEOUT_S = 30
"""A reply slower than this aborts the run: the server is stuck, not slow."""

SETUP_TIMEOUT_S = 600
"""Longest a load generator may take to log its sessions in (or out) on every target."""

IDLE_TIMEOUT_S = 36_000
"""Passed to the bank so that no held session expires during a measurement."""

CONNECTIONS_SPARE = 16
"""Headroom beyond the bench's own sessions (and probe): a run never measures the limit."""

FDS_RESERVED = 128
"""Open files a process needs besides its sockets: Python, SQLite, pipes, the log."""

PROBE_REQUESTS = 200
"""Sequential BALANCE round trips timed while idle sessions are held."""

WINDOW_S = 2
"""Each server is measured in windows of about this many seconds, taking turns, so that a
change in the machine's load while the run goes on reaches every figure alike."""

GENERATOR_SATURATED_PERCENT = 90.0
"""Load generator CPU (100 = one core, for its busiest process) from which a figure is the
generator's ceiling, a lower bound on what the server could do, rather than the server's."""

FSYNC_SAMPLES = 50
FSYNC_BLOCK_BYTES = 4096
"""Each fsync sample appends one page to a file, as a commit appends to SQLite's WAL."""

TERMINAL_NAME = "bench"
"""The one terminal certificate a --tls run issues; every session presents it."""

RECEIVE_BYTES_MAX = 4096
PROGRESS_INTERVAL_S = 0.2
PROGRESS_WIDTH = 30
PERCENTILES = (50, 90, 99)

Address = tuple[str, int]


class BenchError(Exception):
    """The run cannot go on: a server refused, closed, stalled or is misconfigured."""


# -- Accounts and the request mix ------------------------------------------------------


def account_name(number: int) -> str:
    return f"{ACCOUNT_PREFIX}{number:05d}"


def account_names(first: int, count: int) -> list[str]:
    return [account_name(n) for n in range(first, first + count)]


def create_accounts(
    db: Path | str, key_file: Path, count: int, *, pin: str = BENCH_PIN
) -> int:
    """Add BN-00001..count (skipping those that exist); returns how many were added.

    Through ``Store`` (or ``PgStore`` for a PostgreSQL ``db``) rather than the server,
    so a bench database is made like an operator's: the same schema, PIN key and checks.
    """
    added = 0
    key = load_or_create_key(key_file)
    opened = PgStore(db, key) if is_postgresql(db) else Store(Path(db), key)
    with opened as store:
        for account in account_names(1, count):
            with contextlib.suppress(AccountExists):
                store.add_account(account, pin, OPENING_CENTS)
                added += 1
    return added


OPS = ("balance", "deposit", "withdraw", "history", "ping")


@dataclass(frozen=True, slots=True)
class Mix:
    """Operations and their integer weights; ``pick`` draws one by weight."""

    names: tuple[str, ...]
    weights: tuple[int, ...]
    cum_weights: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cum_weights", tuple(itertools.accumulate(self.weights)))

    def pick(self, rng: random.Random) -> str:
        """One draw: ``random.choices`` by cumulative weights, without its per-call setup."""
        cum = self.cum_weights
        return self.names[bisect.bisect(cum, rng.random() * cum[-1])]

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self.weights, strict=True))


def parse_mix(text: str) -> Mix:
    """``balance=50,deposit=25,withdraw=25`` -> a Mix; weights are relative integers."""
    weights: dict[str, int] = {}
    for part in text.split(","):
        name, equals, weight = part.strip().partition("=")
        if name not in OPS or not equals or not weight.isdigit():
            raise argparse.ArgumentTypeError(
                f"{part!r} is not OP=WEIGHT with OP one of {', '.join(OPS)}"
            )
        weights[name] = int(weight)
    chosen = {name: weight for name, weight in weights.items() if weight > 0}
    if not chosen:
        raise argparse.ArgumentTypeError("the mix needs at least one positive weight")
    return Mix(tuple(chosen), tuple(chosen.values()))


class TxnIds:
    """Unique 16-byte transaction ids: a random run prefix and a counter.

    Random per run (and per generator process), so a second run against the same
    database is not answered with replays of the first; a counter, so that making one
    costs no system call.
    """

    def __init__(self) -> None:
        self.prefix = os.urandom(8)
        self.counter = itertools.count()

    def next(self) -> bytes:
        return self.prefix + next(self.counter).to_bytes(8, "big")


MONEY_OPS: dict[str, MoneyKind] = {"deposit": DEPOSIT, "withdraw": WITHDRAWAL}
"""The bench's names for the money kinds (``--mix``, the report's keys)."""


def make_request(op: str, txn_ids: TxnIds) -> Request:
    """The message a template of ``op`` encodes (the tests compare the two)."""
    if op in MONEY_OPS:
        return MONEY_OPS[op].request(txn_ids.next(), AMOUNT_CENTS)
    if op == "history":
        return History(HISTORY_COUNT)
    if op == "ping":
        return Ping()
    if op == "logout":
        return Logout()
    return Balance()


# -- Frames from templates, replies checked by their header ------------------------------

_HEAD = FAST_HEADER.head
"""magic, version, opcode, request id, payload length: the 10-byte header."""
_CRC = FAST_CRC
_NO_ID = bytes(4)
_FRAME_OVERHEAD_BYTES: int = HEADER_BYTES + CRC_BYTES
_LEAD = struct.Struct(f">{len(MAGIC)}sBB")


def _lead(opcode: int) -> bytes:
    """A frame's first bytes: magic, version and opcode."""
    return _LEAD.pack(MAGIC, PROTOCOL_VERSION, opcode)


class RequestTemplates:
    """Every request the generator sends, pre-encoded: ``frame`` patches in the request
    id, a fresh transaction id (for money requests) and the CRC.

    The payloads come from ``wire.encode`` of the real messages, so a template cannot
    drift from the codec; ``tests/test_bench.py`` decodes what they make.
    """

    def __init__(self, txn_ids: TxnIds) -> None:
        self.txn_ids = txn_ids
        self._static: dict[str, tuple[struct.Struct, bytes, int, bytes]] = {}
        for op in (*OPS, "logout"):
            if op in MONEY_OPS:
                continue
            payload = encode(make_request(op, txn_ids), 1)[HEADER_BYTES:-CRC_BYTES]
            body = struct.Struct(f">4sIH{len(payload)}s")
            self._static[op] = (body, _lead(make_request(op, txn_ids).OPCODE), len(payload),
                                payload)
        self._money = struct.Struct(">4sIH8sQQ")
        self._money_leads = {op: _lead(kind.request.OPCODE) for op, kind in MONEY_OPS.items()}
        self._money_bytes = self._money.size - HEADER_BYTES

    def frame(self, op: str, request_id: int) -> bytes:
        lead = self._money_leads.get(op)
        if lead is not None:
            body = self._money.pack(
                lead, request_id, self._money_bytes, self.txn_ids.prefix,
                next(self.txn_ids.counter), AMOUNT_CENTS,
            )
        else:
            layout, lead, length, payload = self._static[op]
            body = layout.pack(lead, request_id, length, payload)
        return body + _CRC.pack(zlib.crc32(body))


_REQUEST_TYPES: dict[str, type[Request]] = {
    "balance": Balance, "deposit": DEPOSIT.request, "withdraw": WITHDRAWAL.request,
    "history": History, "ping": Ping, "logout": Logout,
}
REPLY_OPCODES: dict[str, int] = {
    op: reply_type(cls).OPCODE for op, cls in _REQUEST_TYPES.items()  # type: ignore[arg-type]
}
"""The reply opcode that must answer each operation's request."""

_PAYLOAD_BYTES: dict[int, int] = {
    LoginReply.OPCODE: 1, LogoutReply.OPCODE: 1, PingReply.OPCODE: 1,
    BalanceReply.OPCODE: len(encode(BalanceReply(Status.APPROVED, 0), 1)) - HEADER_BYTES
    - CRC_BYTES,
    **{
        kind.reply.OPCODE: len(encode(kind.reply(Status.APPROVED, 0, 1, 1), 1))
        - HEADER_BYTES - CRC_BYTES
        for kind in MONEY_KINDS
    },
}
"""Payload bytes of each fixed-size reply (refused or approved: a reply's fields are
always there, zero unless APPROVED). HISTORY_REPLY is checked by its entry count."""

_HISTORY_ENTRY_BYTES = (
    len(encode(HistoryReply(Status.APPROVED, _entries := (
        HistoryEntry(1, 1, EntryKind.DEPOSIT, 1, 1),
    )), 1)) - HEADER_BYTES - CRC_BYTES - 2
)
_STATUSES: dict[int, frozenset[int]] = {
    int(opcode): frozenset(int(status) for status in statuses)
    for opcode, statuses in REPLY_STATUSES.items()
}
APPROVED = int(Status.APPROVED)


def frame_end(buffer: bytes) -> int:
    """Where the frame at the start of ``buffer`` ends, from its length field (the buffer
    holds at least a header). BenchError for bytes that cannot start a frame."""
    if buffer[:2] != MAGIC:
        raise BenchError("the server sent bytes that are not a frame (bad magic)")
    length = (buffer[8] << 8) | buffer[9]
    if length > PAYLOAD_BYTES_MAX:
        raise BenchError(f"the server announced a payload of {length} bytes")
    return _FRAME_OVERHEAD_BYTES + length


def reply_status(frame: bytes, *, opcode: int, request_id: int) -> int:
    """The status byte of ``frame``, once it is shown to be an intact reply of type
    ``opcode`` to request ``request_id``, of that type's length, with a status that
    type may carry; BenchError otherwise. Nothing else is decoded."""
    magic, version, got_opcode, got_id, length = _HEAD.unpack_from(frame)
    end = len(frame) - CRC_BYTES
    if magic != MAGIC or version != PROTOCOL_VERSION or end != HEADER_BYTES + length:
        raise BenchError("the server sent a malformed frame")
    if zlib.crc32(frame[:end]) != _CRC.unpack_from(frame, end)[0]:
        raise BenchError(f"CRC mismatch in the reply to request {request_id}")
    if got_opcode != opcode or got_id != request_id:
        if got_opcode == Opcode.ERROR and length:
            raise BenchError(
                f"request {request_id} answered with ERROR {Status(frame[HEADER_BYTES]).name}"
            )
        raise BenchError(
            f"frame {_opcode_name(got_opcode)} {got_id} does not answer request "
            f"{request_id} (expected {_opcode_name(opcode)})"
        )
    expected = _PAYLOAD_BYTES.get(opcode)
    if expected is None and length >= 2:  # HISTORY_REPLY: status, count, entries
        expected = 2 + frame[HEADER_BYTES + 1] * _HISTORY_ENTRY_BYTES
    if length != expected:
        raise BenchError(f"{_opcode_name(opcode)} of {length} bytes, not {expected}")
    status = frame[HEADER_BYTES]
    if status not in _STATUSES[opcode]:
        raise BenchError(f"{_opcode_name(opcode)} with status {status}, not one it may carry")
    return status


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode 0x{opcode:02X}"


def check_notice(frame: bytes) -> None:
    """A frame with request id 0 amid the replies: a SESSION_TOKEN (sent after a login)
    is passed over; any other notice (SHUTDOWN, SESSION_EXPIRED, ERROR) ends the run."""
    opcode = frame[3]
    if opcode != Opcode.SESSION_TOKEN:
        raise BenchError(f"the server sent {_opcode_name(opcode)} during the run")


# -- Latency statistics ------------------------------------------------------------------


def percentile_ns(sorted_ns: Sequence[int], percent: int) -> int:
    """Nearest-rank percentile of sorted latencies, in integer arithmetic."""
    if not sorted_ns:
        return 0
    rank = (len(sorted_ns) * percent + 99) // 100
    return sorted_ns[max(rank, 1) - 1]


def ms(ns: int) -> float:
    return round(ns / 1_000_000, 3)


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float | int]:
    """count, then p50/p90/p99/max in milliseconds."""
    ordered = sorted(latencies_ns)
    summary: dict[str, float | int] = {"count": len(ordered)}
    for percent in PERCENTILES:
        summary[f"p{percent}_ms"] = ms(percentile_ns(ordered, percent))
    summary["max_ms"] = ms(ordered[-1]) if ordered else 0.0
    return summary


class Recorder:
    """Latencies (ns) and refusals per operation, as the sessions report them."""

    def __init__(self, ops: Sequence[str]) -> None:
        self.latencies_ns: dict[str, array.array[int]] = {op: array.array("q") for op in ops}
        self.refused: dict[str, int] = dict.fromkeys(ops, 0)
        self.count = 0

    def record(self, op: str, latency_ns: int, *, approved: bool) -> None:
        self.latencies_ns[op].append(latency_ns)
        self.count += 1
        if not approved:
            self.refused[op] += 1

    def merge(self, other: Recorder) -> None:
        for op, latencies in other.latencies_ns.items():
            self.latencies_ns[op].extend(latencies)
            self.refused[op] += other.refused[op]
        self.count += other.count

    def per_op(self) -> dict[str, dict[str, float | int]]:
        return {
            op: {**latency_summary(ns), "refused": self.refused[op]}
            for op, ns in self.latencies_ns.items()
        }

    def overall(self) -> dict[str, float | int]:
        every = list(itertools.chain.from_iterable(self.latencies_ns.values()))
        return {**latency_summary(every), "refused": sum(self.refused.values())}


# -- Logging in: the protocol engine, checked in full --------------------------------------


async def connect(address: Address, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP stream to ``address``; with ``tls``, TLS over it, handshake done.

    As the ATM opens one (``atm.connection._secure``): the server's certificate checked
    for the address it was reached at, https_compatible (every frame carries its own
    length and CRC), and the handshake explicit, so that it is over before HELLO.
    """
    tcp = await trio.open_tcp_stream(*address)
    if tls is None:
        return tcp
    host, port = address
    secure = trio.SSLStream(tcp, tls, server_hostname=host, https_compatible=True)
    try:
        with trio.fail_after(REPLY_TIMEOUT_S):
            await secure.do_handshake()
    except BaseException as error:
        await trio.aclose_forcefully(secure)
        if isinstance(error, trio.TooSlowError):
            raise BenchError(
                f"no TLS handshake with {host}:{port} in {REPLY_TIMEOUT_S} s"
            ) from None
        if isinstance(error, trio.BrokenResourceError):
            raise BenchError(
                f"TLS handshake with {host}:{port} failed: {error.__cause__ or error}"
            ) from None
        raise
    return secure


class BenchSession:
    """One logged-in connection speaking the wire protocol through its engine, one
    request at a time, over TCP or over TLS on TCP: logins, and idle mode's probe."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._engine = Engine(Sender.CLIENT)

    @classmethod
    async def open(
        cls, address: Address, account: str, pin: str, tls: ssl.SSLContext | None = None
    ) -> BenchSession:
        """Connect (with ``tls``, over TLS), read HELLO and log in; BenchError unless the
        login is APPROVED."""
        stream = await connect(address, tls)
        session = cls(stream)
        try:
            await session._expect_hello()
            reply = await session.request(Login(account, pin))
            if reply.status is not Status.APPROVED:
                raise BenchError(
                    f"login to {account} refused: {reply.status.name} (do the bench "
                    "accounts exist? see --create-accounts)"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return session

    @property
    def last_request_id(self) -> int:
        return self._engine.last_request_id

    @property
    def unread(self) -> bytes:
        """Bytes received and not yet made into events (a SESSION_TOKEN, say)."""
        return self._engine.trailing_data

    async def request(self, message: Request) -> Reply:
        """Send one request and return its reply (the engine checks id and type)."""
        try:
            with trio.fail_after(REPLY_TIMEOUT_S):
                await self.stream.send_all(self._engine.send(message))
                event = await self._receive()
        except trio.TooSlowError:
            raise BenchError(f"no reply to {message.OPCODE.name} in {REPLY_TIMEOUT_S} s") from None
        if not isinstance(event, Answer) or not isinstance(event.message, Reply):
            raise BenchError(f"{message.OPCODE.name} answered with {event.message!r}")
        return event.message

    async def close(self) -> None:
        """Log out (bounded; a failure only means the server closes it for us), then close."""
        with (
            trio.move_on_after(REPLY_TIMEOUT_S),
            contextlib.suppress(BenchError, WireError, trio.BrokenResourceError, OSError),
        ):
            await self.request(Logout())
        await self.stream.aclose()

    async def _expect_hello(self) -> None:
        with trio.fail_after(REPLY_TIMEOUT_S):
            event = await self._receive()
        if self._engine.hello is None:
            raise BenchError(f"expected HELLO, got {event.message!r}")

    async def _receive(self) -> Frame | Answer:
        while True:
            try:
                event = self._engine.next_event()
            except WireError as error:  # RemoteProtocolError
                raise BenchError(f"the server broke the protocol: {error}") from None
            if event is not None and not isinstance(event.message, SessionToken):
                return event  # (the token that follows a login resumes nothing here)
            if event is not None:
                continue
            data = await self.stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                raise BenchError("the server closed the connection")
            self._engine.receive_data(data)


async def open_sessions(
    address: Address, accounts: Sequence[str], pin: str, opened: list[BenchSession],
    tls: ssl.SSLContext | None = None,
) -> None:
    """Log ``accounts`` in, SETUP_CONCURRENCY_MAX at a time, into ``opened`` in the order
    of ``accounts`` (``opened`` is resized to match; a slot is None until its session is
    in). The caller owns ``opened`` so that it can close what did open if this fails.
    """
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY_MAX)
    slots: list[BenchSession | None] = [None] * len(accounts)

    async def open_one(index: int, account: str) -> None:
        async with limiter:
            session = await BenchSession.open(address, account, pin, tls)
            slots[index] = session
            opened.append(session)

    async with trio.open_nursery() as nursery:
        for index, account in enumerate(accounts):
            nursery.start_soon(open_one, index, account)
    opened[:] = [session for session in slots if session is not None]


async def close_all(closers: Sequence[Callable[[], Any]]) -> None:
    """Run every closer (an async callable), SETUP_CONCURRENCY_MAX at a time, shielded."""
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY_MAX)

    async def close_one(closer: Callable[[], Any]) -> None:
        async with limiter:
            await closer()

    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for closer in closers:
                nursery.start_soon(close_one, closer)


@contextlib.asynccontextmanager
async def logged_in(
    address: Address, accounts: Sequence[str], pin: str, label: str,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[list[BenchSession], int]]:
    """Sessions for ``accounts`` and the ns it took to open them (connections, TLS
    handshakes with ``tls``, HELLOs and logins); all closed on exit."""
    sessions: list[BenchSession] = []
    try:
        started_ns = time.perf_counter_ns()
        async with progress(f"{label} login", lambda: setup_status(sessions, accounts)):
            await open_sessions(address, accounts, pin, sessions, tls)
        yield sessions, time.perf_counter_ns() - started_ns
    finally:
        await close_all([session.close for session in sessions])


def setup_status(opened: Sequence[BenchSession], wanted: Sequence[str]) -> tuple[float, str]:
    return len(opened) / len(wanted), f"{len(opened)}/{len(wanted)} sessions"


# -- Progress on stderr ------------------------------------------------------------------


def draw_progress(label: str, fraction: float, text: str) -> None:
    filled = min(PROGRESS_WIDTH, int(fraction * PROGRESS_WIDTH))
    bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
    sys.stderr.write(f"\r{label:<12} [{bar}] {text}   ")
    sys.stderr.flush()


@contextlib.asynccontextmanager
async def progress(label: str, status: Callable[[], tuple[float, str]]) -> AsyncIterator[None]:
    """Redraw a one-line bar while the body runs; ``status`` gives (fraction, text).

    Into a file or pipe only the final state is written, so logs get one line each.
    """

    async def redraw() -> None:
        while True:
            draw_progress(label, *status())
            await trio.sleep(PROGRESS_INTERVAL_S)

    async with trio.open_nursery() as nursery:
        if sys.stderr.isatty():
            nursery.start_soon(redraw)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
            draw_progress(label, *status())
            sys.stderr.write("\n")


# -- The load generator's sessions ---------------------------------------------------------


class FastSession:
    """One logged-in session, driven from templates (see the module docstring).

    It takes over the stream ``BenchSession`` logged in on, with the bytes the engine
    had not used yet and its last request id. Plaintext sessions are read and written
    through their descriptor by ``drive_epoll``; TLS ones through their stream by
    ``drive_stream``.
    """

    __slots__ = ("buffer", "fd", "op", "reply_opcode", "request_id", "rng", "started_ns",
                 "stream", "templates")

    def __init__(
        self, session: BenchSession, *, rng: random.Random, templates: RequestTemplates,
    ) -> None:
        self.stream = session.stream
        self.fd = self.stream.socket.fileno() if isinstance(
            self.stream, trio.SocketStream) else -1
        self.buffer = session.unread
        self.request_id = session.last_request_id
        self.rng = rng
        self.templates = templates
        self.op = ""
        self.reply_opcode = 0
        self.started_ns = 0

    def next_request(self, op: str) -> bytes:
        self.op = op
        self.reply_opcode = REPLY_OPCODES[op]
        self.request_id = rid = self.request_id % REQUEST_ID_MAX + 1
        return self.templates.frame(op, rid)

    def take_reply(self, data: bytes) -> int | None:
        """Add ``data``; the status of the reply to the request in hand once it is whole
        (checked by ``reply_status``), None while it is not. Notices are checked and
        passed over."""
        buffer = self.buffer + data if self.buffer else data
        while True:
            if len(buffer) < HEADER_BYTES:
                self.buffer = buffer
                return None
            end = frame_end(buffer)
            if len(buffer) < end:
                self.buffer = buffer
                return None
            frame, buffer = buffer[:end], buffer[end:]
            if frame[4:8] == _NO_ID:
                check_notice(frame)
                continue
            self.buffer = buffer
            return reply_status(frame, opcode=self.reply_opcode, request_id=self.request_id)

    async def close(self) -> None:
        """LOGOUT (bounded; a failure only means the server closes it for us), then close."""
        with (
            trio.move_on_after(REPLY_TIMEOUT_S),
            contextlib.suppress(BenchError, trio.BrokenResourceError, OSError),
        ):
            await self.stream.send_all(self.next_request("logout"))
            while (data := await self.stream.receive_some(RECEIVE_BYTES_MAX)) and \
                    self.take_reply(bytes(data)) is None:
                pass
        await trio.aclose_forcefully(self.stream)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking descriptor (it nearly always takes it at once)."""
    sent = os.write(fd, data)
    while sent < len(data):
        _, writable, _ = select.select([], [fd], [], REPLY_TIMEOUT_S)
        if not writable:
            raise BenchError(f"the server took no request bytes in {REPLY_TIMEOUT_S} s")
        sent += os.write(fd, data[sent:])


def drive_epoll(
    sessions: Sequence[FastSession], mix: Mix, recorder: Recorder, window_ns: int
) -> int:
    """Closed loop over every plaintext session, in this thread: each session's next
    request goes out when its reply is in, until ``window_ns`` has passed; the ns until
    the last reply was in.

    One ``epoll`` wait serves every session whose reply has arrived, so a request costs
    a read, a write and the checks, and no task switch.
    """
    perf = time.perf_counter_ns
    by_fd = {session.fd: session for session in sessions}
    poller = select.epoll(max(len(by_fd), 1))
    try:
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        started_ns = perf()
        deadline_ns = started_ns + window_ns
        for session in sessions:
            data = session.next_request(mix.pick(session.rng))
            session.started_ns = perf()
            _write_all(session.fd, data)
        waiting = len(sessions)
        while waiting:
            events = poller.poll(REPLY_TIMEOUT_S)
            if not events:
                raise BenchError(f"no reply in {REPLY_TIMEOUT_S} s")
            for fd, _mask in events:
                session = by_fd[fd]
                try:
                    data = os.read(fd, RECEIVE_BYTES_MAX)
                except BlockingIOError:
                    continue
                if not data:
                    raise BenchError("the server closed the connection")
                status = session.take_reply(data)
                if status is None:
                    continue
                now_ns = perf()
                recorder.record(session.op, now_ns - session.started_ns,
                                approved=status == APPROVED)
                if now_ns < deadline_ns:
                    data = session.next_request(mix.pick(session.rng))
                    session.started_ns = perf()
                    _write_all(fd, data)
                else:
                    waiting -= 1
        return perf() - started_ns
    finally:
        poller.close()


async def drive_stream(
    sessions: Sequence[FastSession], mix: Mix, recorder: Recorder, window_ns: int
) -> int:
    """As ``drive_epoll``, for sessions on any Trio stream (TLS): a task per session."""
    perf = time.perf_counter_ns
    started_ns = perf()
    deadline_ns = started_ns + window_ns

    async def drive(session: FastSession) -> None:
        stream = session.stream
        while perf() < deadline_ns:
            data = session.next_request(mix.pick(session.rng))
            session.started_ns = perf()
            await stream.send_all(data)
            status = None
            while status is None:
                received = await stream.receive_some(RECEIVE_BYTES_MAX)
                if not received:
                    raise BenchError("the server closed the connection")
                status = session.take_reply(bytes(received))
            recorder.record(session.op, perf() - session.started_ns,
                            approved=status == APPROVED)

    try:
        with trio.fail_after(window_ns / 1e9 + REPLY_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(drive, session)
    except trio.TooSlowError:
        raise BenchError(f"no reply in {REPLY_TIMEOUT_S} s") from None
    return perf() - started_ns


# -- Load generator processes --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A server to load: where it listens, its pid (for its CPU) and, for a server that
    speaks TLS, the context its sessions connect with."""

    label: str
    address: Address
    pid: int | None
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class GeneratorPlan:
    """What one generator process does: log ``accounts`` in on every target, its
    sessions numbered from ``numbers`` (for their random sequences), then run windows."""

    targets: tuple[Target, ...]
    accounts: tuple[str, ...]
    numbers: tuple[int, ...]
    mix: Mix
    pin: str


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One generator process's part of one window."""

    recorder: Recorder
    elapsed_ns: int
    cpu_s: float


class Generator:
    """The sessions of one generator process, on every target."""

    def __init__(self, plan: GeneratorPlan) -> None:
        self.plan = plan
        self.sessions: list[list[FastSession]] = []

    async def open(self) -> list[int]:
        """Log in on every target, one after another; the ns each took."""
        plan = self.plan
        setup_ns = []
        for target in plan.targets:
            opened: list[BenchSession] = []
            started_ns = time.perf_counter_ns()
            try:
                await open_sessions(target.address, plan.accounts, plan.pin, opened, target.tls)
            except BaseException:
                await close_all([session.close for session in opened])
                raise
            setup_ns.append(time.perf_counter_ns() - started_ns)
            templates = RequestTemplates(TxnIds())
            self.sessions.append([
                FastSession(session, rng=random.Random(number), templates=templates)
                for session, number in zip(opened, plan.numbers, strict=True)
            ])
        return setup_ns

    async def window(self, index: int, window_ns: int) -> WindowResult:
        recorder = Recorder(self.plan.mix.names)
        sessions = self.sessions[index]
        cpu_before = own_cpu_s()
        if self.plan.targets[index].tls is None:
            elapsed_ns = drive_epoll(sessions, self.plan.mix, recorder, window_ns)
        else:
            elapsed_ns = await drive_stream(sessions, self.plan.mix, recorder, window_ns)
        return WindowResult(recorder, elapsed_ns, own_cpu_s() - cpu_before)

    async def close(self) -> None:
        await close_all([session.close for target in self.sessions for session in target])


def generator_main(pipe: Pipe, plan: GeneratorPlan) -> None:
    """A generator process: answers ("opened", setup ns), then a WindowResult for each
    ("window", target index, ns) it is sent, until ("close",); ("error", messages) if
    anything fails."""
    try:
        trio.run(_serve_generator, pipe, plan)
    except BaseException as error:  # the parent reports it; the process ends here
        with contextlib.suppress(OSError):
            pipe.send(("error", list(dict.fromkeys(leaf_messages(error)))))
    finally:
        pipe.close()


async def _serve_generator(pipe: Pipe, plan: GeneratorPlan) -> None:
    generator = Generator(plan)
    try:
        pipe.send(("opened", await generator.open()))
        while (command := pipe.recv())[0] == "window":  # blocks: nothing else runs here
            pipe.send(("window", await generator.window(command[1], command[2])))
    finally:
        await generator.close()
    pipe.send(("closed",))


class GeneratorPool:
    """K generator processes, forked (they inherit the targets, TLS contexts included),
    each with its share of the sessions. Everything here blocks, each wait bounded."""

    def __init__(self, plans: Sequence[GeneratorPlan]) -> None:
        context = multiprocessing.get_context("fork")
        self._pipes: list[Pipe] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for plan in plans:
            ours, theirs = context.Pipe()
            process = context.Process(target=generator_main, args=(theirs, plan), daemon=True)
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)

    def opened(self) -> list[list[int]]:
        """Each process's login time on each target, once all are logged in."""
        return [self._receive(pipe, "opened", SETUP_TIMEOUT_S)[1] for pipe in self._pipes]

    def window(self, index: int, window_ns: int, label: str) -> list[WindowResult]:
        for pipe in self._pipes:
            pipe.send(("window", index, window_ns))
        window_s = window_ns / 1e9
        started = time.monotonic()
        if sys.stderr.isatty():
            while not all(pipe.poll(0) for pipe in self._pipes):
                elapsed = time.monotonic() - started
                draw_progress(label, elapsed / window_s, f"{elapsed:5.1f}/{window_s:.1f} s")
                time.sleep(PROGRESS_INTERVAL_S)
        results = [self._receive(pipe, "window", window_s + REPLY_TIMEOUT_S)[1]
                   for pipe in self._pipes]
        draw_progress(label, 1, f"{window_s:.1f} s  {sum(r.recorder.count for r in results)} ops")
        sys.stderr.write("\n")
        return results

    def close(self) -> None:
        """Log every session out and end the processes (killed if they do not end)."""
        try:
            for pipe in self._pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("close",))
            for pipe in self._pipes:
                with contextlib.suppress(BenchError):
                    self._receive(pipe, "closed", SETUP_TIMEOUT_S)
        finally:
            for process in self._processes:
                process.join(REPLY_TIMEOUT_S)
                if process.is_alive():
                    process.kill()
                    process.join(REPLY_TIMEOUT_S)
            for pipe in self._pipes:
                pipe.close()

    @staticmethod
    def _receive(pipe: Pipe, expected: str, timeout_s: float) -> tuple[Any, ...]:
        if not pipe.poll(timeout_s):
            raise BenchError(f"a load generator sent nothing in {timeout_s:.0f} s")
        try:
            message: tuple[Any, ...] = pipe.recv()
        except EOFError:
            raise BenchError("a load generator process died") from None
        if message[0] == "error":
            raise BenchError("; ".join(message[1]))
        if message[0] != expected:
            raise BenchError(f"a load generator answered {message[0]!r}, not {expected!r}")
        return message

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def generator_plans(
    targets: Sequence[Target], options: LoadOptions, generators: int
) -> list[GeneratorPlan]:
    """The sessions dealt out in turn, so every process gets the same share (within one)."""
    accounts = account_names(1, options.sessions)
    count = min(generators, len(accounts))
    return [
        GeneratorPlan(
            tuple(targets), tuple(accounts[g::count]),
            tuple(range(g, len(accounts), count)), options.mix, options.pin,
        )
        for g in range(count)
    ]


# -- Load mode ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions:
    sessions: int
    seconds: int
    mix: Mix
    pin: str


@dataclass(frozen=True, slots=True)
class LoadResult:
    ops_per_s: float
    logins_per_s: float
    elapsed_s: float
    overall: dict[str, float | int]
    per_op: dict[str, dict[str, float | int]]
    server_cpu_s: float | None
    generator_cpu_s: float
    generator_cpu_max_s: float
    """The busiest generator process's CPU time: the one that saturates first."""
    generators: int = 1

    @property
    def server_cpu_percent(self) -> float | None:
        if self.server_cpu_s is None:
            return None
        return cpu_percent(self.server_cpu_s, round(self.elapsed_s * 1e9))

    @property
    def generator_cpu_percent(self) -> float:
        """All generator processes together (100 = one core)."""
        return cpu_percent(self.generator_cpu_s, round(self.elapsed_s * 1e9))

    @property
    def generator_cpu_percent_max(self) -> float:
        return cpu_percent(self.generator_cpu_max_s, round(self.elapsed_s * 1e9))

    @property
    def server_cpu_us_per_op(self) -> float | None:
        """The server's CPU time per operation, which the machine's noise moves much
        less than throughput."""
        if self.server_cpu_s is None:
            return None
        return cpu_us_per_op(self.server_cpu_s, int(self.overall["count"]))

    @property
    def generator_cpu_us_per_op(self) -> float:
        return cpu_us_per_op(self.generator_cpu_s, int(self.overall["count"]))

    @property
    def generator_saturated(self) -> bool:
        """A generator process kept its core busy: the figure may be its ceiling."""
        return self.generator_cpu_percent_max >= GENERATOR_SATURATED_PERCENT

    def as_dict(self) -> dict[str, object]:
        return {
            "ops_per_s": round(self.ops_per_s, 1),
            "logins_per_s": round(self.logins_per_s, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "server_cpu_percent": self.server_cpu_percent,
            "generator_cpu_percent": self.generator_cpu_percent,
            "generator_cpu_percent_max": self.generator_cpu_percent_max,
            "server_cpu_us_per_op": self.server_cpu_us_per_op,
            "generator_cpu_us_per_op": self.generator_cpu_us_per_op,
            "generator_saturated": self.generator_saturated,
            "generators": self.generators,
            **self.overall,
            "ops": self.per_op,
        }


@dataclass(slots=True)
class Tally:
    """One target's measurement so far, summed over its windows."""

    recorder: Recorder
    setup_ns: int
    generator_cpu_s: list[float]
    elapsed_ns: int = 0
    server_cpu_s: float | None = 0.0

    def add(self, results: Sequence[WindowResult], server_cpu_s: float | None) -> None:
        for result, process in zip(results, itertools.count(), strict=False):
            self.recorder.merge(result.recorder)
            self.generator_cpu_s[process] += result.cpu_s
        self.elapsed_ns += max(result.elapsed_ns for result in results)
        if self.server_cpu_s is None or server_cpu_s is None:
            self.server_cpu_s = None
        else:
            self.server_cpu_s += server_cpu_s

    def result(self, sessions: int) -> LoadResult:
        return LoadResult(
            ops_per_s=per_second(self.recorder.count, self.elapsed_ns),
            logins_per_s=per_second(sessions, self.setup_ns),
            elapsed_s=self.elapsed_ns / 1e9,
            overall=self.recorder.overall(),
            per_op=self.recorder.per_op(),
            server_cpu_s=self.server_cpu_s,
            generator_cpu_s=sum(self.generator_cpu_s),
            generator_cpu_max_s=max(self.generator_cpu_s),
            generators=len(self.generator_cpu_s),
        )


def per_second(count: int, elapsed_ns: int) -> float:
    return count * 1_000_000_000 / max(elapsed_ns, 1)


def turns(count: int, rounds: int) -> Iterator[tuple[int, int]]:
    """(round, target index) in the order windows run: round by round, the targets'
    order rotated by one each round, so that none is always first or always follows
    the same one."""
    for round_ in range(rounds):
        for step in range(count):
            yield round_, (round_ + step) % count


def measure_load(
    targets: Sequence[Target], options: LoadOptions, rounds: int, generators: int,
) -> tuple[list[LoadResult], list[list[float]]]:
    """Log every target's sessions in (in the generator processes), run the mix on one
    target at a time for ``rounds`` windows each (``options.seconds`` in all per target),
    log out. Also the load averages (1, 5, 15 min) before each window.

    Only the windows are measured: connecting, TLS handshakes and logins come before
    them (their rate is reported apart), and meanwhile the sessions of the targets not
    being measured are held idle.
    """
    window_ns = options.seconds * 1_000_000_000 // rounds
    plans = generator_plans(targets, options, generators)
    loads: list[list[float]] = []
    with GeneratorPool(plans) as pool:
        setups = pool.opened()
        for target in targets:
            print(f"{target.label}: {options.sessions} sessions logged in", file=sys.stderr)
        tallies = [
            Tally(Recorder(options.mix.names), max(setup[index] for setup in setups),
                  [0.0] * len(plans))
            for index in range(len(targets))
        ]
        for round_, index in turns(len(targets), rounds):
            target = targets[index]
            label = target.label if rounds == 1 else f"{target.label} {round_ + 1}/{rounds}"
            loads.append([round(load, 2) for load in os.getloadavg()])
            server_before = process_tree_cpu_s(target.pid)
            results = pool.window(index, window_ns, label)
            server_after = process_tree_cpu_s(target.pid)
            used = (None if server_before is None or server_after is None
                    else server_after - server_before)
            tallies[index].add(results, used)
    return [tally.result(options.sessions) for tally in tallies], loads


# -- CPU accounting: which side is the bottleneck -----------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of a process, all its threads (Linux /proc); None
    if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": field 3 is fields[0]
    utime_ticks, stime_ticks = int(fields[11]), int(fields[12])
    return (utime_ticks + stime_ticks) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (``--workers`` makes the bank a process tree)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def process_tree_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and its live descendants; None without a pid."""
    if pid is None:
        return None
    own = process_cpu_s(pid)
    if own is None:
        return None
    return own + sum(cpu or 0.0 for cpu in map(process_cpu_s, child_pids(pid)))


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_percent(cpu_s: float, elapsed_ns: int) -> float:
    """CPU time over wall time: 100 is one core kept busy."""
    return round(cpu_s * 1e11 / max(elapsed_ns, 1), 1)


def cpu_us_per_op(cpu_s: float, count: int) -> float:
    """CPU time per operation, in microseconds."""
    return round(cpu_s * 1e6 / max(count, 1), 1)


def measure_fsync_ns(directory: Path, count: int = FSYNC_SAMPLES) -> list[int]:
    """Durations of ``count`` page appends each made durable with fsync, in ``directory``
    (the database's file system): what one commit of the bank waits for at least."""
    path = directory / "fsync-probe"
    block = bytes(FSYNC_BLOCK_BYTES)
    durations = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            started_ns = time.perf_counter_ns()
            os.write(fd, block)
            os.fsync(fd)
            durations.append(time.perf_counter_ns() - started_ns)
    finally:
        os.close(fd)
        path.unlink()
    return sorted(durations)


# -- Idle mode ---------------------------------------------------------------------------


async def read_rss_kib(pid: int) -> int:
    """The process's resident set size from /proc (Linux), in KiB."""
    text = await trio.Path(f"/proc/{pid}/status").read_text()
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


async def probe_latency(session: BenchSession, count: int) -> list[int]:
    latencies_ns = []
    for _ in range(count):
        started_ns = time.perf_counter_ns()
        await session.request(Balance())
        latencies_ns.append(time.perf_counter_ns() - started_ns)
    return latencies_ns


async def measure_idle(
    address: Address, count: int, pin: str, pid: int | None
) -> dict[str, object]:
    """RSS per held session and a probe session's latency while they are held.

    The probe logs in and makes its requests first, so the server's one-off costs (its
    worker thread, SQLite's page cache) are paid before the first RSS reading.
    """
    probe_account, idle_accounts = account_name(count + 1), account_names(1, count)
    async with logged_in(address, [probe_account], pin, "probe") as (probes, _):
        await probe_latency(probes[0], PROBE_REQUESTS)
        rss_before = await read_rss_kib(pid) if pid else None
        async with logged_in(address, idle_accounts, pin, "idle") as (_held, setup_ns):
            rss_after = await read_rss_kib(pid) if pid else None
            latencies_ns = await probe_latency(probes[0], PROBE_REQUESTS)
    growth = (
        round((rss_after - rss_before) / count, 2)
        if rss_before is not None and rss_after is not None else None
    )
    return {
        "sessions": count,
        "logins_per_s": round(per_second(count, setup_ns), 1),
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_kib_per_session": growth,
        "probe_requests": PROBE_REQUESTS,
        **latency_summary(latencies_ns),
    }


# -- The echo server ---------------------------------------------------------------------


def echo_hello() -> Hello:
    return Hello(PAYLOAD_BYTES_MAX, HISTORY_ENTRIES_MAX, AMOUNT_CENTS_MAX, 10, 30, IDLE_TIMEOUT_S)


def _history_entries(count: int) -> tuple[HistoryEntry, ...]:
    return tuple(
        HistoryEntry(count - i, 1, EntryKind.DEPOSIT, AMOUNT_CENTS, OPENING_CENTS)
        for i in range(count)
    )


def _payload(message: Reply) -> bytes:
    return encode(message, 1)[HEADER_BYTES:-CRC_BYTES]


_ECHO_PAYLOADS: dict[int, bytes] = {
    Opcode.LOGIN: _payload(LoginReply(Status.APPROVED)),
    Opcode.LOGOUT: _payload(LogoutReply(Status.APPROVED)),
    Opcode.PING: _payload(PingReply(Status.APPROVED)),
    Opcode.BALANCE: _payload(BalanceReply(Status.APPROVED, OPENING_CENTS)),
    **{
        kind.request.OPCODE: _payload(kind.reply(Status.APPROVED, OPENING_CENTS, 1, 1))
        for kind in MONEY_KINDS
    },
    **{
        # HISTORY: by the count asked for (byte 10), 0 for a request too short to say.
        0x100 + count: _payload(HistoryReply(Status.APPROVED, _history_entries(count)))
        for count in range(HISTORY_ENTRIES_MAX + 1)
    },
}
"""The payload of the approved reply to each request opcode, with every field filled:
the size of the bank's approved replies."""

_ECHO_LEADS: dict[int, bytes] = {opcode: _lead(opcode | 0x80) for opcode in Opcode if opcode < 0x80}
_ECHO_REFUSAL = encode(Error(Status.FORMAT_ERROR), 0)


def echo_reply_frame(request: bytes) -> tuple[bytes, bool]:
    """The reply frame to one request frame (split by its length field), and whether the
    conversation ends with it (LOGOUT, or a frame that is none of ours).

    Nothing is decoded but the opcode, the request id and a HISTORY's count: the echo
    server does what any server must (frame and answer) and none of the bank's work."""
    opcode = request[3]
    if opcode == Opcode.HISTORY:
        count = request[HEADER_BYTES] if len(request) > HEADER_BYTES + CRC_BYTES else 0
        payload = _ECHO_PAYLOADS.get(0x100 + count)
    else:
        payload = _ECHO_PAYLOADS.get(opcode)
    if payload is None:
        return _ECHO_REFUSAL, True
    body = b"".join((_ECHO_LEADS[opcode], request[4:8], len(payload).to_bytes(2, "big"), payload))
    return body + _CRC.pack(zlib.crc32(body)), opcode == Opcode.LOGOUT


async def echo_connection(stream: trio.SocketStream) -> None:
    """Greet, then answer each request frame with ``echo_reply_frame`` until LOGOUT or
    EOF, reading and writing as the bank does (``bank.transport.SocketTransport``)."""
    transport = SocketTransport(stream)
    buffer = b""
    try:
        await transport.send_all(frame_bytes(Opcode.HELLO, 0, _payload_of_hello()))
        while data := await transport.receive_some():
            buffer += data
            while len(buffer) >= HEADER_BYTES:
                end = HEADER_BYTES + ((buffer[8] << 8) | buffer[9]) + CRC_BYTES
                if len(buffer) < end:
                    break
                reply, last = echo_reply_frame(buffer[:end])
                buffer = buffer[end:]
                await transport.send_all(reply)
                if last:
                    return
    except Exception:  # one bad connection must not end the server; the bench will see it
        return
    finally:
        await transport.aclose()


@functools.cache
def _payload_of_hello() -> bytes:
    return encode(echo_hello(), 0)[HEADER_BYTES:-CRC_BYTES]


def serve_echo(host: str, port: int, ready_file: Path | None) -> int:
    """Serve until killed: the bench stops it with SIGTERM, and it holds no state."""
    trio.run(run_echo_server, host, port, ready_file)
    return EXIT_OK


async def run_echo_server(host: str, port: int, ready_file: Path | None) -> None:
    """Serve echo connections; once listening, say so in the ready file, as the bank does."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo_connection, port, host=host)
        )
        if ready_file is not None:
            write_ready_file(ready_file, listening_addresses(listeners))


# -- Server subprocesses -----------------------------------------------------------------


def is_database_url(db: str) -> bool:
    """A PostgreSQL URL or libpq connection string rather than a SQLite path: as the
    bank decides it (``bank.config.is_postgresql``)."""
    return is_postgresql(db)


def bank_args(
    workdir: Path, connections: int, *, db: str | None = None, key_file: Path | None = None,
    workers: int | None = None,
) -> list[str]:
    """The bank's flags: its database (a temporary SQLite file in ``workdir`` unless
    ``db``), limits that admit every bench session, and ``--workers`` only if asked
    for (so that a bank without the flag still runs)."""
    args = [
        "--db", db if db is not None else str(workdir / "bank.db"),
        "--key-file", str(key_file if key_file is not None else workdir / "bank.key"),
        "--log-level", "WARNING",
        "--connections-max", str(connections + CONNECTIONS_SPARE),
        # Every session comes from 127.0.0.1 and up to SETUP_CONCURRENCY_MAX log in at
        # once: the per-address limit on connections not logged in must not refuse them.
        "--preauth-per-address-max", str(connections + CONNECTIONS_SPARE),
        "--idle-timeout-s", str(IDLE_TIMEOUT_S),
        "--shutdown-grace-s", "1",
    ]
    if workers is not None:
        args += ["--workers", str(workers)]
    return args


def prepare_database(db: str | None, workdir: Path, key_file: Path, accounts: int,
                     pin: str) -> None:
    """Add the bench accounts the database lacks (the temporary SQLite file in
    ``workdir`` without ``db``)."""
    create_accounts(db if db else workdir / "bank.db", key_file, accounts, pin=pin)


@contextlib.contextmanager
def bank_target(
    args: argparse.Namespace, workdir: Path, accounts: int, *, db: str | None = None,
) -> Iterator[tuple[Address, int | None]]:
    """(address, server pid or None): the --port bank, or a fresh one on ``db`` (a
    temporary SQLite database without one)."""
    if args.port is not None:
        yield (args.host, args.port), args.server_pid
        return
    workdir.mkdir(mode=0o700, exist_ok=True)
    key_file = args.key_file if db is not None else workdir / "bank.key"
    prepare_database(db, workdir, key_file, accounts, args.pin)
    launch = bank_args(workdir, accounts, db=db, key_file=key_file, workers=args.workers)
    with launcher.start(launch, workdir=workdir, name="bank") as server:
        yield server.address, server.pid


@contextlib.contextmanager
def tls_bank_target(
    workdir: Path, accounts: int, pin: str
) -> Iterator[tuple[Address, int, ssl.SSLContext]]:
    """(address, pid, client context): a second bank, on its own database in ``workdir``,
    serving TLS and requiring a terminal certificate, as a deployment would.

    The run's CA, the server's certificate for 127.0.0.1 and one terminal certificate
    are made with ``bank.tls`` in ``workdir/certs``; every session presents that one.
    """
    workdir.mkdir(mode=0o700, exist_ok=True)
    certs = workdir / "certs"
    server = init_ca_and_server(certs, [launcher.LOOPBACK])
    terminal = issue_terminal(certs, TERMINAL_NAME)
    context = client_context(terminal.ca, cert=terminal.cert, key=terminal.key)
    create_accounts(workdir / "bank.db", workdir / "bank.key", accounts, pin=pin)
    args = [
        *bank_args(workdir, accounts),
        "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        "--tls-client-ca", str(server.ca),
    ]
    with launcher.start(args, workdir=workdir, name="bank") as bank:
        yield bank.address, bank.pid, context


@contextlib.contextmanager
def echo_target(workdir: Path) -> Iterator[tuple[Address, int]]:
    with launcher.start(
        ["--echo-server"], workdir=workdir, name="echo", module="bank.tools.bench"
    ) as server:
        yield server.address, server.pid


@contextlib.contextmanager
def floor_target(workdir: Path) -> Iterator[tuple[Address, int]]:
    with launcher.start([], workdir=workdir, name="floor", module="bank.tools.floor") as server:
        yield server.address, server.pid


# -- Open files --------------------------------------------------------------------------


def ensure_open_files(sessions: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard limit; BenchError if it cannot fit.

    The bank subprocess inherits the raised limit, and it needs a socket per session too.
    """
    needed = sessions + CONNECTIONS_SPARE + FDS_RESERVED
    allowed = raise_open_files_limit(needed)
    if allowed < needed:
        raise BenchError(
            f"{sessions} sessions need about {needed} open files per process, but only "
            f"{allowed} are allowed; use fewer sessions or raise the hard limit (ulimit -Hn)"
        )


# -- Reports -----------------------------------------------------------------------------


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "cpus": os.cpu_count()}


def op_table(title: str, result: LoadResult) -> str:
    server_percent, server_us = result.server_cpu_percent, result.server_cpu_us_per_op
    lines = [
        f"{title}: {result.ops_per_s:.1f} ops/s over {result.elapsed_s:.2f} s, "
        f"logins {result.logins_per_s:.1f}/s; CPU: server "
        f"{server_percent if server_percent is not None else '?'} % "
        f"({server_us if server_us is not None else '?'} µs/op), "
        f"load generator {result.generator_cpu_percent} % "
        f"({result.generator_cpu_us_per_op} µs/op, {result.generators} "
        f"process{'es' if result.generators > 1 else ''}) (100 % = one core)",
        f"  {'op':<9} {'count':>8} {'refused':>8} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8}",
    ]
    for op, row in [*result.per_op.items(), ("all", result.overall)]:
        lines.append(
            f"  {op:<9} {row['count']:>8} {row['refused']:>8} {row['p50_ms']:>8.3f} "
            f"{row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f} {row['max_ms']:>8.3f}"
        )
    if result.generator_saturated:
        lines.append(
            f"  a load generator process kept its core busy "
            f"({result.generator_cpu_percent_max} %): {title}'s figure is the generator's "
            "ceiling, a lower bound for the server"
        )
    return "\n".join(lines)


def latency_keys(result: LoadResult | None, prefix: str) -> dict[str, float | None]:
    """p50_ms .. max_ms over every operation, with ``prefix``; None without a result."""
    names = [f"p{percent}_ms" for percent in PERCENTILES] + ["max_ms"]
    return {
        prefix + name: (float(result.overall[name]) if result else None)  # latency, ms
        for name in names
    }


def ratio(over: float | None, under: float | None) -> float | None:
    if over is None or not under:
        return None
    return round(over / under, 4)


def side_keys(result: LoadResult | None, prefix: str) -> dict[str, object]:
    """A non-default target's figures, prefixed (None without that target)."""
    return {
        f"{prefix}_ops_per_s": round(result.ops_per_s, 1) if result else None,
        f"{prefix}_logins_per_s": round(result.logins_per_s, 1) if result else None,
        **latency_keys(result, f"{prefix}_"),
        f"{prefix}_refused": result.overall["refused"] if result else None,
        f"{prefix}_cpu_percent": result.server_cpu_percent if result else None,
        f"{prefix}_cpu_us_per_op": result.server_cpu_us_per_op if result else None,
        f"{prefix}_generator_cpu_percent": result.generator_cpu_percent if result else None,
        f"{prefix}_generator_cpu_us_per_op": result.generator_cpu_us_per_op if result else None,
        f"{prefix}_generator_saturated": result.generator_saturated if result else None,
    }


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What a load run records besides its targets' results."""

    rounds: int
    generators: int
    fsync_ns: list[int]
    loadavg: list[list[float]]
    db: str
    compare_db: str | None
    workers: int | None


def load_report(
    options: LoadOptions, bank: LoadResult, echo: LoadResult | None,
    tls: LoadResult | None = None, rounds: int = 1, *, facts: RunFacts | None = None,
    compare: LoadResult | None = None, floor: LoadResult | None = None,
) -> dict[str, object]:
    """The JSON report: the plaintext bank's keys as they always were, the echo
    baseline's, and (None without --tls) the TLS bank's, ``tls_ratio`` TLS/plaintext;
    then the generator's CPU beside each server's, their ratios, the fsync time and the
    load averages of the run."""
    fsync = facts.fsync_ns if facts else []
    loads = facts.loadavg if facts else []
    return {
        "mode": "load",
        **machine(),
        "sessions": options.sessions,
        "seconds": options.seconds,
        "windows": rounds,
        "window_s": round(options.seconds / rounds, 3),
        "generators": facts.generators if facts else 1,
        "db": facts.db if facts else "sqlite",
        "compare_db": facts.compare_db if facts else None,
        "workers": facts.workers if facts else None,
        "mix": options.mix.as_dict(),
        "bank_ops_per_s": round(bank.ops_per_s, 1),
        "echo_ops_per_s": round(echo.ops_per_s, 1) if echo else None,
        "ratio": ratio(bank.ops_per_s, echo.ops_per_s if echo else None),
        "bank_logins_per_s": round(bank.logins_per_s, 1),
        "echo_logins_per_s": round(echo.logins_per_s, 1) if echo else None,
        **latency_keys(bank, ""),
        **latency_keys(echo, "echo_"),
        "p99_ratio": ratio(bank.overall["p99_ms"], echo.overall["p99_ms"] if echo else None),
        "refused": bank.overall["refused"],
        "bank_cpu_percent": bank.server_cpu_percent,
        "echo_cpu_percent": echo.server_cpu_percent if echo else None,
        "bank_cpu_us_per_op": bank.server_cpu_us_per_op,
        "echo_cpu_us_per_op": echo.server_cpu_us_per_op if echo else None,
        "cpu_ratio": ratio(bank.server_cpu_us_per_op,
                           echo.server_cpu_us_per_op if echo else None),
        "generator_cpu_percent": bank.generator_cpu_percent,
        "generator_cpu_us_per_op": bank.generator_cpu_us_per_op,
        "generator_saturated": bank.generator_saturated,
        "echo_generator_cpu_percent": echo.generator_cpu_percent if echo else None,
        "echo_generator_cpu_us_per_op": echo.generator_cpu_us_per_op if echo else None,
        "echo_generator_saturated": echo.generator_saturated if echo else None,
        "fsync_p50_ms": ms(percentile_ns(fsync, 50)) if fsync else None,
        "fsync_p90_ms": ms(percentile_ns(fsync, 90)) if fsync else None,
        "loadavg_first": loads[0] if loads else None,
        "loadavg_last": loads[-1] if loads else None,
        "loadavg_max_1min": max(load[0] for load in loads) if loads else None,
        "tls_ops_per_s": round(tls.ops_per_s, 1) if tls else None,
        "tls_ratio": ratio(tls.ops_per_s, bank.ops_per_s) if tls else None,
        "tls_logins_per_s": round(tls.logins_per_s, 1) if tls else None,
        **latency_keys(tls, "tls_"),
        "tls_refused": tls.overall["refused"] if tls else None,
        "tls_cpu_percent": tls.server_cpu_percent if tls else None,
        "tls_cpu_us_per_op": tls.server_cpu_us_per_op if tls else None,
        "tls_generator_cpu_percent": tls.generator_cpu_percent if tls else None,
        "tls_generator_cpu_us_per_op": tls.generator_cpu_us_per_op if tls else None,
        "tls_generator_saturated": tls.generator_saturated if tls else None,
        **side_keys(compare, "compare"),
        "compare_ratio": ratio(compare.ops_per_s, bank.ops_per_s) if compare else None,
        **side_keys(floor, "floor"),
        "floor_ratio": ratio(floor.ops_per_s, echo.ops_per_s) if floor and echo else None,
        "floor_cpu_ratio": ratio(floor.server_cpu_us_per_op, echo.server_cpu_us_per_op)
        if floor and echo else None,
        "bank_floor_ratio": ratio(bank.ops_per_s, floor.ops_per_s) if floor else None,
        "ops": bank.per_op,
        "bank": bank.as_dict(),
        "echo": echo.as_dict() if echo else None,
        "tls": tls.as_dict() if tls else None,
        "compare": compare.as_dict() if compare else None,
        "floor": floor.as_dict() if floor else None,
    }


def db_kind(db: str | None) -> str:
    return "postgresql" if db is not None and is_database_url(db) else "sqlite"


def run_load(args: argparse.Namespace) -> dict[str, object]:
    """Every target started, then their windows in turns: the bank, the TLS bank (with
    --tls), the bank on --compare-db (with it), the floor (with --floor) and the echo
    baseline."""
    options = LoadOptions(args.sessions, args.seconds, args.mix, args.pin)
    rounds = max(1, options.seconds // WINDOW_S)
    servers_count = (
        1 + args.tls + (args.compare_db is not None) + args.floor + (not args.no_echo)
    )
    ensure_open_files(options.sessions * servers_count)
    with (
        tempfile.TemporaryDirectory(prefix="bank-bench-", dir=args.dir) as tmp,
        contextlib.ExitStack() as servers,
    ):
        workdir = Path(tmp)
        db_dir = Path(args.db).parent if args.db and not is_database_url(args.db) else workdir
        fsync_ns = measure_fsync_ns(db_dir)
        print(f"fsync of a {FSYNC_BLOCK_BYTES}-byte append in {db_dir}: p50 "
              f"{ms(percentile_ns(fsync_ns, 50))} ms, p90 {ms(percentile_ns(fsync_ns, 90))} ms",
              file=sys.stderr)
        targets = [Target("bank", *servers.enter_context(
            bank_target(args, workdir / "bank", options.sessions, db=args.db)
        ))]
        if args.tls:
            targets.append(Target("tls", *servers.enter_context(
                tls_bank_target(workdir / "tls-bank", options.sessions, args.pin)
            )))
        if args.compare_db is not None:
            targets.append(Target("compare", *servers.enter_context(
                bank_target(args, workdir / "compare", options.sessions, db=args.compare_db)
            )))
        if args.floor:
            targets.append(Target("floor", *servers.enter_context(floor_target(workdir))))
        if not args.no_echo:
            targets.append(Target("echo", *servers.enter_context(echo_target(workdir))))
        measured, loads = measure_load(targets, options, rounds, args.generators)
        results = dict(zip((target.label for target in targets), measured, strict=True))
    bank, echo = results["bank"], results.get("echo")
    tls, compare, floor = results.get("tls"), results.get("compare"), results.get("floor")
    for label, result in results.items():
        print(op_table(label, result))
    facts = RunFacts(rounds, bank.generators, fsync_ns, loads, db_kind(args.db),
                     db_kind(args.compare_db) if args.compare_db else None, args.workers)
    report = load_report(
        options, bank, echo, tls, rounds, facts=facts, compare=compare, floor=floor
    )
    print(
        f"fsync p50 {report['fsync_p50_ms']} ms; load average (1 min) "
        f"{report['loadavg_first']} at the first window, max {report['loadavg_max_1min']}"
    )
    if echo:
        print(f"bank/echo: throughput {report['ratio']}, p99 {report['p99_ratio']}, "
              f"server CPU per op {report['cpu_ratio']}")
    if tls:
        print(f"ratio TLS/plaintext: {report['tls_ratio']}")
    if compare:
        print(f"ratio {report['compare_db']}/{report['db']}: {report['compare_ratio']}")
    if floor:
        print(f"floor/echo: throughput {report['floor_ratio']}, server CPU per op "
              f"{report['floor_cpu_ratio']}; bank/floor: throughput {report['bank_floor_ratio']}")
    return report


def run_idle(args: argparse.Namespace) -> dict[str, object]:
    count = args.idle
    ensure_open_files(count + 1)
    with (
        tempfile.TemporaryDirectory(prefix="bank-bench-", dir=args.dir) as tmp,
        bank_target(args, Path(tmp) / "bank", count + 1, db=args.db) as (address, pid),
    ):
        report = trio.run(measure_idle, address, count, args.pin, pid)
    rss = report["rss_kib_per_session"]
    print(
        f"{count} idle sessions: {rss if rss is not None else '?'} KiB RSS each "
        f"(server {report['rss_kib_before']} -> {report['rss_kib_after']} KiB), "
        f"logins {report['logins_per_s']}/s; probe BALANCE p50 {report['p50_ms']} ms, "
        f"p90 {report['p90_ms']} ms, p99 {report['p99_ms']} ms, max {report['max_ms']} ms"
    )
    return {"mode": "idle", **machine(), **report}


# -- Command line ------------------------------------------------------------------------


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def loopback_host(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric IP address") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(
            "only loopback addresses: the echo baseline runs on this machine"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bank.bench",
        description=__doc__.split("\\n\\n")[0],
        epilog="Without --port a bank is started on a temporary database (or --db) with its "
        "accounts. With --port, accounts BN-00001.. (one per session; idle mode one more) "
        "must exist with --pin: make them with --create-accounts N --db DB --key-file KEY.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--idle", type=bounded_int(1, ACCOUNTS_MAX - 1), metavar="N",
                      help="hold N idle logged-in sessions; report RSS per session and latency")
    mode.add_argument("--create-accounts", type=bounded_int(1, ACCOUNTS_MAX), metavar="N",
                      help="add accounts BN-00001..N to --db and exit (existing ones kept)")
    mode.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)  # --echo-server's
    parser.add_argument("--sessions", type=bounded_int(1, ACCOUNTS_MAX),
                        default=SESSIONS_DEFAULT, help="concurrent sessions (%(default)s)")
    parser.add_argument("--seconds", type=bounded_int(1, SECONDS_MAX), default=SECONDS_DEFAULT,
                        help="length of the load run per server (%(default)s)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"operation weights, of {', '.join(OPS)} ({DEFAULT_MIX})")
    parser.add_argument("--generators", type=bounded_int(1, GENERATORS_MAX), default=1,
                        metavar="K", help="load generator processes sharing the sessions "
                        "(%(default)s); more help only with cores to spare for them")
    parser.add_argument("--no-echo", action="store_true", help="skip the echo baseline")
    parser.add_argument("--tls", action="store_true",
                        help="also load a second bank serving TLS with terminal certificates "
                        "(made for the run), taking turns with the plaintext one; "
                        "reports tls_ratio, TLS/plaintext")
    parser.add_argument("--floor", action="store_true",
                        help="also load the floor (bank.tools.floor: the protocol engine "
                        "answering from a dict, nothing else), taking turns; reports "
                        "floor_ratio and floor_cpu_ratio over echo, bank_floor_ratio")
    parser.add_argument("--host", type=loopback_host, default="127.0.0.1",
                        help="address of a running bank, with --port (%(default)s)")
    parser.add_argument("--port", type=bounded_int(0, 65535),
                        help="port of a running bank instead of starting one")
    parser.add_argument("--server-pid", type=int,
                        help="pid of the --port bank, for its RSS (idle) and CPU (load) figures")
    parser.add_argument("--pin", default=BENCH_PIN, help="PIN of the bench accounts")
    parser.add_argument("--db", metavar="PATH|URL",
                        help="the bank's database: a SQLite path or a postgresql:// URL "
                        "(the bench adds its accounts); default: a temporary SQLite file, "
                        "and bank.db for --create-accounts")
    parser.add_argument("--compare-db", metavar="PATH|URL",
                        help="also load a bank on this database, taking turns with the first; "
                        "reports compare_ratio, it over --db")
    parser.add_argument("--workers", type=bounded_int(1, WORKERS_MAX), metavar="N",
                        help="passed to the bank (python -m bank --workers N)")
    parser.add_argument("--key-file", type=Path, default=Path("bank.key"),
                        help="PIN key file for --db and --create-accounts (%(default)s)")
    parser.add_argument("--dir", type=Path,
                        help="where the temporary database goes (default: the system temp dir)")
    return parser


def leaf_messages(error: BaseException) -> Iterator[str]:
    """The messages of an error, or of every error in a (nested) group: nurseries nest."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaf_messages(inner)
    else:
        yield str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tls and (args.idle or args.create_accounts or args.port is not None):
        parser.error("--tls is for load mode, with the banks the bench starts (no --port)")
    if args.floor and (args.idle or args.create_accounts):
        parser.error("--floor is for load mode")
    if args.port is not None and (args.db or args.compare_db or args.workers):
        parser.error("--db, --compare-db and --workers are for the banks the bench starts "
                     "(no --port)")
    if args.echo_server:
        return serve_echo(args.host, args.port or 0, args.ready_file)
    try:
        if args.create_accounts:
            count = args.create_accounts
            db = args.db or "bank.db"
            added = create_accounts(db, args.key_file, count, pin=args.pin)
            print(f"added {added} accounts; {account_name(1)}..{account_name(count)} exist")
            return EXIT_OK
        report = run_idle(args) if args.idle else run_load(args)
    except* (BenchError, launcher.LaunchError, TlsError, WireError, OSError) as group:
        for message in dict.fromkeys(leaf_messages(group)):  # once each, in order
            print(f"bank.bench: {message}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None
    print(json.dumps(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
