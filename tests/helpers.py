"""What several test modules share: the demo accounts, a wire-level test client, a bank
server started in the test's nursery, and for the ATM's tests a fake bank and a scripted
keyboard. Fixtures live in conftest.py; test modules import helpers from here, never
from each other."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import ssl
import threading
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from atm.connection import Connection
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.leases import Leases
from bank.ledger import Ledger, PinChangeVerdict, PinVerdict, Posting
from bank.resumption import SessionRegistry
from bank.server import BankServer
from bank.session import Session
from bank.store import DestinationPolicy
from wire import (
    ALL_FEATURES,
    AMOUNT_CENTS_MAX,
    PROTOCOL_VERSION,
    Answer,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Decoder,
    Deposit,
    EntryKind,
    Error,
    Feature,
    Features,
    FeaturesReply,
    Frame,
    Hello,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    Ping,
    PingReply,
    Reply,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionToken,
    State,
    Status,
    Transfer,
    TransferReply,
    Withdraw,
    encode,
    is_trivial_pin,
)
from wire import Connection as Engine
from wire import SessionExpired as SessionExpiredNotice
from wire._kinds import KIND_OF_REQUEST, MoneyKind
from wire._messages import MoneyReply, MoneyRequest, reply_type

RECEIVE_TIMEOUT_S = 10
"""Guard against a hung test when the real clock runs; far above any honest wait."""

DEMO_ACCOUNT, DEMO_PIN, DEMO_BALANCE_CENTS = "AC-12345", "1324", 1024_32
DESTINATIONS = DestinationPolicy(
    tries_max=ServerConfig().destination_tries_max,
    lockout_ms=ServerConfig().destination_lockout_s * 1000,
)
"""The server's default transfer-lock settings, for tests that call a store directly."""
OTHER_ACCOUNT, OTHER_PIN = "BC-01373", "2947"


class WireClient:
    """A test peer that speaks the protocol through a client ``wire.Connection``, and
    can turn into a raw probe for the hostile tests.

    ``hello``, ``send``, ``request`` and ``login`` are a conversation the engine checks:
    each reply must answer its request. ``send_raw`` puts arbitrary bytes on the wire;
    the engine cannot follow a conversation broken on purpose, so from then on the
    client hands the engine's unread bytes to a plain ``Decoder`` and ``receive``
    returns frames as the server sent them, checking nothing but the framing.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._engine = Engine(Sender.CLIENT)
        self._raw: Decoder | None = None
        self._raw_ids = itertools.count(1)
        self.tokens: list[bytes] = []
        """The session tokens the server sent (SESSION_TOKEN), oldest first."""

    @classmethod
    async def connect(cls, port: int) -> WireClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send_raw(self, data: bytes) -> None:
        """Send ``data`` as it is: from now on this client is a raw probe."""
        if self._raw is None:
            self._raw = Decoder(Sender.SERVER)
            self._raw.receive_data(self._engine.trailing_data)
        await self.stream.send_all(data)

    async def send(self, message: Request) -> int:
        """Send one request without waiting for its reply; returns its request id."""
        if self._raw is not None:
            request_id = next(self._raw_ids)
            await self.stream.send_all(encode(message, request_id))
            return request_id
        data = self._engine.send(message)
        await self.stream.send_all(data)
        return self._engine.last_request_id

    async def receive(self) -> Frame | None:
        """The next frame (for an answer, its reply), or None when the server closed.

        SESSION_TOKEN notices are kept in ``tokens``, not returned: they follow every
        approved LOGIN, and tests that count frames mean the others."""
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while True:
                while (event := self._next_event()) is None:
                    data = await self.stream.receive_some(4096)
                    if not data:
                        return None
                    self._receive_data(data)
                if isinstance(event.message, SessionToken):
                    self.tokens.append(event.message.token)
                    continue
                return event if isinstance(event, Frame) else Frame(event.request_id, event.message)

    def _next_event(self) -> Frame | Answer | None:
        return self._raw.next_frame() if self._raw is not None else self._engine.next_event()

    def _receive_data(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw.receive_data(data)
        else:
            self._engine.receive_data(data)

    async def request(self, message: Request) -> Message:
        """Send one request and return its answer (the engine checks it answers ours)."""
        request_id = await self.send(message)
        frame = await self.receive()
        assert frame is not None, f"connection closed instead of answering {message}"
        assert frame.request_id == request_id
        return frame.message

    async def hello(self) -> Hello:
        frame = await self.receive()
        assert frame is not None and isinstance(frame.message, Hello)
        return frame.message

    async def login(self, account: str = DEMO_ACCOUNT, pin: str = DEMO_PIN) -> Status:
        """LOGIN; once approved, also the SESSION_TOKEN that follows, so that no frame of
        the login is left unread (a test may turn to raw bytes next)."""
        reply = await self.request(Login(account, pin))
        assert isinstance(reply, LoginReply)
        if reply.status is Status.APPROVED:
            await self.token()
        return reply.status

    async def token(self) -> bytes:
        """The session token the server sent after the last approved LOGIN or RESUME."""
        count = len(self.tokens)
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while len(self.tokens) == count:
                while (event := self._next_event()) is None:
                    data = await self.stream.receive_some(4096)
                    assert data, "the server closed instead of sending a session token"
                    self._receive_data(data)
                assert isinstance(event.message, SessionToken), event
                self.tokens.append(event.message.token)
        return self.tokens[-1]

    async def closed(self) -> bool:
        """True once the server has closed the connection (after any frames it sent)."""
        return await self.receive() is None

    async def aclose(self) -> None:
        await self.stream.aclose()


def txn_id() -> bytes:
    return uuid.uuid4().bytes


class RunningServer:
    def __init__(self, server: BankServer, port: int) -> None:
        self.server = server
        self.port = port

    async def client(self, *, hello: bool = True) -> WireClient:
        client = await WireClient.connect(self.port)
        if hello:
            await client.hello()
        return client


async def start_server(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, *,
    tls: ssl.SSLContext | None = None, **overrides: object,
) -> RunningServer:
    server = BankServer(dataclasses.replace(config, **overrides), ledger, tls=tls)
    listeners = await nursery.start(server.serve)
    return RunningServer(server, listeners[0].socket.getsockname()[1])


async def logged_in(
    bank: RunningServer, account: str = DEMO_ACCOUNT, pin: str = DEMO_PIN
) -> WireClient:
    client = await bank.client()
    assert await client.login(account, pin) is Status.APPROVED
    return client


SETTLE_ROUNDS_MAX = 100
"""Bound on settle's rounds; each round ends only when every task and thread is idle."""


async def settle() -> None:
    """Return once no server task can run and no worker thread is busy.

    ``wait_all_tasks_blocked`` alone counts a task waiting for SQLite's thread as
    blocked; this is trio's documented recipe that also waits for the threads.
    """
    for _ in range(SETTLE_ROUNDS_MAX):
        await trio.testing.wait_all_threads_completed()
        await trio.testing.wait_all_tasks_blocked()
        if trio.testing.active_thread_count() == 0:
            return
    raise AssertionError("the server never settled")


async def legit_session(
    bank: RunningServer, account: str = DEMO_ACCOUNT, pin: str = DEMO_PIN
) -> None:
    """An honest ATM's whole visit; every step must be approved."""
    client = await logged_in(bank, account, pin)
    before = await client.request(Balance())
    assert isinstance(before, BalanceReply) and before.status is Status.APPROVED
    deposit = await client.request(Deposit(txn_id(), 12_34))
    assert deposit.status is Status.APPROVED
    assert deposit.balance_cents == before.balance_cents + 12_34
    withdraw = await client.request(Withdraw(txn_id(), 5_67))
    assert withdraw.status is Status.APPROVED
    after = await client.request(Balance())
    assert after == BalanceReply(Status.APPROVED, before.balance_cents + 12_34 - 5_67)
    assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    assert await client.closed()
    await client.aclose()


async def frames_until_closed(client: WireClient, frames_max: int = 10) -> list[Frame]:
    """Every frame the server still sends, until it closes (bounded)."""
    frames = []
    for _ in range(frames_max):
        frame = await client.receive()
        if frame is None:
            return frames
        frames.append(frame)
    raise AssertionError(f"still open after {frames_max} frames: {frames}")


def bank_process_args(workdir: Path) -> list[str]:
    """Flags for a real server on a fresh database in ``workdir``: bank.db and bank.key."""
    return [
        "--db", str(workdir / "bank.db"), "--key-file", str(workdir / "bank.key"),
        "--log-level", "INFO", "--shutdown-grace-s", "5",
    ]


@dataclass
class Fault:
    error: Exception
    after_work: bool
    """Raise after the real call has done its work (a commit whose success went unseen)."""


class FaultyLedger:
    """The real ledger, except where a test makes its calls raise: ``fail_next`` makes
    one method's next call raise (before or after the real work), and while ``failing``
    is set every call raises it (a bug below the session, whichever call it is)."""

    def __init__(self, real: Ledger) -> None:
        self.real = real
        self.faults: dict[str, Fault] = {}
        self.failing: Exception | None = None

    def fail_next(self, method: str, error: Exception, *, after_work: bool = False) -> None:
        self.faults[method] = Fault(error, after_work)

    async def _call(self, method: str, *args: object, **kwargs: object) -> Any:
        if self.failing is not None:
            raise self.failing
        fault = self.faults.pop(method, None)
        if fault is not None and not fault.after_work:
            raise fault.error
        result = await getattr(self.real, method)(*args, **kwargs)
        if fault is not None:
            raise fault.error
        return result

    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        return cast(PinVerdict, await self._call("verify_pin", account, pin))

    async def balance(self, account: str) -> int:
        return cast(int, await self._call("balance", account))

    async def post(self, **posting: Any) -> Posting:
        return cast(Posting, await self._call("post", **posting))

    async def transfer(self, **transfer: Any) -> Posting:
        return cast(Posting, await self._call("transfer", **transfer))

    async def change_pin(
        self, account: str, pin: str, new_pin: str, *, fence: int | None = None
    ) -> PinChangeVerdict:
        return cast(
            PinChangeVerdict,
            await self._call("change_pin", account, pin, new_pin, fence=fence),
        )

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        return cast(list[HistoryEntry], await self._call("history", account, count))

    async def aclose(self) -> None:
        await self.real.aclose()


class ServedSession:
    """A bank ``Session`` behind a server ``wire.Connection``, driven without a socket:
    each request goes in as a client engine's bytes and its answer comes back through
    both engines' checks, as the server's connection loop would send it."""

    def __init__(
        self, *, ledger: Ledger, leases: Leases, config: ServerConfig, name: str = "test",
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.session = Session(
            ledger=ledger, leases=leases, config=config, name=name, sessions=sessions
        )
        self.engine = Engine(Sender.SERVER, login_attempts_max=config.login_attempts_max)
        self._client = Engine(Sender.CLIENT)
        self._client.receive_data(self.engine.send(config.hello()))
        assert self._client.next_event() is not None

    async def handle(self, request: Request) -> Reply:
        self.engine.receive_data(self._client.send(request))
        frame = self.engine.next_event()
        assert frame is not None and frame.message == request
        reply = await self.session.answer(self.engine, request)
        self._client.receive_data(self.engine.send(reply))
        answer = self._client.next_event()
        assert isinstance(answer, Answer) and answer.message == reply
        return reply

    def begin_shutdown(self) -> None:
        self.engine.begin_shutdown()

    def end(self) -> None:
        """As the connection's end does: the engine closes and the lease is released."""
        self.engine.close()
        self.session.end()


# -- A fake bank and a scripted keyboard, for the ATM tests ------------------------------

ACCOUNT = "AC-12345"
PIN = "1234"
START_BALANCE_CENTS = 100_00
START_TIME_MS = 1_700_000_000_000
"""2023-11-14 22:13:20 UTC; the fake's clock advances one second per entry."""

HELLO = Hello(
    payload_bytes_max=1024,
    history_entries_max=20,
    amount_cents_max=AMOUNT_CENTS_MAX,
    frame_timeout_s=10,
    login_timeout_s=30,
    idle_timeout_s=120,
)

LOGIN_FAILURES_MAX = 3


def with_version(frame: bytes, version: int) -> bytes:
    """``frame`` as a peer of another protocol version would send it (CRC recomputed)."""
    body = frame[:2] + bytes([version]) + frame[3:-4]
    return body + zlib.crc32(body).to_bytes(4, "big")


@dataclass
class FakeAccount:
    pin: str
    balance_cents: int
    locked: bool = False
    entries: list[HistoryEntry] = field(default_factory=list)


class FakeBank:
    """The bank as the ATM tests need it: quick, in memory, and able to misbehave on cue.

    It follows the server contract through the same protocol engine as the real bank
    (``wire.Connection``): HELLO on connect (or ERROR(SERVER_BUSY)), the state table,
    LOGIN with retries, one lease per account, money requests idempotent by txn_id
    (refusals not recorded), and notices with request id 0. Knobs let a test lose or
    delay a reply after the money moved, or keep a lease after its connection closed.
    ``connect`` is an ``atm.session.Connector`` on memory streams.
    """

    def __init__(self, nursery: trio.Nursery, *, hello: Hello = HELLO) -> None:
        self._nursery = nursery
        self.hello = hello
        self.hello_version = PROTOCOL_VERSION
        """The version byte of the HELLO frame: another one plays a bank of another version."""
        self.accounts = {ACCOUNT: FakeAccount(PIN, START_BALANCE_CENTS)}
        self.leases: set[str] = set()
        self.tokens: dict[str, tuple[bytes, _FakeSession]] = {}
        """Per account, the token that resumes its session, and that session."""
        self.resumes_refused = False
        """Answer every RESUME UNKNOWN_SESSION, as a bank that lost its sessions would."""
        self.outcomes: dict[bytes, MoneyReply] = {}
        self.transfers: dict[bytes, TransferReply] = {}
        self.transfers_locked = False
        """Refuse every new transfer as the bank's transfer lock does (spec §3.18): 65 if
        the connection announced FREQUENCY_LIMIT, else 61."""
        self.served_features = int(ALL_FEATURES)
        """What FEATURES is answered with (of what was asked): 0 plays a bank that has none."""
        self.features_seen = False
        self.features_announced = 0
        """The bits of the last FEATURES (one fake serves one ATM at a time)."""
        self.requests: list[Frame] = []
        self.connections = 0
        self.busy_after_connections: int | None = None
        self.lose_replies = 0
        """Money requests whose reply is lost (connection closed) after the money moved."""
        self.hang_replies = 0
        """Money requests never answered (until the ATM hangs up) after the money moved."""
        self.expire_before_login = 0
        """Connections whose first LOGIN finds the session expired (a slow typist)."""
        self.unavailable_replies = 0
        """Money requests answered ISSUER_UNAVAILABLE without being looked up, as the real
        bank answers during a storage failure."""
        self.unsettled_replies: deque[Status | Error] = deque()
        """Answers to the next money requests, each sent instead of the real reply after the
        money moved: a status (in the request's reply type) or an ERROR frame, as a bank
        whose storage failed after the commit might answer."""
        self.wrong_version_replies = 0
        """Money requests whose reply, after the money moved, carries another protocol
        version byte (damage on the way: the HELLO was version 1)."""
        self.unavailable_logins = 0
        """LOGINs answered ISSUER_UNAVAILABLE, as a bank shutting down or whose storage
        briefly fails answers them."""
        self.close_instead_of: set[type[Request]] = set()
        self.close_once_instead_of: set[type[Request]] = set()
        """Request types whose next request closes the connection instead of a reply."""
        self.lease_kept_after_close_s = 0.0
        """How long a session's lease outlives its connection, as at a real bank that did
        not see the connection close and holds the lease until the idle timeout."""
        self.error_instead_of: set[type[Request]] = set()
        self.notice_before_reply: dict[type[Request], Message] = {}
        """A notice sent just before the reply to the next request of that type."""
        self.logged_in = trio.Event()
        self.streams: list[trio.abc.Stream] = []
        self._engines: list[Engine] = []

    # -- Inspection for tests --------------------------------------------------------

    def sent(self, kind: type[Request]) -> list[Request]:
        return [f.message for f in self.requests if isinstance(f.message, kind)]

    def money_requests(self) -> list[MoneyRequest]:
        return [f.message for f in self.requests if isinstance(f.message, MoneyRequest)]

    async def send_notice(self, message: Message) -> None:
        """Send a notice on the newest connection, as the bank may at any time."""
        await self.streams[-1].send_all(self._engines[-1].send(message))

    # -- Serving ---------------------------------------------------------------------

    async def connect(self) -> Connection:
        client, server = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self.serve, server)
        return await Connection.handshake(client)

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        self.streams.append(stream)
        session = _FakeSession()
        try:
            await self._serve(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if session.account is not None and self.lease_kept_after_close_s:
                self._nursery.start_soon(self._release_later, session)
            elif session.account is not None:
                self._release(session)
            await trio.aclose_forcefully(stream)

    async def _release_later(self, session: _FakeSession) -> None:
        await trio.sleep(self.lease_kept_after_close_s)
        self._release(session)

    def _release(self, session: _FakeSession) -> None:
        """End ``session``'s hold on its account, unless a resumed session took it over."""
        if session.account is not None and not session.superseded:
            self.leases.discard(session.account)
            self.tokens.pop(session.account, None)

    async def _serve(self, stream: trio.abc.Stream, session: _FakeSession) -> None:
        engine = Engine(Sender.SERVER, login_attempts_max=LOGIN_FAILURES_MAX)
        self._engines.append(engine)
        busy_after = self.busy_after_connections
        if busy_after is not None and self.connections > busy_after:
            await stream.send_all(engine.send(Error(Status.SERVER_BUSY)))
            return
        greeting = engine.send(self.hello)
        if self.hello_version != PROTOCOL_VERSION:
            greeting = with_version(greeting, self.hello_version)
        await stream.send_all(greeting)
        while engine.state is not State.CLOSED:
            frame = await _receive_request(stream, engine)
            if frame is None:
                return
            self.requests.append(frame)
            request = frame.message
            assert isinstance(request, Request), "a server's engine yields only requests"
            if isinstance(request, Login) and self.expire_before_login:
                self.expire_before_login -= 1  # as the real bank at its login deadline
                await stream.send_all(engine.send(SessionExpiredNotice()))
                return
            if isinstance(request, Login) and self.unavailable_logins:
                self.unavailable_logins -= 1
                await stream.send_all(engine.send(LoginReply(Status.ISSUER_UNAVAILABLE)))
                continue
            refused = engine.refusal(request)
            if refused is not None:
                reply: Reply = reply_type(request)(refused)
            else:
                reply = self._answer(request, session)
            if not await self._deliver(stream, engine, request, reply):
                return
            if isinstance(reply, LoginReply | ResumeReply) and reply.status is Status.APPROVED:
                token = os.urandom(16)
                assert session.account is not None
                self.tokens[session.account] = (token, session)
                await stream.send_all(engine.send(SessionToken(token)))
            if session.account is not None:
                self.logged_in.set()  # After the reply went out, so a test may send next.
            if session.superseded:
                return

    async def _deliver(
        self, stream: trio.abc.Stream, engine: Engine, request: Request, reply: Reply
    ) -> bool:
        """Send ``reply`` unless a knob says otherwise; False when the connection ends."""
        if type(request) in self.close_instead_of:
            return False
        if type(request) in self.close_once_instead_of:
            self.close_once_instead_of.discard(type(request))
            return False
        if isinstance(request, MoneyRequest | Transfer | ChangePin) and self.lose_replies:
            self.lose_replies -= 1
            return False
        if isinstance(request, MoneyRequest) and self.hang_replies:
            self.hang_replies -= 1
            await _wait_for_hang_up(stream)
            return False
        if isinstance(request, MoneyRequest) and self.unavailable_replies:
            self.unavailable_replies -= 1
            reply = type(reply)(Status.ISSUER_UNAVAILABLE)
        answer: Reply | Error = reply
        if isinstance(request, MoneyRequest) and self.unsettled_replies:
            instead = self.unsettled_replies.popleft()
            answer = instead if isinstance(instead, Error) else type(reply)(instead)
        if isinstance(request, MoneyRequest) and self.wrong_version_replies:
            self.wrong_version_replies -= 1
            await stream.send_all(with_version(engine.send(answer), 2))
            return True
        if type(request) in self.error_instead_of:
            answer = Error(Status.INVALID_TRANSACTION)  # an ERROR after which the session goes on
        notice = self.notice_before_reply.pop(type(request), None)
        if notice is not None:
            await stream.send_all(engine.send(notice))
        await stream.send_all(engine.send(answer))
        return True

    def _answer(self, request: Request, session: _FakeSession) -> Reply:
        match request:
            case Login():
                return LoginReply(self._log_in(request, session))
            case Resume():
                return ResumeReply(self._resume(request, session))
            case Logout():
                return LogoutReply(Status.APPROVED)
            case Ping():
                return PingReply(Status.APPROVED)
            case Balance():
                return BalanceReply(Status.APPROVED, self._account(session).balance_cents)
            case History(count=count):
                entries = tuple(reversed(self._account(session).entries))[:count]
                return HistoryReply(Status.APPROVED, entries)
            case MoneyRequest():
                return self._move_money(request, self._account(session))
            case Features(features=features):
                self.features_seen = True
                self.features_announced = features
                return FeaturesReply(Status.APPROVED, features & self.served_features)
            case Transfer():
                assert session.account is not None
                if self.transfers_locked and request.txn_id not in self.transfers:
                    told = self.features_announced & self.served_features
                    return TransferReply(
                        Status.EXCEEDS_FREQUENCY_LIMIT if told & Feature.FREQUENCY_LIMIT
                        else Status.EXCEEDS_WITHDRAWAL_LIMIT
                    )
                return self._transfer(request, session.account)
            case ChangePin():
                return ChangePinReply(self._change_pin(request, self._account(session)))
        raise AssertionError(f"the fake does not serve {request}")

    def _transfer(self, request: Transfer, source: str) -> TransferReply:
        """As the bank: replay by id, then SAME_ACCOUNT, funds, destination; both legs."""
        if request.txn_id in self.transfers:
            return self.transfers[request.txn_id]
        if request.to_account == source:
            return TransferReply(Status.SAME_ACCOUNT)
        account = self.accounts[source]
        if account.balance_cents < request.amount_cents:
            return TransferReply(Status.INSUFFICIENT_FUNDS)
        destination = self.accounts.get(request.to_account)
        if destination is None:
            return TransferReply(Status.INVALID_TO_ACCOUNT)
        legs = ((account, EntryKind.TRANSFER_OUT, -1), (destination, EntryKind.TRANSFER_IN, 1))
        for record, kind, sign in legs:
            record.balance_cents += sign * request.amount_cents
            record.entries.append(HistoryEntry(
                entry_id=len(record.entries) + 1,
                time_ms=START_TIME_MS + 1000 * len(record.entries), kind=kind,
                amount_cents=request.amount_cents, balance_cents=record.balance_cents,
            ))
        first = account.entries[-1]
        reply = TransferReply(Status.APPROVED, account.balance_cents, first.entry_id,
                              first.time_ms)
        self.transfers[request.txn_id] = reply
        return reply

    @staticmethod
    def _change_pin(request: ChangePin, account: FakeAccount) -> Status:
        if is_trivial_pin(request.new_pin):
            return Status.PIN_NOT_ALLOWED
        if account.pin != request.pin:
            return Status.INCORRECT_PIN
        account.pin = request.new_pin
        return Status.APPROVED

    def _account(self, session: _FakeSession) -> FakeAccount:
        assert session.account is not None
        return self.accounts[session.account]

    def _resume(self, resume: Resume, session: _FakeSession) -> Status:
        """Take over the account's session from its old connection, as the bank does
        (the old one is marked superseded and stops serving; its lease passes here)."""
        held = self.tokens.get(resume.account)
        if self.resumes_refused or held is None or held[0] != resume.token:
            return Status.UNKNOWN_SESSION
        del self.tokens[resume.account]
        held[1].superseded = True
        session.account = resume.account
        self.leases.add(resume.account)
        return Status.APPROVED

    def _log_in(self, login: Login, session: _FakeSession) -> Status:
        account = self.accounts.get(login.account)
        if account is not None and account.locked:
            return Status.PIN_TRIES_EXCEEDED
        if account is None or account.pin != login.pin:
            return Status.INCORRECT_PIN
        if login.account in self.leases:
            return Status.ACCOUNT_IN_USE
        self.leases.add(login.account)
        session.account = login.account
        return Status.APPROVED

    def _move_money(self, request: MoneyRequest, account: FakeAccount) -> MoneyReply:
        if request.txn_id in self.outcomes:
            return self.outcomes[request.txn_id]
        outcome = self._apply(request, account, KIND_OF_REQUEST[type(request)])
        if outcome.status is Status.APPROVED:  # a refusal records nothing, as at the bank
            self.outcomes[request.txn_id] = outcome
        return outcome

    def _apply(self, request: MoneyRequest, account: FakeAccount, kind: MoneyKind) -> MoneyReply:
        balance_cents = account.balance_cents + kind.balance_change_cents(request.amount_cents)
        if balance_cents < 0:
            return kind.reply(Status.INSUFFICIENT_FUNDS)
        account.balance_cents = balance_cents
        entry = HistoryEntry(
            entry_id=len(account.entries) + 1,
            time_ms=START_TIME_MS + 1000 * len(account.entries),
            kind=kind.entry_kind,
            amount_cents=request.amount_cents,
            balance_cents=account.balance_cents,
        )
        account.entries.append(entry)
        return kind.reply(Status.APPROVED, account.balance_cents, entry.entry_id, entry.time_ms)


@dataclass
class _FakeSession:
    account: str | None = None
    superseded: bool = False


async def _receive_request(stream: trio.abc.Stream, engine: Engine) -> Frame | None:
    """The next request, or None when the ATM hung up."""
    while (event := engine.next_event()) is None:
        data = await stream.receive_some(4096)
        if not data:
            return None
        engine.receive_data(data)
    assert isinstance(event, Frame), "a server's engine yields frames"
    return event


async def _wait_for_hang_up(stream: trio.abc.Stream) -> None:
    while await stream.receive_some(4096):
        pass


async def listen_on_loopback(nursery: trio.Nursery, bank: FakeBank) -> int:
    """Serve ``bank`` over TCP on 127.0.0.1 at a free port, which is returned."""
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, bank.serve, 0)
    return listeners[0].socket.getsockname()[1]


@dataclass(frozen=True)
class WaitFor:
    """In a ScriptedConsole's lines: the customer waits until the ATM has shown a line
    containing ``text`` before typing the next answer."""

    text: str


class ScriptedConsole:
    """A keyboard that types ``lines`` in order, then ends input (or waits forever).
    A ``WaitFor`` among the lines holds the next answer until the screen shows its text."""

    def __init__(self, lines: list[str | WaitFor], *, then_wait: bool = False) -> None:
        self._lines = deque(lines)
        self._then_wait = then_wait
        self.prompts: list[tuple[str, bool]] = []
        self.output: list[str] = []
        self._written = trio.Event()

    async def read_line(self, prompt: str, *, secret: bool = False) -> str | None:
        await trio.lowlevel.checkpoint()
        self.prompts.append((prompt, secret))
        while self._lines and isinstance(self._lines[0], WaitFor):
            awaited = self._lines.popleft()
            assert isinstance(awaited, WaitFor)
            while not any(awaited.text in line for line in self.output):
                await self._written.wait()
                self._written = trio.Event()
        if self._lines:
            line = self._lines.popleft()
            assert isinstance(line, str)
            return line
        if self._then_wait:
            await trio.sleep_forever()
        return None

    def write(self, line: str) -> None:
        self.output.append(line)
        self._written.set()

    @property
    def text(self) -> str:
        return "\n".join(self.output)


PROTOCOL_WORDS = re.compile(
    r"(?i:greet|protocol|\bframe|\btoken|\blease)|\b(HELLO|LOGIN|RESUME|LOGOUT|PING|ERROR|[A-Z_]+_REPLY)\b"
)
"""Words of the wire protocol that mean nothing to a customer."""


def assert_customer_words(sentence: str) -> None:
    """``sentence`` speaks the customer's language: no protocol words in it."""
    found = PROTOCOL_WORDS.search(sentence)
    assert found is None, f"{found.group()!r} in a customer sentence: {sentence!r}"


BATCH_RELEASE_TIMEOUT_S = 10
"""Bound on a held batch's wait, so that a broken test fails instead of hanging."""


class StoreBatches:
    """Every batch a ``BatchLedger`` hands its store, recorded, whichever way the store
    runs it: SQLite's statements on the event loop (``run_batch``) and its COMMIT in a
    thread (``commit_batch``), or the whole batch in a thread (``execute_batch``:
    PostgreSQL, or SQLite while another connection holds the write lock).

    ``hold`` keeps the next batch in its thread (before its COMMIT, or before it starts)
    until ``release``, so that a test can act while it is in flight; ``fail`` makes the
    next batch fail in the database, before its COMMIT (rolled back) or after it (the
    caller learns only of the failure), with ``error``."""

    def __init__(self, ledger: BatchLedger, monkeypatch: Any) -> None:
        self.seen: list[list[Any]] = []
        self._store = store = cast(Any, ledger._store)
        self._gate: threading.Event | None = None
        self._release = threading.Event()
        self._entered = threading.Event()
        self._failure: tuple[Exception, bool] | None = None
        self._execute_batch = store.execute_batch
        monkeypatch.setattr(store, "execute_batch", self._whole_batch)
        if store.statements_on_loop:
            self._run_batch, self._commit_batch = store.run_batch, store.commit_batch
            monkeypatch.setattr(store, "run_batch", self._statements)
            monkeypatch.setattr(store, "commit_batch", self._commit)

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def sizes(self) -> list[int]:
        return [len(requests) for requests in self.seen]

    def hold(self) -> None:
        self._gate = self._release = threading.Event()
        self._entered.clear()

    async def held(self) -> None:
        """Return once the held batch is in its thread, waiting for ``release``."""
        assert await trio.to_thread.run_sync(self._entered.wait, BATCH_RELEASE_TIMEOUT_S)

    def release(self) -> None:
        self._release.set()

    def fail(self, error: Exception, *, after_commit: bool) -> None:
        self._failure = (error, after_commit)

    def _wait_at_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            self._entered.set()
            assert gate.wait(timeout=BATCH_RELEASE_TIMEOUT_S), "a held batch was never released"

    def _whole_batch(self, requests: Any, now_ms: int) -> Any:
        self.seen.append(list(requests))
        self._wait_at_gate()
        failure, self._failure = self._failure, None
        if failure is not None and not failure[1]:
            raise failure[0]
        outcomes = self._execute_batch(requests, now_ms)
        if failure is not None:
            raise failure[0]  # committed, but its caller learns only of the failure
        return outcomes

    def _statements(self, requests: Any, now_ms: int) -> Any:
        self.seen.append(list(requests))
        return self._run_batch(requests, now_ms)

    def _commit(self) -> None:
        self._wait_at_gate()
        failure, self._failure = self._failure, None
        if failure is not None and not failure[1]:
            self._store._roll_back()
            raise failure[0]
        self._commit_batch()
        if failure is not None:
            raise failure[0]
