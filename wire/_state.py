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
from dataclasses import dataclass

from wire._messages import (
    MESSAGE_TYPES,
    Balance,
    ChangePin,
    Deposit,
    Error,
    Features,
    Hello,
    History,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    Ping,
    Reply,
    Request,
    Resume,
    ResumeReply,
    SessionExpired,
    Transfer,
    Withdraw,
)
from wire._status import Status


class State(enum.Enum):
    OPENING = "opening"
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


PERMITTED: dict[State, frozenset[type[Request]]] = {
    State.OPENING: frozenset(),
    State.CONNECTED: frozenset({Login, Resume, Features, Ping, Logout}),
    State.AUTHENTICATED: frozenset(
        {Balance, Deposit, Withdraw, Transfer, ChangePin, History, Features, Ping, Logout}
    ),
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
    {Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED, Status.ACCOUNT_IN_USE,
     Status.UNKNOWN_SESSION}
)
"""LOGIN and RESUME answers that count toward the server's ``login_attempts_max``: the
login was checked and refused (a RESUME with a token that opens nothing is a guess like a
wrong PIN). ISSUER_UNAVAILABLE (storage, or a shutdown) checked nothing."""

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


@dataclass(frozen=True, slots=True)
class Transition:
    """One rule of the table: a ``message`` the server sends (any reply when it is
    ``Reply``) with one of ``statuses`` (any status when None), sent in one of
    ``before``, leaves the connection in ``after``."""

    message: type[Message]
    statuses: frozenset[Status] | None
    before: frozenset[State]
    after: State


_OPEN = frozenset({State.OPENING, State.CONNECTED, State.AUTHENTICATED})
_FATAL_ERRORS = frozenset(Status) - NON_FATAL_ERRORS - {Status.APPROVED}

TRANSITIONS: tuple[Transition, ...] = (
    Transition(Hello, None, frozenset({State.OPENING}), State.CONNECTED),
    Transition(LoginReply, frozenset({Status.APPROVED}), frozenset({State.CONNECTED}),
               State.AUTHENTICATED),
    Transition(ResumeReply, frozenset({Status.APPROVED}), frozenset({State.CONNECTED}),
               State.AUTHENTICATED),
    Transition(LogoutReply, None, _OPEN, State.CLOSED),
    Transition(Reply, ENDING_STATUSES, _OPEN, State.CLOSED),
    Transition(SessionExpired, None, _OPEN, State.CLOSED),
    Transition(Error, _FATAL_ERRORS, _OPEN, State.CLOSED),
)
"""Every frame that moves the state, whichever side sends or receives it; any other
frame leaves it as it is. The first rule that matches applies."""


def next_state(state: State, message: Message) -> State:
    """The state after the server sends (or the client receives) ``message``.

    Only what the server says moves the state: a request changes nothing until it is
    answered. The one rule that is not read off a frame, the server's count of failed
    LOGINs, is kept by ``wire.Connection``.
    """
    return _after(state, type(message), getattr(message, "status", None))


def _after(state: State, cls: type[Message], status: Status | None) -> State:
    """``next_state`` for a message of class ``cls`` carrying ``status`` (None: none)."""
    for rule in TRANSITIONS:
        if (
            issubclass(cls, rule.message)
            and state in rule.before
            and (rule.statuses is None or status in rule.statuses)
        ):
            return rule.after
    return state


@dataclass(frozen=True, slots=True)
class StateRules:
    """One state's rows of the tables above, as the lookups ``wire.Connection`` makes for
    every request and every frame the server sends.

    The functions walk the tables: ``next_state`` tries up to seven rules, each an
    ``isinstance`` and a set test on an enum whose hash is a Python call; ``refusal``
    looks the state up in two dicts, by that same hash. Through these rows, a
    request's refusal and a reply's move are one set test and two dict lookups keyed by
    class and status (both hashed in C). ``RULES`` holds one per state, derived from the
    tables and tested against the functions for every message class and status.
    """

    state: State
    permitted: frozenset[type[Request]]
    """``PERMITTED[state]``."""
    refused_with: Status
    """``REFUSAL[state]``: the answer to a request outside ``permitted``."""
    moves: dict[type[Message], dict[Status | None, State]]
    """For every message class: the statuses (None for a message without one) after
    which ``next_state`` leaves ``state``, and where to. A class not in it (one that
    ``wire._messages`` does not register) is for ``next_state`` to place."""


def _rules_of(state: State) -> StateRules:
    statuses: list[Status | None] = [*Status, None]
    moves = {
        cls: {
            status: after for status in statuses
            if (after := _after(state, cls, status)) is not state
        }
        for cls in MESSAGE_TYPES.values()
    }
    return StateRules(state, PERMITTED[state], REFUSAL[state], moves)


RULES: dict[State, StateRules] = {state: _rules_of(state) for state in State}
"""Each state's ``StateRules``."""
