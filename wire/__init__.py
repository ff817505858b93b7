"""The ATM protocol: frames, messages and status codes, with no I/O (sans-IO).

The bank server and the ATM client both speak only through this package;
spec/PROTOCOL.md describes the same format for people writing other peers.
"""

from wire._connection import Answer, Connection, LocalProtocolError, RemoteProtocolError
from wire._state import LOGIN_FAILURES, PERMITTED, REFUSAL, State
from wire.codec import Decoder, Frame, encode
from wire.errors import WireError
from wire.limits import (
    AMOUNT_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    PAYLOAD_BYTES_MAX,
    PROTOCOL_VERSION,
    REQUEST_ID_MAX,
)
from wire.messages import (
    MESSAGE_TYPES,
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
    Opcode,
    Ping,
    PingReply,
    Reply,
    Request,
    Sender,
    SessionExpired,
    Shutdown,
    Withdraw,
    WithdrawReply,
)
from wire.status import ISO8583_RESPONSE_CODE, Status

__all__ = [
    "AMOUNT_CENTS_MAX",
    "HISTORY_ENTRIES_MAX",
    "ISO8583_RESPONSE_CODE",
    "LOGIN_FAILURES",
    "MESSAGE_TYPES",
    "PAYLOAD_BYTES_MAX",
    "PERMITTED",
    "PROTOCOL_VERSION",
    "REFUSAL",
    "REQUEST_ID_MAX",
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
    "Opcode",
    "Ping",
    "PingReply",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Sender",
    "SessionExpired",
    "Shutdown",
    "State",
    "Status",
    "WireError",
    "Withdraw",
    "WithdrawReply",
    "encode",
]
