"""The bank's side of one ATM session: the application behind the protocol engine.

``wire.Connection`` owns the conversation (HELLO, request ids, the state table, the
shutdown mode, when the connection closes) and lets through only the requests the
session's state permits; ``Session.handle`` answers those, with the ledger and the
account leases. It awaits the ledger, so it runs in Trio, but it does no I/O of its own.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

import trio

from bank.config import ServerConfig
from bank.leases import Lease, Leases
from bank.ledger import (
    Ledger,
    PinChangeResult,
    PinChangeVerdict,
    PinResult,
    Posting,
    PostResult,
    StorageError,
)
from bank.resumption import SessionRegistry, new_token
from wire import (
    ALL_FEATURES,
    KIND_OF_REQUEST,
    MONEY_KINDS,
    TRANSFER,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    EntryKind,
    Feature,
    Features,
    FeaturesReply,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    MoneyRequest,
    Ping,
    PingReply,
    Reply,
    Request,
    Resume,
    ResumeReply,
    Status,
    Transfer,
    TransferReply,
    format_cents,
    mask_account,
    reply_type,
)
from wire import Connection as Engine

log = logging.getLogger("bank.session")

RESUME_TAKEOVER_S = 5.0
"""Longest a RESUME waits for the superseded connection to release the lease: it ends at
once when it is waiting on its peer, or after the request it is working on."""

PIN_STATUS: dict[PinResult, Status] = {
    PinResult.MATCHED: Status.APPROVED,
    PinResult.WRONG: Status.INCORRECT_PIN,
    PinResult.LOCKED: Status.PIN_TRIES_EXCEEDED,
}
"""The LOGIN answer to each outcome of a PIN check (spec §3.1)."""


@dataclass(frozen=True, slots=True)
class ServerLimit:
    """The server's own cap on one kind of transaction, below the protocol's: the setting
    that sets it, and the status a new transaction over it is refused with."""

    cents_max: Callable[[ServerConfig], int]
    refusal: Status


SERVER_LIMITS: dict[EntryKind, ServerLimit] = {
    # The maximum HELLO announces: a deposit past it is simply an invalid amount.
    EntryKind.DEPOSIT: ServerLimit(attrgetter("amount_cents_max"), Status.INVALID_AMOUNT),
    # A limit of its own, which ServerConfig keeps within that maximum, so it alone decides.
    EntryKind.WITHDRAWAL: ServerLimit(
        attrgetter("withdrawal_cents_max"), Status.EXCEEDS_WITHDRAWAL_LIMIT
    ),
}
"""Which of the server's settings bounds each kind: its policy, not the protocol's."""

_POST_STATUS_ANY_KIND: dict[PostResult, Status] = {
    PostResult.BOOKED: Status.APPROVED,
    PostResult.REPLAYED: Status.APPROVED,
    PostResult.TXN_ID_REUSED: Status.DUPLICATE_TRANSMISSION,
    PostResult.AMOUNT_OUT_OF_RANGE: Status.INVALID_AMOUNT,
    PostResult.INSUFFICIENT_FUNDS: Status.INSUFFICIENT_FUNDS,
    PostResult.BALANCE_FULL: Status.INVALID_AMOUNT,
    PostResult.FENCED: Status.ISSUER_UNAVAILABLE,
}

POST_STATUS: dict[EntryKind, dict[PostResult, Status]] = {
    kind: {**_POST_STATUS_ANY_KIND, PostResult.OVER_LIMIT: limit.refusal}
    for kind, limit in SERVER_LIMITS.items()
}
"""The DEPOSIT_REPLY or WITHDRAW_REPLY answer to each outcome of a post, by kind (spec
§3.3, §9): the kinds differ only in the refusal of their own limit."""


TRANSFER_STATUS: dict[PostResult, Status] = {
    **{result: status for result, status in _POST_STATUS_ANY_KIND.items()},
    # Money leaving by transfer is held to the limit money leaving in cash is (spec §3.18).
    PostResult.OVER_LIMIT: SERVER_LIMITS[EntryKind.WITHDRAWAL].refusal,
    PostResult.UNKNOWN_DESTINATION: Status.INVALID_TO_ACCOUNT,
    PostResult.SAME_ACCOUNT: Status.SAME_ACCOUNT,
    PostResult.TRANSFERS_LOCKED: Status.EXCEEDS_FREQUENCY_LIMIT,
}
"""The TRANSFER_REPLY answer to each outcome of a transfer (spec §3.18), for a client
that announced FREQUENCY_LIMIT. A full destination is INVALID_AMOUNT, as a deposit into
it would be: nothing more is revealed."""

OLD_CLIENT_TRANSFER_STATUS: dict[PostResult, Status] = {
    **TRANSFER_STATUS,
    # A limit refusal it decodes: settled, nothing moved (spec §3.16).
    PostResult.TRANSFERS_LOCKED: SERVER_LIMITS[EntryKind.WITHDRAWAL].refusal,
}
"""``TRANSFER_STATUS`` for a client that did not announce FREQUENCY_LIMIT: it would take
EXCEEDS_FREQUENCY_LIMIT's unknown byte for a malformed frame (spec §4)."""

PIN_CHANGE_STATUS: dict[PinChangeResult, Status] = {
    PinChangeResult.CHANGED: Status.APPROVED,
    PinChangeResult.WRONG: Status.INCORRECT_PIN,
    PinChangeResult.LOCKED: Status.PIN_TRIES_EXCEEDED,
    PinChangeResult.TRIVIAL: Status.PIN_NOT_ALLOWED,
    PinChangeResult.FENCED: Status.ISSUER_UNAVAILABLE,
}
"""The CHANGE_PIN_REPLY answer to each outcome of a PIN change (spec §3.20)."""

SERVED_FEATURES = ALL_FEATURES
"""The optional requests this server serves, as FEATURES_REPLY says (spec §3.16)."""

OLD_CLIENT_ENTRY_KIND: dict[int, EntryKind] = {
    int(TRANSFER.debit): EntryKind.WITHDRAWAL,
    int(TRANSFER.credit): EntryKind.DEPOSIT,
}
"""A transfer's entry as shown to a client that did not announce TRANSFER (spec §3.16):
what it did to the balance, in the kinds that client can decode."""


class LeaseLost(Exception):
    """The session's cluster lease was taken over (or expired and taken) by another
    process: a money write was refused by its fence (FENCED, nothing moved). Not
    answered: the connection ends with SESSION_EXPIRED, as a superseded one does
    (spec/PROTOCOL.md §6, In a cluster)."""


def format_time_ms(time_ms: int) -> str:
    """A Unix time in milliseconds for the log: ``2026-12-02 14:24:03 UTC``."""
    moment = datetime.datetime.fromtimestamp(time_ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _nothing() -> None:
    return None


class Session:
    """What the bank knows of one connection's session: its account, once logged in.

    An idle logged-in session is mostly memory (10,000 of them at once, in
    ``bench --idle``): the instance has slots, its handlers are named in one table for
    the class (``_HANDLERS``), and the event a successor waits on is made only for a wait.
    """

    __slots__ = (
        "_config",
        "_ended",
        "_leases",
        "_ledger",
        "_name",
        "_released",
        "_sessions",
        "account",
        "features",
        "lease",
        "on_lease_lost",
        "on_supersede",
        "terminal",
        "token",
    )

    _HANDLERS: ClassVar[dict[type[Request], str]] = {
        Login: "_login",
        Resume: "_resume",
        Logout: "_logout",
        Balance: "_balance",
        **{kind.request: "_post" for kind in MONEY_KINDS},
        History: "_history",
        Transfer: "_transfer",
        ChangePin: "_change_pin",
        Features: "_features",
        Ping: "_ping",
    }
    """The name of each request type's handler: one table for every session (a dict of
    bound methods per session cost 1.3 KiB each), looked up by name so that the method
    in force is the one called."""

    def __init__(
        self, *, ledger: Ledger, leases: Leases, config: ServerConfig, name: str,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.account: str | None = None
        self.terminal: str | None = None
        """The ATM's identity from its TLS terminal certificate, booked with each entry."""
        self.token: bytes | None = None
        """What resumes this session (``bank.resumption``), while it holds its lease."""
        self.on_supersede: Callable[[], None] = _nothing
        """Set by the connection: end it, for a successor that resumed this session."""
        self.on_lease_lost: Callable[[], None] = _nothing
        """Set by the connection: end it, another process has this session's lease."""
        self.lease: Lease | None = None
        """The account's lease while the session holds it; its fence goes with every
        money write."""
        self._ledger = ledger
        self._leases = leases
        self._config = config
        self._name = name
        self._sessions = sessions
        self._ended = False
        """True once ``end`` (or LOGOUT) has released whatever the session held."""
        self._released: trio.Event | None = None
        """Set once ``_ended``; made by the first ``wait_released``, as few sessions are
        ever waited on."""
        self.features = Feature(0)
        """What this connection's client announced it speaks, of what this server serves
        (FEATURES); nothing until it says so, which keeps an old client safe."""

    def identify(self, name: str, terminal: str) -> None:
        """The connection learned which terminal this is (its TLS certificate)."""
        self._name, self.terminal = name, terminal

    async def handle(self, request: Request) -> Reply:
        """The reply to one request that the protocol engine let through.

        A storage failure is answered ISSUER_UNAVAILABLE and the session goes on; a bug
        of ours is answered SYSTEM_MALFUNCTION, which ends the session, and never
        reaches another connection.
        """
        try:
            return await self._handler(request)(request)
        except LeaseLost:
            raise  # the connection ends it, unanswered
        except Exception as error:
            return self._failed(request, error)

    async def answer(self, engine: Engine, request: Request) -> Reply:
        """The reply to a request ``engine`` has just received: the state table's
        refusal where it refuses, else ``handle``'s. Send it with ``engine.send``.

        ``handle``'s body is repeated here rather than awaited: the server answers
        every request through this, and each coroutine layer is paid per request."""
        refused = engine.refusal(request)
        if refused is not None:
            return reply_type(request)(refused)
        try:
            return await self._handler(request)(request)
        except LeaseLost:
            raise  # the connection ends it, unanswered
        except Exception as error:
            return self._failed(request, error)

    def _handler(self, request: Request) -> Callable[[Any], Awaitable[Reply]]:
        """The method that answers ``request``; each takes the request type it is filed
        under: typed Any to say so."""
        handler: Callable[[Any], Awaitable[Reply]] = getattr(self, self._HANDLERS[type(request)])
        return handler

    def _failed(self, request: Request, error: Exception) -> Reply:
        """The reply to ``request`` when its handler raised ``error`` (being handled)."""
        if isinstance(error, StorageError):
            # One line per request: in an outage every ATM's every request fails alike,
            # and the same forty-line stack each time would bury the log. The error says
            # what the driver said; the stack is there for whoever debugs, at DEBUG.
            # ``storage_error`` on the record says which failure it was to a handler that
            # must tell these lines from a bug's (the session fuzzer's log check).
            log.error("%s: storage unavailable during %s: %s", self._name,
                      request.OPCODE.name, error, exc_info=log.isEnabledFor(logging.DEBUG),
                      extra={"storage_error": error})
            return reply_type(request)(Status.ISSUER_UNAVAILABLE)
        log.exception("%s: internal error during %s", self._name, request.OPCODE.name)
        self.end()
        return reply_type(request)(Status.SYSTEM_MALFUNCTION)

    def end(self) -> None:
        """Release the lease, if any; the token dies with it. Safe to call more than once."""
        self._release("%s: %s released")

    def _release(self, message: str) -> None:
        """``end``, logging ``message`` (with the name and the masked account) if the
        session held an account."""
        if self.account is not None and self.lease is not None:
            if self._sessions is not None:
                self._sessions.forget(self.account, self)
            self._leases.end(self.lease)
            log.info(message, self._name, mask_account(self.account))
            self.account = self.token = self.lease = None
        self._ended = True
        if self._released is not None:
            self._released.set()

    def supersede(self) -> None:
        """A new connection resumed this session: end this one (``Resumable``)."""
        log.debug("%s: superseded by a resumed connection", self._name)
        self.on_supersede()

    async def wait_released(self) -> None:
        if self._ended:
            await trio.lowlevel.checkpoint()  # as a wait on a set event does
            return
        if self._released is None:
            self._released = trio.Event()
        await self._released.wait()

    def _lease_lost(self) -> None:
        """Another process took this session's cluster lease (a RESUME there, or a
        LOGIN after it expired): end this connection, as a superseded one."""
        log.warning("%s: lease taken over by another process: ending", self._name)
        self.on_lease_lost()

    async def _acquire(
        self, account: str, token: bytes | None, succeeding: Lease | None = None
    ) -> Lease | None:
        return await self._leases.acquire(
            account, token=token, terminal=self.terminal, on_lost=self._lease_lost,
            succeeding=succeeding,
        )

    def _new_token(self) -> bytes | None:
        return new_token() if self._sessions is not None else None

    def _hold(self, lease: Lease, token: bytes | None) -> None:
        """``lease`` is this session's: resumable with ``token`` from now on."""
        self.account, self.lease = lease.account, lease
        if self._sessions is not None and token is not None:
            self.token = self._sessions.register(lease.account, self, token)

    async def _login(self, request: Login) -> Reply:
        verdict = await self._ledger.verify_pin(request.account, request.pin)
        status = PIN_STATUS[verdict.result]
        token, lease = self._new_token(), None
        if status is Status.APPROVED:
            lease = await self._acquire(request.account, token)
            if lease is None:
                status = Status.ACCOUNT_IN_USE
        # The operator learns what the customer is not told: that there is no such account.
        unknown = "" if verdict.account_known else " (no such account)"
        masked = mask_account(request.account)
        if verdict.locked_until_ms is not None:
            log.warning(
                "%s: login %s %s%s: locked until %s", self._name, masked, status.name,
                unknown, format_time_ms(verdict.locked_until_ms),
            )
        else:
            log.info("%s: login %s %s%s", self._name, masked, status.name, unknown)
        if lease is not None:
            self._hold(lease, token)
        return LoginReply(status)

    async def _resume(self, request: Resume) -> Reply:
        """Take over this account's session from its old connection, at once: the old one
        is superseded and its lease passes here, once released (bounded)."""
        masked = mask_account(request.account)
        if self._sessions is None:
            log.info("%s: resume %s refused: no such session", self._name, masked)
            return ResumeReply(Status.UNKNOWN_SESSION)
        predecessor = self._sessions.claim(request.account, request.token, self.terminal)
        token = new_token()
        if predecessor is None:  # none here; in a cluster, perhaps another process's
            lease = await self._leases.take_over(
                request.account, token=request.token, new_token=token,
                terminal=self.terminal, on_lost=self._lease_lost,
            )
            if lease is None:
                log.info("%s: resume %s refused: no such session", self._name, masked)
                return ResumeReply(Status.UNKNOWN_SESSION)
        else:
            # Its lease before it ends: in a cluster, the row is taken back only at that
            # fence, so that a session another process took over since (this registry
            # learns of it only at a heartbeat) is not reopened by the token it spent.
            succeeding = predecessor.lease
            predecessor.supersede()
            with trio.move_on_after(RESUME_TAKEOVER_S):
                await predecessor.wait_released()
            lease = await self._acquire(request.account, token, succeeding)
            if lease is None:  # still held, taken meanwhile, or taken over elsewhere
                log.info("%s: resume %s refused: the lease was not freed", self._name, masked)
                return ResumeReply(Status.UNKNOWN_SESSION)
        self._hold(lease, token)
        log.info(
            "%s: resume %s APPROVED%s", self._name, masked,
            " (taken over from another process)" if predecessor is None else "",
        )
        return ResumeReply(Status.APPROVED)

    async def _logout(self, _request: Logout) -> Reply:
        self._release("%s: logout %s")
        await self._leases.settle()  # free in the whole cluster before the ATM hears so
        return LogoutReply(Status.APPROVED)

    async def _balance(self, _request: Balance) -> Reply:
        return BalanceReply(Status.APPROVED, await self._ledger.balance(self._account()))

    async def _post(self, request: MoneyRequest) -> Reply:
        kind = KIND_OF_REQUEST[type(request)]
        posting = await self._ledger.post(  # awaited here: a layer less per deposit
            account=self._account(),
            txn_id=request.txn_id,
            kind=kind.entry_kind,
            amount_cents=request.amount_cents,
            limit_cents=SERVER_LIMITS[kind.entry_kind].cents_max(self._config),
            terminal=self.terminal,
            fence=self._fence(),
        )
        if posting.result is PostResult.FENCED:
            raise LeaseLost(request.txn_id.hex())
        status = POST_STATUS[kind.entry_kind][posting.result]
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than the check
            self._log_post(request, status, posting)
        return kind.reply(status, posting.balance_cents, posting.entry_id, posting.time_ms)

    def _log_post(self, request: MoneyRequest, status: Status, posting: Posting) -> None:
        """One line per deposit or withdrawal: the transaction id the ATM tells its
        customer to quote, and the entry once booked (or replayed). Never a balance: the
        log is not a statement, and a declined one has none to show."""
        result = posting.result
        booked = result in {PostResult.BOOKED, PostResult.REPLAYED}
        log.log(
            logging.WARNING if result is PostResult.TXN_ID_REUSED else logging.INFO,
            "%s: %s %s %s %s%s txn %s%s",
            self._name, mask_account(self._account()), request.OPCODE.name,
            format_cents(request.amount_cents), status.name,
            " (replayed)" if result is PostResult.REPLAYED else "", request.txn_id.hex(),
            f" entry {posting.entry_id}" if booked else "",
        )

    async def _transfer(self, request: Transfer) -> Reply:
        posting = await self._ledger.transfer(
            account=self._account(),
            txn_id=request.txn_id,
            to_account=request.to_account,
            amount_cents=request.amount_cents,
            limit_cents=SERVER_LIMITS[EntryKind.WITHDRAWAL].cents_max(self._config),
            terminal=self.terminal,
            fence=self._fence(),
        )
        if posting.result is PostResult.FENCED:
            raise LeaseLost(request.txn_id.hex())
        statuses = (
            TRANSFER_STATUS if Feature.FREQUENCY_LIMIT in self.features
            else OLD_CLIENT_TRANSFER_STATUS
        )
        status = statuses[posting.result]
        if posting.locked_until_ms is not None:
            self._log_transfer_lock(request, status, posting.locked_until_ms)
        elif log.isEnabledFor(logging.INFO):
            self._log_transfer(request, status, posting)
        return TransferReply(status, posting.balance_cents, posting.entry_id, posting.time_ms)

    def _log_transfer(self, request: Transfer, status: Status, posting: Posting) -> None:
        """One line per transfer, as ``_log_post``'s: both accounts masked, the id to
        quote and the source's entry once booked; never a balance, either side's."""
        result = posting.result
        booked = result in {PostResult.BOOKED, PostResult.REPLAYED}
        log.log(
            logging.WARNING if result is PostResult.TXN_ID_REUSED else logging.INFO,
            "%s: %s TRANSFER %s to %s %s%s txn %s%s",
            self._name, mask_account(self._account()), format_cents(request.amount_cents),
            mask_account(request.to_account), status.name,
            " (replayed)" if result is PostResult.REPLAYED else "", request.txn_id.hex(),
            f" entry {posting.entry_id}" if booked else "",
        )

    def _log_transfer_lock(self, request: Transfer, status: Status, locked_until_ms: int) -> None:
        """A transfer refused by the source's transfer lock, or the miss that set it: a
        warning with until when, as a LOGIN's PIN lock is; the destination masked."""
        log.warning(
            "%s: %s TRANSFER %s to %s %s txn %s: transfers locked until %s", self._name,
            mask_account(self._account()), format_cents(request.amount_cents),
            mask_account(request.to_account), status.name, request.txn_id.hex(),
            format_time_ms(locked_until_ms),
        )

    async def _change_pin(self, request: ChangePin) -> Reply:
        verdict = await self._ledger.change_pin(
            self._account(), request.pin, request.new_pin,
            fence=self._fence(),
        )
        if verdict.result is PinChangeResult.FENCED:  # nothing checked, nothing changed
            raise LeaseLost("CHANGE_PIN")
        status = PIN_CHANGE_STATUS[verdict.result]
        self._log_pin_change(status, verdict)
        return ChangePinReply(status)

    def _log_pin_change(self, status: Status, verdict: PinChangeVerdict) -> None:
        """The outcome, never a PIN; a lock it set is a warning, as a LOGIN's is."""
        masked = mask_account(self._account())
        if verdict.locked_until_ms is not None:
            log.warning(
                "%s: change PIN %s %s: locked until %s", self._name, masked, status.name,
                format_time_ms(verdict.locked_until_ms),
            )
        else:
            log.info("%s: change PIN %s %s", self._name, masked, status.name)

    async def _features(self, request: Features) -> Reply:
        self.features = Feature(request.features & SERVED_FEATURES)
        return FeaturesReply(Status.APPROVED, int(self.features))

    async def _history(self, request: History) -> Reply:
        entries = await self._ledger.history(self._account(), request.count)
        if Feature.TRANSFER not in self.features:
            entries = [_for_old_client(entry) for entry in entries]
        return HistoryReply(Status.APPROVED, tuple(entries))

    async def _ping(self, _request: Ping) -> Reply:
        return PingReply(Status.APPROVED)

    def _fence(self) -> int | None:
        """The fence every write of this session carries (``LeaseLost`` when refused)."""
        return None if self.lease is None else self.lease.fence

    def _account(self) -> str:
        if self.account is None:  # the engine's state table makes this unreachable
            raise RuntimeError("no account in an authenticated state")
        return self.account


def _for_old_client(entry: HistoryEntry) -> HistoryEntry:
    """``entry`` in the kinds a client from before TRANSFER decodes (spec §3.16)."""
    kind = OLD_CLIENT_ENTRY_KIND.get(entry[2])
    if kind is None:
        return entry
    return HistoryEntry(entry.entry_id, entry.time_ms, kind, entry.amount_cents,
                        entry.balance_cents)
