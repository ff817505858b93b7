"""The protocol engine, ``wire.Connection``, with no socket: a server and a client engine
joined by handing bytes across, in the manner of h11's ``tests/test_state.py``.

Covers the state table (every request in every state), HELLO first, request-id
allocation and matching, the shutdown mode, the failed-login count, fatal errors on
either side, and that a caller breaking a rule gets ``LocalProtocolError``.
"""

from __future__ import annotations

import pytest

from tests.helpers import DEMO_ACCOUNT, DEMO_PIN, OTHER_ACCOUNT, txn_id
from wire import (
    PERMITTED,
    REFUSAL,
    Answer,
    Balance,
    BalanceReply,
    ChangePin,
    Connection,
    Deposit,
    DepositReply,
    Error,
    Features,
    Hello,
    History,
    LocalProtocolError,
    Login,
    Logout,
    LogoutReply,
    Ping,
    PingReply,
    RemoteProtocolError,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    State,
    Status,
    Transfer,
    Withdraw,
    encode,
)
from wire._codec import frame_bytes
from wire._messages import Opcode, reply_type

HELLO = Hello(
    payload_bytes_max=1024, history_entries_max=20, amount_cents_max=10_000_000,
    frame_timeout_s=10, login_timeout_s=30, idle_timeout_s=120,
)

TOKEN = bytes(range(16))

ALL_REQUESTS: list[Request] = [
    Login(DEMO_ACCOUNT, DEMO_PIN), Logout(), Balance(), Deposit(txn_id(), 100),
    Withdraw(txn_id(), 100), History(5), Ping(), Resume(DEMO_ACCOUNT, TOKEN),
    Transfer(txn_id(), 100, OTHER_ACCOUNT), ChangePin(DEMO_PIN, "2580"), Features(3),
]


class Pair:
    """A server engine and a client engine, each frame handed across as bytes."""

    def __init__(self, *, login_attempts_max: int | None = 3) -> None:
        self.server = Connection(Sender.SERVER, login_attempts_max=login_attempts_max)
        self.client = Connection(Sender.CLIENT)

    def to_client(self, data: bytes) -> object:
        self.client.receive_data(data)
        return self.client.next_event()

    def to_server(self, data: bytes) -> object:
        self.server.receive_data(data)
        return self.server.next_event()

    def greet(self) -> None:
        self.to_client(self.server.send(HELLO))

    def exchange(self, request: Request, status: Status = Status.APPROVED) -> None:
        """The client asks, the server answers ``status`` (or its refusal)."""
        frame = self.to_server(self.client.send(request))
        assert frame is not None
        refused = self.server.refusal(request)
        reply = reply_type(request)(refused if refused is not None else status)
        answer = self.to_client(self.server.send(reply))
        assert answer is not None

    def assert_state(self, state: State) -> None:
        assert self.server.state is state
        assert self.client.state is state


def logged_in() -> Pair:
    pair = Pair()
    pair.greet()
    pair.exchange(Login(DEMO_ACCOUNT, DEMO_PIN))
    return pair


def test_both_sides_start_opening_and_hello_connects_them() -> None:
    pair = Pair()
    pair.assert_state(State.OPENING)
    pair.greet()
    pair.assert_state(State.CONNECTED)
    assert pair.client.hello == HELLO == pair.server.hello


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.OPCODE.name)
@pytest.mark.parametrize("state", [State.CONNECTED, State.AUTHENTICATED])
def test_every_request_in_every_state_follows_the_table(request_: Request, state: State) -> None:
    pair = logged_in() if state is State.AUTHENTICATED else Pair()
    if state is State.CONNECTED:
        pair.greet()
    pair.to_server(pair.client.send(request_))
    expected = None if type(request_) in PERMITTED[state] else REFUSAL[state]
    assert pair.server.refusal(request_) is expected


def test_a_refused_request_must_get_exactly_its_refusal() -> None:
    pair = Pair()
    pair.greet()
    pair.to_server(pair.client.send(Balance()))
    with pytest.raises(LocalProtocolError, match="NOT_LOGGED_IN"):
        pair.server.send(BalanceReply(Status.APPROVED, 5))
    pair.to_client(pair.server.send(BalanceReply(Status.NOT_LOGGED_IN)))
    pair.assert_state(State.CONNECTED)


def test_an_approved_login_authenticates_and_logout_closes() -> None:
    pair = logged_in()
    pair.assert_state(State.AUTHENTICATED)
    pair.exchange(Login(DEMO_ACCOUNT, DEMO_PIN))  # refused: ALREADY_LOGGED_IN
    pair.assert_state(State.AUTHENTICATED)
    pair.exchange(Logout())
    pair.assert_state(State.CLOSED)


def test_logout_before_login_closes_too() -> None:
    pair = Pair()
    pair.greet()
    pair.exchange(Logout())
    pair.assert_state(State.CLOSED)


@pytest.mark.parametrize(
    "status", [Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED, Status.ACCOUNT_IN_USE]
)
def test_the_server_closes_after_login_attempts_max_refused_logins(status: Status) -> None:
    pair = Pair(login_attempts_max=3)
    pair.greet()
    for _ in range(2):
        pair.exchange(Login(DEMO_ACCOUNT, "0000"), status)
        assert pair.server.state is State.CONNECTED
    pair.exchange(Login(DEMO_ACCOUNT, "0000"), status)
    assert pair.server.state is State.CLOSED
    assert pair.client.state is State.CONNECTED  # the client learns it from the close


def test_logins_answered_unavailable_do_not_count() -> None:
    pair = Pair(login_attempts_max=1)
    pair.greet()
    for _ in range(3):
        pair.exchange(Login(DEMO_ACCOUNT, DEMO_PIN), Status.ISSUER_UNAVAILABLE)
    assert pair.server.state is State.CONNECTED


def test_shutdown_refuses_everything_but_logout() -> None:
    pair = logged_in()
    pair.server.begin_shutdown()
    assert pair.server.refusal(Balance()) is Status.ISSUER_UNAVAILABLE
    assert pair.server.refusal(Logout()) is None
    assert not pair.client.shutting_down
    pair.to_client(pair.server.send(Shutdown(10)))
    assert pair.client.shutting_down
    assert pair.client.refusal(Deposit(txn_id(), 5)) is Status.ISSUER_UNAVAILABLE
    pair.exchange(Balance())
    pair.exchange(Logout())
    pair.assert_state(State.CLOSED)


def test_session_expired_closes_both_sides() -> None:
    pair = logged_in()
    pair.to_client(pair.server.send(SessionExpired()))
    pair.assert_state(State.CLOSED)


def test_system_malfunction_closes_both_sides() -> None:
    pair = logged_in()
    pair.exchange(Balance(), Status.SYSTEM_MALFUNCTION)
    pair.assert_state(State.CLOSED)


@pytest.mark.parametrize(
    ("status", "state"),
    [(Status.INVALID_TRANSACTION, State.AUTHENTICATED), (Status.FORMAT_ERROR, State.CLOSED)],
)
def test_an_error_notice_closes_unless_it_concerns_one_frame(status: Status, state: State) -> None:
    pair = logged_in()
    pair.to_client(pair.server.send(Error(status)))
    pair.assert_state(state)


def test_client_request_ids_count_from_one_and_skip_zero_when_they_wrap() -> None:
    client = Connection(Sender.CLIENT)
    first = client.send(Ping())
    assert first == encode(Ping(), 1)
    client._last_request_id = 2**32 - 2  # near the counter's end, without 4 billion sends
    assert client.send(Ping()) == encode(Ping(), 2**32 - 1)
    assert client.send(Ping()) == encode(Ping(), 1)


def test_pipelined_replies_are_matched_in_order() -> None:
    pair = logged_in()
    requests = [Balance(), Ping(), History(3)]
    data = b"".join(pair.client.send(request) for request in requests)
    pair.server.receive_data(data)
    replies = b""
    for request in requests:
        frame = pair.server.next_event()
        assert frame is not None and frame.message == request
        replies += pair.server.send(reply_type(request)(Status.APPROVED))
    pair.client.receive_data(replies)
    got = [pair.client.next_event() for _ in requests]
    assert [frame.request_id for frame in got if frame is not None] == [2, 3, 4]


def test_a_server_answers_before_it_reads_on() -> None:
    pair = logged_in()
    pair.server.receive_data(pair.client.send(Ping()) + pair.client.send(Ping()))
    assert pair.server.next_event() is not None
    with pytest.raises(LocalProtocolError, match="not answered"):
        pair.server.next_event()


@pytest.mark.parametrize(
    ("reply_id", "reply", "match"),
    [
        (9, PingReply(Status.APPROVED), "out of order"),
        (2, LogoutReply(Status.APPROVED), "answered with"),
    ],
)
def test_a_client_refuses_a_reply_that_answers_nothing(reply_id: int, reply, match: str) -> None:
    pair = logged_in()
    pair.client.send(Ping())
    pair.client.receive_data(encode(reply, reply_id))
    with pytest.raises(RemoteProtocolError, match=match):
        pair.client.next_event()
    assert pair.client.state is State.CLOSED


def test_a_reply_with_nothing_asked_is_refused() -> None:
    pair = logged_in()
    pair.client.receive_data(encode(PingReply(Status.APPROVED), 7))
    with pytest.raises(RemoteProtocolError, match="answers no request"):
        pair.client.next_event()


def test_a_client_refuses_a_first_frame_that_is_not_hello() -> None:
    client = Connection(Sender.CLIENT)
    client.receive_data(encode(Shutdown(5)))
    with pytest.raises(RemoteProtocolError, match="not HELLO"):
        client.next_event()
    assert client.state is State.CLOSED and client.hello is None


def test_a_busy_refusal_instead_of_hello_closes_the_client() -> None:
    client = Connection(Sender.CLIENT)
    client.receive_data(Connection(Sender.SERVER).send(Error(Status.SERVER_BUSY)))
    frame = client.next_event()
    assert frame is not None and frame.message == Error(Status.SERVER_BUSY)
    assert client.state is State.CLOSED


def test_an_error_for_a_frame_we_did_not_send_is_passed_on_without_answering_ours() -> None:
    pair = logged_in()
    pair.client.send(Ping())
    pair.to_client(encode(Error(Status.INVALID_TRANSACTION), 77))
    pair.client.receive_data(encode(PingReply(Status.APPROVED), 2))
    frame = pair.client.next_event()
    assert frame is not None and frame.request_id == 2


def test_a_fatal_bad_frame_closes_the_server_after_one_error() -> None:
    pair = logged_in()
    pair.server.receive_data(b"XX" + bytes(20))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.server.next_event()
    assert caught.value.fatal and pair.server.state is State.CLOSED
    assert pair.server.send_error(caught.value) == encode(Error(Status.FORMAT_ERROR))
    with pytest.raises(LocalProtocolError):
        pair.server.send_error(caught.value)
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.server.send(SessionExpired())


def test_an_unknown_opcode_is_refused_with_its_id_and_the_session_goes_on() -> None:
    pair = logged_in()
    pair.server.receive_data(frame_bytes(0x55, 41, b""))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.server.next_event()
    assert not caught.value.fatal
    assert pair.server.send_error(caught.value) == encode(Error(Status.INVALID_TRANSACTION), 41)
    pair.to_client(encode(Error(Status.INVALID_TRANSACTION), 41))
    pair.exchange(Ping())
    pair.assert_state(State.AUTHENTICATED)


@pytest.mark.parametrize(
    "message", [Ping(), PingReply(Status.APPROVED), Shutdown(5)], ids=lambda m: m.OPCODE.name
)
def test_a_server_sends_hello_before_anything_else(message) -> None:
    server = Connection(Sender.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(message)


def test_hello_is_sent_once() -> None:
    pair = Pair()
    pair.greet()
    with pytest.raises(LocalProtocolError, match="once"):
        pair.server.send(HELLO)


def test_a_client_sends_only_requests_and_nothing_once_closed() -> None:
    client = Connection(Sender.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(PingReply(Status.APPROVED))
    client.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        client.send(Ping())


def test_a_reply_of_the_wrong_type_is_a_local_error_on_the_server() -> None:
    pair = logged_in()
    pair.to_server(pair.client.send(Balance()))
    with pytest.raises(LocalProtocolError, match="cannot be answered"):
        pair.server.send(PingReply(Status.APPROVED))


def test_a_reply_with_no_request_is_a_local_error_on_the_server() -> None:
    pair = logged_in()
    with pytest.raises(LocalProtocolError, match="answers no request"):
        pair.server.send(PingReply(Status.APPROVED))


def test_every_opcode_is_in_the_engine_or_a_notice() -> None:
    requests = {type(request) for request in ALL_REQUESTS}
    assert requests == set().union(*PERMITTED.values())
    assert {Opcode(cls.OPCODE) for cls in requests} == {
        op for op in Opcode if op < 0x80
    }


def test_a_client_answer_pairs_the_reply_with_its_request() -> None:
    pair = logged_in()
    deposit = Deposit(txn_id(), 250)
    pair.to_server(pair.client.send(deposit))
    answer = pair.to_client(pair.server.send(DepositReply(Status.APPROVED, 1, 1, 1)))
    assert isinstance(answer, Answer)
    assert answer.request is deposit and answer.request_id == pair.client.last_request_id


def test_a_server_may_answer_the_request_in_hand_with_an_error() -> None:
    pair = logged_in()
    pair.to_server(pair.client.send(Ping()))
    answer = pair.to_client(pair.server.send(Error(Status.INVALID_TRANSACTION)))
    assert isinstance(answer, Answer) and answer.message == Error(Status.INVALID_TRANSACTION)
    pair.assert_state(State.AUTHENTICATED)


def test_trailing_data_is_what_no_event_was_made_of() -> None:
    client = Connection(Sender.CLIENT)
    hello = encode(HELLO)
    client.receive_data(hello + hello[:7])
    assert client.next_event() is not None
    assert client.trailing_data == hello[:7]


def test_an_approved_resume_authenticates_and_the_token_reaches_the_client() -> None:
    pair = Pair()
    pair.greet()
    pair.exchange(Resume(DEMO_ACCOUNT, TOKEN))
    pair.assert_state(State.AUTHENTICATED)
    assert pair.client.session_token is None
    pair.to_client(pair.server.send(SessionToken(bytes(16))))
    assert pair.client.session_token == bytes(16) == pair.server.session_token
    pair.exchange(Logout())
    assert pair.client.session_token is None  # it dies with the session


def test_resumes_with_a_token_that_opens_nothing_count_as_failed_logins() -> None:
    pair = Pair(login_attempts_max=2)
    pair.greet()
    pair.exchange(Resume(DEMO_ACCOUNT, TOKEN), Status.UNKNOWN_SESSION)
    assert pair.server.state is State.CONNECTED
    pair.exchange(Resume(DEMO_ACCOUNT, TOKEN), Status.UNKNOWN_SESSION)
    assert pair.server.state is State.CLOSED


def test_a_session_token_is_only_for_an_authenticated_session() -> None:
    pair = Pair()
    pair.greet()
    with pytest.raises(LocalProtocolError, match="authenticated"):
        pair.server.send(SessionToken(TOKEN))


def test_a_resume_while_logged_in_is_refused_already_logged_in() -> None:
    pair = logged_in()
    pair.to_server(pair.client.send(Resume(DEMO_ACCOUNT, TOKEN)))
    assert pair.server.refusal(Resume(DEMO_ACCOUNT, TOKEN)) is Status.ALREADY_LOGGED_IN
    pair.to_client(pair.server.send(ResumeReply(Status.ALREADY_LOGGED_IN)))
    pair.assert_state(State.AUTHENTICATED)
