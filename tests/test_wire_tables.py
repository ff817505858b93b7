"""The lookups the engine and the codec make per frame, against what they stand for.

``wire.Connection`` answers a request's refusal and moves its state through
``wire._state.RULES`` (each state's rows, derived from the tables), checks a reply's
type through a table by request class, and decoders share one table of message classes
per side. These tests hold each lookup to the function or table it replaces, for every
state, message class and status, so that a derived table cannot drift from the rules.
They also check what keeps an idle connection small: no per-instance ``__dict__``.
"""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest

from wire import MESSAGE_TYPES, PERMITTED, Connection, Decoder, Sender, State, Status
from wire._messages import Message, Opcode, Request, reply_type
from wire._state import RULES, next_state, refusal

REQUEST_CLASSES = [cls for cls in MESSAGE_TYPES.values() if issubclass(cls, Request)]


def bare(cls: type[Message], status: Status | None) -> Message:
    """An instance of ``cls`` with only ``status`` set: the state rules read nothing else,
    and this reaches statuses a validated message may not carry (APPROVED in an ERROR)."""
    message = object.__new__(cls)
    if status is not None:
        object.__setattr__(message, "status", status)
    return message


def statuses_of(cls: type[Message]) -> list[Status | None]:
    """Every status a message of ``cls`` could carry, or None for one without a status."""
    return list(Status) if "status" in {f.name for f in fields(cls)} else [None]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("shutting_down", [False, True])
def test_the_engines_refusal_is_the_state_tables(state: State, shutting_down: bool) -> None:
    engine = Connection(Sender.SERVER)
    engine.state = state  # from outside: the engine must notice its rows are stale
    engine.shutting_down = shutting_down
    for cls in REQUEST_CLASSES:
        request = bare(cls, None)
        assert isinstance(request, Request)
        assert engine.refusal(request) is refusal(state, request, shutting_down=shutting_down)


def test_a_request_class_the_registry_does_not_know_is_refused_as_the_table_says() -> None:
    class Unregistered(Request):  # a subclass of no registered request: in no PERMITTED row
        OPCODE = Opcode.PING

    engine = Connection(Sender.SERVER)
    for state in State:
        engine.state = state
        assert engine.refusal(Unregistered()) is refusal(
            state, Unregistered(), shutting_down=False
        )


@pytest.mark.parametrize("state", list(State))
def test_each_states_rows_are_its_table_rows(state: State) -> None:
    rules = RULES[state]
    assert rules.state is state and rules.permitted == PERMITTED[state]
    assert set(rules.moves) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("state", list(State))
def test_the_moves_are_next_state_for_every_class_and_status(state: State) -> None:
    moves = RULES[state].moves
    for cls in MESSAGE_TYPES.values():
        for status in statuses_of(cls):
            message = bare(cls, status)
            assert moves[cls].get(status, state) is next_state(state, message), (cls, status)


def test_the_engine_moves_as_next_state_for_every_class_and_status() -> None:
    """Through the engine's own path (``_server_said``), from every state."""
    for state, cls in itertools.product(State, MESSAGE_TYPES.values()):
        for status in statuses_of(cls):
            engine = Connection(Sender.CLIENT)
            engine.state = state
            message = bare(cls, status)
            if cls.OPCODE is Opcode.SESSION_TOKEN:
                object.__setattr__(message, "token", bytes(16))
            engine._server_said(message)
            assert engine.state is next_state(state, message), (state, cls, status)


def test_reply_type_by_table_is_the_reply_by_opcode() -> None:
    for cls in REQUEST_CLASSES:
        expected = MESSAGE_TYPES[Opcode(cls.OPCODE | 0x80)]
        assert reply_type(bare(cls, None)) is expected  # type: ignore[arg-type]


def test_reply_type_of_an_unregistered_request_class_goes_by_its_opcode() -> None:
    class Unregistered(Request):
        OPCODE = Opcode.BALANCE

    assert reply_type(Unregistered()) is MESSAGE_TYPES[Opcode.BALANCE_REPLY]


def test_decoders_of_one_side_share_one_table_of_classes() -> None:
    for sender in Sender:
        first, second = Decoder(sender), Decoder(sender)
        assert first._types is second._types
        assert first._types == {
            op: cls for op, cls in MESSAGE_TYPES.items() if cls.SENDER is sender
        }


def test_an_engine_and_its_decoder_hold_no_per_instance_dict() -> None:
    """A server holds one engine per connection, idle ones too: each ``__dict__`` was
    about 170 bytes, and the decoder's own table of classes 570 (tracemalloc)."""
    engine = Connection(Sender.SERVER)
    assert not hasattr(engine, "__dict__")
    assert not hasattr(engine._decoder, "__dict__")
    assert isinstance(engine._unanswered, list)
