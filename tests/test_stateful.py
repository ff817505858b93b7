"""Model-based test of the bank server: Hypothesis drives several ATMs against a real one.

A ``RuleBasedStateMachine`` (which cannot be async) runs a real ``BankServer`` on port 0
over a fresh SQLite ledger in a background thread with its own Trio loop, and plays up to
three ATMs over plain blocking loopback sockets: connect, login with the right or a wrong
PIN, deposit, withdraw (overdrafts and over-limit amounts included), balance, history,
logout, abrupt disconnects (FIN or RST, also with a money request in flight), retries
of the last money request with the same transaction id, transfers between the accounts
(to itself and to no account too, and their retries) and PIN changes (right or wrong
current PIN, trivial new ones), modelled with the lockout they count toward, and
transfers to no account with the transfer lock they count toward. Every rule
works in any state: a request before login expects NOT_LOGGED_IN, a second login
ALREADY_LOGGED_IN.

The model holds each account's balance and entries, the approved transaction ids, which
ATM holds which account, consecutive PIN failures and locks (modelled exactly), and each
connection's refused logins. After every step: each balance equals the model's and is not
negative (so money is conserved across all accounts), the server's leases equal the
model's holders (so at most one session per account), and the ledger's own invariants
hold.
"""

from __future__ import annotations

import queue
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bank.batch_ledger import BatchLedger, open_ledger
from bank.config import ServerConfig
from bank.server import BankServer
from bank.store import DEMO_ACCOUNTS
from tests.helpers import settle, txn_id
from wire import (
    Answer,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Deposit,
    DepositReply,
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
    Message,
    Request,
    Sender,
    SessionToken,
    Status,
    Transfer,
    TransferReply,
    Withdraw,
    WithdrawReply,
    is_trivial_pin,
)
from wire import Connection as Engine

T = TypeVar("T")

PINS = {account: pin for account, pin, _ in DEMO_ACCOUNTS[:1] + DEMO_ACCOUNTS[5:6]}
OPENING_CENTS = {account: cents for account, _, cents in DEMO_ACCOUNTS if account in PINS}
ACCOUNTS = sorted(PINS)
WRONG_PIN = "0000"
ATMS = 3

CONFIG = ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=0, destination_tries_max=2)
"""Two transfers to no account lock a source's transfers, so that runs reach the lock."""

SOCKET_TIMEOUT_S = 10
"""Guard against a hung test on a blocking socket; far above any honest wait."""

SERVER_START_TIMEOUT_S = 10
RELEASE_TIMEOUT_S = 5

MONEY_REPLY = {Deposit: DepositReply, Withdraw: WithdrawReply}
ENTRY_KIND = {Deposit: EntryKind.DEPOSIT, Withdraw: EntryKind.WITHDRAWAL}


@dataclass(frozen=True)
class Started:
    """What the server thread hands back once it listens."""

    server: BankServer
    ledger: BatchLedger
    port: int
    token: trio.lowlevel.TrioToken


class ServerThread:
    """A real BankServer in its own thread and Trio loop; calls cross via the Trio token."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bank-stateful-")
        self._started: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        started = self._started.get(timeout=SERVER_START_TIMEOUT_S)
        if isinstance(started, BaseException):
            raise started
        assert isinstance(started, Started)
        self.server, self.ledger, self.port = started.server, started.ledger, started.port
        self._token = started.token

    async def _main(self) -> None:
        try:
            directory = Path(self._dir.name)
            ledger = await open_ledger(
                directory / "bank.db", directory / "bank.key",
                pin_tries_max=CONFIG.pin_tries_max, lockout_s=CONFIG.pin_lockout_s,
                destination_tries_max=CONFIG.destination_tries_max,
                destination_lockout_s=CONFIG.destination_lockout_s,
            )
        except BaseException as error:
            self._started.put(error)
            raise
        try:
            server = BankServer(CONFIG, ledger)
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve)
                port = listeners[0].socket.getsockname()[1]
                self._started.put(
                    Started(server, ledger, port, trio.lowlevel.current_trio_token())
                )
            # serve() returns once shutdown() has closed every connection.
        finally:
            await ledger.aclose()

    def run(self, function: Callable[[], Awaitable[T]]) -> T:
        return trio.from_thread.run(function, trio_token=self._token)

    def settled_leases(self) -> frozenset[str]:
        """The leases once the server has done all it can (disconnects seen, threads idle)."""

        async def leases() -> frozenset[str]:
            await settle()
            return self.server.leases.held()

        return self.run(leases)

    def stop(self) -> None:
        try:
            trio.from_thread.run_sync(self.server.shutdown, trio_token=self._token)
            self._thread.join(timeout=SERVER_START_TIMEOUT_S)
            assert not self._thread.is_alive(), "the server did not shut down"
        finally:
            self._dir.cleanup()


class Atm:
    """A blocking-socket ATM with no logic of its own: a client ``wire.Connection``
    checks the conversation (a blocking socket, since hypothesis drives it from a thread
    that is not Trio's)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
        self.engine = Engine(Sender.CLIENT)
        hello = self.receive()
        assert hello is not None and isinstance(hello.message, Hello)

    def send(self, message: Request) -> None:
        self.sock.sendall(self.engine.send(message))

    def receive(self) -> Frame | Answer | None:
        """The next event, or None once the server has closed the connection."""
        while (event := self.engine.next_event()) is None:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.engine.receive_data(data)
        return event

    def request(self, message: Request) -> Message:
        """Send one request and return its answer; the engine checks it answers ours."""
        self.send(message)
        answer = self.receive()
        while answer is not None and isinstance(answer.message, SessionToken):
            answer = self.receive()  # follows an approved LOGIN; the engine keeps it
        assert isinstance(answer, Answer), f"{answer} instead of answering {message}"
        return answer.message

    def close(self, *, reset: bool = False) -> None:
        if reset:  # SO_LINGER 0: the close sends RST, not FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@dataclass
class Slot:
    """One ATM as the model sees it."""

    atm: Atm | None = None
    account: str | None = None
    refused_logins: int = 0
    last_money: tuple[type[Deposit] | type[Withdraw], bytes, int] | None = None


@dataclass(frozen=True)
class Entry:
    entry_id: int
    time_ms: int
    kind: EntryKind
    amount_cents: int
    balance_cents: int


def entry_of(entry: HistoryEntry) -> Entry:
    return Entry(
        entry.entry_id, entry.time_ms, entry.kind, entry.amount_cents, entry.balance_cents
    )


@dataclass(frozen=True)
class Txn:
    """An applied transaction id: what it did, and its receipt."""

    account: str
    kind: type[Deposit] | type[Withdraw]
    entry: Entry


amounts = st.one_of(st.integers(1, 10_000), st.integers(10_000, 2 * CONFIG.withdrawal_cents_max))
atm_index = st.integers(0, ATMS - 1)
accounts = st.sampled_from(ACCOUNTS)
money_kinds = st.sampled_from([Deposit, Withdraw])
destinations = st.sampled_from([*ACCOUNTS, "QQ-00000"])


class BankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bank = ServerThread()
        self.slots = [Slot() for _ in range(ATMS)]
        self.balances = dict(OPENING_CENTS)
        self.entries: dict[str, list[Entry]] = {account: [] for account in ACCOUNTS}
        self.txns: dict[bytes, Txn] = {}
        self.pin_failures = dict.fromkeys(ACCOUNTS, 0)
        self.locked: set[str] = set()
        self.destination_misses = dict.fromkeys(ACCOUNTS, 0)
        """Transfers to no account, per source; a booked transfer does not reset them."""
        self.transfers_locked: set[str] = set()
        self.last_entry_id = 0
        self.pins = dict(PINS)
        self.transfers: dict[bytes, tuple[str, str, int, Entry]] = {}
        """Booked transfers: source, destination, amount and the source's entry."""
        self.last_transfer: tuple[bytes, str, int] | None = None

    def teardown(self) -> None:
        for slot in self.slots:
            if slot.atm is not None:
                slot.atm.close()
        self.bank.stop()

    # -- model helpers -----------------------------------------------------------------

    def held(self) -> frozenset[str]:
        return frozenset(s.account for s in self.slots if s.account is not None)

    def connected(self, i: int) -> Atm:
        slot = self.slots[i]
        if slot.atm is None:
            slot.atm = Atm(self.bank.port)
        return slot.atm

    def forget_connection(self, i: int) -> None:
        slot = self.slots[i]
        slot.atm, slot.account, slot.refused_logins = None, None, 0

    def wait_released(self, account: str) -> None:
        """Wait until the server has released ``account`` after we dropped its connection.

        Our close happens in this thread and the server notices it in its own loop; each
        round lets that loop settle first, so one round nearly always suffices. The real
        timeout is there only because the kernel could deliver the FIN or RST late.
        """
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while account in self.bank.settled_leases():
            assert time.monotonic() < deadline, f"{account} still leased after disconnect"

    def expected_login(self, account: str, *, right_pin: bool) -> Status:
        if account in self.locked:
            return Status.PIN_TRIES_EXCEEDED  # the PIN is not even checked
        if right_pin:
            self.pin_failures[account] = 0
            return Status.ACCOUNT_IN_USE if account in self.held() else Status.APPROVED
        self.pin_failures[account] += 1
        if self.pin_failures[account] >= CONFIG.pin_tries_max:
            self.locked.add(account)
            return Status.PIN_TRIES_EXCEEDED
        return Status.INCORRECT_PIN

    def judge(
        self, account: str, kind: type[Deposit] | type[Withdraw], key: bytes, amount: int
    ) -> tuple[Status, Txn | None]:
        """What the server must answer, and the earlier transaction if it is a replay."""
        if kind is Withdraw and amount > CONFIG.withdrawal_cents_max:
            return Status.EXCEEDS_WITHDRAWAL_LIMIT, None  # checked before the ledger
        prior = self.txns.get(key)
        if prior is not None:
            if (prior.account, prior.kind, prior.entry.amount_cents) != (account, kind, amount):
                return Status.DUPLICATE_TRANSMISSION, None
            return Status.APPROVED, prior
        if kind is Withdraw and amount > self.balances[account]:
            return Status.INSUFFICIENT_FUNDS, None
        return Status.APPROVED, None

    def apply(self, account: str, kind: type[Deposit] | type[Withdraw], key: bytes, entry: Entry):
        delta = entry.amount_cents if kind is Deposit else -entry.amount_cents
        self.balances[account] += delta
        assert entry.balance_cents == self.balances[account]
        assert entry.entry_id > self.last_entry_id  # ids only grow
        assert entry.kind is ENTRY_KIND[kind]
        self.last_entry_id = entry.entry_id
        self.entries[account].append(entry)
        self.txns[key] = Txn(account, kind, entry)

    def post(self, i: int, kind: type[Deposit] | type[Withdraw], key: bytes, amount: int):
        """Send one money request and check its reply against the model."""
        slot = self.slots[i]
        atm = self.connected(i)
        slot.last_money = (kind, key, amount)
        reply = atm.request(kind(key, amount))
        assert isinstance(reply, MONEY_REPLY[kind])
        if slot.account is None:
            assert reply == MONEY_REPLY[kind](Status.NOT_LOGGED_IN)
            return
        status, prior = self.judge(slot.account, kind, key, amount)
        event(f"{kind.__name__}: {status.name}{' (replay)' if prior else ''}")
        assert reply.status is status, (reply, status)
        if status is not Status.APPROVED:
            assert reply == MONEY_REPLY[kind](status)
        elif prior is not None:
            entry = prior.entry
            assert reply == MONEY_REPLY[kind](
                Status.APPROVED, entry.balance_cents, entry.entry_id, entry.time_ms
            )
        else:
            entry = Entry(
                reply.entry_id, reply.time_ms, ENTRY_KIND[kind], amount, reply.balance_cents
            )
            self.apply(slot.account, kind, key, entry)

    # -- rules ---------------------------------------------------------------------------

    @initialize()
    def two_atms_start_logged_in(self) -> None:
        """Begin where money moves; the rules log out, disconnect and log in from here."""
        for i, account in enumerate(ACCOUNTS):
            self.login(i, account, right_pin=True)

    @rule(i=atm_index)
    def connect(self, i: int) -> None:
        self.connected(i)

    @rule(i=atm_index, account=accounts, right_pin=st.booleans())
    def login(self, i: int, account: str, right_pin: bool) -> None:
        slot = self.slots[i]
        atm = self.connected(i)
        pin = self.pins[account] if right_pin else WRONG_PIN
        reply = atm.request(Login(account, pin))
        if slot.account is not None:
            assert reply == LoginReply(Status.ALREADY_LOGGED_IN)
            return
        expected = self.expected_login(account, right_pin=right_pin)
        event(f"login: {expected.name}")
        assert reply == LoginReply(expected)
        if expected is Status.APPROVED:
            slot.account = account
            return
        slot.refused_logins += 1
        if slot.refused_logins >= CONFIG.login_attempts_max:
            assert atm.receive() is None, "still open after too many refused logins"
            atm.close()
            self.forget_connection(i)

    @rule(i=atm_index, amount=amounts)
    def deposit(self, i: int, amount: int) -> None:
        self.post(i, Deposit, txn_id(), amount)

    @rule(i=atm_index, amount=amounts)
    def withdraw(self, i: int, amount: int) -> None:
        self.post(i, Withdraw, txn_id(), amount)

    @rule(i=atm_index)
    def retry_last_money_request(self, i: int) -> None:
        """The same transaction id again: on this connection, or after a reconnect."""
        last = self.slots[i].last_money
        if last is None:
            self.post(i, Deposit, txn_id(), 1)
        else:
            self.post(i, *last)

    @rule(i=atm_index, j=atm_index)
    def reuse_another_atms_txn_id(self, i: int, j: int) -> None:
        """ATM ``i`` sends ATM ``j``'s last money request: another account's id conflicts."""
        last = self.slots[j].last_money
        if last is None:
            self.post(i, Withdraw, txn_id(), 1)
        else:
            self.post(i, *last)

    @rule(i=atm_index, destination=destinations, amount=amounts)
    def transfer(self, i: int, destination: str, amount: int) -> None:
        self.send_transfer(i, txn_id(), destination, amount)

    @rule(i=atm_index)
    def retry_last_transfer(self, i: int) -> None:
        """The same transfer id again, from whichever ATM: replayed, or reused."""
        if self.last_transfer is None:
            self.send_transfer(i, txn_id(), ACCOUNTS[0], 1)
        else:
            self.send_transfer(i, *self.last_transfer)

    def judge_transfer(
        self, source: str, key: bytes, destination: str, amount: int
    ) -> tuple[Status, Entry | None]:
        """What the server must answer a transfer, in the spec's order (§3.18)."""
        prior = self.transfers.get(key)
        if prior is not None:
            if prior[:3] != (source, destination, amount):
                return Status.DUPLICATE_TRANSMISSION, None
            return Status.APPROVED, prior[3]
        if key in self.txns:
            return Status.DUPLICATE_TRANSMISSION, None
        if source in self.transfers_locked:  # a client without FREQUENCY_LIMIT is told 61
            return Status.EXCEEDS_WITHDRAWAL_LIMIT, None
        if destination == source:
            return Status.SAME_ACCOUNT, None
        if amount > CONFIG.withdrawal_cents_max:
            return Status.EXCEEDS_WITHDRAWAL_LIMIT, None
        if amount > self.balances[source]:
            return Status.INSUFFICIENT_FUNDS, None
        if destination not in self.balances:
            self.destination_misses[source] += 1
            if self.destination_misses[source] >= CONFIG.destination_tries_max:
                self.transfers_locked.add(source)
                return Status.EXCEEDS_WITHDRAWAL_LIMIT, None  # the miss that locks
            return Status.INVALID_TO_ACCOUNT, None
        return Status.APPROVED, None

    def send_transfer(self, i: int, key: bytes, destination: str, amount: int) -> None:
        slot = self.slots[i]
        reply = self.connected(i).request(Transfer(key, amount, destination))
        self.last_transfer = (key, destination, amount)
        if slot.account is None:
            assert reply == TransferReply(Status.NOT_LOGGED_IN)
            return
        status, prior = self.judge_transfer(slot.account, key, destination, amount)
        event(f"Transfer: {status.name}{' (replay)' if prior else ''}")
        if status is not Status.APPROVED:
            assert reply == TransferReply(status)
            return
        if prior is not None:
            assert reply == TransferReply(
                Status.APPROVED, prior.balance_cents, prior.entry_id, prior.time_ms
            )
            return
        assert isinstance(reply, TransferReply) and reply.status is Status.APPROVED
        assert reply.entry_id > self.last_entry_id
        self.balances[slot.account] -= amount
        self.balances[destination] += amount
        assert reply.balance_cents == self.balances[slot.account]
        # Shown to this ATM (which never sent FEATURES) as a withdrawal and a deposit.
        out = Entry(reply.entry_id, reply.time_ms, EntryKind.WITHDRAWAL, amount,
                    reply.balance_cents)
        into = Entry(reply.entry_id + 1, reply.time_ms, EntryKind.DEPOSIT, amount,
                     self.balances[destination])
        self.entries[slot.account].append(out)
        self.entries[destination].append(into)
        self.last_entry_id = into.entry_id
        self.transfers[key] = (slot.account, destination, amount, out)

    @rule(i=atm_index, right_pin=st.booleans(), new_pin=st.sampled_from(["2580", "1357", "1111"]))
    def change_pin(self, i: int, right_pin: bool, new_pin: str) -> None:
        slot = self.slots[i]
        account = slot.account
        current = self.pins[account] if right_pin and account is not None else WRONG_PIN
        reply = self.connected(i).request(ChangePin(current, new_pin))
        if account is None:
            assert reply == ChangePinReply(Status.NOT_LOGGED_IN)
            return
        if is_trivial_pin(new_pin):
            expected = Status.PIN_NOT_ALLOWED  # nothing counted
        else:
            expected = self.expected_login(account, right_pin=right_pin)
            if expected is Status.ACCOUNT_IN_USE:  # our own lease: a PIN change has none
                expected = Status.APPROVED
            if expected is Status.APPROVED:
                self.pins[account] = new_pin
        event(f"change PIN: {expected.name}")
        assert reply == ChangePinReply(expected)

    @rule(i=atm_index)
    def balance(self, i: int) -> None:
        account = self.slots[i].account
        reply = self.connected(i).request(Balance())
        if account is None:
            assert reply == BalanceReply(Status.NOT_LOGGED_IN)
        else:
            assert reply == BalanceReply(Status.APPROVED, self.balances[account])

    @rule(i=atm_index, count=st.integers(1, 20))
    def history(self, i: int, count: int) -> None:
        account = self.slots[i].account
        reply = self.connected(i).request(History(count))
        if account is None:
            assert reply == HistoryReply(Status.NOT_LOGGED_IN)
            return
        assert isinstance(reply, HistoryReply) and reply.status is Status.APPROVED
        newest_first = self.entries[account][::-1][:count]
        assert [entry_of(e) for e in reply.entries] == newest_first

    @rule(i=atm_index)
    def logout(self, i: int) -> None:
        atm = self.connected(i)
        assert atm.request(Logout()) == LogoutReply(Status.APPROVED)
        assert atm.receive() is None
        atm.close()
        self.forget_connection(i)  # the lease is released before the reply is sent

    @rule(i=atm_index, reset=st.booleans())
    def disconnect(self, i: int, reset: bool) -> None:
        slot = self.slots[i]
        self.connected(i).close(reset=reset)
        if slot.account is not None:
            self.wait_released(slot.account)
        self.forget_connection(i)

    @rule(i=atm_index, kind=money_kinds, amount=amounts, reset=st.booleans(), retry=st.booleans())
    def disconnect_with_a_request_in_flight(
        self, i: int, kind: type[Deposit] | type[Withdraw], amount: int, reset: bool,
        retry: bool,
    ) -> None:
        """The ATM's nightmare: did it happen? Only the ledger knows, and a retry tells."""
        slot = self.slots[i]
        account = slot.account
        if retry and slot.last_money is not None:
            kind, key, amount = slot.last_money
        else:
            key = txn_id()
        slot.last_money = (kind, key, amount)
        atm = self.connected(i)
        atm.send(kind(key, amount))
        atm.close(reset=reset)
        self.forget_connection(i)
        if account is None:
            return
        self.wait_released(account)  # the server finished the request before releasing
        status, prior = self.judge(account, kind, key, amount)
        balance = self.bank.run(lambda: self.bank.ledger.balance(account))
        if status is not Status.APPROVED or prior is not None:
            assert balance == self.balances[account]
            return
        delta = amount if kind is Deposit else -amount
        if balance == self.balances[account]:
            event("request in flight: not applied")
            return  # the server never read it: nothing happened, a retry will do it
        event("request in flight: applied")
        assert balance == self.balances[account] + delta
        [last] = self.bank.run(lambda: self.bank.ledger.history(account, 1))
        self.apply(account, kind, key, entry_of(last))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        for account in ACCOUNTS:
            balance = self.bank.run(lambda a=account: self.bank.ledger.balance(a))
            assert balance == self.balances[account] >= 0

    @invariant()
    def leases_match_the_model(self) -> None:
        holders = [s.account for s in self.slots if s.account is not None]
        assert len(holders) == len(set(holders)), "one account in two sessions"
        assert self.bank.settled_leases() == self.held()

    @invariant()
    def books_balance(self) -> None:
        assert self.bank.run(self.bank.ledger.check_invariants) == []


BankMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
test_bank_against_the_model = BankMachine.TestCase
