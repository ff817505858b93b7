"""The conversation's rules: every one that changes a session's state lives here.

A connection is OPENING until the server's HELLO, CONNECTED until a LOGIN is approved,
AUTHENTICATED until it ends, then CLOSED. Both roles follow the same table, the server
by what it sends and the client by what it receives, so each knows the other's state
from the frames alone (h11's ``_state.py`` is the model).

What each state permits a client to ask is ``PERMITTED``; a request outside it is a
lookup miss, answered with ``REFUSAL[state]`` and changing nothing. Once the server has
announced a shutdown, only LOGOUT is served and the rest get ISSUER_UNAVAILABLE.
The spec's state table (spec/PROTOCOL.md section 5) is generated from these tables.
"""

from __future__ import annotations

import enum

from wire.messages import (
    Balance,
    Deposit,
    Error,
    Hello,
    History,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    Ping,
    Request,
    SessionExpired,
    Withdraw,
)
from wire.status import Status


class State(enum.Enum):
    OPENING = "opening"
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


PERMITTED: dict[State, frozenset[type[Request]]] = {
    State.OPENING: frozenset(),
    State.CONNECTED: frozenset({Login, Ping, Logout}),
    State.AUTHENTICATED: frozenset({Balance, Deposit, Withdraw, History, Ping, Logout}),
    State.CLOSED: frozenset(),
}
"""Which requests each state serves."""

REFUSAL: dict[State, Status] = {
    State.OPENING: Status.NOT_LOGGED_IN,
    State.CONNECTED: Status.NOT_LOGGED_IN,
    State.AUTHENTICATED: Status.ALREADY_LOGGED_IN,
    State.CLOSED: Status.NOT_LOGGED_IN,
}
"""The status that answers a request its state does not permit."""

PERMITTED_WHILE_SHUTTING_DOWN: frozenset[type[Request]] = frozenset({Logout})
"""What a server still serves after announcing SHUTDOWN, in any state."""

SHUTDOWN_REFUSAL = Status.ISSUER_UNAVAILABLE
"""The answer to any other request once a shutdown has begun."""

LOGIN_FAILURES: frozenset[Status] = frozenset(
    {Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED, Status.ACCOUNT_IN_USE}
)
"""LOGIN answers that count toward the server's ``login_attempts_max``: the login was
checked and refused. ISSUER_UNAVAILABLE (storage, or a shutdown) checked nothing."""

NON_FATAL_ERRORS: frozenset[Status] = frozenset(
    {Status.INVALID_TRANSACTION, Status.INVALID_AMOUNT}
)
"""ERROR statuses after which the session goes on: each concerns one intact frame.
Every other ERROR means the server closes the connection after sending it."""

ENDING_STATUSES: frozenset[Status] = frozenset({Status.SYSTEM_MALFUNCTION})
"""A reply carrying one of these ends the session: the server closes after it."""


def refusal(state: State, request: Request, *, shutting_down: bool) -> Status | None:
    """The status that refuses ``request`` in ``state``, or None if it is to be served."""
    if shutting_down and type(request) not in PERMITTED_WHILE_SHUTTING_DOWN:
        return SHUTDOWN_REFUSAL
    if type(request) not in PERMITTED[state]:
        return REFUSAL[state]
    return None


def next_state(state: State, message: Message) -> State:
    """The state after the server sends (or the client receives) ``message``.

    Only what the server says moves the state: a request changes nothing until it is
    answered. The one rule that is not read off a frame, the server's count of failed
    LOGINs, is kept by ``wire.Connection``.
    """
    if state is State.CLOSED:
        return state
    if isinstance(message, Hello):
        return State.CONNECTED if state is State.OPENING else state
    if isinstance(message, SessionExpired):
        return State.CLOSED
    if isinstance(message, Error):
        return state if message.status in NON_FATAL_ERRORS else State.CLOSED
    status = getattr(message, "status", None)
    if status in ENDING_STATUSES:
        return State.CLOSED
    if isinstance(message, LogoutReply):
        return State.CLOSED
    if isinstance(message, LoginReply) and status is Status.APPROVED:
        return State.AUTHENTICATED
    return state
