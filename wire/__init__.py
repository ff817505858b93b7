"""The ATM protocol, with no I/O (sans-IO): its engine, frames, messages and rules.

The bank server, the ATM client and the tools speak only through this package, and
import only what it exports here; its modules are private (``wire._codec`` and so on),
in the manner of h11. spec/PROTOCOL.md describes the same protocol for people writing
other peers, and its tables are checked against (or generated from) these modules.

- ``Connection``: one side of one conversation (``wire._connection``, with the state
  table of ``wire._state``); ``LocalProtocolError`` and ``RemoteProtocolError`` say
  whose fault a broken rule was.
- ``encode``, ``Decoder``, ``Frame``: the framing, for tools that need raw frames.
- The messages, one class per opcode; ``Status``; the limits; the money kinds
  (``wire._kinds``); account and PIN formats (``wire._credentials``); dollars and cents
  (``wire._money``).
"""

from wire._codec import Decoder, Frame, encode, frame_bytes
from wire._connection import Answer, Connection, LocalProtocolError, RemoteProtocolError
from wire._credentials import (
    ACCOUNT_PATTERN,
    PIN_PATTERN,
    canonical_account,
    check_pin,
    mask_account,
)
from wire._errors import WireError
from wire._kinds import (
    DEPOSIT,
    KIND_OF_ENTRY,
    KIND_OF_REQUEST,
    MONEY_KINDS,
    WITHDRAWAL,
    MoneyKind,
)
from wire._limits import (
    ACCOUNT_BYTES,
    AMOUNT_CENTS_MAX,
    BALANCE_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    MAGIC,
    PAYLOAD_BYTES_MAX,
    PIN_BYTES,
    PROTOCOL_VERSION,
    REQUEST_ID_MAX,
    SECONDS_MAX,
    SESSION_TOKEN_BYTES,
    TXN_ID_BYTES,
)
from wire._messages import (
    MESSAGE_TYPES,
    REPLY_STATUSES,
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    EntryKind,
    Error,
    Hello,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    MoneyReply,
    MoneyRequest,
    Opcode,
    Ping,
    PingReply,
    Reply,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    Withdraw,
    WithdrawReply,
    reply_type,
)
from wire._money import format_cents, parse_dollars
from wire._state import LOGIN_FAILURES, PERMITTED, REFUSAL, State
from wire._status import ISO8583_RESPONSE_CODE, Status

__all__ = [
    "ACCOUNT_BYTES",
    "ACCOUNT_PATTERN",
    "AMOUNT_CENTS_MAX",
    "BALANCE_CENTS_MAX",
    "DEPOSIT",
    "HISTORY_ENTRIES_MAX",
    "ISO8583_RESPONSE_CODE",
    "KIND_OF_ENTRY",
    "KIND_OF_REQUEST",
    "LOGIN_FAILURES",
    "MAGIC",
    "MESSAGE_TYPES",
    "MONEY_KINDS",
    "PAYLOAD_BYTES_MAX",
    "PERMITTED",
    "PIN_BYTES",
    "PIN_PATTERN",
    "PROTOCOL_VERSION",
    "REFUSAL",
    "REPLY_STATUSES",
    "REQUEST_ID_MAX",
    "SECONDS_MAX",
    "SESSION_TOKEN_BYTES",
    "TXN_ID_BYTES",
    "WITHDRAWAL",
    "Answer",
    "Balance",
    "BalanceReply",
    "Connection",
    "Decoder",
    "Deposit",
    "DepositReply",
    "EntryKind",
    "Error",
    "Frame",
    "Hello",
    "History",
    "HistoryEntry",
    "HistoryReply",
    "LocalProtocolError",
    "Login",
    "LoginReply",
    "Logout",
    "LogoutReply",
    "Message",
    "MoneyKind",
    "MoneyReply",
    "MoneyRequest",
    "Opcode",
    "Ping",
    "PingReply",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Resume",
    "ResumeReply",
    "Sender",
    "SessionExpired",
    "SessionToken",
    "Shutdown",
    "State",
    "Status",
    "WireError",
    "Withdraw",
    "WithdrawReply",
    "canonical_account",
    "check_pin",
    "encode",
    "format_cents",
    "frame_bytes",
    "mask_account",
    "parse_dollars",
    "reply_type",
]
