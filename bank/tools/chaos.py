"""``python -m bank.chaos``: crash the real server under load and check no money moved wrongly.

Modelled on Jepsen's bank workload. A real ``python -m bank`` process serves a fresh
database; one concurrent ATM session per demo account deposits, withdraws and transfers
to another demo account random amounts (each with a fresh random 16-byte transaction id)
while the harness kill -9s the server at random moments and restarts it on the same
database. Every operation ends acknowledged (APPROVED, with entry id and balance),
refused (nothing moved), or unknown (the connection died before the reply); a client
retries each unknown one with the same transaction id until the bank answers, so the
idempotency key, not luck, decides whether it happened. At the end the server is stopped
cleanly and the database is checked against the history: nothing acknowledged lost,
nothing refused applied, nothing applied twice or from nowhere, every applied transfer
with both legs, balances replayable and non-negative, and the money total equal to the
opening total plus the acknowledged deposits and withdrawals (transfers conserve it
across all accounts).

kill -9 tests that a process crash cannot lose or tear a committed transaction (the
page cache survives it); it does not simulate a power cut.

With ``--db URL --servers N`` (PostgreSQL; the database must hold no bank yet) it runs N
servers on one database: each crash kills -9 a random one and starts it again, and once
(with two servers or more) one server is frozen (SIGSTOP) past its lease expiry and the
clients' reply timeout, then thawed (SIGCONT). A client whose server dies or freezes fails
over to another one, resuming its session there with its token (RESUME) or logging in
again, and replays its unanswered operation. A thawed server's stale writes must be
refused by their lease fence: ``fenced_writes`` counts them (from the servers' logs: a
killed server cannot report otherwise), and the checker must still find nothing lost,
nothing duplicated and the money conserved.

Whether a thawed server's stale write meets the fence or its first heartbeat (overdue on
thawing) ends the session first is a race, so ``fenced_writes`` may be 0 in such a run.
``--fence-probe`` makes one fenced write certain (``FenceProbe``): the frozen server's
heartbeat is held back, by a row lock, just long enough for a stale deposit left in its
socket to meet the fence.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio

from bank import pg_store
from bank.config import is_postgresql, redact_db
from bank.store import DEMO_ACCOUNTS, BookEntry, Books, Store, read_books
from bank.tools import launcher
from wire import (
    KIND_OF_ENTRY,
    MONEY_KINDS,
    TRANSFER,
    TXN_ID_BYTES,
    Answer,
    Balance,
    Deposit,
    EntryKind,
    Error,
    Frame,
    Login,
    LoginReply,
    Logout,
    Message,
    MoneyReply,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Status,
    Transfer,
    TransferReply,
    WireError,
    entry_change_cents,
)
from wire import Connection as Engine

HOST = launcher.LOOPBACK
"""Loopback only: the harness never exposes the server it starts."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

CLIENTS_DEFAULT = 4
SECONDS_DEFAULT = 10.0
SECONDS_MAX = 3600.0
CRASHES_DEFAULT = 3
CRASHES_MAX = 1000
SERVERS_MAX = 8

LEASE_EXPIRY_S = 2
"""--lease-expiry-s of each cluster server: short, so a frozen one's leases expire soon."""

CLUSTER_REPLY_TIMEOUT_S = 2.0
"""A cluster client's wait for a reply before it fails over; a frozen server gives none."""

FREEZE_S = max(LEASE_EXPIRY_S, CLUSTER_REPLY_TIMEOUT_S) + 1.0
"""How long the frozen server stays stopped: past its leases' expiry and past its clients'
reply timeout, so they fail over and its sessions are taken over before it wakes."""

FREEZE_AT = 0.5
"""The freeze begins at this fraction of --seconds."""

FENCED_LOG_MARK = "FENCED: the lease was taken over"
"""What a server logs for each write its fence refused (bank.server)."""

AMOUNT_DRAWN_CENTS_MAX = 60_000
"""Largest random amount: $600, under the server's default withdrawal limit, and large
enough against the smallest demo balances that withdrawals are regularly refused."""

CRASH_WINDOW = (0.1, 0.9)
"""Crashes happen between these fractions of --seconds, so the run starts and ends under
load and the last restarted server still serves some fresh operations."""

SERVER_START_TIMEOUT_S = 15.0
"""From spawning the server to its ready file."""

SERVER_STOP_TIMEOUT_S = 10.0
"""From SIGTERM to the process's exit, before SIGKILL; SIGTERM gets --shutdown-grace-s 1."""

SERVER_GRACE_S = 1
"""--shutdown-grace-s for the server: clients have logged out before the clean stop."""

CONNECT_TIMEOUT_S = 3.0
"""Connect, HELLO and LOGIN together; a fresh server answers in milliseconds."""

REPLY_TIMEOUT_S = 5.0
"""Waiting for one reply: past it the connection is treated as dead (outcome unknown)."""

LOGOUT_TIMEOUT_S = 1.0
"""The courtesy LOGOUT at the end of a client's run."""

RECONNECT_ATTEMPTS_MAX = 60
"""Connection attempts before a client gives up (about 14 s at the capped backoff)."""

RECONNECT_BACKOFF_S = 0.02
"""First pause between connection attempts; it doubles up to the cap."""

RECONNECT_BACKOFF_MAX_S = 0.25

OPERATION_ATTEMPTS_MAX = 200
"""Sends of one transaction id before the client gives up on resolving it."""

DRAIN_S = 15.0
"""After --seconds, time for clients to resolve their last unknown operation and log out."""

RUN_ALLOWANCE_S = SERVER_START_TIMEOUT_S + DRAIN_S + SERVER_STOP_TIMEOUT_S
"""The whole run is bounded by --seconds plus this fixed allowance."""

PROGRESS_INTERVAL_S = 1.0
RECEIVE_BYTES_MAX = 4096

PROBLEMS_SHOWN_MAX = 20

REFUSALS = frozenset({
    Status.INSUFFICIENT_FUNDS,
    Status.INVALID_AMOUNT,
    Status.EXCEEDS_WITHDRAWAL_LIMIT,
    Status.DUPLICATE_TRANSMISSION,
    Status.INVALID_TO_ACCOUNT,
    Status.SAME_ACCOUNT,
    Status.EXCEEDS_FREQUENCY_LIMIT,
})
"""Definite answers that moved nothing. Any other non-APPROVED status (ISSUER_UNAVAILABLE:
a storage error may come after the commit) leaves the outcome unknown, to be retried."""

LOGIN_RETRYABLE = frozenset({Status.ACCOUNT_IN_USE, Status.ISSUER_UNAVAILABLE})
"""A lease not yet released by a dead connection (or, in a cluster, held by a frozen
server until it expires), or a server shutting down: try again."""


class ChaosError(Exception):
    """The harness could not do its job (server would not start, client could not
    reconnect): the run fails, but the database is still checked."""


class LinkBroken(Exception):
    """The connection died or misbehaved before a reply: the request's outcome is unknown."""


class SessionEnded(LinkBroken):
    """The server ended the session (SESSION_EXPIRED) instead of answering."""


# -- The history -------------------------------------------------------------------------


class Outcome(enum.Enum):
    ACKNOWLEDGED = "acknowledged"
    REFUSED = "refused"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class Operation:
    """One deposit, withdrawal or transfer as the client saw it, across all its attempts
    (a transfer's ``kind`` is its source leg's, TRANSFER_OUT, with ``to_account``)."""

    txn_id: bytes
    account: str
    kind: EntryKind
    amount_cents: int
    outcome: Outcome = Outcome.UNKNOWN
    status: Status | None = None
    entry_id: int = 0
    balance_cents: int = 0
    attempts: int = 0
    was_unknown: bool = False
    """An attempt ended without an answer: a crash (or timeout) hit this operation."""
    to_account: str | None = None
    """A transfer's destination; None for a deposit or withdrawal."""

    @property
    def signed_cents(self) -> int:
        """What it does to its own account's balance."""
        return entry_change_cents(self.kind, self.amount_cents)

    def as_json(self) -> dict[str, object]:
        return {
            "txn_id": self.txn_id.hex(), "account": self.account, "kind": self.kind.name,
            "amount_cents": self.amount_cents, "outcome": self.outcome.value,
            "status": None if self.status is None else self.status.name,
            "entry_id": self.entry_id, "balance_cents": self.balance_cents,
            "attempts": self.attempts, "was_unknown": self.was_unknown,
            "to_account": self.to_account,
        }


@dataclass(frozen=True, slots=True)
class BankState:
    """What the database holds after the run, read once the server has stopped."""

    books: Books
    invariant_problems: tuple[str, ...] = ()
    integrity_ok: bool = True


@dataclass(slots=True)
class Verdict:
    """The checker's findings; ``problems`` explains every failed check in words."""

    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    refused_applied: int = 0
    unexpected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- The checker (pure: history and database state in, verdict out) ---------------------


def check_history(operations: Sequence[Operation], state: BankState) -> Verdict:
    """Judge a history against the final database; every broken rule is counted and named.

    Unknown operations the clients never resolved may or may not have happened: the
    ledger decides, and an applied one is counted in the expected balances.
    """
    verdict = Verdict()
    # A transaction's own entry: a transfer's source leg (its credit is checked apart).
    own = [e for e in state.books.entries if e.kind is not TRANSFER.credit]
    counts = Counter(entry.txn_id for entry in own)
    entries = {entry.txn_id: entry for entry in own}
    credits = {e.txn_id: e for e in state.books.entries if e.kind is TRANSFER.credit}
    _check_duplicates(counts, verdict)
    _check_operations(operations, entries, verdict)
    _check_credits(operations, entries, credits, verdict)
    _check_unexpected(operations, entries, verdict)
    _check_money(operations, entries, state, verdict)
    verdict.problems += [f"invariant: {p}" for p in state.invariant_problems]
    if not state.integrity_ok:
        verdict.problems.append("PRAGMA integrity_check or foreign_key_check failed")
    return verdict


def _check_duplicates(counts: Counter[bytes], verdict: Verdict) -> None:
    for txn_id, count in counts.items():
        if count > 1:
            verdict.duplicated += count - 1
            verdict.problems.append(f"txn {txn_id.hex()} applied {count} times")


def _check_operations(
    operations: Sequence[Operation], entries: dict[bytes, BookEntry], verdict: Verdict
) -> None:
    for op in operations:
        entry = entries.get(op.txn_id)
        if op.outcome is Outcome.ACKNOWLEDGED and entry is None:
            verdict.lost += 1
            verdict.problems.append(f"txn {op.txn_id.hex()} acknowledged but not in the ledger")
        elif op.outcome is Outcome.REFUSED and entry is not None:
            verdict.refused_applied += 1
            verdict.problems.append(
                f"txn {op.txn_id.hex()} refused ({_name(op.status)}) but in the ledger"
            )
        elif entry is not None and _differs(op, entry):
            verdict.mismatched += 1
            verdict.problems.append(f"txn {op.txn_id.hex()}: client saw {op}, ledger has {entry}")


def _check_credits(
    operations: Sequence[Operation], entries: dict[bytes, BookEntry],
    credits: dict[bytes, BookEntry], verdict: Verdict,
) -> None:
    """Each applied transfer credited its destination with its amount, once; and no
    credit without its debit."""
    transfers = {op.txn_id: op for op in operations if op.to_account is not None}
    for txn_id, op in transfers.items():
        credit = credits.get(txn_id)
        if (txn_id in entries) != (credit is not None):
            verdict.mismatched += 1
            verdict.problems.append(f"txn {txn_id.hex()}: a transfer with one leg only")
        elif credit is not None and (credit.account, credit.amount_cents) != (
            op.to_account, op.amount_cents
        ):
            verdict.mismatched += 1
            verdict.problems.append(f"txn {txn_id.hex()}: credit {credit} is not {op}")
    for txn_id in credits.keys() - transfers.keys():
        verdict.unexpected += 1
        verdict.problems.append(f"txn {txn_id.hex()}: a credit no transfer issued")


def _differs(op: Operation, entry: BookEntry) -> bool:
    """Whether the ledger's entry is not what the client asked for (or was told)."""
    asked = (op.account, op.kind, op.amount_cents, op.to_account)
    if asked != (entry.account, entry.kind, entry.amount_cents, entry.counterparty):
        return True
    receipt = (op.entry_id, op.balance_cents)
    return op.outcome is Outcome.ACKNOWLEDGED and receipt != (entry.entry_id, entry.balance_cents)


def _check_unexpected(
    operations: Sequence[Operation], entries: dict[bytes, BookEntry], verdict: Verdict
) -> None:
    issued = {op.txn_id for op in operations}
    for txn_id in entries.keys() - issued:
        verdict.unexpected += 1
        verdict.problems.append(f"txn {txn_id.hex()} in the ledger but never issued")


def _check_money(
    operations: Sequence[Operation],
    entries: dict[bytes, BookEntry],
    state: BankState,
    verdict: Verdict,
) -> None:
    """Per account and in total: final == opening + acknowledged (and applied unknown)."""
    expected = dict(state.books.opening_cents)
    for op in operations:
        applied = op.outcome is Outcome.ACKNOWLEDGED or (
            op.outcome is Outcome.UNKNOWN and op.txn_id in entries
        )
        if op.account not in expected:
            verdict.problems.append(f"txn {op.txn_id.hex()} on unknown account {op.account}")
        elif applied:
            expected[op.account] += op.signed_cents
            if op.to_account is not None:
                expected[op.to_account] = expected.get(op.to_account, 0) + op.amount_cents
    for account, balance_cents in sorted(state.books.balance_cents.items()):
        if balance_cents < 0:
            verdict.problems.append(f"{account}: negative balance {balance_cents}")
        if balance_cents != expected.get(account):
            verdict.problems.append(
                f"{account}: balance {balance_cents}, history says {expected.get(account)}"
            )
    total, expected_total = sum(state.books.balance_cents.values()), sum(expected.values())
    if total != expected_total:
        verdict.problems.append(f"total money {total}, history says {expected_total}")


def _name(status: Status | None) -> str:
    return "none" if status is None else status.name


# -- Reading the database after the run --------------------------------------------------


def read_bank_state(db: Path | str, key_file: Path) -> BankState:
    """The books as the servers left them (read first, read-only), then the store's own
    checks of them; the servers have stopped, so nothing changes in between."""
    if is_postgresql(db):
        books = pg_store.read_books(db)
        with pg_store.PgStore(db, key_file.read_bytes(), seed_demo=False, create=False) as pg:
            return BankState(books, tuple(pg.check_invariants()), True)
    books = read_books(db)
    with Store(db, key_file.read_bytes(), seed_demo=False) as store:
        return BankState(books, tuple(store.check_invariants()), store.integrity_ok())


# -- The server process ------------------------------------------------------------------


class Harness:
    """Starts, kills, freezes and restarts the servers; clients ask it for a port.

    Each start is a new incarnation on the same database, logging to server-N.log; with
    one server (SQLite) there is one slot, with ``--servers N`` (PostgreSQL) N slots.
    """

    def __init__(
        self, workdir: Path, *, db: str | None = None, servers: int = 1, seed: int = 0,
        probe: FenceProbe | None = None,
    ) -> None:
        self.db: Path | str = workdir / "bank.db" if db is None else db
        self.key_file = workdir / "bank.key"
        self.crashes = 0
        self.freezes = 0
        self.resumes = 0
        """Failovers that resumed their session with its token instead of logging in."""
        self.failures: list[str] = []
        self._workdir = workdir
        self._slots: list[launcher.Server | None] = [None] * servers
        self._frozen: set[int] = set()
        self._incarnations = 0
        self._answered = trio.Event()
        self._rng = random.Random(seed)
        self._probe = probe

    @property
    def cluster(self) -> bool:
        return len(self._slots) > 1

    @property
    def port(self) -> int | None:
        """The first slot's port, or None while it is down (one server: clients back off)."""
        return self.port_for(0)

    def port_for(self, turn: int) -> int | None:
        """A serving port, starting from slot ``turn`` (modulo the slots) and skipping
        those that are down or frozen; None when none serves."""
        count = len(self._slots)
        for step in range(count):
            slot = (turn + step) % count
            server = self._slots[slot]
            if server is not None and slot not in self._frozen:
                return server.port
        return None

    def note_answered(self) -> None:
        """A client got a definite answer: the servers are serving under load."""
        self._answered.set()

    async def wait_under_load(self, deadline: float) -> None:
        """Until a server has answered an operation since the last start (or
        ``deadline``), so a crash lands amid work and not on a server that has not been
        reconnected to yet."""
        with trio.move_on_at(deadline):
            await self._answered.wait()

    async def start_all(self) -> None:
        for slot in range(len(self._slots)):
            await self.start(slot)

    async def start(self, slot: int = 0) -> None:
        self._incarnations += 1
        self._answered = trio.Event()
        args = [
            "--db", str(self.db), "--key-file", str(self.key_file),
            "--shutdown-grace-s", str(SERVER_GRACE_S), "--log-level", "INFO",
        ]
        if self.cluster:
            args += ["--lease-expiry-s", str(LEASE_EXPIRY_S), "--preauth-per-address-max",
                     str(len(DEMO_ACCOUNTS) * 2)]
        start = functools.partial(
            launcher.start, args, workdir=self._workdir, name=f"server-{self._incarnations}",
            timeout_s=SERVER_START_TIMEOUT_S,
        )
        try:
            server = await trio.to_thread.run_sync(start)
        except launcher.LaunchError as error:
            raise ChaosError(str(error)) from None
        self._slots[slot] = server
        progress(f"server {self._incarnations} (pid {server.pid}) listening on port "
                 f"{server.port}" + (f" (slot {slot})" if self.cluster else ""))

    async def crash(self) -> None:
        """kill -9 a server (with several, a random one not frozen), wait for it to die,
        and start its next incarnation."""
        candidates = [
            slot for slot, server in enumerate(self._slots)
            if server is not None and slot not in self._frozen
        ]
        if not candidates:
            raise ChaosError("no server to crash")
        slot = self._rng.choice(candidates)
        server = self._take_server(slot, "crash")
        await _end_server(server.kill)
        self.crashes += 1
        progress(f"crash {self.crashes}: kill -9 pid {server.pid}"
                 + (f" (slot {slot})" if self.cluster else ""))
        await self.start(slot)

    async def freeze(self, seconds: float) -> None:
        """SIGSTOP a random server for ``seconds``, then SIGCONT it: its clients time
        out and fail over, its leases expire and are taken over, and its stale writes
        must then be fenced (with a ``FenceProbe``, one certainly is)."""
        candidates = [slot for slot, server in enumerate(self._slots) if server is not None]
        slot = self._rng.choice(candidates)
        server = self._slots[slot]
        assert server is not None
        probe = self._probe
        if probe is not None:
            await probe.arm(self, server.port)
        self._frozen.add(slot)
        os.kill(server.pid, signal.SIGSTOP)
        self.freezes += 1
        progress(f"freeze: SIGSTOP pid {server.pid} (slot {slot}) for {seconds:.1f} s")
        try:
            if probe is not None:
                await probe.take_over(self)
            await trio.sleep(seconds)
        finally:
            os.kill(server.pid, signal.SIGCONT)
            progress(f"thaw: SIGCONT pid {server.pid} (slot {slot})")
            try:
                if probe is not None:  # the thawed server is not crashed before it is done
                    await probe.conclude(self)
            finally:
                self._frozen.discard(slot)

    @property
    def fence_probes(self) -> int:
        """Stale writes the probe made that the fence refused (0 or 1)."""
        return 0 if self._probe is None else self._probe.fenced

    async def stop(self) -> int:
        """SIGTERM every server, as an operator would; 0 when every one exited 0."""
        statuses = []
        for slot in range(len(self._slots)):
            server = self._take_server(slot, "stop")
            status = await _end_server(functools.partial(server.stop, SERVER_STOP_TIMEOUT_S))
            progress(f"server pid {server.pid} stopped with exit status {status}")
            statuses.append(status)
        return next((status for status in statuses if status != 0), 0)

    async def kill_if_running(self) -> None:
        """Cleanup after a failure: never leave a server behind (nor a frozen one)."""
        for slot, server in enumerate(self._slots):
            self._slots[slot] = None
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGCONT)
                await _end_server(server.kill)

    def fenced_writes(self) -> int:
        """Writes refused by their lease fence, counted in every server's log (a killed
        server's too)."""
        count = 0
        for log in self._workdir.glob("server-*.log"):
            with contextlib.suppress(OSError):
                count += log.read_text(errors="replace").count(FENCED_LOG_MARK)
        return count

    def _take_server(self, slot: int, action: str) -> launcher.Server:
        """The slot's running server, now marked down so that clients go elsewhere."""
        server, self._slots[slot] = self._slots[slot], None
        if server is None:
            raise ChaosError(f"no server to {action}")
        return server


async def _end_server(end: Callable[[], int]) -> int:
    """Run a server's blocking stop or kill to the end, even in a cancelled run."""
    try:
        with trio.CancelScope(shield=True):
            status = await trio.to_thread.run_sync(end)
    except launcher.LaunchError as error:
        raise ChaosError(str(error)) from None
    return status


# -- One ATM session ---------------------------------------------------------------------


class AtmLink:
    """One connection, logged in to one account, sending one request at a time."""

    def __init__(self, stream: trio.SocketStream, reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self._stream = stream
        self._engine = Engine(Sender.CLIENT)
        self._reply_timeout_s = reply_timeout_s
        self.token: bytes | None = None
        """The newest SESSION_TOKEN: what resumes the session from another connection."""
        self.resumed = False
        """The session was resumed (RESUME APPROVED), not logged in afresh."""

    @classmethod
    async def open(
        cls, port: int, account: str, pin: str, *, token: bytes | None = None,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> tuple[AtmLink, Status]:
        """Connect, read HELLO, then RESUME with ``token`` if given (and LOGIN if that
        is refused UNKNOWN_SESSION) or LOGIN; the link and the last status."""
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(HOST, port)
        link = cls(stream, reply_timeout_s)
        try:
            greeting = await link._receive()
            if link._engine.hello is None:
                raise LinkBroken(f"expected HELLO, got {greeting.message}")
            if token is not None:
                resumed = await link.request(Resume(account, token))
                if not isinstance(resumed, ResumeReply):
                    raise LinkBroken(f"expected RESUME_REPLY, got {resumed}")
                if resumed.status is not Status.UNKNOWN_SESSION:
                    link.resumed = resumed.status is Status.APPROVED
                    return link, resumed.status
            reply = await link.request(Login(account, pin))
            if not isinstance(reply, LoginReply):
                raise LinkBroken(f"expected LOGIN_REPLY, got {reply}")
        except BaseException:
            await link.aclose()
            raise
        return link, reply.status

    async def request(self, message: Request) -> Message:
        """Send and return the answer (the engine checks it answers this request);
        LinkBroken if the connection cannot deliver one."""
        await self.send(message)
        return await self.answer()

    async def send(self, message: Request) -> None:
        """Send without waiting for the answer (``answer`` waits)."""
        try:
            data = self._engine.send(message)
        except WireError as error:  # LocalProtocolError: the session has ended
            raise LinkBroken(f"session over: {error}") from error
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise LinkBroken(f"send failed: {error}") from error

    async def answer(self) -> Message:
        """The answer to the request sent last; SessionEnded if the server ended the
        session instead (SESSION_EXPIRED), LinkBroken if the connection failed."""
        while True:
            event = await self._receive()
            if isinstance(event, Answer):
                return event.message
            if isinstance(event.message, SessionToken):
                self.token = event.message.token
                continue
            if isinstance(event.message, SessionExpired):
                self.token = None  # the session is over: its token opens nothing
                raise SessionEnded(f"server sent {event.message}")
            if isinstance(event.message, Error):
                raise LinkBroken(f"server sent {event.message}")
            # A SHUTDOWN notice: the reply (or the close) still follows.

    async def _receive(self) -> Frame | Answer:
        try:
            with trio.fail_after(self._reply_timeout_s):
                while (event := self._engine.next_event()) is None:
                    data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
                    if not data:
                        raise LinkBroken("server closed the connection")
                    self._engine.receive_data(data)
        except trio.TooSlowError as error:
            raise LinkBroken(f"no reply in {self._reply_timeout_s} s") from error
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise LinkBroken(f"receive failed: {error}") from error
        except WireError as error:  # RemoteProtocolError
            raise LinkBroken(f"bad frame from server: {error}") from error
        return event

    async def logout_and_close(self) -> None:
        try:
            with trio.move_on_after(LOGOUT_TIMEOUT_S), contextlib.suppress(LinkBroken):
                await self.request(Logout())
        finally:
            await self.aclose()  # also when cancelled: never leak the socket

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def connect(
    harness: Harness, account: str, pin: str, *, home: int = 0, token: bytes | None = None
) -> AtmLink:
    """A logged-in link to a server that is up now, from slot ``home`` on, failing over to
    the next on each failed attempt: RESUME with ``token`` first (once it opens nothing,
    LOGIN), bounded attempts, short backoff."""
    backoff_s = RECONNECT_BACKOFF_S
    last = "server down"
    reply_timeout_s = CLUSTER_REPLY_TIMEOUT_S if harness.cluster else REPLY_TIMEOUT_S
    for attempt in range(RECONNECT_ATTEMPTS_MAX):
        port = harness.port_for(home + attempt)
        if port is not None:
            try:
                link, status = await AtmLink.open(
                    port, account, pin, token=token, reply_timeout_s=reply_timeout_s
                )
            except (LinkBroken, OSError, trio.TooSlowError) as error:
                last = f"{type(error).__name__}: {error}"
            else:
                if status is Status.APPROVED:
                    if token is not None and link.resumed:
                        harness.resumes += 1
                    return link
                await link.aclose()
                token = None  # whatever it was, it opened nothing: log in from now on
                if status not in LOGIN_RETRYABLE:
                    raise ChaosError(f"{account}: login refused with {status.name}")
                last = f"login {status.name}"
        await trio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
    raise ChaosError(f"{account}: no connection after {RECONNECT_ATTEMPTS_MAX} tries ({last})")


FENCE_PROBE_CENTS = 1
"""The probe's stale deposit: one cent, which the fence must refuse (it is in no client's
history, so the checker would also find it booked)."""


class FenceProbe:
    """One write that must meet the fence, made on purpose during the freeze.

    Before the freeze, the server about to freeze logs in two spare demo accounts: the
    probe and an anchor. While it is frozen, the probe's session is taken over on another
    server (RESUME, or LOGIN once its lease expired), and a deposit is left in the frozen
    server's socket. The harness then holds the anchor's lease row FOR SHARE: the thawed
    server's first heartbeat (one UPDATE over all its leases, the anchor's among them, at
    its fence) waits for that lock instead of ending the probe's session first, so the
    deposit is what meets the stale fence: refused, unanswered, SESSION_EXPIRED. Once that
    is seen the lock goes and the heartbeat proceeds. Without the anchor, the overdue
    heartbeat and the deposit race, and either one refuses the write.
    """

    def __init__(self, db: str, probe: tuple[str, str], anchor: tuple[str, str]) -> None:
        self._db = db
        self._probe, self._anchor = probe, anchor
        self._stale: AtmLink | None = None
        self._anchored: AtmLink | None = None
        self._lock: psycopg.Connection[Any] | None = None
        self.fenced = 0

    async def arm(self, harness: Harness, port: int) -> None:
        """Log both accounts in on the server about to freeze (and read the probe's token)."""
        try:
            self._stale = await self._login(port, *self._probe)
            await self._stale.request(Balance())  # its SESSION_TOKEN comes before the answer
            self._anchored = await self._login(port, *self._anchor)
        except (ChaosError, LinkBroken, OSError, trio.TooSlowError) as error:
            harness.failures.append(f"fence probe: {type(error).__name__}: {error}")

    @staticmethod
    async def _login(port: int, account: str, pin: str) -> AtmLink:
        link, status = await AtmLink.open(port, account, pin)
        if status is not Status.APPROVED:
            await link.aclose()
            raise ChaosError(f"{account}: login {status.name}")
        return link

    async def take_over(self, harness: Harness) -> None:
        """While the holder is frozen: the probe's session elsewhere (its fence goes up),
        the anchor's row held, a deposit left in the frozen server's socket."""
        if self._stale is None or self._anchored is None or self._stale.token is None:
            return
        account, pin = self._probe
        try:
            elsewhere = await connect(harness, account, pin, token=self._stale.token)
            await elsewhere.logout_and_close()
            self._lock = await trio.to_thread.run_sync(self._hold_row, self._anchor[0])
            txn_id = secrets.token_bytes(TXN_ID_BYTES)
            await self._stale.send(Deposit(txn_id, FENCE_PROBE_CENTS))
        except (ChaosError, LinkBroken, OSError, psycopg.Error, trio.TooSlowError) as error:
            harness.failures.append(f"fence probe: {type(error).__name__}: {error}")

    def _hold_row(self, account: str) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self._db, connect_timeout=int(CONNECT_TIMEOUT_S))
        try:
            row = connection.execute(
                "SELECT holder FROM leases WHERE account = %s FOR SHARE", (account,)
            ).fetchone()
        except BaseException:
            connection.close()
            raise
        if row is None or row[0] is None:
            connection.close()
            raise ChaosError(f"the anchor {account} holds no lease")
        return connection

    async def conclude(self, harness: Harness) -> None:
        """After the thaw: the deposit must end the session unanswered; then the lock goes
        and both sessions end (bounded, even in a cancelled run)."""
        with trio.CancelScope(shield=True):
            try:
                if self._stale is not None and self._lock is not None:
                    await self._expect_fenced(harness, self._stale)
            finally:
                if self._lock is not None:
                    await trio.to_thread.run_sync(self._lock.close)  # rolls back: unlocked
                for link in (self._stale, self._anchored):
                    if link is not None:
                        await link.logout_and_close()
                self._stale = self._anchored = self._lock = None

    async def _expect_fenced(self, harness: Harness, link: AtmLink) -> None:
        try:
            reply = await link.answer()
        except SessionEnded:
            self.fenced += 1
            progress("fence probe: the stale deposit was refused by the fence")
        except LinkBroken as error:
            harness.failures.append(f"fence probe: {error}")
        else:
            harness.failures.append(f"fence probe: the stale deposit was answered {reply}")


TRANSFER_SHARE = 3
"""One operation in this many is a transfer to another demo account."""


def new_operation(
    rng: random.Random, account: str, destinations: Sequence[str] = ()
) -> Operation:
    """Kind, amount and destination from the seeded generator; the txn id from the OS,
    so ids never repeat across runs or clients whatever the seed. A transfer goes to
    one of ``destinations`` (the other clients' accounts, leased by their sessions)."""
    others = [other for other in destinations if other != account]
    txn_id = secrets.token_bytes(TXN_ID_BYTES)
    if others and rng.randrange(TRANSFER_SHARE) == 0:
        amount_cents = rng.randint(1, AMOUNT_DRAWN_CENTS_MAX)
        return Operation(txn_id, account, TRANSFER.debit, amount_cents,
                         to_account=rng.choice(others))
    kind = rng.choice(MONEY_KINDS).entry_kind
    amount_cents = rng.randint(1, AMOUNT_DRAWN_CENTS_MAX)
    return Operation(txn_id, account, kind, amount_cents)


async def attempt(link: AtmLink, op: Operation) -> bool:
    """Send ``op`` once; whether the bank answered it definitely (LinkBroken otherwise)."""
    op.attempts += 1
    reply_type: type[Message]
    if op.to_account is not None:
        request: Request = Transfer(op.txn_id, op.amount_cents, op.to_account)
        reply_type = TransferReply
    else:
        kind = KIND_OF_ENTRY[op.kind]
        request, reply_type = kind.request(op.txn_id, op.amount_cents), kind.reply
    reply = await link.request(request)
    if not isinstance(reply, reply_type) or not isinstance(reply, MoneyReply):
        raise LinkBroken(f"unexpected reply {reply}")
    op.status = reply.status
    if reply.status is Status.APPROVED:
        op.outcome = Outcome.ACKNOWLEDGED
        op.entry_id, op.balance_cents = reply.entry_id, reply.balance_cents
        return True
    if reply.status in REFUSALS:
        op.outcome = Outcome.REFUSED
        return True
    raise LinkBroken(f"indeterminate status {reply.status.name}")


@dataclass(frozen=True, slots=True)
class Deadlines:
    started_at: float
    """When the workload began (trio clock); crash offsets count from here."""
    stop_at: float
    """No new operation starts after this (trio clock)."""
    drain_at: float
    """Unresolved operations are abandoned (left unknown) after this."""


@dataclass(frozen=True, slots=True)
class Client:
    """One simulated ATM: the demo account it drives and its own seeded generator."""

    account: str
    pin: str
    rng: random.Random
    home: int = 0
    """The server slot it connects to first (clients spread over the servers)."""
    destinations: tuple[str, ...] = ()
    """The accounts it may transfer to: the other clients'."""


async def drive_account(
    harness: Harness, client: Client, history: list[Operation], deadlines: Deadlines
) -> None:
    """One ATM on one account: operations one after another, each retried until answered."""
    account = client.account
    link: AtmLink | None = None
    token: bytes | None = None
    pending: Operation | None = None
    try:
        with trio.move_on_at(deadlines.drain_at):
            while pending is not None or trio.current_time() < deadlines.stop_at:
                if pending is None:
                    pending = new_operation(client.rng, account, client.destinations)
                    history.append(pending)
                if pending.attempts >= OPERATION_ATTEMPTS_MAX:
                    raise ChaosError(f"{account}: txn {pending.txn_id.hex()} never answered")
                if link is None:
                    link = await connect(
                        harness, account, client.pin, home=client.home, token=token
                    )
                operation = pending
                try:
                    await attempt(link, operation)
                    harness.note_answered()
                    pending = None
                except LinkBroken:
                    operation.was_unknown = True
                    token = link.token  # resumes the session elsewhere, if it still can
                    await link.aclose()
                    link = None
                    client = dataclasses.replace(client, home=client.home + 1)
    except ChaosError as error:
        harness.failures.append(str(error))
        progress(f"client failed: {error}")
    finally:
        if link is not None:
            await link.logout_and_close()


# -- The run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    clients: int
    crashes: int
    seconds: float
    seed: int
    workdir: Path
    db: str | None = None
    """A PostgreSQL database holding no bank yet; None: SQLite in ``workdir``."""
    servers: int = 1
    fence_probe: bool = False
    """Make one fenced write certain during the freeze (``FenceProbe``)."""


@dataclass(slots=True)
class Report:
    """Everything the run measured and concluded."""

    options: Options
    history: list[Operation]
    crashes: int = 0
    freezes: int = 0
    resumes: int = 0
    fenced_writes: int = 0
    fence_probes: int = 0
    elapsed_s: float = 0.0
    clean_exit: bool = False
    checked: bool = False
    """Whether the database could be read and judged at all."""
    errors: list[str] = field(default_factory=list)
    verdict: Verdict = field(default_factory=Verdict)

    @property
    def ok(self) -> bool:
        return (
            self.checked and self.verdict.ok and self.clean_exit and not self.errors
            and self.crashes == self.options.crashes and self.count_unresolved() == 0
            and (not self.options.fence_probe or self.fence_probes == 1)
        )

    def count(self, outcome: Outcome) -> int:
        return sum(op.outcome is outcome for op in self.history)

    def count_unresolved(self) -> int:
        return self.count(Outcome.UNKNOWN)

    def summary(self) -> dict[str, object]:
        crashed = [op for op in self.history if op.was_unknown]
        return {
            "acknowledged": self.count(Outcome.ACKNOWLEDGED),
            "refused": self.count(Outcome.REFUSED),
            "unknown_resolved": sum(op.outcome is not Outcome.UNKNOWN for op in crashed),
            "unknown_applied": sum(op.outcome is Outcome.ACKNOWLEDGED for op in crashed),
            "unknown_unresolved": self.count_unresolved(),
            "lost": self.verdict.lost,
            "duplicated": self.verdict.duplicated,
            "mismatched": self.verdict.mismatched,
            "refused_applied": self.verdict.refused_applied,
            "unexpected": self.verdict.unexpected,
            "crashes": self.crashes,
            "servers": self.options.servers,
            "freezes": self.freezes,
            "resumes": self.resumes,
            "fenced_writes": self.fenced_writes,
            "fence_probes": self.fence_probes,
            "operations": len(self.history),
            "attempts": sum(op.attempts for op in self.history),
            "seconds": round(self.elapsed_s, 2),
            "seconds_requested": self.options.seconds,
            "clients": self.options.clients,
            "seed": self.options.seed,
            "clean_exit": self.clean_exit,
            "invariant_ok": self.checked and self.verdict.ok,
            "ok": self.ok,
            "problems": len(self.verdict.problems) + len(self.errors),
        }


def crash_offsets_s(rng: random.Random, crashes: int, seconds: float) -> list[float]:
    """When to crash, in seconds from the start of the workload, in order."""
    low, high = CRASH_WINDOW
    return sorted(rng.uniform(low * seconds, high * seconds) for _ in range(crashes))


async def crash_loop(harness: Harness, offsets_s: list[float], deadlines: Deadlines) -> None:
    """Crash at each offset, but not before the restarted server has served something;
    crashes still owed at the end of --seconds follow one another without waiting."""
    for offset_s in offsets_s:
        await trio.sleep_until(deadlines.started_at + offset_s)
        await harness.wait_under_load(deadlines.stop_at)
        await harness.crash()


async def report_progress(history: list[Operation], harness: Harness, started_at: float) -> None:
    while True:
        await trio.sleep(PROGRESS_INTERVAL_S)
        pending = sum(op.outcome is Outcome.UNKNOWN for op in history)
        acked = sum(op.outcome is Outcome.ACKNOWLEDGED for op in history)
        progress(f"{trio.current_time() - started_at:5.1f} s: {len(history)} operations,"
                 f" {acked} acknowledged, {pending} in flight or unknown,"
                 f" {harness.crashes} crashes")


async def drive(harness: Harness, options: Options, history: list[Operation]) -> None:
    """The workload: clients and the crash schedule, concurrently, until all clients end."""
    rng = random.Random(options.seed)
    offsets_s = crash_offsets_s(rng, options.crashes, options.seconds)
    started_at = trio.current_time()
    stop_at = started_at + options.seconds
    deadlines = Deadlines(started_at, stop_at, stop_at + DRAIN_S)
    async with trio.open_nursery() as outer:
        outer.start_soon(report_progress, history, harness, started_at)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_loop, harness, offsets_s, deadlines)
            if harness.cluster:
                nursery.start_soon(freeze_once, harness, deadlines, options.seconds)
            chosen = accounts_for(options.clients)
            destinations = tuple(account for account, _, _ in chosen)
            for home, (account, pin, _) in enumerate(chosen):
                client = Client(
                    account, pin, random.Random(rng.getrandbits(64)), home, destinations
                )
                nursery.start_soon(drive_account, harness, client, history, deadlines)
        outer.cancel_scope.cancel()


async def freeze_once(harness: Harness, deadlines: Deadlines, seconds: float) -> None:
    """Halfway through, under load, freeze one server past its leases' expiry."""
    await trio.sleep_until(deadlines.started_at + FREEZE_AT * seconds)
    await harness.wait_under_load(deadlines.stop_at)
    await harness.freeze(FREEZE_S)


def accounts_for(clients: int) -> list[tuple[str, str, int]]:
    """Smallest balances first, so even a few clients see INSUFFICIENT_FUNDS refusals."""
    return sorted(DEMO_ACCOUNTS, key=lambda demo: demo[2])[:clients]


async def run_chaos(options: Options) -> Report:
    """Serve, drive, crash, stop, then check; every failure ends up in the report."""
    report = Report(options, [])
    started_at = trio.current_time()
    harness: Harness | None = None
    try:
        with trio.fail_after(options.seconds + RUN_ALLOWANCE_S):
            harness = Harness(
                options.workdir, db=options.db, servers=options.servers, seed=options.seed,
                probe=fence_probe(options),
            )
            try:
                await harness.start_all()
                await drive(harness, options, report.history)
                report.clean_exit = await harness.stop() == 0
            finally:
                await harness.kill_if_running()
    except* (ChaosError, trio.TooSlowError, OSError) as group:
        # except*: failures inside nurseries arrive wrapped in exception groups.
        report.errors += [f"{type(e).__name__}: {e}" for e in _leaves(group)]
    if harness is not None:
        report.crashes, report.freezes = harness.crashes, harness.freezes
        report.resumes, report.fenced_writes = harness.resumes, harness.fenced_writes()
        report.fence_probes = harness.fence_probes
        report.errors += harness.failures
    report.elapsed_s = trio.current_time() - started_at
    await _check(report)
    return report


def spare_accounts(clients: int) -> list[tuple[str, str]]:
    """The demo accounts (with their PINs) that no client drives nor transfers to."""
    driven = {account for account, _, _ in accounts_for(clients)}
    return [(account, pin) for account, pin, _ in DEMO_ACCOUNTS if account not in driven]


FENCE_PROBE_ACCOUNTS = 2
"""The probe and its anchor, each a demo account no client uses."""


def fence_probe(options: Options) -> FenceProbe | None:
    if not options.fence_probe or options.db is None:
        return None
    probe, anchor = spare_accounts(options.clients)[:FENCE_PROBE_ACCOUNTS]
    return FenceProbe(options.db, probe, anchor)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return leaves


async def _check(report: Report) -> None:
    key_file, sqlite_db = report.options.workdir / "bank.key", report.options.workdir / "bank.db"
    db: Path | str = sqlite_db if report.options.db is None else report.options.db
    if report.options.db is None and not sqlite_db.exists():
        report.errors.append("no database to check")
        return
    if not key_file.exists():
        report.errors.append("no PIN key: the servers never started")
        return
    state = await trio.to_thread.run_sync(read_bank_state, db, key_file)
    report.verdict = check_history(report.history, state)
    report.checked = True


# -- Command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bank.chaos",
        description="Jepsen-style bank workload: run the real server on a fresh database, "
        "drive concurrent ATM sessions (one per demo account) with random deposits, "
        "withdrawals and transfers to each other, kill -9 and restart the server at random "
        "moments (with --servers, fail over to the others), retry every "
        "operation whose outcome was lost with the same transaction id, then stop the "
        "server with SIGTERM and check the database against what the clients were told.",
        epilog="Progress goes to stderr; a summary, then one JSON object as the last line, "
        "to stdout. JSON keys: acknowledged, refused, unknown_resolved (outcome lost to a "
        "crash, then answered by a retry), unknown_applied (of those, APPROVED), "
        "unknown_unresolved, lost, duplicated, mismatched, refused_applied, unexpected, "
        "crashes, servers, freezes, resumes (failovers that resumed their session with its "
        "token), fenced_writes (stale writes refused by a lease fence, from the servers' "
        "logs), fence_probes (with --fence-probe: 1 when its stale write was fenced), "
        "operations, attempts, seconds (measured), seconds_requested, clients, "
        "seed, clean_exit, invariant_ok (every database check passed), ok, problems. "
        f"Exit status {EXIT_OK} when every check passed, {EXIT_FAILED} when one failed, "
        f"{EXIT_USAGE} for bad arguments. The run takes at most --seconds plus "
        f"{RUN_ALLOWANCE_S:.0f} s. Only 127.0.0.1 is used.",
    )
    parser.add_argument(
        "--clients", type=_bounded_int(1, len(DEMO_ACCOUNTS)), default=CLIENTS_DEFAULT,
        help=f"concurrent ATM sessions, one per demo account, 1..{len(DEMO_ACCOUNTS)} "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--crashes", type=_bounded_int(0, CRASHES_MAX), default=CRASHES_DEFAULT,
        help="times to kill -9 the server during the run (default %(default)s)",
    )
    parser.add_argument(
        "--seconds", type=_seconds, default=SECONDS_DEFAULT,
        help="how long clients start new operations (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_bounded_int(0, 2**64 - 1), default=None,
        help="seed for crash times, kinds and amounts (default: random, printed in the JSON)",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="a PostgreSQL database (postgresql:// URL or libpq string) holding no bank "
        "yet, for the servers to share; default: a fresh SQLite file in the work directory",
    )
    parser.add_argument(
        "--servers", type=_bounded_int(1, SERVERS_MAX), default=1,
        help=f"server processes on the database, 1..{SERVERS_MAX} (more than 1 needs --db);"
        " with 2 or more, one is also frozen (SIGSTOP) past its leases' expiry, then "
        "thawed (default %(default)s)",
    )
    parser.add_argument(
        "--fence-probe", action="store_true",
        help="during the freeze, make one stale write that must meet the fence: a spare "
        "account's session on the frozen server is taken over elsewhere and a deposit left "
        "in its socket, while a row lock holds back that server's heartbeat (needs "
        f"--servers 2 or more and --clients at most {len(DEMO_ACCOUNTS) - 2})",
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", default=None,
        help="work in DIR (created; must not already hold bank.db) and keep the database, "
        "key, server logs (server-N.log, one per start) and history.jsonl there; otherwise "
        "a temporary directory is used and removed after a passing run (kept and named "
        "after a failing one)",
    )
    return parser


def _bounded_int(low: int, high: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # argparse would name this function: "invalid parse value"
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}")
        return value

    return parse  # type: ignore[return-value]


def _seconds(text: str) -> float:
    try:
        value = float(text)  # a duration in seconds, never money
    except ValueError:  # argparse would name this function: "invalid _seconds value"
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= SECONDS_MAX:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {SECONDS_MAX:.0f}")
    return value


def prepare_workdir(keep: Path | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="bank-chaos-"))
    keep.mkdir(parents=True, exist_ok=True)
    if (keep / "bank.db").exists():
        raise ValueError(f"{keep} already holds bank.db; the checker needs a fresh database")
    return keep


def require_fresh_postgresql(db: str) -> None:
    """The checker judges every entry in the database, so it must hold no bank yet."""
    with psycopg.connect(db, connect_timeout=int(launcher.START_TIMEOUT_S)) as connection:
        row = connection.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is not None and row[0]:
        raise ValueError(
            f"{redact_db(db)} already holds a bank; the checker needs a fresh database"
        )


def print_summary(report: Report) -> None:
    figures = report.summary()
    print(
        f"{figures['operations']} operations by {figures['clients']} clients in "
        f"{figures['seconds']} s, {figures['crashes']} crashes, {figures['servers']} "
        f"servers, {figures['freezes']} freezes, {figures['fenced_writes']} fenced writes,"
        f" {figures['resumes']} resumed failovers (seed {figures['seed']}): "
        f"{figures['acknowledged']} acknowledged, {figures['refused']} refused, "
        f"{figures['unknown_resolved']} unknown then resolved by retry "
        f"({figures['unknown_applied']} had been applied), "
        f"{figures['unknown_unresolved']} unresolved"
    )
    problems = report.errors + report.verdict.problems
    for problem in problems[:PROBLEMS_SHOWN_MAX]:
        print(f"FAIL: {problem}")
    if len(problems) > PROBLEMS_SHOWN_MAX:
        print(f"... and {len(problems) - PROBLEMS_SHOWN_MAX} more problems")
    if report.crashes != report.options.crashes:
        print(f"FAIL: {report.crashes} of {report.options.crashes} crashes happened")
    if not report.clean_exit:
        print("FAIL: the server was not stopped cleanly (exit status 0 on SIGTERM)")
    print("PASS" if report.ok else "FAIL")
    print(json.dumps(figures))


def write_history(report: Report, path: Path) -> None:
    with path.open("w") as out:
        for op in report.history:
            out.write(json.dumps(op.as_json()) + "\n")


def progress(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.db is not None and not is_postgresql(args.db):
        parser.error("--db takes a PostgreSQL database (without it, SQLite is used)")
    if args.servers > 1 and args.db is None:
        parser.error("--servers above 1 needs --db: one SQLite file serves one process")
    if args.fence_probe and (
        args.servers < 2 or len(spare_accounts(args.clients)) < FENCE_PROBE_ACCOUNTS
    ):
        parser.error("--fence-probe needs --servers 2 or more and two demo accounts no "
                     f"client uses (--clients at most {len(DEMO_ACCOUNTS) - 2})")
    try:
        if args.db is not None:
            require_fresh_postgresql(args.db)
        workdir = prepare_workdir(args.keep)
    except (ValueError, OSError, psycopg.Error) as error:
        print(f"bank.chaos: {error}", file=sys.stderr)
        return EXIT_USAGE
    seed = secrets.randbits(64) if args.seed is None else args.seed
    options = Options(
        args.clients, args.crashes, args.seconds, seed, workdir, args.db, args.servers,
        args.fence_probe,
    )
    progress(f"working in {workdir}")
    report = trio.run(run_chaos, options)
    print_summary(report)
    if args.keep is not None:
        write_history(report, workdir / "history.jsonl")
    elif report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        write_history(report, workdir / "history.jsonl")
        progress(f"failed run kept in {workdir}")
    return EXIT_OK if report.ok else EXIT_FAILED


__all__ = [
    "BankState", "Operation", "Options", "Outcome", "Report", "Verdict",
    "check_history", "main", "read_bank_state", "run_chaos",
]

if __name__ == "__main__":
    sys.exit(main())
