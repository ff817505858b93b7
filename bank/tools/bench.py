"""``python -m bank.bench``: the bank server's own load tool, in the manner of pgbench.

Load mode (the default) opens ``--sessions`` logged-in ATM sessions and runs a request
mix for ``--seconds``, each session closed-loop (one request at a time). It does so twice
in one run: against the bank, then against a bare Trio echo server that frames with the
same wire codec and answers with frames of the bank's reply sizes. The machine's noise
moves both figures together, so their ratio is the number to compare between runs. The
CPU time each server and the load generator used during the mix is reported too (100 %
is one core): a side near 100 % is the bottleneck, and when it is the load generator,
the figure is the generator's ceiling, not the server's.

With ``--tls`` a second bank serves TLS (1.3, requiring a terminal certificate, as a
deployment would; the run's CA and certificates are made with ``bank.tls``), and the
plaintext bank, the TLS bank and the echo server take turns in windows of about
TLS_WINDOW_S, ``--seconds`` in all each, so that the machine's load while the run goes
on reaches all three alike; ``tls_ratio`` is TLS over plaintext. Connecting, TLS
handshakes and logins happen before the first window, as logins always have, and their
rate is reported apart.

Idle mode (``--idle N``) holds N logged-in sessions that send nothing, and measures the
server's resident memory per session and one more session's round-trip latency while
they are held.

By default the bank is a real ``python -m bank`` subprocess on a temporary database,
with its log at WARNING so that logging is not what is measured; ``bank.tools.launcher``
starts it and the echo server. ``--port`` targets a bank already running on this machine
instead; its accounts ``BN-00001``.. (one per session, plus one for idle mode's probe)
must exist with the bench PIN: create them with
``python -m bank.bench --create-accounts N --db bank.db --key-file bank.key``.
Only loopback addresses are accepted: the echo baseline runs here, so the ratio means
something only for a bank on the same machine.

The load generator runs in this process (the servers are subprocesses) and speaks the
wire package directly, not the ATM client, so that the ATM's screen logic is not in the
figures. The last line printed is JSON, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import platform
import random
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bank.pins import load_or_create_key
from bank.readiness import listening_addresses, write_ready_file
from bank.server import raise_open_files_limit
from bank.store import AccountExists, Store
from bank.tls import TlsError, client_context, init_ca_and_server, issue_terminal
from bank.tools import launcher
from wire import (
    AMOUNT_CENTS_MAX,
    DEPOSIT,
    HISTORY_ENTRIES_MAX,
    MONEY_KINDS,
    PAYLOAD_BYTES_MAX,
    WITHDRAWAL,
    Answer,
    Balance,
    BalanceReply,
    EntryKind,
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
    Ping,
    PingReply,
    Reply,
    Request,
    Sender,
    SessionToken,
    State,
    Status,
    WireError,
)
from wire import Connection as Engine

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

SETUP_CONCURRENCY_MAX = 100
"""Sessions connecting and logging in at once; more only queue in the listen backlog."""

REPLY_TIMEOUT_S = 30
"""A reply slower than this aborts the run: the server is stuck, not slow."""

IDLE_TIMEOUT_S = 36_000
"""Passed to the bank so that no held session expires during a measurement."""

CONNECTIONS_SPARE = 16
"""Headroom beyond the bench's own sessions (and probe): a run never measures the limit."""

FDS_RESERVED = 128
"""Open files a process needs besides its sockets: Python, SQLite, pipes, the log."""

PROBE_REQUESTS = 200
"""Sequential BALANCE round trips timed while idle sessions are held."""

TLS_WINDOW_S = 2
"""With --tls each server is measured in windows of about this many seconds, taking turns,
so that a change in the machine's load while the run goes on reaches every figure alike."""

GENERATOR_SATURATED_PERCENT = 90.0
"""Load generator CPU (100 = one core) from which a figure is the generator's ceiling,
a lower bound on what the server could do, rather than the server's own."""

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


def create_accounts(db: Path, key_file: Path, count: int, *, pin: str = BENCH_PIN) -> int:
    """Add BN-00001..count (skipping those that exist); returns how many were added.

    Through ``Store`` rather than the server, so a bench database is made like an
    operator's: the same schema, PIN key and checks.
    """
    added = 0
    with Store(db, load_or_create_key(key_file)) as store:
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
        return rng.choices(self.names, cum_weights=self.cum_weights)[0]

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

    Random per run, so a second run against the same database is not answered with
    replays of the first; a counter, so that making one costs no system call.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = itertools.count()

    def next(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(8, "big")


MONEY_OPS: dict[str, MoneyKind] = {"deposit": DEPOSIT, "withdraw": WITHDRAWAL}
"""The bench's names for the money kinds (``--mix``, the report's keys)."""


def make_request(op: str, txn_ids: TxnIds) -> Request:
    if op in MONEY_OPS:
        return MONEY_OPS[op].request(txn_ids.next(), AMOUNT_CENTS)
    if op == "history":
        return History(HISTORY_COUNT)
    if op == "ping":
        return Ping()
    return Balance()


# -- Latency statistics ------------------------------------------------------------------


def percentile_ns(sorted_ns: Sequence[int], percent: int) -> int:
    """Nearest-rank percentile of sorted latencies, in integer arithmetic."""
    if not sorted_ns:
        return 0
    rank = (len(sorted_ns) * percent + 99) // 100
    return sorted_ns[max(rank, 1) - 1]


def ms(ns: int) -> float:
    return round(ns / 1_000_000, 3)


def latency_summary(latencies_ns: list[int]) -> dict[str, float | int]:
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
        self.latencies_ns: dict[str, list[int]] = {op: [] for op in ops}
        self.refused: dict[str, int] = dict.fromkeys(ops, 0)
        self.count = 0

    def record(self, op: str, latency_ns: int, *, approved: bool) -> None:
        self.latencies_ns[op].append(latency_ns)
        self.count += 1
        if not approved:
            self.refused[op] += 1

    def per_op(self) -> dict[str, dict[str, float | int]]:
        return {
            op: {**latency_summary(ns), "refused": self.refused[op]}
            for op, ns in self.latencies_ns.items()
        }

    def overall(self) -> dict[str, float | int]:
        every = list(itertools.chain.from_iterable(self.latencies_ns.values()))
        return {**latency_summary(every), "refused": sum(self.refused.values())}


# -- The load generator's client ---------------------------------------------------------


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
    """One logged-in connection speaking the wire protocol directly, one request at a time,
    over TCP or over TLS on TCP."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
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

    async def request(self, message: Request) -> Reply:
        """Send one request and return its reply (the engine checks id and type)."""
        try:
            with trio.fail_after(REPLY_TIMEOUT_S):
                await self._stream.send_all(self._engine.send(message))
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
        await self._stream.aclose()

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
            data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                raise BenchError("the server closed the connection")
            self._engine.receive_data(data)


async def open_sessions(
    address: Address, accounts: Sequence[str], pin: str, opened: list[BenchSession],
    tls: ssl.SSLContext | None = None,
) -> None:
    """Log ``accounts`` in, SETUP_CONCURRENCY_MAX at a time, appending to ``opened``.

    The caller owns ``opened`` so that it can close what did open if this fails.
    """
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY_MAX)

    async def open_one(account: str) -> None:
        async with limiter:
            opened.append(await BenchSession.open(address, account, pin, tls))

    async with trio.open_nursery() as nursery:
        for account in accounts:
            nursery.start_soon(open_one, account)


async def close_sessions(sessions: Sequence[BenchSession]) -> None:
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY_MAX)

    async def close_one(session: BenchSession) -> None:
        async with limiter:
            await session.close()

    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(close_one, session)


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
        await close_sessions(sessions)


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


# -- Load mode ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions:
    sessions: int
    seconds: int
    mix: Mix
    pin: str


@dataclass(frozen=True, slots=True)
class Target:
    """A server to load: where it listens, its pid (for its CPU) and, for a server that
    speaks TLS, the context its sessions connect with."""

    label: str
    address: Address
    pid: int | None
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class LoadResult:
    ops_per_s: float
    logins_per_s: float
    elapsed_s: float
    overall: dict[str, float | int]
    per_op: dict[str, dict[str, float | int]]
    server_cpu_s: float | None
    generator_cpu_s: float

    @property
    def server_cpu_percent(self) -> float | None:
        if self.server_cpu_s is None:
            return None
        return cpu_percent(self.server_cpu_s, round(self.elapsed_s * 1e9))

    @property
    def generator_cpu_percent(self) -> float:
        return cpu_percent(self.generator_cpu_s, round(self.elapsed_s * 1e9))

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
        """The load generator kept its core busy: the figure may be its ceiling."""
        return self.generator_cpu_percent >= GENERATOR_SATURATED_PERCENT

    def as_dict(self) -> dict[str, object]:
        return {
            "ops_per_s": round(self.ops_per_s, 1),
            "logins_per_s": round(self.logins_per_s, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "server_cpu_percent": self.server_cpu_percent,
            "generator_cpu_percent": self.generator_cpu_percent,
            "server_cpu_us_per_op": self.server_cpu_us_per_op,
            "generator_cpu_us_per_op": self.generator_cpu_us_per_op,
            "generator_saturated": self.generator_saturated,
            **self.overall,
            "ops": self.per_op,
        }


@dataclass(slots=True)
class Tally:
    """One target's measurement so far, summed over its windows."""

    recorder: Recorder
    rngs: list[random.Random]
    """One per session, kept across windows: each target gets the same request sequence."""
    setup_ns: int
    txn_ids: TxnIds = field(default_factory=TxnIds)
    elapsed_ns: int = 0
    server_cpu_s: float | None = 0.0
    generator_cpu_s: float = 0.0

    def result(self, sessions: int) -> LoadResult:
        return LoadResult(
            ops_per_s=per_second(self.recorder.count, self.elapsed_ns),
            logins_per_s=per_second(sessions, self.setup_ns),
            elapsed_s=self.elapsed_ns / 1e9,
            overall=self.recorder.overall(),
            per_op=self.recorder.per_op(),
            server_cpu_s=self.server_cpu_s,
            generator_cpu_s=self.generator_cpu_s,
        )


def per_second(count: int, elapsed_ns: int) -> float:
    return count * 1_000_000_000 / max(elapsed_ns, 1)


async def drive(
    session: BenchSession, *, mix: Mix, rng: random.Random, txn_ids: TxnIds,
    deadline_ns: int, recorder: Recorder,
) -> None:
    """Closed loop: the next request goes out only when the last reply is in."""
    while time.perf_counter_ns() < deadline_ns:
        op = mix.pick(rng)
        message = make_request(op, txn_ids)
        started_ns = time.perf_counter_ns()
        reply = await session.request(message)
        recorder.record(
            op, time.perf_counter_ns() - started_ns, approved=reply.status is Status.APPROVED
        )


async def run_mix(
    sessions: Sequence[BenchSession], tally: Tally, mix: Mix, window_ns: int, label: str
) -> int:
    """Drive every session for ``window_ns``, recording into ``tally``; the elapsed ns
    (until the last reply is in)."""
    recorder = tally.recorder
    count_before = recorder.count
    started_ns = time.perf_counter_ns()
    deadline_ns = started_ns + window_ns

    def status() -> tuple[float, str]:
        elapsed_ns = time.perf_counter_ns() - started_ns
        return elapsed_ns / window_ns, (
            f"{elapsed_ns / 1e9:5.1f}/{window_ns / 1e9:.1f} s  "
            f"{recorder.count - count_before} ops"
        )

    async with progress(label, status), trio.open_nursery() as nursery:
        for session, rng in zip(sessions, tally.rngs, strict=True):
            nursery.start_soon(functools.partial(
                drive, session, mix=mix, rng=rng, txn_ids=tally.txn_ids,
                deadline_ns=deadline_ns, recorder=recorder,
            ))
    return time.perf_counter_ns() - started_ns


async def measure_window(
    target: Target, sessions: Sequence[BenchSession], tally: Tally, *, mix: Mix,
    window_ns: int, label: str,
) -> None:
    """One window of the mix on ``target``, its CPU (the server's and ours) counted over
    the window alone."""
    server_before, own_before = await process_cpu_s(target.pid), own_cpu_s()
    tally.elapsed_ns += await run_mix(sessions, tally, mix, window_ns, label)
    server_after, own_after = await process_cpu_s(target.pid), own_cpu_s()
    tally.generator_cpu_s += own_after - own_before
    if tally.server_cpu_s is None or server_before is None or server_after is None:
        tally.server_cpu_s = None
    else:
        tally.server_cpu_s += server_after - server_before


def turns(count: int, rounds: int) -> Iterator[tuple[int, int]]:
    """(round, target index) in the order windows run: round by round, the targets'
    order rotated by one each round, so that none is always first or always follows
    the same one."""
    for round_ in range(rounds):
        for step in range(count):
            yield round_, (round_ + step) % count


async def measure_load(
    targets: Sequence[Target], options: LoadOptions, rounds: int
) -> list[LoadResult]:
    """Log every target's sessions in, run the mix on one target at a time for
    ``rounds`` windows each (``options.seconds`` in all per target), log out.

    Only the windows are measured: connecting, TLS handshakes and logins come before
    them (their rate is reported apart), and meanwhile the sessions of the targets not
    being measured are held idle.
    """
    accounts = account_names(1, options.sessions)
    window_ns = options.seconds * 1_000_000_000 // rounds
    async with contextlib.AsyncExitStack() as stack:
        held: list[list[BenchSession]] = []
        tallies: list[Tally] = []
        for target in targets:
            sessions, setup_ns = await stack.enter_async_context(
                logged_in(target.address, accounts, options.pin, target.label, target.tls)
            )
            held.append(sessions)
            tallies.append(Tally(
                Recorder(options.mix.names),
                [random.Random(index) for index in range(len(sessions))],
                setup_ns,
            ))
        for round_, index in turns(len(targets), rounds):
            label = targets[index].label
            if rounds > 1:
                label = f"{label} {round_ + 1}/{rounds}"
            await measure_window(
                targets[index], held[index], tallies[index],
                mix=options.mix, window_ns=window_ns, label=label,
            )
    return [tally.result(len(accounts)) for tally in tallies]


# -- CPU accounting: which side is the bottleneck -----------------------------------------


async def process_cpu_s(pid: int | None) -> float | None:
    """User plus system CPU seconds of a process, all its threads (Linux /proc)."""
    if pid is None:
        return None
    text = await trio.Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": field 3 is fields[0]
    utime_ticks, stime_ticks = int(fields[11]), int(fields[12])
    return (utime_ticks + stime_ticks) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_percent(cpu_s: float, elapsed_ns: int) -> float:
    """CPU time over wall time: 100 is one core kept busy."""
    return round(cpu_s * 1e11 / max(elapsed_ns, 1), 1)


def cpu_us_per_op(cpu_s: float, count: int) -> float:
    """CPU time per operation, in microseconds."""
    return round(cpu_s * 1e6 / max(count, 1), 1)


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


_ECHO_REPLIES: dict[type[Request], Reply] = {
    Login: LoginReply(Status.APPROVED),
    Logout: LogoutReply(Status.APPROVED),
    Ping: PingReply(Status.APPROVED),
    Balance: BalanceReply(Status.APPROVED, OPENING_CENTS),
    **{kind.request: kind.reply(Status.APPROVED, OPENING_CENTS, 1, 1) for kind in MONEY_KINDS},
}
"""Approved replies with every field filled: the size of the bank's approved replies."""


def echo_reply(request: Request) -> Reply:
    """The reply the bank would send, in type and size, without doing the bank's work."""
    if isinstance(request, History):
        return HistoryReply(Status.APPROVED, _history_entries(request.count))
    return _ECHO_REPLIES[type(request)]


async def echo_connection(stream: trio.SocketStream) -> None:
    """Decode each request and answer a same-size reply through the same protocol engine
    as the bank's, until LOGOUT or EOF: what the bank does minus the bank's own work."""
    engine = Engine(Sender.SERVER)
    try:
        await stream.send_all(engine.send(echo_hello()))
        while data := await stream.receive_some(RECEIVE_BYTES_MAX):
            engine.receive_data(data)
            while (frame := engine.next_event()) is not None:
                assert isinstance(frame.message, Request), "a server's engine yields requests"
                await stream.send_all(engine.send(echo_reply(frame.message)))
                if engine.state is State.CLOSED:  # LOGOUT answered
                    return
    except Exception:  # one bad connection must not end the server; the bench will see it
        return
    finally:
        await stream.aclose()


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


def bank_args(workdir: Path, connections: int) -> list[str]:
    return [
        "--db", str(workdir / "bank.db"),
        "--key-file", str(workdir / "bank.key"),
        "--log-level", "WARNING",
        "--connections-max", str(connections + CONNECTIONS_SPARE),
        # Every session comes from 127.0.0.1 and up to SETUP_CONCURRENCY_MAX log in at
        # once: the per-address limit on connections not logged in must not refuse them.
        "--preauth-per-address-max", str(connections + CONNECTIONS_SPARE),
        "--idle-timeout-s", str(IDLE_TIMEOUT_S),
        "--shutdown-grace-s", "1",
    ]


@contextlib.contextmanager
def bank_target(
    args: argparse.Namespace, workdir: Path, accounts: int
) -> Iterator[tuple[Address, int | None]]:
    """(address, server pid or None): the --port bank, or a fresh one on a temp database."""
    if args.port is not None:
        yield (args.host, args.port), args.server_pid
        return
    create_accounts(workdir / "bank.db", workdir / "bank.key", accounts, pin=args.pin)
    with launcher.start(bank_args(workdir, accounts), workdir=workdir, name="bank") as server:
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
        f"({result.generator_cpu_us_per_op} µs/op) (100 % = one core)",
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
            f"  the load generator kept its core busy ({result.generator_cpu_percent} %): "
            f"{title}'s figure is the generator's ceiling, a lower bound for the server"
        )
    return "\n".join(lines)


def latency_keys(result: LoadResult | None, prefix: str) -> dict[str, float | None]:
    """p50_ms .. max_ms over every operation, with ``prefix``; None without a result."""
    names = [f"p{percent}_ms" for percent in PERCENTILES] + ["max_ms"]
    return {
        prefix + name: (float(result.overall[name]) if result else None)  # latency, ms
        for name in names
    }


def load_report(
    options: LoadOptions, bank: LoadResult, echo: LoadResult | None,
    tls: LoadResult | None = None, rounds: int = 1,
) -> dict[str, object]:
    """The JSON report: the plaintext bank's keys as they always were, the echo
    baseline's, and (None without --tls) the TLS bank's, ``tls_ratio`` TLS/plaintext."""
    return {
        "mode": "load",
        **machine(),
        "sessions": options.sessions,
        "seconds": options.seconds,
        "windows": rounds,
        "mix": options.mix.as_dict(),
        "bank_ops_per_s": round(bank.ops_per_s, 1),
        "echo_ops_per_s": round(echo.ops_per_s, 1) if echo else None,
        "ratio": round(bank.ops_per_s / echo.ops_per_s, 4) if echo else None,
        "bank_logins_per_s": round(bank.logins_per_s, 1),
        "echo_logins_per_s": round(echo.logins_per_s, 1) if echo else None,
        **latency_keys(bank, ""),
        **latency_keys(echo, "echo_"),
        "refused": bank.overall["refused"],
        "bank_cpu_percent": bank.server_cpu_percent,
        "echo_cpu_percent": echo.server_cpu_percent if echo else None,
        "bank_cpu_us_per_op": bank.server_cpu_us_per_op,
        "tls_ops_per_s": round(tls.ops_per_s, 1) if tls else None,
        "tls_ratio": round(tls.ops_per_s / bank.ops_per_s, 4) if tls else None,
        "tls_logins_per_s": round(tls.logins_per_s, 1) if tls else None,
        **latency_keys(tls, "tls_"),
        "tls_refused": tls.overall["refused"] if tls else None,
        "tls_cpu_percent": tls.server_cpu_percent if tls else None,
        "tls_cpu_us_per_op": tls.server_cpu_us_per_op if tls else None,
        "tls_generator_cpu_percent": tls.generator_cpu_percent if tls else None,
        "tls_generator_cpu_us_per_op": tls.generator_cpu_us_per_op if tls else None,
        "tls_generator_saturated": tls.generator_saturated if tls else None,
        "ops": bank.per_op,
        "bank": bank.as_dict(),
        "echo": echo.as_dict() if echo else None,
        "tls": tls.as_dict() if tls else None,
    }


def run_load(args: argparse.Namespace) -> dict[str, object]:
    """The bank, then the echo baseline, one window each; with --tls the bank over
    plaintext, the bank over TLS and the echo baseline, taking turns in windows of about
    TLS_WINDOW_S. Every server is started before the first login."""
    options = LoadOptions(args.sessions, args.seconds, args.mix, args.pin)
    rounds = max(1, options.seconds // TLS_WINDOW_S) if args.tls else 1
    ensure_open_files(options.sessions * (1 + args.tls + (not args.no_echo)))
    with (
        tempfile.TemporaryDirectory(prefix="bank-bench-", dir=args.dir) as tmp,
        contextlib.ExitStack() as servers,
    ):
        workdir = Path(tmp)
        targets = [Target("bank", *servers.enter_context(
            bank_target(args, workdir, options.sessions)
        ))]
        if args.tls:
            targets.append(Target("tls", *servers.enter_context(
                tls_bank_target(workdir / "tls-bank", options.sessions, args.pin)
            )))
        if not args.no_echo:
            targets.append(Target("echo", *servers.enter_context(echo_target(workdir))))
        results = dict(zip(
            (target.label for target in targets),
            trio.run(measure_load, targets, options, rounds),
            strict=True,
        ))
    bank, tls, echo = results["bank"], results.get("tls"), results.get("echo")
    for label, result in results.items():
        print(op_table(label, result))
    if echo:
        print(f"ratio bank/echo: {bank.ops_per_s / echo.ops_per_s:.4f}")
    if tls:
        print(f"ratio TLS/plaintext: {tls.ops_per_s / bank.ops_per_s:.4f}")
    return load_report(options, bank, echo, tls, rounds)


def run_idle(args: argparse.Namespace) -> dict[str, object]:
    count = args.idle
    ensure_open_files(count + 1)
    with (
        tempfile.TemporaryDirectory(prefix="bank-bench-", dir=args.dir) as tmp,
        bank_target(args, Path(tmp), count + 1) as (address, pid),
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
        description=__doc__.split("\n\n")[0],
        epilog="Without --port a bank is started on a temporary database with its accounts. "
        "With --port, accounts BN-00001.. (one per session; idle mode one more) must exist "
        "with --pin: make them with --create-accounts N --db DB --key-file KEY.",
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
                        help="length of the load run (%(default)s)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"operation weights, of {', '.join(OPS)} ({DEFAULT_MIX})")
    parser.add_argument("--no-echo", action="store_true", help="skip the echo baseline")
    parser.add_argument("--tls", action="store_true",
                        help="also load a second bank serving TLS with terminal certificates "
                        "(made for the run), taking turns with the plaintext one; "
                        "reports tls_ratio, TLS/plaintext")
    parser.add_argument("--host", type=loopback_host, default="127.0.0.1",
                        help="address of a running bank, with --port (%(default)s)")
    parser.add_argument("--port", type=bounded_int(0, 65535),
                        help="port of a running bank instead of starting one")
    parser.add_argument("--server-pid", type=int,
                        help="pid of the --port bank, for its RSS (idle) and CPU (load) figures")
    parser.add_argument("--pin", default=BENCH_PIN, help="PIN of the bench accounts")
    parser.add_argument("--db", type=Path, default=Path("bank.db"),
                        help="database for --create-accounts (%(default)s)")
    parser.add_argument("--key-file", type=Path, default=Path("bank.key"),
                        help="PIN key file for --create-accounts (%(default)s)")
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
    if args.echo_server:
        return serve_echo(args.host, args.port or 0, args.ready_file)
    try:
        if args.create_accounts:
            count = args.create_accounts
            added = create_accounts(args.db, args.key_file, count, pin=args.pin)
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
