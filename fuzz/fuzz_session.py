"""Fuzz the session's message handling: decoded requests in any order against a fake bank.

Run (from the repository root)::

    .venv/bin/python fuzz/fuzz_session.py -atheris_runs=50000
    .venv/bin/python fuzz/fuzz_session.py -max_total_time=60

An input is a control byte and a byte stream. The stream goes to a server's protocol
engine (``wire.Connection(Sender.SERVER)``, greeted) and every request it yields goes to
``Session.answer``, in one ``trio.run`` per input, as the server's connection loop does:
a non-fatal RemoteProtocolError is answered and skipped, a fatal one or a CLOSED engine
ends the conversation, and then ``session.end()`` runs as the connection's ``finally``
does. The session works on ``FakeLedger`` (in memory, integer cents) and a
real ``bank.leases.Leases``. Control bit 0 makes another ATM hold ``CD-67890``'s lease
for the whole input; bit 1 begins a shutdown once the session has logged in.

A finding is: an exception escaping ``answer``, or a reply the engine refuses to send; a
reply of the wrong type, a SYSTEM_MALFUNCTION or an ERROR-level log record (a bug caught
by ``handle``'s last resort); a request outside the state table not answered with the
state's refusal, or changing the state; during shutdown anything but ISSUER_UNAVAILABLE;
a reply that does not encode and decode back to itself; ACCOUNT_IN_USE said to someone
without the account's PIN; money moving on a refusal, on a non-money request, on another
account, or by other than the amount (a TRANSFER: exactly the amount out of the session's
account and into its destination, so money is conserved across all accounts at every
step); a negative balance or a balance that does not
match its entries; an approved BALANCE not the ledger's; more than the session's one
account leased (besides the other ATM's), an authenticated session without its lease, or
any lease left after ``session.end()``; a full account number in the session's log.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the ``fuzz`` package importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import trio

from bank.config import ServerConfig
from bank.leases import Leases
from bank.ledger import (
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    PinVerdict,
    Posting,
    PostResult,
    StorageError,
)
from bank.resumption import SessionRegistry
from bank.session import Session
from fuzz.frames import WHOLE_STREAM, Finding, golden_frames, split_input
from wire import (
    BALANCE_CENTS_MAX,
    PERMITTED,
    REFUSAL,
    Balance,
    BalanceReply,
    ChangePin,
    Decoder,
    Deposit,
    EntryKind,
    Features,
    Frame,
    History,
    HistoryEntry,
    Login,
    Logout,
    Ping,
    RemoteProtocolError,
    Reply,
    Request,
    Sender,
    State,
    Status,
    Transfer,
    WireError,
    Withdraw,
    encode,
    is_trivial_pin,
)
from wire import Connection as Engine
from wire._kinds import KIND_OF_ENTRY, KIND_OF_REQUEST, TRANSFER, entry_change_cents
from wire._messages import MoneyRequest, reply_type

OTHER_ATM_BIT = 0x01
"""Control bit: another ATM holds ``OTHER_ACCOUNT`` throughout, so LOGIN can meet ACCOUNT_IN_USE."""

SHUTDOWN_BIT = 0x02
"""Control bit: the server starts shutting down once the session is authenticated."""

STORAGE_FAILURE_TXN_PREFIX = b"\xde\xad"
"""A posting whose txn id starts so makes the fake ledger raise StorageError."""

OPENING_BALANCES = {  # account: (PIN, balance in cents); AB-12345/1234 is the vectors' login
    "AB-12345": ("1234", 100_000),
    "CD-67890": ("4321", 0),
    "EF-00001": ("0000", 5_000_000),
}
OTHER_ACCOUNT = "CD-67890"
CONFIG = ServerConfig()
TIME_MS_START = 1_700_000_000_000


@dataclass
class FakeAccount:
    pin: str
    opening_cents: int
    balance_cents: int
    entries: list[HistoryEntry] = field(default_factory=list)  # newest first


class FakeLedger:
    """The ``Ledger`` protocol in memory: integer cents, lockout, idempotent txn ids.

    It follows the protocol's contract (and BatchLedger's behaviour) closely enough
    that a finding is about the session; a clock that ticks once per posting keeps
    runs deterministic, which libFuzzer needs to reproduce a crash.
    """

    def __init__(
        self, *, pin_tries_max: int = CONFIG.pin_tries_max,
        destination_tries_max: int = CONFIG.destination_tries_max,
    ) -> None:
        self.accounts = {
            account: FakeAccount(pin, cents, cents)
            for account, (pin, cents) in OPENING_BALANCES.items()
        }
        self._pin_tries_max = pin_tries_max
        self._failures: dict[str, int] = {}
        self._destination_tries_max = destination_tries_max
        self._misses: dict[str, int] = {}
        """Transfers to no account per source; at the limit its transfers lock (no clock
        here: a lock lasts the run)."""
        self._postings: dict[bytes, tuple[tuple[object, ...], Posting]] = {}
        self._entry_ids = itertools.count(1)
        self._time_ms = itertools.count(TIME_MS_START)

    def pin_is_right(self, account: str, pin: str) -> bool:
        """What the customer knows, without counting an attempt: for the harness's checks."""
        known = self.accounts.get(account)
        return known is not None and known.pin == pin

    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        return PinVerdict(self._check_pin(account, pin), account in self.accounts)

    def _check_pin(self, account: str, pin: str) -> PinResult:
        failures = self._failures.get(account, 0)
        if failures >= self._pin_tries_max:
            return PinResult.LOCKED
        known = self.accounts.get(account)
        if known is not None and hmac.compare_digest(known.pin, pin):
            self._failures.pop(account, None)
            return PinResult.MATCHED
        self._failures[account] = failures + 1
        if failures + 1 >= self._pin_tries_max:
            return PinResult.LOCKED
        return PinResult.WRONG

    async def balance(self, account: str) -> int:
        return self.accounts[account].balance_cents

    async def post(
        self,
        *,
        account: str,
        txn_id: bytes,
        kind: EntryKind,
        amount_cents: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        if txn_id[: len(STORAGE_FAILURE_TXN_PREFIX)] == STORAGE_FAILURE_TXN_PREFIX:
            raise StorageError("fake disk failure")
        content = (account, kind, amount_cents)
        earlier = self._postings.get(txn_id)
        if earlier is not None:
            original_content, original = earlier
            if original_content == content:
                return dataclasses.replace(original, result=PostResult.REPLAYED)
            return Posting(PostResult.TXN_ID_REUSED)
        if amount_cents > limit_cents:
            return Posting(PostResult.OVER_LIMIT)
        return self._apply(txn_id, content)

    def _apply(self, txn_id: bytes, content: tuple[str, EntryKind, int]) -> Posting:
        account, kind, amount_cents = content
        record = self.accounts[account]
        delta = KIND_OF_ENTRY[kind].balance_change_cents(amount_cents)
        if record.balance_cents + delta < 0:
            return Posting(PostResult.INSUFFICIENT_FUNDS)
        record.balance_cents += delta
        entry = HistoryEntry(next(self._entry_ids), next(self._time_ms), kind, amount_cents,
                             record.balance_cents)
        record.entries.insert(0, entry)
        posting = Posting(PostResult.BOOKED, entry.balance_cents, entry.entry_id, entry.time_ms)
        self._postings[txn_id] = (content, posting)
        return posting

    async def transfer(
        self,
        *,
        account: str,
        txn_id: bytes,
        to_account: str,
        amount_cents: int,
        limit_cents: int,
        terminal: str | None = None,
        fence: int | None = None,
    ) -> Posting:
        """As ``Store.transfer``: the same checks in the same order, both legs or none."""
        if txn_id[: len(STORAGE_FAILURE_TXN_PREFIX)] == STORAGE_FAILURE_TXN_PREFIX:
            raise StorageError("fake disk failure")
        content = ("transfer", account, to_account, amount_cents)
        earlier = self._postings.get(txn_id)
        if earlier is not None:
            if earlier[0] == content:
                return dataclasses.replace(earlier[1], result=PostResult.REPLAYED)
            return Posting(PostResult.TXN_ID_REUSED)
        misses = self._misses.get(account, 0)
        if misses >= self._destination_tries_max:
            return Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=TIME_MS_START)
        source = self.accounts[account]
        destination = self.accounts.get(to_account)
        if to_account == account:
            return Posting(PostResult.SAME_ACCOUNT)
        if amount_cents > limit_cents:
            return Posting(PostResult.OVER_LIMIT)
        if source.balance_cents < amount_cents:
            return Posting(PostResult.INSUFFICIENT_FUNDS)
        if destination is None:
            self._misses[account] = misses + 1
            if misses + 1 >= self._destination_tries_max:
                return Posting(PostResult.TRANSFERS_LOCKED, locked_until_ms=TIME_MS_START)
            return Posting(PostResult.UNKNOWN_DESTINATION)
        if destination.balance_cents > BALANCE_CENTS_MAX - amount_cents:
            return Posting(PostResult.BALANCE_FULL)
        time_ms = next(self._time_ms)
        legs = ((source, TRANSFER.debit, -amount_cents), (destination, TRANSFER.credit,
                                                          amount_cents))
        entries = []
        for record, kind, change_cents in legs:
            record.balance_cents += change_cents
            entry = HistoryEntry(next(self._entry_ids), time_ms, kind, amount_cents,
                                 record.balance_cents)
            record.entries.insert(0, entry)
            entries.append(entry)
        posting = Posting(PostResult.BOOKED, entries[0].balance_cents, entries[0].entry_id,
                          time_ms)
        self._postings[txn_id] = (content, posting)
        return posting

    async def change_pin(
        self, account: str, pin: str, new_pin: str, *, fence: int | None = None
    ) -> PinChangeVerdict:
        if is_trivial_pin(new_pin):
            return PinChangeVerdict(PinChangeResult.TRIVIAL)
        result = self._check_pin(account, pin)
        if result is PinResult.LOCKED:
            return PinChangeVerdict(PinChangeResult.LOCKED, TIME_MS_START)
        if result is PinResult.WRONG:
            return PinChangeVerdict(PinChangeResult.WRONG)
        self.accounts[account].pin = new_pin
        return PinChangeVerdict(PinChangeResult.CHANGED)

    async def history(self, account: str, count: int) -> list[HistoryEntry]:
        return self.accounts[account].entries[:count]

    async def aclose(self) -> None:
        pass


# -- The harness --------------------------------------------------------------------------

LedgerFactory = Callable[[], FakeLedger]
LeasesFactory = Callable[[], Leases]


def test_one_input(data: bytes) -> None:
    """The harness's check: raises ``Finding`` if the session misbehaves on ``data``."""
    check_conversation(data)


def check_conversation(
    data: bytes, *, make_ledger: LedgerFactory = FakeLedger, make_leases: LeasesFactory = Leases
) -> None:
    """``test_one_input`` with ledger and leases injectable, so tests can prove checks fail."""
    trio.run(_converse, data, make_ledger, make_leases)


async def _converse(data: bytes, make_ledger: LedgerFactory, make_leases: LeasesFactory) -> None:
    control, stream = split_input(data)
    ledger, leases = make_ledger(), make_leases()
    others = frozenset({OTHER_ACCOUNT}) if control & OTHER_ATM_BIT else frozenset()
    failure: Exception | None = None
    release_others = trio.Event()
    async with trio.open_nursery() as nursery:
        for account in others:
            await nursery.start(_other_atm, leases, account, release_others)
        try:
            await _conversation(stream, control, ledger, leases, others)
        except Exception as error:  # raised after the nursery, not as an ExceptionGroup
            failure = error
        finally:
            release_others.set()
    if failure is not None:
        raise failure
    if leases.held():
        raise Finding(f"leases left after every session ended: {sorted(leases.held())}")


async def _other_atm(
    leases: Leases, account: str, done: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Another connection's task holding ``account``: trio.Lock leases belong to a task."""
    if not leases.try_acquire(account):
        raise Finding(f"the other ATM could not lease {account} in a fresh table")
    try:
        task_status.started()
        await done.wait()
    finally:
        leases.release(account)


async def _conversation(
    stream: bytes, control: int, ledger: FakeLedger, leases: Leases, others: frozenset[str]
) -> None:
    session = Session(
        ledger=ledger, leases=leases, config=CONFIG, name="fuzz", sessions=SessionRegistry()
    )
    engine = Engine(Sender.SERVER, login_attempts_max=CONFIG.login_attempts_max)
    engine.send(CONFIG.hello())
    engine.receive_data(stream)
    with captured_session_log() as records:
        accounts_seen: set[str] = set(others)
        while engine.state is not State.CLOSED:
            try:
                frame = engine.next_event()
            except RemoteProtocolError as error:
                engine.send_error(error)
                if error.fatal:
                    break
                continue
            if frame is None:
                break
            if isinstance(frame.message, Login):
                accounts_seen.add(frame.message.account)
            await check_request(
                engine, session, frame, ledger=ledger, leases=leases, others=others
            )
            check_log(records, accounts_seen)
            if control & SHUTDOWN_BIT and engine.state is State.AUTHENTICATED:
                engine.begin_shutdown()
        session.end()
        check_log(records, accounts_seen)
    if session.account is not None:
        raise Finding(f"end() left account {session.account!r}")
    if leases.held() != others:
        raise Finding(f"after end() leases are {sorted(leases.held())}, not {sorted(others)}")


async def check_request(
    engine: Engine, session: Session, frame: Frame, *,
    ledger: FakeLedger, leases: Leases, others: frozenset[str],
) -> None:
    """Answer one request and check every invariant the module docstring lists."""
    request, request_id = frame.message, frame.request_id
    assert isinstance(request, Request), "a server's engine yields only requests"
    state_before, shutting_down = engine.state, engine.shutting_down
    balances_before = balances(ledger)
    try:
        reply = await session.answer(engine, request)
        data = engine.send(reply)
    except Exception as error:
        raise Finding(f"{type(error).__name__} answering {request!r}: {error}") from error
    if type(reply) is not reply_type(request):
        raise Finding(f"{request!r} answered with {reply!r}")
    if reply.status is Status.SYSTEM_MALFUNCTION:
        raise Finding(f"{request!r} hit an internal error (SYSTEM_MALFUNCTION)")
    if shutting_down and not isinstance(request, Logout):
        if reply.status is not Status.ISSUER_UNAVAILABLE:
            raise Finding(f"during shutdown {request!r} got {reply.status.name}")
    elif type(request) not in PERMITTED[state_before] and (
        reply.status is not REFUSAL[state_before] or engine.state is not state_before
    ):
        raise Finding(f"{request!r} in {state_before} got {reply.status.name}, "
                      f"now {engine.state}")
    check_reply_travels(data, reply, request_id)
    if (reply.status is Status.ACCOUNT_IN_USE and isinstance(request, Login)
            and not ledger.pin_is_right(request.account, request.pin)):
        raise Finding("ACCOUNT_IN_USE told to someone without the PIN")
    check_money(ledger, balances_before, request, reply, session.account)
    check_leases(engine, session, leases, others)
    if isinstance(reply, BalanceReply) and reply.status is Status.APPROVED and (
        session.account is None or reply.balance_cents != await ledger.balance(session.account)
    ):
        raise Finding(f"BALANCE said {reply.balance_cents} for {session.account}")


def balances(ledger: FakeLedger) -> dict[str, int]:
    return {account: record.balance_cents for account, record in ledger.accounts.items()}


def check_reply_travels(data: bytes, reply: Reply, request_id: int) -> None:
    """Every reply the engine sends must echo the request id and decode back to itself."""
    try:
        decoder = Decoder(Sender.SERVER)
        decoder.receive_data(data)
        frame = decoder.next_frame()
    except WireError as error:
        raise Finding(f"{reply!r} cannot travel: {error}") from error
    if frame is None or frame.message != reply or frame.request_id != request_id:
        raise Finding(f"{reply!r} came back as {frame!r}")


def check_money(
    ledger: FakeLedger, before: dict[str, int], request: Request, reply: Reply,
    account: str | None,
) -> None:
    """Money moves only on an approved deposit or withdrawal, on the session's account."""
    after = balances(ledger)
    moved = {a: after[a] - before[a] for a in after if after[a] != before[a]}
    for name, record in ledger.accounts.items():
        if record.balance_cents < 0:
            raise Finding(f"{name} balance is negative: {record.balance_cents}")
        booked = sum(entry_change_cents(e.kind, e.amount_cents) for e in record.entries)
        if record.opening_cents + booked != record.balance_cents:
            raise Finding(f"{name} balance {record.balance_cents} does not match its entries")
    if sum(after.values()) - sum(before.values()) != sum(moved.values()) or (
        isinstance(request, Transfer) and sum(moved.values()) != 0
    ):
        raise Finding(f"{request!r} created or destroyed money: {moved}")
    if not moved:
        return
    if not isinstance(request, MoneyRequest | Transfer) or reply.status is not Status.APPROVED:
        raise Finding(f"{request!r} answered {reply.status.name} moved money: {moved}")
    if isinstance(request, Transfer):
        expected = {account: -request.amount_cents, request.to_account: request.amount_cents}
    else:
        change_cents = KIND_OF_REQUEST[type(request)].balance_change_cents(request.amount_cents)
        expected = {account: change_cents}
    if moved != expected:
        raise Finding(f"{request!r} for {account} moved {moved}")


def check_leases(
    engine: Engine, session: Session, leases: Leases, others: frozenset[str]
) -> None:
    """The session holds its own account's lease exactly while it is authenticated."""
    mine = leases.held() - others
    expected = {session.account} if session.account is not None else set()
    if mine != expected:
        raise Finding(f"session of {session.account!r} ({engine.state}) sees leases {mine}")
    if (engine.state is State.AUTHENTICATED) != (session.account is not None):
        raise Finding(f"state {engine.state} with account {session.account!r}")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_session_log() -> Iterator[list[logging.LogRecord]]:
    """The ``bank.session`` log records of one input, at INFO so masking can be checked."""
    logger = logging.getLogger("bank.session")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_log(records: list[logging.LogRecord], accounts: set[str]) -> None:
    """No ERROR record but a storage failure's (else handle's last resort caught a bug);
    no account number unmasked."""
    for record in records:
        message = record.getMessage()
        # The session marks a storage failure's line (its stack is logged only at DEBUG).
        storage_failure = isinstance(getattr(record, "storage_error", None), StorageError)
        if record.levelno >= logging.ERROR and not storage_failure:
            raise Finding(f"session logged an error: {message}")
        for account in accounts:
            if account in message:
                raise Finding(f"log shows {account} unmasked: {message}")
    records.clear()


# -- Seed corpus --------------------------------------------------------------------------


def _txn(n: int, prefix: bytes = b"") -> bytes:
    return (prefix + n.to_bytes(16, "big"))[:16]


def _stream(*requests: Request) -> bytes:
    return b"".join(encode(request, i) for i, request in enumerate(requests, 1))


def seeds() -> list[bytes]:
    """Conversations that reach every status the session and the fake ledger can give."""
    login = Login("AB-12345", "1234")
    conversations = [
        b"".join(golden_frames("client")),
        _stream(login, Balance(), Deposit(_txn(1), 250_000), Withdraw(_txn(2), 6_000),
                History(20), Ping(), Logout()),
        _stream(Balance(), Deposit(_txn(1), 1), History(1), Ping(), login, login, Logout()),
        _stream(Login("ab-12345", "9999"), Login("zz-00000", "1234"), login, Balance()),
        _stream(Login("AB-12345", "0000"), Login("AB-12345", "0000"), Login("AB-12345", "0000")),
        _stream(Login(OTHER_ACCOUNT, "4321"), Login(OTHER_ACCOUNT, "1111"), login,
                Withdraw(_txn(3), 1)),
        _stream(login, Withdraw(_txn(4), 100_001), Withdraw(_txn(5), 100_000),
                Withdraw(_txn(6), 1), Deposit(_txn(7), 10_000_000), Balance()),
        _stream(login, Deposit(_txn(8), 500), Deposit(_txn(8), 500), Deposit(_txn(8), 501),
                Withdraw(_txn(8), 500), History(3)),
        _stream(login, Deposit(_txn(9, STORAGE_FAILURE_TXN_PREFIX), 100), Balance(), Logout()),
        _stream(Login("EF-00001", "0000"), Withdraw(_txn(10), 50_000), History(2), Logout(),
                Ping()),
        _stream(Features(3), login, Transfer(_txn(11), 500, OTHER_ACCOUNT),
                Transfer(_txn(11), 500, OTHER_ACCOUNT), Transfer(_txn(11), 501, OTHER_ACCOUNT),
                Transfer(_txn(12), 500, "AB-12345"), Transfer(_txn(13), 500, "ZZ-00000"),
                Transfer(_txn(14), 100_001, OTHER_ACCOUNT), History(5), Features(0), History(5)),
        _stream(Features(7), login, *[
            Transfer(_txn(20 + n), 1, f"ZZ-0000{n}") for n in range(CONFIG.destination_tries_max)
        ], Transfer(_txn(30), 1, OTHER_ACCOUNT), Transfer(_txn(11), 1, OTHER_ACCOUNT),
                Features(3), Transfer(_txn(31), 1, OTHER_ACCOUNT), Deposit(_txn(32), 1)),
        _stream(login, ChangePin("0000", "2580"), ChangePin("1234", "1111"),
                ChangePin("1234", "2580"), Balance(), Logout(), Login("AB-12345", "2580")),
        _stream(Transfer(_txn(15), 1, OTHER_ACCOUNT), ChangePin("1234", "2580"), login,
                Transfer(_txn(16, STORAGE_FAILURE_TXN_PREFIX), 1, OTHER_ACCOUNT),
                *[ChangePin("0000", "2580")] * 3, Balance()),
    ]
    return [
        bytes([control]) + conversation
        for conversation in conversations
        for control in (WHOLE_STREAM, 0x00, OTHER_ATM_BIT, SHUTDOWN_BIT)
    ]


if __name__ == "__main__":
    from fuzz.runner import main

    main(test_one_input, seeds(), sys.argv)
