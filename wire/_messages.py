"""The protocol's messages as frozen dataclasses, one per opcode.

A message validates itself on construction, so one that exists can be encoded: the
encoder never truncates, and the decoder builds messages through the same checks.
Field order follows the wire layout in ``wire._layout`` (checked at import).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum, IntFlag
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any, ClassVar, TypeVar, cast

from construct import Struct

from wire import _layout as layout
from wire._credentials import canonical_account, check_pin
from wire._errors import WireError
from wire._limits import (
    AMOUNT_CENTS_MAX,
    BALANCE_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    PAYLOAD_BYTES_MAX,
    REQUEST_ID_MAX,
    SECONDS_MAX,
    SESSION_TOKEN_BYTES,
    TXN_ID_BYTES,
)
from wire._status import Status


class Opcode(IntEnum):
    """Byte 3 of a frame. A reply's opcode is its request's with the high bit set."""

    LOGIN = 0x01
    LOGOUT = 0x02
    BALANCE = 0x03
    DEPOSIT = 0x04
    WITHDRAW = 0x05
    HISTORY = 0x06
    PING = 0x07
    RESUME = 0x08
    TRANSFER = 0x09
    CHANGE_PIN = 0x0A
    FEATURES = 0x0B
    LOGIN_REPLY = 0x81
    LOGOUT_REPLY = 0x82
    BALANCE_REPLY = 0x83
    DEPOSIT_REPLY = 0x84
    WITHDRAW_REPLY = 0x85
    HISTORY_REPLY = 0x86
    PING_REPLY = 0x87
    RESUME_REPLY = 0x88
    TRANSFER_REPLY = 0x89
    CHANGE_PIN_REPLY = 0x8A
    FEATURES_REPLY = 0x8B
    HELLO = 0xC0
    SHUTDOWN = 0xC1
    SESSION_EXPIRED = 0xC2
    SESSION_TOKEN = 0xC3
    ERROR = 0xFF


REPLY_BIT = 0x80


class Sender(Enum):
    CLIENT = "client"
    SERVER = "server"


class EntryKind(IntEnum):
    """What a ledger entry in a HISTORY reply did to the balance.

    A transfer books two entries under one transaction id: TRANSFER_OUT on the source
    account, TRANSFER_IN on the destination. A client that announced no transfer support
    is never sent kinds 3 and 4 (spec/PROTOCOL.md section 3.16)."""

    DEPOSIT = 1
    WITHDRAWAL = 2
    TRANSFER_OUT = 3
    TRANSFER_IN = 4


class Feature(IntFlag):
    """The optional parts of version 1, one bit each in FEATURES and FEATURES_REPLY.

    They came after the rest of version 1. A client that never sends FEATURES is served
    as before them: it is never sent what it might not decode (spec section 3.16)."""

    TRANSFER = 0x01
    """TRANSFER, and entry kinds TRANSFER_OUT and TRANSFER_IN in HISTORY_REPLY."""
    CHANGE_PIN = 0x02
    """CHANGE_PIN."""
    FREQUENCY_LIMIT = 0x04
    """Status EXCEEDS_FREQUENCY_LIMIT (65) in TRANSFER_REPLY: a strict client from before
    it would take the unknown status byte for a malformed frame (spec §4), so a server
    tells a client that did not announce it EXCEEDS_WITHDRAWAL_LIMIT instead."""


ALL_FEATURES = Feature.TRANSFER | Feature.CHANGE_PIN | Feature.FREQUENCY_LIMIT

ANY_REQUEST_ID = range(0, REQUEST_ID_MAX + 1)
NONZERO_REQUEST_ID = range(1, REQUEST_ID_MAX + 1)
NOTICE_REQUEST_ID = range(0, 1)


def _check_int(
    name: str, value: object, valid: range, status: Status = Status.FORMAT_ERROR, *,
    fatal: bool = True,
) -> None:
    if type(value) is not int:  # bool and float are refused: money is int cents.
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value not in valid:
        raise WireError(
            status, f"{name}={value} outside {valid.start}..{valid.stop - 1}", fatal=fatal
        )


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise WireError(Status.FORMAT_ERROR, f"{name} is {len(value)} bytes, not {size}")


E = TypeVar("E", bound=IntEnum)


def _as_enum(enum: type[E], name: str, value: object) -> E:
    if type(value) is not int and not isinstance(value, enum):
        raise TypeError(f"{name} must be an int or {enum.__name__}")
    # A dict lookup, not ``enum(value)``: every reply's status comes through here, and
    # the enum call costs 0.36 us against 0.04 us (timeit, CPython 3.11).
    member = _MEMBERS[enum].get(value)
    if member is None:
        raise WireError(Status.FORMAT_ERROR, f"{name}={value} is not a {enum.__name__}")
    return member  # type: ignore[return-value]  # _MEMBERS[enum] holds only enum's members


_MEMBERS: dict[type[IntEnum], dict[int, IntEnum]] = {
    enum: {member.value: member for member in enum} for enum in (Status, EntryKind)
}


AMOUNT_CENTS = range(1, AMOUNT_CENTS_MAX + 1)
BALANCE_CENTS = range(0, BALANCE_CENTS_MAX + 1)
ENTRY_ID = range(1, BALANCE_CENTS_MAX + 1)
TIME_MS = range(0, BALANCE_CENTS_MAX + 1)
SECONDS = range(1, SECONDS_MAX + 1)
HISTORY_COUNT = range(1, HISTORY_ENTRIES_MAX + 1)
"""Entries a HISTORY may ask for (a constant: a range built per request cost 0.08 us)."""
FEATURE_BITS = range(0, 0xFF + 1)
"""A FEATURES byte: any of its 8 bits; bits no Feature names yet are allowed, and a
server answers only those it serves (spec section 3.16)."""


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages. Subclasses set the class variables below."""

    OPCODE: ClassVar[Opcode]
    LAYOUT: ClassVar[Struct]
    FAST: ClassVar[layout.FastLayout]
    SENDER: ClassVar[Sender]
    REQUEST_IDS: ClassVar[range]
    VALUES_OF: ClassVar[Callable[[Message], tuple[Any, ...]]]
    """Reads the fields ``FAST.names`` lists, as a tuple; set per class at registration."""
    FRAMING: ClassVar[tuple[struct.Struct, int] | None]
    """``FAST.framing()`` for a layout without an array (None for one with): what
    ``wire.encode`` packs header and payload with. Set per class at registration."""
    DECODE: ClassVar[Callable[[bytes], Message]]
    """``from_payload`` with the fewest calls (``_payload_decoder``): the decoder's path.
    Set per class at registration."""

    def wire_values(self) -> tuple[Any, ...]:
        """Field values in wire order, as the layout packs them."""
        return self.VALUES_OF(self)  # type: ignore[call-arg]  # a staticmethod (_register)

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> Message:
        return cls(*values)

    @classmethod
    def from_payload(cls, payload: bytes) -> Message:
        """The message a payload carries, checked as ``from_wire`` checks it: the decoder's
        entry point. Raises ``struct.error`` if the payload does not fit the layout."""
        return cls.from_wire(cls.FAST.unpack(payload))


# -- Requests (client to server) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request(Message):
    SENDER = Sender.CLIENT
    REQUEST_IDS = NONZERO_REQUEST_ID


@dataclass(frozen=True, slots=True)
class Login(Request):
    """Open a session: account number (any letter case, kept upper) and PIN."""

    OPCODE = Opcode.LOGIN
    LAYOUT = layout.LOGIN

    account: str
    pin: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.account, str) or not isinstance(self.pin, str):
            raise TypeError("account and pin must be str")
        object.__setattr__(self, "account", canonical_account(self.account))
        check_pin(self.pin)

    def wire_values(self) -> tuple[Any, ...]:
        return self.account.encode("ascii"), self.pin.encode("ascii")

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> Login:
        account, pin = values
        # Latin-1 turns every byte into one character, so a non-ASCII byte reaches the
        # format check (which admits only ASCII) and gets the same refusal as any other
        # malformed account or PIN, not a UnicodeDecodeError.
        return cls(account.decode("latin-1"), pin.decode("latin-1"))


@dataclass(frozen=True, slots=True)
class Resume(Request):
    """Take over this ATM's own session from a new connection: the account and the token
    the server gave it (SESSION_TOKEN). No PIN: the token stands for the login it follows."""

    OPCODE = Opcode.RESUME
    LAYOUT = layout.RESUME

    account: str
    token: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.account, str):
            raise TypeError("account must be str")
        object.__setattr__(self, "account", canonical_account(self.account))
        _check_bytes("token", self.token, SESSION_TOKEN_BYTES)

    def wire_values(self) -> tuple[Any, ...]:
        return self.account.encode("ascii"), self.token

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> Resume:
        account, token = values
        return cls(account.decode("latin-1"), token)  # latin-1: see Login.from_wire


@dataclass(frozen=True, slots=True)
class Logout(Request):
    OPCODE = Opcode.LOGOUT
    LAYOUT = layout.EMPTY


@dataclass(frozen=True, slots=True)
class Balance(Request):
    OPCODE = Opcode.BALANCE
    LAYOUT = layout.EMPTY


@dataclass(frozen=True, slots=True)
class MoneyRequest(Request):
    """A deposit or withdrawal: a client-chosen idempotency key and an amount."""

    LAYOUT = layout.MONEY_REQUEST

    txn_id: bytes
    amount_cents: int

    def __post_init__(self) -> None:
        _check_bytes("txn_id", self.txn_id, TXN_ID_BYTES)
        # An amount out of range is a refused request, not a broken peer: not fatal.
        _check_int("amount_cents", self.amount_cents, AMOUNT_CENTS, Status.INVALID_AMOUNT,
                   fatal=False)


@dataclass(frozen=True, slots=True)
class Deposit(MoneyRequest):
    OPCODE = Opcode.DEPOSIT


@dataclass(frozen=True, slots=True)
class Withdraw(MoneyRequest):
    OPCODE = Opcode.WITHDRAW


@dataclass(frozen=True, slots=True)
class Transfer(Request):
    """Move money from the session's account to another, under one idempotency key.

    Not a MoneyRequest: it names a second account, and books an entry on each."""

    OPCODE = Opcode.TRANSFER
    LAYOUT = layout.TRANSFER

    txn_id: bytes
    amount_cents: int
    to_account: str

    def __post_init__(self) -> None:
        _check_bytes("txn_id", self.txn_id, TXN_ID_BYTES)
        if not isinstance(self.to_account, str):
            raise TypeError("to_account must be str")
        object.__setattr__(self, "to_account", canonical_account(self.to_account))
        # As a deposit's: an amount out of range is a refused request, not fatal.
        _check_int("amount_cents", self.amount_cents, AMOUNT_CENTS, Status.INVALID_AMOUNT,
                   fatal=False)

    def wire_values(self) -> tuple[Any, ...]:
        return self.txn_id, self.amount_cents, self.to_account.encode("ascii")

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> Transfer:
        txn_id, amount_cents, to_account = values
        return cls(txn_id, amount_cents, to_account.decode("latin-1"))  # see Login.from_wire


@dataclass(frozen=True, slots=True)
class ChangePin(Request):
    """Replace the session's PIN: the current one (checked as a LOGIN's) and the new one."""

    OPCODE = Opcode.CHANGE_PIN
    LAYOUT = layout.CHANGE_PIN

    pin: str = field(repr=False)
    new_pin: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pin, str) or not isinstance(self.new_pin, str):
            raise TypeError("pin and new_pin must be str")
        check_pin(self.pin)
        check_pin(self.new_pin)

    def wire_values(self) -> tuple[Any, ...]:
        return self.pin.encode("ascii"), self.new_pin.encode("ascii")

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> ChangePin:
        pin, new_pin = values
        return cls(pin.decode("latin-1"), new_pin.decode("latin-1"))  # see Login.from_wire


@dataclass(frozen=True, slots=True)
class Features(Request):
    """The optional parts of the protocol this client speaks (``Feature`` bits)."""

    OPCODE = Opcode.FEATURES
    LAYOUT = layout.FEATURES

    features: int

    def __post_init__(self) -> None:
        # Any bits: those a server does not know are a later client's, and ignored.
        _check_int("features", self.features, FEATURE_BITS)


@dataclass(frozen=True, slots=True)
class History(Request):
    """Ask for the ``count`` most recent ledger entries of the session's account."""

    OPCODE = Opcode.HISTORY
    LAYOUT = layout.HISTORY

    count: int

    def __post_init__(self) -> None:
        _check_int("count", self.count, HISTORY_COUNT)


@dataclass(frozen=True, slots=True)
class Ping(Request):
    OPCODE = Opcode.PING
    LAYOUT = layout.EMPTY


# -- Replies (server to client, echoing the request id) ------------------------------


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """A reply starts with a status; its other fields are zero unless APPROVED."""

    SENDER = Sender.SERVER
    REQUEST_IDS = NONZERO_REQUEST_ID
    LAYOUT = layout.STATUS_ONLY
    EMPTY_WHEN_REFUSED: ClassVar[tuple[tuple[str, object], ...]] = ()
    """(field, default) pairs after the status; set per class at registration."""

    status: Status

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", _as_enum(Status, "status", self.status))
        if self.status is not Status.APPROVED:
            for name, default in self.EMPTY_WHEN_REFUSED:
                if getattr(self, name) != default:
                    raise WireError(
                        Status.FORMAT_ERROR, f"{name} must be empty in a refused reply"
                    )


@dataclass(frozen=True, slots=True)
class LoginReply(Reply):
    OPCODE = Opcode.LOGIN_REPLY


@dataclass(frozen=True, slots=True)
class ResumeReply(Reply):
    OPCODE = Opcode.RESUME_REPLY


@dataclass(frozen=True, slots=True)
class LogoutReply(Reply):
    OPCODE = Opcode.LOGOUT_REPLY


@dataclass(frozen=True, slots=True)
class PingReply(Reply):
    OPCODE = Opcode.PING_REPLY


@dataclass(frozen=True, slots=True)
class BalanceReply(Reply):
    OPCODE = Opcode.BALANCE_REPLY
    LAYOUT = layout.BALANCE_REPLY

    balance_cents: int = 0

    def __post_init__(self) -> None:
        Reply.__post_init__(self)
        _check_int("balance_cents", self.balance_cents, BALANCE_CENTS)


@dataclass(frozen=True, slots=True)
class MoneyReply(Reply):
    """The outcome of a deposit or withdrawal; when approved, a receipt's data."""

    LAYOUT = layout.MONEY_REPLY

    balance_cents: int = 0
    entry_id: int = 0
    time_ms: int = 0

    def __post_init__(self) -> None:
        Reply.__post_init__(self)
        _check_int("balance_cents", self.balance_cents, BALANCE_CENTS)
        _check_int("time_ms", self.time_ms, TIME_MS)
        if self.status is Status.APPROVED:
            _check_int("entry_id", self.entry_id, ENTRY_ID)


@dataclass(frozen=True, slots=True)
class DepositReply(MoneyReply):
    OPCODE = Opcode.DEPOSIT_REPLY


@dataclass(frozen=True, slots=True)
class WithdrawReply(MoneyReply):
    OPCODE = Opcode.WITHDRAW_REPLY


@dataclass(frozen=True, slots=True)
class TransferReply(MoneyReply):
    """A transfer's receipt: the SOURCE account's entry and balance, never the
    destination's (which the customer may not see)."""

    OPCODE = Opcode.TRANSFER_REPLY


@dataclass(frozen=True, slots=True)
class ChangePinReply(Reply):
    OPCODE = Opcode.CHANGE_PIN_REPLY


@dataclass(frozen=True, slots=True)
class FeaturesReply(Reply):
    """The optional parts both sides speak: the request's bits that this server serves."""

    OPCODE = Opcode.FEATURES_REPLY
    LAYOUT = layout.FEATURES_REPLY

    features: int = 0

    def __post_init__(self) -> None:
        Reply.__post_init__(self)
        _check_int("features", self.features, FEATURE_BITS)


class HistoryEntry(tuple[Any, ...]):
    """One ledger entry: what moved, when, and the balance right after it.

    Validated and immutable like a message, but a tuple of its wire values underneath,
    as a NamedTuple is, so that the decoder can check a reply's entries a column at a
    time and build them all in C. As a frozen dataclass an entry cost about 2 us to
    decode, 42 of the 48 us of a 20-entry HISTORY_REPLY (``python -m wire.bench``),
    against a target of 10 us per frame. Equal only to another HistoryEntry.
    """

    __slots__ = ()

    FIELDS: ClassVar[tuple[str, ...]] = (
        "entry_id", "time_ms", "kind", "amount_cents", "balance_cents"
    )
    """Field names in wire order, as ``dataclasses.fields`` gives them for messages."""

    def __new__(
        cls, entry_id: int, time_ms: int, kind: EntryKind | int, amount_cents: int,
        balance_cents: int,
    ) -> HistoryEntry:
        _check_int("entry_id", entry_id, ENTRY_ID)
        _check_int("time_ms", time_ms, TIME_MS)
        kind = _as_enum(EntryKind, "kind", kind)
        _check_int("amount_cents", amount_cents, AMOUNT_CENTS)
        _check_int("balance_cents", balance_cents, BALANCE_CENTS)
        return tuple.__new__(cls, (entry_id, time_ms, kind.value, amount_cents, balance_cents))

    entry_id = property(itemgetter(0), doc="Its id: unique in the bank, rising with time.")
    time_ms = property(itemgetter(1), doc="When it was committed, ms since the Unix epoch.")
    amount_cents = property(itemgetter(3), doc="How much moved, in cents.")
    balance_cents = property(itemgetter(4), doc="The balance right after it, in cents.")

    @property
    def kind(self) -> EntryKind:
        """Deposit or withdrawal (stored as its wire value, checked on the way in)."""
        return _ENTRY_KINDS[self[2]]

    def __eq__(self, other: object) -> bool:
        return type(other) is HistoryEntry and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)  # copy and pickle rebuild through __new__, checks included

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"HistoryEntry({fields})"

    @classmethod
    def all_from_columns(cls, columns: tuple[tuple[int, ...], ...]) -> tuple[HistoryEntry, ...]:
        """Entries from decoded columns (one tuple per field, in wire order), checked a
        column at a time; the same WireError as ``__new__`` for the first bad value.

        A column is checked with one C call (min, max or a set), and the rows become
        entries without a Python call each. If a check fails the rows are built one by
        one, so the error names the first bad field just as building them singly does.
        """
        entry_ids, times, kinds, amounts, balances = columns
        if not entry_ids:
            return ()
        # Fields are unsigned on the wire: only the lower ends above zero need a min.
        valid = (
            min(entry_ids) >= ENTRY_ID.start
            and max(entry_ids) < ENTRY_ID.stop
            and max(times) < TIME_MS.stop
            and _ENTRY_KIND_VALUES.issuperset(kinds)
            and min(amounts) >= AMOUNT_CENTS.start
            and max(amounts) < AMOUNT_CENTS.stop
            and max(balances) < BALANCE_CENTS.stop
        )
        rows = zip(*columns, strict=True)
        if not valid:
            return tuple(cls(*row) for row in rows)
        return tuple(map(tuple.__new__, repeat(cls), rows))


_ENTRY_KINDS = cast(dict[int, EntryKind], _MEMBERS[EntryKind])
_ENTRY_KIND_VALUES = frozenset(_ENTRY_KINDS)


@dataclass(frozen=True, slots=True)
class HistoryReply(Reply):
    """The most recent entries, newest first."""

    OPCODE = Opcode.HISTORY_REPLY
    LAYOUT = layout.HISTORY_REPLY

    entries: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple):
            raise TypeError("entries must be a tuple")
        Reply.__post_init__(self)
        if len(self.entries) > HISTORY_ENTRIES_MAX:
            raise WireError(
                Status.FORMAT_ERROR,
                f"{len(self.entries)} entries, at most {HISTORY_ENTRIES_MAX} allowed",
            )
        if not set(map(type, self.entries)) <= {HistoryEntry}:  # C calls, not one per entry
            raise TypeError("entries must be HistoryEntry values")

    def wire_values(self) -> tuple[Any, ...]:
        return self.status, self.entries  # each entry is its own row, in wire order

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> HistoryReply:
        status, rows = values
        return cls(status, tuple(HistoryEntry(*row) for row in rows))

    @classmethod
    def from_payload(cls, payload: bytes) -> HistoryReply:
        """The decoder's path: the same checks as ``from_wire``, done a column at a time."""
        status, columns = cls.FAST.unpack_columns(payload)
        return cls(status, HistoryEntry.all_from_columns(columns))


# -- Server messages that answer no request ------------------------------------------


@dataclass(frozen=True, slots=True)
class Notice(Message):
    SENDER = Sender.SERVER
    REQUEST_IDS = NOTICE_REQUEST_ID


@dataclass(frozen=True, slots=True)
class Hello(Notice):
    """First frame on every connection: the server's limits. Its header carries the version."""

    OPCODE = Opcode.HELLO
    LAYOUT = layout.HELLO

    payload_bytes_max: int
    history_entries_max: int
    amount_cents_max: int
    frame_timeout_s: int
    login_timeout_s: int
    idle_timeout_s: int

    def __post_init__(self) -> None:
        # A server may announce less than the protocol's payload limit, never more.
        _check_int("payload_bytes_max", self.payload_bytes_max, range(1, PAYLOAD_BYTES_MAX + 1))
        _check_int(
            "history_entries_max", self.history_entries_max, range(1, HISTORY_ENTRIES_MAX + 1)
        )
        _check_int("amount_cents_max", self.amount_cents_max, AMOUNT_CENTS)
        _check_int("frame_timeout_s", self.frame_timeout_s, SECONDS)
        _check_int("login_timeout_s", self.login_timeout_s, SECONDS)
        _check_int("idle_timeout_s", self.idle_timeout_s, SECONDS)


@dataclass(frozen=True, slots=True)
class Shutdown(Notice):
    """The server is stopping: finish up, the connection closes in ``grace_s`` seconds."""

    OPCODE = Opcode.SHUTDOWN
    LAYOUT = layout.SHUTDOWN

    grace_s: int

    def __post_init__(self) -> None:
        _check_int("grace_s", self.grace_s, range(0, SECONDS_MAX + 1))


@dataclass(frozen=True, slots=True)
class SessionToken(Notice):
    """The token that resumes this session from another connection (RESUME). Sent right
    after an approved LOGIN_REPLY or RESUME_REPLY; a new one replaces the old."""

    OPCODE = Opcode.SESSION_TOKEN
    LAYOUT = layout.SESSION_TOKEN

    token: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes("token", self.token, SESSION_TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class SessionExpired(Notice):
    """The session was idle too long: the lease is released and the connection closes."""

    OPCODE = Opcode.SESSION_EXPIRED
    LAYOUT = layout.EMPTY


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Answers a frame that could not be decoded, or refuses a connection (id 0)."""

    SENDER = Sender.SERVER
    REQUEST_IDS = ANY_REQUEST_ID
    OPCODE = Opcode.ERROR
    LAYOUT = layout.STATUS_ONLY

    status: Status

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", _as_enum(Status, "status", self.status))
        if self.status is Status.APPROVED:
            raise WireError(Status.FORMAT_ERROR, "an ERROR cannot carry APPROVED")


# -- Registry ------------------------------------------------------------------------


def _leaf_classes(base: type[Message]) -> list[type[Message]]:
    leaves = []
    for sub in base.__subclasses__():
        leaves.extend(_leaf_classes(sub) if "OPCODE" not in sub.__dict__ else [sub])
    return leaves


def _values_getter(names: tuple[str, ...]) -> Callable[[Message], tuple[Any, ...]]:
    """A function returning the named attributes as a tuple, for any number of names.

    ``attrgetter`` does it in C: 0.1 us for four fields, where a generator of ``getattr``
    calls took 0.5 us (timeit), paid on every frame encoded."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        value_of = attrgetter(*names)
        return lambda message: (value_of(message),)
    return lambda message: ()


def _payload_decoder(cls: type[Message]) -> Callable[[bytes], Message]:
    """``cls.from_payload`` as one function of the payload, the same checks in the same
    order: ``cls(*values)`` straight from the struct, unless the class decodes its own
    way (``from_wire`` or ``from_payload`` of its own). The generic path's two
    classmethods and ``FastLayout.unpack`` were three Python calls more per frame."""
    if cls.from_payload.__func__ is not Message.from_payload.__func__:  # type: ignore[attr-defined]
        return cls.from_payload
    if cls.FAST.items is not None:
        return cls.from_payload  # an array: FastLayout.unpack builds its item tuples
    unpack = cls.FAST.head.unpack
    if cls.from_wire.__func__ is not Message.from_wire.__func__:  # type: ignore[attr-defined]
        from_wire = cls.from_wire
        return lambda payload: from_wire(unpack(payload))
    return lambda payload: cls(*unpack(payload))


def _register() -> dict[Opcode, type[Message]]:
    by_opcode: dict[Opcode, type[Message]] = {}
    for cls in _leaf_classes(Message):
        names = tuple(sub.name for sub in cls.LAYOUT.subcons)
        if names != tuple(f.name for f in fields(cls)):
            raise TypeError(f"{cls.__name__} fields do not follow its layout {names}")
        cls.FAST = layout.FastLayout.derive(cls.LAYOUT)
        cls.VALUES_OF = staticmethod(_values_getter(cls.FAST.names))
        cls.FRAMING = None
        if cls.FAST.items is None:
            cls.FRAMING = cls.FAST.framing()
            if cls.FRAMING[1] > PAYLOAD_BYTES_MAX:  # so encode need not check it per frame
                raise TypeError(f"{cls.__name__}'s payload is over PAYLOAD_BYTES_MAX")
        cls.DECODE = staticmethod(_payload_decoder(cls))
        if issubclass(cls, Reply):
            cls.EMPTY_WHEN_REFUSED = tuple((f.name, f.default) for f in fields(cls)[1:])
        by_opcode[cls.OPCODE] = cls
    if set(by_opcode) != set(Opcode):
        raise TypeError(f"opcodes without a message: {set(Opcode) - set(by_opcode)}")
    return by_opcode


MESSAGE_TYPES: dict[Opcode, type[Message]] = _register()
"""Every opcode's message class; ``MESSAGE_TYPES[op].LAYOUT`` is its payload layout."""

# HistoryEntry.all_from_columns checks no lower end of zero: it relies on every entry field
# being unsigned on the wire. Say so loudly if the layout ever changes.
if HistoryReply.FAST.items is None or not HistoryReply.FAST.items.format.lstrip(">").isupper():
    raise TypeError("HISTORY_REPLY entries must be unsigned fields for the column checks")


def reply_type(request: Request) -> type[Reply]:
    """The reply class answering ``request``: its opcode with the high bit set."""
    reply = _REPLY_TYPES.get(type(request))
    if reply is None:  # not a registered class: found by its opcode, as the table was
        reply = _reply_type_by_opcode(request.OPCODE)
    return reply


def _reply_type_by_opcode(opcode: Opcode) -> type[Reply]:
    reply = MESSAGE_TYPES[Opcode(opcode | REPLY_BIT)]
    assert issubclass(reply, Reply), "_register pairs every request with its reply"
    return reply


_REPLY_TYPES: dict[type[Message], type[Reply]] = {
    cls: _reply_type_by_opcode(cls.OPCODE)
    for cls in MESSAGE_TYPES.values() if issubclass(cls, Request)
}
"""Each request class's reply class. The server checks every reply it sends against
it; through ``Opcode(...)``, an enum call, the lookup took 0.5 us (timeit, CPython
3.11), a dict lookup by class 0.04."""


REPLY_STATUSES: dict[Opcode, frozenset[Status]] = {
    Opcode.LOGIN_REPLY: frozenset({
        Status.APPROVED, Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED,
        Status.ACCOUNT_IN_USE, Status.ALREADY_LOGGED_IN,
        Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.LOGOUT_REPLY: frozenset({Status.APPROVED, Status.SYSTEM_MALFUNCTION}),
    Opcode.BALANCE_REPLY: frozenset({
        Status.APPROVED, Status.NOT_LOGGED_IN,
        Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.DEPOSIT_REPLY: frozenset({
        Status.APPROVED, Status.INVALID_AMOUNT, Status.DUPLICATE_TRANSMISSION,
        Status.NOT_LOGGED_IN, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.WITHDRAW_REPLY: frozenset({
        Status.APPROVED, Status.INSUFFICIENT_FUNDS, Status.EXCEEDS_WITHDRAWAL_LIMIT,
        Status.DUPLICATE_TRANSMISSION,
        Status.NOT_LOGGED_IN, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.HISTORY_REPLY: frozenset({
        Status.APPROVED, Status.NOT_LOGGED_IN,
        Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.PING_REPLY: frozenset({
        Status.APPROVED, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.RESUME_REPLY: frozenset({
        Status.APPROVED, Status.UNKNOWN_SESSION, Status.ALREADY_LOGGED_IN,
        Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.TRANSFER_REPLY: frozenset({
        Status.APPROVED, Status.INVALID_AMOUNT, Status.INSUFFICIENT_FUNDS,
        Status.EXCEEDS_WITHDRAWAL_LIMIT, Status.INVALID_TO_ACCOUNT, Status.SAME_ACCOUNT,
        Status.EXCEEDS_FREQUENCY_LIMIT, Status.DUPLICATE_TRANSMISSION,
        Status.NOT_LOGGED_IN, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.CHANGE_PIN_REPLY: frozenset({
        Status.APPROVED, Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED,
        Status.PIN_NOT_ALLOWED,
        Status.NOT_LOGGED_IN, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
    Opcode.FEATURES_REPLY: frozenset({
        Status.APPROVED, Status.ISSUER_UNAVAILABLE, Status.SYSTEM_MALFUNCTION,
    }),
}
"""The statuses a server may answer each request with, by reply opcode.

spec/PROTOCOL.md §4.1 prints this table, and tests/test_conformance.py takes the bank's
session down every path that answers a request and checks it sends exactly these. Each
row is the request's own outcomes, the state refusals (NOT_LOGGED_IN, ALREADY_LOGGED_IN),
ISSUER_UNAVAILABLE (shutdown refuses all but LOGOUT; a storage failure, all that use the
store) and SYSTEM_MALFUNCTION (a bug, anywhere).

It is not a check on received replies: the decoder accepts any known status on any reply,
since a status outside its row is a refusal to show, not a malformed frame, and a later
server may add statuses to a row. Only an unknown status byte is a format error.
"""

if set(REPLY_STATUSES) != {op for op, cls in MESSAGE_TYPES.items() if issubclass(cls, Reply)}:
    raise TypeError("REPLY_STATUSES needs a row for every reply opcode, and only those")
