"""One ATM's session: the protocol's state table, applied to requests. No I/O here.

A session is CONNECTED until a LOGIN passes both the PIN check and the lease, then
AUTHENTICATED until LOGOUT (or the connection's end), then CLOSED. What each state
permits is the table ``PERMITTED``; a request outside it is a lookup miss answered
with the state's refusal status, as spec/PROTOCOL.md prints it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable

from bank.config import ServerConfig
from bank.leases import Leases
from bank.ledger import Ledger, Posting, StorageError
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    EntryKind,
    History,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Ping,
    PingReply,
    Reply,
    Request,
    Status,
    Withdraw,
)
from wire.messages import MoneyRequest, mask_account, reply_type
from wire.money import format_cents

log = logging.getLogger("bank.session")


class State(enum.Enum):
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


PERMITTED: dict[State, frozenset[type[Request]]] = {
    State.CONNECTED: frozenset({Login, Ping, Logout}),
    State.AUTHENTICATED: frozenset({Balance, Deposit, Withdraw, History, Ping, Logout}),
    State.CLOSED: frozenset(),
}
"""Which requests each state serves. The spec's state table prints this."""

REFUSAL: dict[State, Status] = {
    State.CONNECTED: Status.NOT_LOGGED_IN,
    State.AUTHENTICATED: Status.ALREADY_LOGGED_IN,
    State.CLOSED: Status.NOT_LOGGED_IN,
}
"""The status that answers a request its state does not permit."""


class Session:
    """The state of one connection's conversation with the bank."""

    def __init__(
        self, *, ledger: Ledger, leases: Leases, config: ServerConfig, name: str
    ) -> None:
        self.state = State.CONNECTED
        self.account: str | None = None
        self.shutting_down = False
        self._ledger = ledger
        self._leases = leases
        self._config = config
        self._name = name
        self._failed_logins = 0
        self._handlers: dict[type[Request], Callable[[Request], Awaitable[Reply]]] = {
            Login: self._login,
            Logout: self._logout,
            Balance: self._balance,
            Deposit: self._post,
            Withdraw: self._post,
            History: self._history,
            Ping: self._ping,
        }

    async def handle(self, request: Request) -> Reply:
        """The reply to one request, after which ``state`` says whether to go on."""
        if self.shutting_down and not isinstance(request, Logout):
            return reply_type(request)(Status.ISSUER_UNAVAILABLE)
        if type(request) not in PERMITTED[self.state]:
            return reply_type(request)(REFUSAL[self.state])
        try:
            return await self._handlers[type(request)](request)
        except StorageError:
            log.exception("%s: storage unavailable during %s", self._name, request.OPCODE.name)
            return reply_type(request)(Status.ISSUER_UNAVAILABLE)
        except Exception:
            # A bug of ours must not reach other connections: answer, log, end this one.
            log.exception("%s: internal error during %s", self._name, request.OPCODE.name)
            self.end()
            return reply_type(request)(Status.SYSTEM_MALFUNCTION)

    def end(self) -> None:
        """Release the lease, if any, and close. Safe to call more than once."""
        if self.account is not None:
            self._leases.release(self.account)
            log.info("%s: %s released", self._name, mask_account(self.account))
            self.account = None
        self.state = State.CLOSED

    async def _login(self, request: Login) -> Reply:
        status = await self._ledger.verify_pin(request.account, request.pin)
        if status is Status.APPROVED and not self._leases.try_acquire(request.account):
            status = Status.ACCOUNT_IN_USE
        log.info("%s: login %s %s", self._name, mask_account(request.account), status.name)
        if status is Status.APPROVED:
            self.account = request.account
            self.state = State.AUTHENTICATED
        else:
            self._failed_logins += 1
            if self._failed_logins >= self._config.login_attempts_max:
                log.info("%s: too many failed logins, closing", self._name)
                self.end()
        return LoginReply(status)

    async def _logout(self, _request: Logout) -> Reply:
        self.end()
        return LogoutReply(Status.APPROVED)

    async def _balance(self, _request: Balance) -> Reply:
        return BalanceReply(Status.APPROVED, await self._ledger.balance(self._account()))

    async def _post(self, request: MoneyRequest) -> Reply:
        posting = await self._posting(request)
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than the check
            log.info(
                "%s: %s %s %s %s entry %d balance %s",
                self._name, mask_account(self._account()), request.OPCODE.name,
                format_cents(request.amount_cents), posting.status.name, posting.entry_id,
                format_cents(posting.balance_cents),
            )
        return reply_type(request)(
            posting.status, posting.balance_cents, posting.entry_id, posting.time_ms
        )

    async def _posting(self, request: MoneyRequest) -> Posting:
        if isinstance(request, Withdraw):
            kind, limit_cents = EntryKind.WITHDRAWAL, self._config.withdrawal_cents_max
        else:
            kind, limit_cents = EntryKind.DEPOSIT, self._config.amount_cents_max
        return await self._ledger.post(
            account=self._account(),
            txn_id=request.txn_id,
            kind=kind,
            amount_cents=request.amount_cents,
            limit_cents=limit_cents,
        )

    async def _history(self, request: History) -> Reply:
        entries = await self._ledger.history(self._account(), request.count)
        return HistoryReply(Status.APPROVED, tuple(entries))

    async def _ping(self, _request: Ping) -> Reply:
        return PingReply(Status.APPROVED)

    def _account(self) -> str:
        if self.account is None:  # PERMITTED makes this unreachable; keep it loud if not.
            raise RuntimeError("no account in an authenticated state")
        return self.account
