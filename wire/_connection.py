"""The protocol engine: one side of one connection, with no I/O (in the manner of h11).

Bytes in with ``receive_data``, events out with ``next_event``; messages in with
``send``, bytes out. The caller moves the bytes (over TCP, TLS, a memory stream, or a
fuzzer's buffer); this class owns everything else about the conversation:

- HELLO first: the server greets before anything else, and a client refuses a first
  frame that is neither HELLO nor an ERROR;
- request ids: a client's come from a counter (1, 2, ... wrapping before 2**32; 0 is
  for notices), and each reply must answer the oldest unanswered request, with that
  request's reply type (the server answers strictly in order);
- the state table of ``wire._state`` (OPENING, CONNECTED, AUTHENTICATED, CLOSED) and the
  shutdown mode, kept by both roles from the frames the server sends;
- which refusal answers a request that its state does not permit, and that the server
  sends exactly that refusal;
- after a fatal error, either side's, the connection is CLOSED.

Errors name whose fault they are: ``RemoteProtocolError`` for what the peer sent (its
``status`` is what the server answers with, and ``fatal`` says whether the byte stream
is still usable), ``LocalProtocolError`` for a caller that broke a rule (a bug).
"""

from __future__ import annotations

from dataclasses import dataclass

from wire._codec import Decoder, Frame, encode
from wire._errors import WireError
from wire._limits import PAYLOAD_BYTES_MAX, REQUEST_ID_MAX
from wire._messages import (
    Error,
    Hello,
    LoginReply,
    Message,
    Notice,
    Reply,
    Request,
    ResumeReply,
    Sender,
    SessionToken,
    Shutdown,
    reply_type,
)
from wire._state import (
    LOGIN_FAILURES,
    PERMITTED_WHILE_SHUTTING_DOWN,
    RULES,
    SHUTDOWN_REFUSAL,
    State,
    next_state,
)
from wire._status import Status

# Enum members as module constants: read through its class, a member costs about 55 ns
# more than a global (timeit, CPython 3.11), and every request reads several.
_OPENING = State.OPENING
_AUTHENTICATED = State.AUTHENTICATED
_CLOSED = State.CLOSED
_LOGIN_REPLIES = (LoginReply, ResumeReply)


class LocalProtocolError(WireError):
    """Our side tried to break the protocol: a bug in the caller, never the peer's doing."""

    def __init__(self, detail: str) -> None:
        super().__init__(Status.SYSTEM_MALFUNCTION, detail)


class RemoteProtocolError(WireError):
    """The peer broke the protocol. ``status`` is what a server answers it with (in an
    ERROR frame carrying ``request_id``); after a ``fatal`` one the connection is CLOSED."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A client's event: the server's answer to one of our requests, paired with it.

    ``message`` is the request's reply type, or an ERROR (whose status is never
    APPROVED, so checking ``status`` covers both)."""

    request_id: int
    request: Request
    message: Reply | Error


_Unanswered = tuple[int, Request, Status | None]
"""A request not answered yet: its id, itself, and what the state table answered when it
arrived (server side only). A plain tuple: a NamedTuple's constructor, a Python call,
cost 0.3 us per request (timeit)."""


class Connection:
    """One side of one connection: ``Connection(Sender.SERVER)`` is the bank's,
    ``Connection(Sender.CLIENT)`` an ATM's.

    ``login_attempts_max`` is the server's: after that many LOGINs refused as
    ``wire._state.LOGIN_FAILURES`` the connection is CLOSED. A client cannot know it
    (HELLO does not announce it) and learns of it when the server closes.

    A server holds one per connection, idle sessions included, hence ``__slots__`` and
    a list for the unanswered requests (a server has at most one): an empty deque is
    760 bytes, an empty list 56.
    """

    __slots__ = (
        "_decoder",
        "_error_to_report",
        "_failed_logins",
        "_is_server",
        "_last_request_id",
        "_login_attempts_max",
        "_rules",
        "_unanswered",
        "hello",
        "our_role",
        "session_token",
        "shutting_down",
        "state",
        "their_role",
    )

    def __init__(
        self,
        our_role: Sender,
        *,
        payload_bytes_max: int = PAYLOAD_BYTES_MAX,
        login_attempts_max: int | None = None,
    ) -> None:
        self.our_role = our_role
        self.their_role = Sender.SERVER if our_role is Sender.CLIENT else Sender.CLIENT
        self.state = State.OPENING
        self._is_server = our_role is Sender.SERVER
        self._rules = RULES[self.state]
        """The current state's rows of the tables (``wire._state.RULES``): taken again
        whenever ``state`` is not theirs."""
        self.shutting_down = False
        """True once a shutdown has begun: only LOGOUT is served from then on."""
        self.hello: Hello | None = None
        """The server's greeting, once sent (server) or received (client)."""
        self.session_token: bytes | None = None
        """The token that resumes this session (SESSION_TOKEN), once sent or received;
        None again when the session closes."""
        self._decoder = Decoder(self.their_role, payload_bytes_max=payload_bytes_max)
        self._login_attempts_max = login_attempts_max
        self._failed_logins = 0
        self._unanswered: list[_Unanswered] = []
        self._last_request_id = 0
        self._error_to_report: RemoteProtocolError | None = None

    # -- Bytes in, events out ----------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet consumed: non-zero means a frame has begun."""
        return self._decoder.buffered_bytes

    @property
    def trailing_data(self) -> bytes:
        """The bytes received but not yet made into events, for a caller that hands the
        byte stream over to something else (as h11's ``trailing_data``)."""
        return self._decoder.unconsumed

    @property
    def last_request_id(self) -> int:
        """The request id of the request this client sent last (0 before the first)."""
        return self._last_request_id

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes as they arrived; then call ``next_event`` until it returns None."""
        self._decoder.receive_data(data)

    def next_event(self) -> Frame | Answer | None:
        """The next frame the peer sent, checked against the conversation; None if more
        bytes are needed. Raises ``RemoteProtocolError``.

        A server gets each request as a ``Frame`` and must answer it (``send``) before
        asking for the next. A client gets the answer to its oldest request as an
        ``Answer``, and notices (request id 0) and ERRORs about other frames as ``Frame``.
        """
        if self._is_server and self._unanswered:
            raise LocalProtocolError("the last request is not answered yet")
        try:
            frame = self._decoder.next_frame()
        except WireError as error:
            raise self._remote_error(
                error.status, error.detail, fatal=error.fatal, request_id=error.request_id
            ) from None
        if frame is None:
            return None
        if self._is_server:
            request = frame.message
            assert isinstance(request, Request), "a server's decoder yields only requests"
            self._unanswered.append((frame.request_id, request, self.refusal(request)))
            return frame
        return self._server_frame_received(frame)

    def _server_frame_received(self, frame: Frame) -> Frame | Answer:
        message = frame.message
        if self.state is _OPENING and not isinstance(message, (Hello, Error)):
            raise self._remote_error(
                Status.FORMAT_ERROR, f"the server opened with {message.OPCODE.name}, not HELLO"
            )
        event: Frame | Answer = frame
        if isinstance(message, Error):
            # An ERROR answers the frame its id names, which may be one we did not send
            # as a request (it was damaged on the way): it answers our oldest only if the
            # id matches.
            if self._unanswered and frame.request_id == self._unanswered[0][0]:
                event = Answer(frame.request_id, self._unanswered.pop(0)[1], message)
        elif isinstance(message, Reply):
            self._check_answer(frame.request_id, message)
            event = Answer(frame.request_id, self._unanswered.pop(0)[1], message)
        self._server_said(message)
        return event

    def _check_answer(self, request_id: int, reply: Reply) -> None:
        if not self._unanswered:
            raise self._remote_error(
                Status.FORMAT_ERROR, f"{reply.OPCODE.name} {request_id} answers no request"
            )
        oldest_id, oldest, _ = self._unanswered[0]
        if request_id != oldest_id:
            raise self._remote_error(
                Status.FORMAT_ERROR,
                f"{reply.OPCODE.name} {request_id} out of order: {oldest_id} is unanswered",
            )
        if type(reply) is not reply_type(oldest):
            raise self._remote_error(
                Status.FORMAT_ERROR,
                f"{oldest.OPCODE.name} answered with {reply.OPCODE.name}",
            )

    def _remote_error(
        self, status: Status, detail: str, *, fatal: bool = True, request_id: int = 0
    ) -> RemoteProtocolError:
        error = RemoteProtocolError(status, detail, fatal=fatal, request_id=request_id)
        if fatal:
            self.state = _CLOSED
            self._unanswered.clear()
            self._error_to_report = error
        return error

    # -- Messages in, bytes out --------------------------------------------------------

    def refusal(self, request: Request) -> Status | None:
        """What the state table answers ``request`` with now, or None if it is served:
        ``wire._state.refusal``, through the current state's rows."""
        if self.shutting_down and type(request) not in PERMITTED_WHILE_SHUTTING_DOWN:
            return SHUTDOWN_REFUSAL
        rules = self._rules
        if rules.state is not self.state:
            rules = self._rules = RULES[self.state]
        return None if type(request) in rules.permitted else rules.refused_with

    def send(self, message: Message) -> bytes:
        """The frame for ``message``, after checking that this side may send it now.

        A client's request gets the next request id; a server's reply answers the
        request ``next_event`` returned last. Raises ``LocalProtocolError``.
        """
        if self.state is _CLOSED:
            raise LocalProtocolError(f"cannot send {message.OPCODE.name}: the connection is closed")
        if self._is_server:
            return self._send_as_server(message)
        return self._send_request(message)

    def _send_request(self, request: Message) -> bytes:
        if not isinstance(request, Request):
            raise LocalProtocolError(f"a client does not send {request.OPCODE.name}")
        self._last_request_id = self._last_request_id % REQUEST_ID_MAX + 1
        data = self._encode(request, self._last_request_id)
        self._unanswered.append((self._last_request_id, request, None))
        return data

    def _send_as_server(self, message: Message) -> bytes:
        if self.state is _OPENING and not isinstance(message, (Hello, Error)):
            raise LocalProtocolError(f"{message.OPCODE.name} before HELLO")
        if isinstance(message, Reply) or (isinstance(message, Error) and self._unanswered):
            request_id = self._answer(message)
        elif isinstance(message, (Notice, Error)):
            if isinstance(message, Hello) and self.state is not _OPENING:
                raise LocalProtocolError("HELLO is sent once, first")
            if isinstance(message, SessionToken) and self.state is not _AUTHENTICATED:
                raise LocalProtocolError("a SESSION_TOKEN is for an authenticated session")
            request_id = 0
        else:
            raise LocalProtocolError(f"a server does not send {message.OPCODE.name}")
        data = self._encode(message, request_id)
        self._server_said(message)
        return data

    def _answer(self, reply: Reply | Error) -> int:
        """Check ``reply`` answers the unanswered request as the state table says, and
        take that request off the queue; its id is the reply's. An ERROR answers the
        request in hand whatever it was (a server that could not make sense of it)."""
        if not self._unanswered:
            raise LocalProtocolError(f"{reply.OPCODE.name} answers no request")
        request_id, request, status = self._unanswered[0]
        if isinstance(reply, Error):
            self._unanswered.pop()
            return request_id
        if type(reply) is not reply_type(request):
            raise LocalProtocolError(
                f"{request.OPCODE.name} cannot be answered with {reply.OPCODE.name}"
            )
        if status is not None and reply.status is not status:
            raise LocalProtocolError(
                f"{request.OPCODE.name} must be refused with {status.name} in {self.state.name}"
            )
        self._unanswered.pop()  # a server's only one: it reads no request before answering
        if isinstance(reply, _LOGIN_REPLIES) and reply.status in LOGIN_FAILURES:
            self._failed_logins += 1
        return request_id

    def send_error(self, error: RemoteProtocolError) -> bytes:
        """The server's ERROR frame for ``error``, the last ``next_event`` raised: its
        status and the offending frame's id. After a fatal one, nothing more is sent."""
        if not self._is_server:
            raise LocalProtocolError("only a server answers a bad frame")
        if error.fatal:
            if error is not self._error_to_report:
                raise LocalProtocolError("an ERROR for a fatal error is sent once, last")
            self._error_to_report = None
        elif self.state is _CLOSED:
            raise LocalProtocolError("cannot send ERROR: the connection is closed")
        return self._encode(Error(error.status), error.request_id)

    def begin_shutdown(self) -> None:
        """The server has decided to shut down: from now on only LOGOUT is served.
        Send ``Shutdown`` to tell the client; it would begin the shutdown too."""
        self.shutting_down = True

    def close(self) -> None:
        """Our side ends the connection (a deadline, a lost peer): nothing more is sent."""
        self.state = _CLOSED
        self._unanswered.clear()

    # -- Shared ------------------------------------------------------------------------

    def _server_said(self, message: Message) -> None:
        """Move the state as ``message``, sent by the server, moves both sides:
        ``wire._state.next_state``, through the current state's rows."""
        if not isinstance(message, Reply):  # a reply is none of these: one test for it
            if isinstance(message, Hello) and self.hello is None:
                self.hello = message
            if isinstance(message, Shutdown):
                self.shutting_down = True
            if isinstance(message, SessionToken) and self.state is _AUTHENTICATED:
                self.session_token = message.token
        rules = self._rules
        if rules.state is not self.state:
            rules = self._rules = RULES[self.state]
        moves = rules.moves.get(type(message))
        if moves is None:
            self.state = next_state(self.state, message)
        else:
            self.state = moves.get(getattr(message, "status", None), self.state)
        if (
            self._login_attempts_max is not None
            and self._failed_logins >= self._login_attempts_max
        ):
            self.state = _CLOSED
        if self.state is _CLOSED:
            self._unanswered.clear()
            self.session_token = None

    def _encode(self, message: Message, request_id: int) -> bytes:
        try:
            return encode(message, request_id)
        except WireError as error:
            detail = f"cannot encode {message.OPCODE.name}: {error.detail}"
            raise LocalProtocolError(detail) from None
