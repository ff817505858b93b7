"""The customer flow: log in, serve menu choices until exit, then log out.

States follow the bank's: connected -> logged in -> closed. Control flow lives here and
the leaves are pure (``atm.inputs`` parses, ``atm.text`` words); the network is behind
``atm.connection`` and the keyboard behind ``atm.console``, both injectable, so the
whole flow runs in tests against a fake bank on memory streams.

A deposit or withdrawal whose reply is lost is not guessed at: the ATM reconnects, logs
in again and resends it with the same transaction id, which the bank answers with the
original outcome, so the money moves exactly once. So is one answered with a status that
does not settle it (``SETTLED``), even on the first attempt: ISSUER_UNAVAILABLE or
SYSTEM_MALFUNCTION may come after the money was committed. A balance or history request
whose connection is lost is simply asked again on the new connection.

A bank that never saw the old connection close (its last packets lost on the way) holds
the account's lease until that session's idle timeout, answering ACCOUNT_IN_USE until
then. So the ATM keeps reconnecting, with growing pauses, for the idle timeout its HELLO
announced plus a margin (``RECONNECT_MARGIN_S``, at most ``RECONNECT_WAIT_S_MAX``), and
makes its last attempt at the end of that window.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import TypeVar

import trio

from atm import text
from atm.connection import Connection
from atm.console import Console
from atm.errors import (
    ConnectionLost,
    ExitCode,
    LoginRefused,
    ServerBusy,
    SessionEnded,
    SessionExpired,
    TransactionUnconfirmed,
)
from atm.inputs import Choice, InputError, parse_account, parse_amount, parse_choice, parse_pin
from atm.text import Receipt, TransactionKind, TransferReceipt
from wire import (
    ALL_FEATURES,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Error,
    Feature,
    Features,
    FeaturesReply,
    History,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    MoneyReply,
    MoneyRequest,
    Reply,
    Request,
    Resume,
    ResumeReply,
    Status,
    Transfer,
    TransferReply,
    canonical_account,
    is_trivial_pin,
)

LOGIN_ATTEMPTS_MAX = 3
"""Wrong PINs the ATM lets a customer retry; the bank closes the connection after three."""

CONNECT_ATTEMPTS_MAX = 3
"""Connections tried, a second apart, before a greeting or a LOGIN cut by the network
ends the visit: a bank that is really down fails them all."""

RECONNECT_BACKOFF_S = 1
"""Wait after the first failed reconnect, doubled after each further one: the bank needs a
moment to notice the old connection closed and release the account."""

RECONNECT_BACKOFF_S_MAX = 8
"""Longest wait between two reconnects."""

RECONNECT_MARGIN_S = 5
"""Added to the bank's idle timeout to get how long the ATM keeps reconnecting."""

RECONNECT_WAIT_S_MAX = 300
"""Longest the ATM keeps reconnecting, whatever idle timeout the bank's HELLO announces."""

SETTLED: frozenset[Status] = frozenset({
    Status.APPROVED,
    Status.INSUFFICIENT_FUNDS,
    Status.INVALID_AMOUNT,
    Status.EXCEEDS_WITHDRAWAL_LIMIT,
    Status.DUPLICATE_TRANSMISSION,
})
"""Answers to a deposit or withdrawal that settle it: the bank looked its id up (or, for
INVALID_AMOUNT, refused it before it could move anything). Any other (ISSUER_UNAVAILABLE,
SYSTEM_MALFUNCTION, an ERROR frame), to the first attempt or to a resend, leaves it
unknown: the money may have moved before the failure, so it must not be reported as
declined. That includes the ISSUER_UNAVAILABLE a shutting-down bank gives every request:
it moves nothing, but it can reach the ATM before the SHUTDOWN notice, so it cannot be
told apart from a storage failure after the commit."""

TRANSFER_SETTLED: frozenset[Status] = SETTLED | {
    Status.INVALID_TO_ACCOUNT, Status.SAME_ACCOUNT, Status.EXCEEDS_FREQUENCY_LIMIT,
}
"""Answers that settle a transfer: a withdrawal's, and its own three refusals (the bank
answers EXCEEDS_FREQUENCY_LIMIT only after it looked the id up, spec §3.18)."""

PIN_CHANGE_SETTLED: frozenset[Status] = frozenset({
    Status.APPROVED, Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED, Status.PIN_NOT_ALLOWED,
})
"""Answers for which the bank checked a CHANGE_PIN; any other leaves it unknown."""

ANNOUNCED_BEFORE: tuple[type[Request], ...] = (History, Transfer, ChangePin)
"""Requests sent only after FEATURES on their connection (spec §3.16): HISTORY's entries
come in transfer kinds only once the bank knows this ATM reads them."""

LOGIN_RETRYABLE: frozenset[Status] = frozenset({Status.ACCOUNT_IN_USE, Status.ISSUER_UNAVAILABLE})
"""Login answers, while confirming, that waiting may change: the bank still holds the old
session's lease (160), or is shutting down or its storage briefly failed (91)."""

HISTORY_ENTRIES_SHOWN = 10
"""Entries shown by ``h``; fewer if the bank's HELLO allows fewer."""

T = TypeVar("T")
ReplyT = TypeVar("ReplyT", bound=Reply)

Connector = Callable[[], Awaitable[Connection]]

class EndOfInput(Exception):
    """Input ended (Ctrl-D, or the end of a pipe): the customer has walked away."""


class _NeverSent(ConnectionLost):
    """The connection had dropped before the request was sent (the customer was told):
    its first sending is on a new connection, so nothing about it needs confirming."""


class _NotLoggedInYet(ConnectionLost):
    """On reconnect the bank could not log us in yet (``LOGIN_RETRYABLE``): worth another
    try within the window."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Kept for one session only, to log in again when confirming a lost reply."""

    account: str
    pin: str = field(repr=False)


async def run_atm(console: Console, connect: Connector, *, tz: tzinfo | None = None) -> ExitCode:
    """Run one customer session from greeting to goodbye; returns the exit status."""
    session = AtmSession(console, connect, tz=tz)
    try:
        await session.run()
    except SessionEnded as ended:
        console.write(text.ending(ended))
        return ended.exit_code
    return ExitCode.OK


class AtmSession:
    """One customer's visit: at most one live connection, replaced when a reply is lost."""

    def __init__(self, console: Console, connect: Connector, *, tz: tzinfo | None = None) -> None:
        self._console = console
        self._connect = connect
        self._tz = tz
        self._connection: Connection | None = None
        self._credentials: Credentials | None = None
        self._token: bytes | None = None
        """The token of our session at the bank, kept from the last connection: a new
        connection resumes the session with it (RESUME) instead of logging in again."""
        self._lost: ConnectionLost | None = None
        """Why the connection dropped while the customer was choosing: the next request
        goes out on a new connection."""
        self._gone_before_login = False
        """The bank ended the connection (its login deadline) or it dropped while the
        customer typed the account or PIN: the LOGIN goes out on a new one, unworded."""

    @property
    def _conn(self) -> Connection:
        assert self._connection is not None, "only used between connect and close"
        return self._connection

    async def run(self) -> None:
        try:
            self._connection = await self._connect_riding_out_cuts()
            self._console.write(text.WELCOME)
            if await self._log_in():
                await self._serve_menu()
        finally:
            self._credentials = self._token = None
            await self._drop_connection()

    async def _connect_riding_out_cuts(self) -> Connection:
        """A greeted connection; a connection cut before or during HELLO is tried again
        (``CONNECT_ATTEMPTS_MAX`` times, a second apart), so that one bad moment of the
        network is not the end of a visit. A bank that is really down ends it still.
        Each failed try is said: a silent greeting takes its whole timeout, and three of
        them in silence look like a hung ATM."""
        for attempt in range(1, CONNECT_ATTEMPTS_MAX + 1):
            try:
                return await self._connect()
            except ConnectionLost as failure:
                if attempt == CONNECT_ATTEMPTS_MAX:
                    raise
                self._console.write(
                    text.retry_failed(attempt, failure, retry_in_s=RECONNECT_BACKOFF_S)
                )
                await trio.sleep(RECONNECT_BACKOFF_S)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _drop_connection(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            if connection.session_token is not None:
                self._token = connection.session_token
            await connection.aclose()

    # -- Input ------------------------------------------------------------------------

    async def _ask_watching(self, prompt: str, *, secret: bool = False) -> str:
        """Ask, while also watching the bank: a notice ends the wait and the session.

        A connection that drops meanwhile does not: the customer is told, and the answer
        goes out on a new connection that resumes the session (``_lost``). Before login
        neither a drop nor an expiry (the bank's login deadline) is worth a word: the
        LOGIN goes out on a new connection anyway (``_send_login_reconnecting``)."""
        notice: SessionEnded | None = None
        line: str | None = None
        logged_in = self._credentials is not None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal notice
                try:
                    await self._conn.watch()
                except ConnectionLost as lost:
                    if logged_in:
                        self._lost = lost
                        self._console.write(text.connection_dropped(lost))
                    else:
                        self._gone_before_login = True
                    return  # keep reading the customer's answer
                except SessionExpired as expired:
                    if not logged_in:
                        self._gone_before_login = True
                        return
                    notice = expired
                except SessionEnded as ended:
                    notice = ended
                nursery.cancel_scope.cancel()

            if self._lost is None:
                nursery.start_soon(watch)
            line = await self._console.read_line(prompt, secret=secret)
            nursery.cancel_scope.cancel()
        if notice is not None:
            raise notice
        if line is None:
            raise EndOfInput
        return line

    async def _ask_parsed(self, prompt: str, parse: Callable[[str], T], *,
                          secret: bool = False) -> T:
        """Ask until the answer parses; each refusal explains the expected format."""
        while True:
            try:
                return parse(await self._ask_watching(prompt, secret=secret))
            except InputError as error:
                self._console.write(str(error))

    async def _request(self, message: Request, reply_type: type[ReplyT]) -> ReplyT | Error:
        """``message``'s answer on the connection at hand; a reply slower than
        ``STILL_WORKING_AFTER_S`` is not waited for in silence."""
        return await self._conn.request(
            message, reply_type, on_slow=lambda: self._console.write(text.STILL_WORKING)
        )

    # -- Login ------------------------------------------------------------------------

    async def _log_in(self) -> bool:
        """True once logged in; False if input ended before any login was tried. Raises
        LoginRefused, also when input ends after a refusal: a script must see it failed."""
        refused: Status | None = None
        for attempt in range(1, LOGIN_ATTEMPTS_MAX + 1):
            try:
                credentials = await self._ask_credentials()
            except EndOfInput:
                if refused is not None:
                    raise LoginRefused(refused) from None
                return False
            status = await self._send_login_reconnecting(credentials)
            if status is Status.APPROVED:
                self._credentials = credentials
                self._console.write(text.logged_in(credentials.account))
                return True
            if status is not Status.INCORRECT_PIN or attempt == LOGIN_ATTEMPTS_MAX:
                raise LoginRefused(status)
            refused = status
            self._console.write(f"{text.status_sentence(status)}. {text.TRY_AGAIN}")
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _ask_credentials(self) -> Credentials:
        account = await self._ask_parsed(text.ACCOUNT_PROMPT, parse_account)
        pin = await self._ask_parsed(text.PIN_PROMPT, parse_pin, secret=True)
        return Credentials(account, pin)

    async def _send_login_reconnecting(self, credentials: Credentials) -> Status:
        """Log in; if the bank let the connection go while the customer was typing (its
        login deadline runs from connect), or the network cut it during the LOGIN, log in
        on a new connection (``CONNECT_ATTEMPTS_MAX`` tries): logging in twice moves
        nothing. Should the lost LOGIN have been approved, the bank holds our session:
        ACCOUNT_IN_USE is then waited out as when confirming (``LOGIN_RETRYABLE``)."""
        if self._gone_before_login:  # while the customer typed: nothing to say
            self._gone_before_login = False
        else:
            try:
                return await self._send_login(credentials)
            except (SessionExpired, ConnectionLost) as lost:
                if isinstance(lost, ConnectionLost):
                    self._console.write(text.reconnecting(text.LOGGING_IN, lost))
        deadline: float | None = None
        for attempt in range(1, CONNECT_ATTEMPTS_MAX + 1):
            await self._drop_connection()
            try:
                self._connection = await self._connect()
                status = await self._send_login(credentials)
            except (SessionExpired, ConnectionLost) as failure:
                if attempt == CONNECT_ATTEMPTS_MAX:
                    raise
                self._console.write(text.retry_failed(attempt, failure, retry_in_s=1))
                await trio.sleep(RECONNECT_BACKOFF_S)
                continue
            if status is not Status.ACCOUNT_IN_USE:
                return status
            # Perhaps our own lost LOGIN's session: wait it out, as when confirming.
            deadline = deadline or trio.current_time() + self._reconnect_window_s()
            return await self._login_when_released(credentials, deadline)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _login_when_released(self, credentials: Credentials, deadline: float) -> Status:
        """LOGIN again, pausing longer each time, while the bank says ACCOUNT_IN_USE and
        ``deadline`` allows; the last answer is the customer's."""
        backoff_s = RECONNECT_BACKOFF_S
        while True:
            left_s = deadline - trio.current_time()
            if left_s <= 0:
                return Status.ACCOUNT_IN_USE
            pause_s = min(backoff_s, left_s)
            self._console.write(text.login_waiting(math.ceil(pause_s)))
            await trio.sleep(pause_s)
            backoff_s = min(2 * backoff_s, RECONNECT_BACKOFF_S_MAX)
            await self._drop_connection()
            self._connection = await self._connect()
            status = await self._send_login(credentials)
            if status is not Status.ACCOUNT_IN_USE:
                return status

    async def _resume(self) -> Status:
        """Take our session over on the new connection with its token (RESUME): at once,
        even if the bank never saw the old connection end. UNKNOWN_SESSION (or no token,
        or a bank that does not know RESUME) means: log in instead."""
        if self._token is None or self._credentials is None:
            return Status.UNKNOWN_SESSION
        token, self._token = self._token, None  # single use: the bank sends a new one
        reply = await self._request(Resume(self._credentials.account, token), ResumeReply)
        return reply.status if isinstance(reply, ResumeReply) else Status.UNKNOWN_SESSION

    async def _send_login(self, credentials: Credentials) -> Status:
        reply = await self._request(Login(credentials.account, credentials.pin), LoginReply)
        return reply.status

    # -- Menu -------------------------------------------------------------------------

    async def _serve_menu(self) -> None:
        actions = {
            Choice.BALANCE: self._show_balance,
            Choice.DEPOSIT: self._deposit,
            Choice.WITHDRAW: self._withdraw,
            Choice.HISTORY: self._show_history,
            Choice.TRANSFER: self._transfer,
            Choice.CHANGE_PIN: self._change_pin,
        }
        try:
            while True:
                self._conn.raise_if_shutting_down()
                choice = parse_choice(await self._ask_watching(text.MENU_PROMPT))
                if choice is Choice.EXIT:
                    break
                if choice is None:
                    self._console.write(text.MENU_HELP)
                    continue
                await actions[choice]()
        except EndOfInput:
            pass
        await self._log_out()

    async def _log_out(self) -> None:
        """Say goodbye to the bank; the customer is leaving, so a failure here is not one.
        A connection that dropped is resumed once for it, so that the bank releases the
        account now rather than at its idle timeout."""
        try:
            if self._lost is not None:
                await self._resume_for_logout()
            reply = await self._request(Logout(), LogoutReply)
        except SessionEnded:
            self._console.write(text.LOGOUT_UNCONFIRMED)
            return
        self._console.write(text.GOODBYE if reply.status is Status.APPROVED
                            else text.LOGOUT_UNCONFIRMED)

    async def _show_balance(self) -> None:
        reply = await self._read(Balance(), BalanceReply, purpose=text.GETTING_BALANCE)
        if isinstance(reply, BalanceReply) and reply.status is Status.APPROVED:
            self._console.write(text.balance(reply.balance_cents))
        else:
            self._console.write(text.request_failed(reply.status))

    async def _served_features(self) -> Feature:
        """What the bank serves of the optional requests, asked once per connection
        (FEATURES); a bank from before them answers ERROR, and serves none. A connection
        that dropped is not asked: the request goes out on a new one, which asks there."""
        if self._lost is not None:
            return ALL_FEATURES  # not known yet; the new connection will ask
        try:
            return await self._ask_features()
        except ConnectionLost as lost:
            self._lost = lost  # the request goes out on a new connection, which asks
            return ALL_FEATURES

    async def _ask_features(self) -> Feature:
        """FEATURES on the connection at hand, once; raises if the connection is lost."""
        connection = self._conn
        if connection.features is None:
            reply = await self._request(Features(int(ALL_FEATURES)), FeaturesReply)
            served = reply.features if isinstance(reply, FeaturesReply) else 0
            connection.features = Feature(served)
        return connection.features

    async def _offered(self, feature: Feature) -> bool:
        if feature in await self._served_features():
            return True
        self._console.write(text.NOT_OFFERED)
        return False

    async def _show_history(self) -> None:
        await self._served_features()
        count = min(HISTORY_ENTRIES_SHOWN, self._conn.history_entries_max)
        reply = await self._read(History(count), HistoryReply, purpose=text.GETTING_HISTORY)
        if isinstance(reply, HistoryReply) and reply.status is Status.APPROVED:
            self._console.write(text.format_history(reply.entries, self._tz))
        else:
            self._console.write(text.request_failed(reply.status))

    # -- Moving money -----------------------------------------------------------------

    async def _deposit(self) -> None:
        await self._move_money(TransactionKind.DEPOSIT)

    async def _withdraw(self) -> None:
        await self._move_money(TransactionKind.WITHDRAWAL)

    async def _ask_amount(self, prompt: str) -> int | None:
        """Cents to move, or None if the customer cancelled with an empty line."""
        amount_cents_max = self._conn.amount_cents_max
        while True:
            line = await self._ask_watching(prompt)
            if not line.strip():
                return None
            try:
                return parse_amount(line, amount_cents_max=amount_cents_max)
            except InputError as error:
                self._console.write(str(error))

    async def _move_money(self, kind: TransactionKind) -> None:
        amount_cents = await self._ask_amount(text.amount_prompt(kind))
        if amount_cents is None:
            self._console.write(text.CANCELLED)
            return
        request_type, reply_type = kind.money.request, kind.money.reply
        # A fresh random id per transaction; retries of this one reuse it.
        request = request_type(uuid.uuid4().bytes, amount_cents)
        reply = await self._send_money(kind, request, reply_type)
        if not isinstance(reply, MoneyReply) or reply.status is not Status.APPROVED:
            self._console.write(text.refused(kind, reply.status))
            return
        assert self._credentials is not None, "money moves only after login"
        receipt = Receipt(kind=kind, account=self._credentials.account,
                          amount_cents=amount_cents, balance_cents=reply.balance_cents,
                          entry_id=reply.entry_id, time_ms=reply.time_ms)
        self._console.write(text.format_receipt(receipt, self._tz))

    async def _transfer(self) -> None:
        """Key ``t``: destination, amount, a confirmation naming both, then the receipt,
        which shows the source's new balance and never the destination's."""
        if not await self._offered(Feature.TRANSFER):
            return
        assert self._credentials is not None, "money moves only after login"
        line = await self._ask_watching(text.DESTINATION_PROMPT)
        if not line.strip():
            self._console.write(text.CANCELLED)
            return
        try:
            destination = parse_account(line)
        except InputError as error:
            self._console.write(str(error))
            return
        if canonical_account(destination) == canonical_account(self._credentials.account):
            self._console.write(text.refused(text.TRANSFER_NOUN, Status.SAME_ACCOUNT))
            return
        amount_cents = await self._ask_amount(text.TRANSFER_AMOUNT_PROMPT)
        if amount_cents is None or not await self._confirm(
            text.transfer_confirmation(destination, amount_cents)
        ):
            self._console.write(text.CANCELLED)
            return
        request = Transfer(uuid.uuid4().bytes, amount_cents, destination)
        reply = await self._send_money(text.TRANSFER_NOUN, request, TransferReply,
                                       settled=TRANSFER_SETTLED)
        if not isinstance(reply, TransferReply) or reply.status is not Status.APPROVED:
            self._console.write(text.refused(text.TRANSFER_NOUN, reply.status))
            return
        receipt = TransferReceipt(
            account=self._credentials.account, destination=request.to_account,
            amount_cents=amount_cents, balance_cents=reply.balance_cents,
            entry_id=reply.entry_id, time_ms=reply.time_ms,
        )
        self._console.write(text.format_transfer_receipt(receipt, self._tz))

    async def _confirm(self, question: str) -> bool:
        while True:
            answer = (await self._ask_watching(question)).strip().lower()
            if answer in {"y", "yes"}:
                return True
            if answer in {"n", "no", ""}:
                return False
            self._console.write(text.CONFIRM_HINT)

    async def _change_pin(self) -> None:
        """Key ``p``: the current PIN, the new one twice (all hidden). A mismatch or a
        trivial new PIN is refused here; only the bank's answer changes anything."""
        if not await self._offered(Feature.CHANGE_PIN):
            return
        assert self._credentials is not None, "a PIN is changed only after login"
        pin = await self._ask_parsed(text.CURRENT_PIN_PROMPT, parse_pin, secret=True)
        new_pin = await self._ask_parsed(text.NEW_PIN_PROMPT, parse_pin, secret=True)
        repeated = await self._ask_parsed(text.REPEAT_PIN_PROMPT, parse_pin, secret=True)
        if repeated != new_pin:
            self._console.write(text.PINS_DIFFER)
            return
        if is_trivial_pin(new_pin):
            self._console.write(text.pin_change_refused(Status.PIN_NOT_ALLOWED))
            return
        status = await self._send_pin_change(ChangePin(pin, new_pin))
        if status is Status.APPROVED:
            self._credentials = Credentials(self._credentials.account, new_pin)
            self._console.write(text.PIN_CHANGED)
        else:
            self._console.write(text.pin_change_refused(status))

    async def _send_pin_change(self, request: ChangePin) -> Status:
        """The bank's answer, confirmed as spec §3.20 says if it was lost: the same
        request again, and if that finds the old PIN wrong, the new PIN as both (which
        succeeds only if the first one went through)."""
        def settles(reply: ChangePinReply | Error) -> bool:
            return reply.status in PIN_CHANGE_SETTLED

        try:
            first = await self._first_attempt(request, ChangePinReply)
        except (ConnectionLost, SessionExpired) as lost:
            cause: SessionEnded | Status = lost
        else:
            if settles(first):
                return first.status
            cause = first.status
        never_sent = isinstance(cause, _NeverSent)
        if not never_sent:
            self._console.write(text.reconnecting(text.CONFIRMING_PIN_CHANGE, cause))
        window_s = self._reconnect_window_s()
        try:
            again = await self._resend_until_settled(request, ChangePinReply, window_s,
                                                     settles=settles)
            # Sent for the first time, INCORRECT_PIN is the answer: probing with the new
            # PIN would only count a second wrong PIN toward the lock.
            if never_sent or again.status is not Status.INCORRECT_PIN:
                return again.status
            done = ChangePin(request.new_pin, request.new_pin)
            reply = await self._request(done, ChangePinReply)
        except SessionEnded:
            self._console.write(text.PIN_CHANGE_UNCONFIRMED)
            raise
        return Status.APPROVED if reply.status is Status.APPROVED else Status.INCORRECT_PIN

    async def _send_money(self, kind: TransactionKind | str, request: MoneyRequest | Transfer,
                          reply_type: type[MoneyReply], *,
                          settled: frozenset[Status] = SETTLED) -> MoneyReply | Error:
        """The bank's settled answer to ``request``, confirmed by resending it if the reply
        is lost or does not settle it.

        Whatever ends the wait before it settles (Ctrl-C, plain or grouped by a nursery;
        an unexpected error) first tells the customer the transaction id: the money may
        have moved. ``TransactionUnconfirmed`` tells it itself, when the session ends.
        """
        try:
            reply, resent = await self._settle_money(kind, request, reply_type, settled)
        except TransactionUnconfirmed:
            raise
        except BaseException:
            with contextlib.suppress(OSError):  # the screen may be what failed
                self._console.write(text.ending(TransactionUnconfirmed(
                    kind=text.noun(kind), amount_cents=request.amount_cents,
                    txn_id=request.txn_id,
                )))
            raise
        if resent and isinstance(reply, MoneyReply) and reply.status is Status.APPROVED:
            self._console.write(text.confirmed(kind, reply.entry_id))
        return reply  # a refusal is told once, by the caller

    async def _settle_money(
        self, kind: TransactionKind | str, request: MoneyRequest | Transfer,
        reply_type: type[MoneyReply], settled: frozenset[Status],
    ) -> tuple[MoneyReply | Error, bool]:
        """The answer that settles ``request``, and whether it took resending."""
        cause: SessionEnded | Status

        def settles(reply: MoneyReply | Error) -> bool:
            return reply.status in settled

        try:
            reply = await self._first_attempt(request, reply_type)
        except (ConnectionLost, SessionExpired) as lost:
            cause = lost
        else:
            if settles(reply):
                return reply, False
            cause = reply.status  # 91, 96, an ERROR...: it may have gone through
        never_sent = isinstance(cause, _NeverSent)
        if not never_sent:  # else the customer already knows, and nothing is unsure yet
            self._console.write(text.reconnecting(text.confirming(kind), cause))
        window_s = self._reconnect_window_s()
        try:
            reply = await self._resend_until_settled(request, reply_type, window_s,
                                                     settles=settles)
        except SessionEnded:
            raise TransactionUnconfirmed(kind=text.noun(kind), amount_cents=request.amount_cents,
                                         txn_id=request.txn_id) from None
        return reply, not never_sent

    async def _read(self, request: Request, reply_type: type[ReplyT], *,
                    purpose: str) -> ReplyT | Error:
        """Send a request that changes nothing; if the connection is lost, ask again on a
        new one. Raises the last failure if that cannot be done in time."""
        try:
            return await self._first_attempt(request, reply_type)
        except (ConnectionLost, SessionExpired) as lost:
            self._console.write(text.reconnecting(purpose, lost))
            window_s = self._reconnect_window_s()
        return await self._resend_until_settled(request, reply_type, window_s)

    async def _first_attempt(self, request: Request, reply_type: type[ReplyT]) -> ReplyT | Error:
        """Send ``request`` on the connection at hand; one that dropped while the customer
        was choosing is not tried: its loss is raised, for the request to go out on a new
        connection."""
        if self._lost is not None:
            lost, self._lost = self._lost, None
            raise _NeverSent(lost.reason, status=lost.status, detail=lost.detail) from lost
        return await self._request(request, reply_type)

    async def _resume_for_logout(self) -> None:
        """One new connection that resumes the session, for the LOGOUT only."""
        self._lost = None
        await self._drop_connection()
        self._connection = await self._connect()
        if await self._resume() is not Status.APPROVED:
            raise ConnectionLost("the session could not be resumed to log out")

    def _reconnect_window_s(self) -> float:
        """How long to keep reconnecting: as long as the bank may hold the old session."""
        return min(self._conn.idle_timeout_s + RECONNECT_MARGIN_S, RECONNECT_WAIT_S_MAX)

    async def _resend_until_settled(
        self, request: Request, reply_type: type[ReplyT], window_s: float, *,
        settles: Callable[[ReplyT | Error], bool] = lambda reply: True,
    ) -> ReplyT | Error:
        """Send ``request`` again (the same message: a money request keeps its
        transaction id) on new connections, pausing longer each time, until an answer
        ``settles`` it. The last pause is cut short so that one attempt is made at the end
        of ``window_s`` (when the bank releases a lease it kept); raises the last failure
        once an attempt fails at or after that, and at once for a refused login, which
        waiting cannot change.
        """
        deadline = trio.current_time() + window_s
        backoff_s = RECONNECT_BACKOFF_S
        for attempt in itertools.count(1):
            await self._drop_connection()
            try:
                reply = await self._resend(request, reply_type)
            except LoginRefused as refusal:
                self._console.write(text.retry_failed(attempt, refusal))
                raise
            except (ConnectionLost, SessionExpired, ServerBusy) as failure:
                problem: SessionEnded | Status = failure
            else:
                if settles(reply):
                    return reply
                # 91, 96, an ERROR...: the bank did not look the id up; it may have gone through.
                problem = reply.status
            left_s = deadline - trio.current_time()
            if left_s <= 0:
                self._console.write(text.retry_failed(attempt, problem))
                if isinstance(problem, Status):
                    raise ConnectionLost(text.NOT_SETTLED, status=problem)
                raise problem
            pause_s = min(backoff_s, left_s)
            self._console.write(text.retry_failed(attempt, problem,
                                                  retry_in_s=math.ceil(pause_s)))
            await trio.sleep(pause_s)
            backoff_s = min(2 * backoff_s, RECONNECT_BACKOFF_S_MAX)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _resend(self, request: Request, reply_type: type[ReplyT]) -> ReplyT | Error:
        assert self._credentials is not None, "requests are sent only after login"
        self._connection = await self._connect()
        status = await self._resume()
        if status is not Status.APPROVED:
            status = await self._send_login(self._credentials)
        if status is Status.INCORRECT_PIN and isinstance(request, ChangePin):
            # The lost CHANGE_PIN went through: the new PIN logs in, and asking for the
            # PIN it already is confirms it (spec §3.20).
            credentials = Credentials(self._credentials.account, request.new_pin)
            status = await self._send_login(credentials)
            if status is Status.APPROVED:
                self._credentials = credentials
                request = ChangePin(request.new_pin, request.new_pin)
        if status in LOGIN_RETRYABLE:
            raise _NotLoggedInYet(text.login_not_yet(status), status=status)
        if status is not Status.APPROVED:
            raise LoginRefused(status)
        if isinstance(request, ANNOUNCED_BEFORE):
            await self._ask_features()
        return await self._request(request, reply_type)
