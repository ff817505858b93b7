"""A fake bank and a scripted keyboard for the ATM tests, and checks of the fake itself.

The ATM's flow is tested against this fake (quick, and able to misbehave on cue;
``tests/test_e2e.py`` runs the real ATM against the real server), which follows the
server contract: HELLO on connect (or ERROR(SERVER_BUSY)), LOGIN with retries, one lease
per account, money requests idempotent by txn_id (refusals not recorded), and notices
with request id 0. Knobs let a test lose or delay a reply after the money moved, or keep
a lease after its connection closed.
The other ``test_atm_*`` modules import ``FakeBank`` and ``ScriptedConsole`` from here.
"""

from __future__ import annotations

import functools
import zlib
from collections import deque
from dataclasses import dataclass, field

import trio
import trio.testing

from atm.connection import Connection
from wire import (
    AMOUNT_CENTS_MAX,
    MESSAGE_TYPES,
    Balance,
    BalanceReply,
    Decoder,
    Deposit,
    DepositReply,
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
    Message,
    Opcode,
    Ping,
    PingReply,
    Request,
    Sender,
    Status,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire import SessionExpired as SessionExpiredNotice
from wire.kinds import KIND_OF_REQUEST, MoneyKind
from wire.messages import MoneyReply, MoneyRequest

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

SERVED_BEFORE_LOGIN = (Login, Ping, Logout)
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
    """Serves any Trio stream; ``connect`` is an ``atm.session.Connector`` on memory streams."""

    def __init__(self, nursery: trio.Nursery, *, hello: Hello = HELLO) -> None:
        self._nursery = nursery
        self.hello_frame = encode(hello)
        self.accounts = {ACCOUNT: FakeAccount(PIN, START_BALANCE_CENTS)}
        self.leases: set[str] = set()
        self.outcomes: dict[bytes, MoneyReply] = {}
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

    # -- Inspection for tests --------------------------------------------------------

    def sent(self, kind: type[Request]) -> list[Request]:
        return [f.message for f in self.requests if isinstance(f.message, kind)]

    def money_requests(self) -> list[MoneyRequest]:
        return [f.message for f in self.requests if isinstance(f.message, MoneyRequest)]

    async def send_notice(self, message: Message) -> None:
        await self.streams[-1].send_all(encode(message))

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
                self._nursery.start_soon(self._release_later, session.account)
            elif session.account is not None:
                self.leases.discard(session.account)
            await trio.aclose_forcefully(stream)

    async def _release_later(self, account: str) -> None:
        await trio.sleep(self.lease_kept_after_close_s)
        self.leases.discard(account)

    async def _serve(self, stream: trio.abc.Stream, session: _FakeSession) -> None:
        busy_after = self.busy_after_connections
        if busy_after is not None and self.connections > busy_after:
            await stream.send_all(encode(Error(Status.SERVER_BUSY)))
            return
        await stream.send_all(self.hello_frame)
        decoder = Decoder(Sender.CLIENT)
        while (frame := await _receive_frame(stream, decoder)) is not None:
            self.requests.append(frame)
            if isinstance(frame.message, Login) and self.expire_before_login:
                self.expire_before_login -= 1  # as the real bank at its login deadline
                await stream.send_all(encode(SessionExpiredNotice()))
                return
            if isinstance(frame.message, Login) and self.unavailable_logins:
                self.unavailable_logins -= 1
                await stream.send_all(encode(LoginReply(Status.ISSUER_UNAVAILABLE),
                                             frame.request_id))
                continue
            reply = self._answer(frame.message, session)
            if not await self._deliver(stream, frame, reply):
                return
            if session.account is not None:
                self.logged_in.set()  # After the reply went out, so a test may send next.
            if isinstance(frame.message, Logout) or session.login_failures >= LOGIN_FAILURES_MAX:
                return

    async def _deliver(self, stream: trio.abc.Stream, frame: Frame, reply: Message) -> bool:
        """Send ``reply`` unless a knob says otherwise; False when the connection ends."""
        request = frame.message
        if type(request) in self.close_instead_of:
            return False
        if type(request) in self.close_once_instead_of:
            self.close_once_instead_of.discard(type(request))
            return False
        if isinstance(request, MoneyRequest) and self.lose_replies:
            self.lose_replies -= 1
            return False
        if isinstance(request, MoneyRequest) and self.hang_replies:
            self.hang_replies -= 1
            await _wait_for_hang_up(stream)
            return False
        if isinstance(request, MoneyRequest) and self.unavailable_replies:
            self.unavailable_replies -= 1
            reply = type(reply)(Status.ISSUER_UNAVAILABLE)
        if isinstance(request, MoneyRequest) and self.unsettled_replies:
            instead = self.unsettled_replies.popleft()
            reply = instead if isinstance(instead, Error) else type(reply)(instead)
        if isinstance(request, MoneyRequest) and self.wrong_version_replies:
            self.wrong_version_replies -= 1
            await stream.send_all(with_version(encode(reply, frame.request_id), 2))
            return True
        if type(request) in self.error_instead_of:
            reply = Error(Status.FORMAT_ERROR)
        notice = self.notice_before_reply.pop(type(request), None)
        if notice is not None:
            await stream.send_all(encode(notice))
        await stream.send_all(encode(reply, frame.request_id))
        return True

    def _answer(self, request: Message, session: _FakeSession) -> Message:
        if session.account is None and not isinstance(request, SERVED_BEFORE_LOGIN):
            return MESSAGE_TYPES[Opcode(request.OPCODE | 0x80)](Status.NOT_LOGGED_IN)
        match request:
            case Login():
                return LoginReply(self._log_in(request, session))
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
        raise AssertionError(f"the fake does not serve {request}")

    def _account(self, session: _FakeSession) -> FakeAccount:
        assert session.account is not None
        return self.accounts[session.account]

    def _log_in(self, login: Login, session: _FakeSession) -> Status:
        if session.account is not None:
            return Status.ALREADY_LOGGED_IN
        account = self.accounts.get(login.account)
        if account is not None and account.locked:
            return Status.PIN_TRIES_EXCEEDED
        if account is None or account.pin != login.pin:
            session.login_failures += 1
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
    login_failures: int = 0


async def _receive_frame(stream: trio.abc.Stream, decoder: Decoder) -> Frame | None:
    """The next request, or None when the ATM hung up."""
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(4096)
        if not data:
            return None
        decoder.receive_data(data)
    return frame


async def _wait_for_hang_up(stream: trio.abc.Stream) -> None:
    while await stream.receive_some(4096):
        pass


async def listen_on_loopback(nursery: trio.Nursery, bank: FakeBank) -> int:
    """Serve ``bank`` over TCP on 127.0.0.1 at a free port, which is returned."""
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, bank.serve, 0)
    return listeners[0].socket.getsockname()[1]


class ScriptedConsole:
    """A keyboard that types ``lines`` in order, then ends input (or waits forever)."""

    def __init__(self, lines: list[str], *, then_wait: bool = False) -> None:
        self._lines = deque(lines)
        self._then_wait = then_wait
        self.prompts: list[tuple[str, bool]] = []
        self.output: list[str] = []

    async def read_line(self, prompt: str, *, secret: bool = False) -> str | None:
        await trio.lowlevel.checkpoint()
        self.prompts.append((prompt, secret))
        if self._lines:
            return self._lines.popleft()
        if self._then_wait:
            await trio.sleep_forever()
        return None

    def write(self, line: str) -> None:
        self.output.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.output)


# -- The fake keeps the contract the ATM relies on --------------------------------------


async def test_fake_bank_answers_a_retried_deposit_with_the_original_outcome() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        assert (await connection.request(Login(ACCOUNT, PIN), LoginReply)).status is Status.APPROVED
        deposit = Deposit(b"t" * 16, 5_00)
        first = await connection.request(deposit, DepositReply)
        again = await connection.request(deposit, DepositReply)
        assert first == again
        assert bank.accounts[ACCOUNT].balance_cents == START_BALANCE_CENTS + 5_00
        await connection.aclose()


async def test_fake_bank_judges_a_retried_refusal_afresh() -> None:
    """As the real bank (spec section 9): a refused transaction is not recorded."""
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        assert (await connection.request(Login(ACCOUNT, PIN), LoginReply)).status is Status.APPROVED
        withdraw = Withdraw(b"w" * 16, START_BALANCE_CENTS + 1)
        refused = await connection.request(withdraw, WithdrawReply)
        assert refused.status is Status.INSUFFICIENT_FUNDS
        await connection.request(Deposit(b"d" * 16, 1), DepositReply)
        approved = await connection.request(withdraw, WithdrawReply)
        assert approved.status is Status.APPROVED and approved.balance_cents == 0
        await connection.aclose()


async def test_fake_bank_refuses_requests_before_login() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        connection = await bank.connect()
        reply = await connection.request(Balance(), BalanceReply)
        assert reply == BalanceReply(Status.NOT_LOGGED_IN)
        await connection.aclose()


def test_with_version_keeps_the_frame_intact_but_the_version() -> None:
    frame = encode(HELLO)
    changed = with_version(frame, 2)
    assert changed[2] == 2
    assert changed[:2] == frame[:2]
    assert changed[3:-4] == frame[3:-4]
