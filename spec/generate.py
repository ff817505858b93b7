"""Build spec/vectors.json and spec/examples.md from hand-chosen messages.

Run ``.venv/bin/python spec/generate.py`` after changing anything in ``wire/`` and check
in both files; tests/test_conformance.py fails while they are stale.

Golden frames are produced by ``wire.encode``; their field-by-field annotations walk the
construct declarations in ``wire.layout`` (the frame header and the message's ``LAYOUT``),
so offsets and sizes are derived, never typed by hand. Negative vectors are hand-built
byte strings; each is run through ``wire.Decoder`` here, and generation stops if the
decoder disagrees with the status and fatal flag this file expects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

from construct import Construct, Struct

from bank.config import ServerConfig
from wire import (
    Balance,
    BalanceReply,
    Decoder,
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
    Sender,
    SessionExpired,
    Shutdown,
    Status,
    WireError,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire import layout as wire_layout
from wire.limits import (
    AMOUNT_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    MAGIC,
    PAYLOAD_BYTES_MAX,
    PROTOCOL_VERSION,
    REQUEST_ID_MAX,
)
from wire.messages import REPLY_STATUSES
from wire.money import format_cents
from wire.status import ISO8583_RESPONSE_CODE

SPEC_DIR = Path(__file__).resolve().parent
VECTORS_PATH = SPEC_DIR / "vectors.json"
EXAMPLES_PATH = SPEC_DIR / "examples.md"

# Fixed inputs, so the generated files are byte-for-byte reproducible.
TXN_DEPOSIT = bytes.fromhex("6f9619ff8b86d011b42d00c04fc964ff")
TXN_WITHDRAW = bytes.fromhex("3f2504e04f8941d39a0c0305e82c3301")
TXN_MAX = bytes.fromhex("00112233445566778899aabbccddeeff")
TIME_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
ACCOUNT = "AB-12345"
PIN = "1234"


# -- Golden frames -----------------------------------------------------------------


@dataclass(frozen=True)
class Golden:
    name: str
    message: Message
    request_id: int
    note: str


def _entry(index: int) -> HistoryEntry:
    """The ``index``-th most recent entry of a made-up ledger, newest first."""
    kind = EntryKind.DEPOSIT if index % 3 == 0 else EntryKind.WITHDRAWAL
    return HistoryEntry(
        entry_id=100 - index,
        time_ms=TIME_MS - index * 60_000,
        kind=kind,
        amount_cents=2_000 + index * 100,
        balance_cents=500_000 - index * 1_000,
    )


def _approved_money_reply(cls: type[DepositReply | WithdrawReply]) -> Message:
    return cls(Status.APPROVED, balance_cents=273_456, entry_id=42, time_ms=TIME_MS)


ERROR_REQUEST_IDS: dict[Status, tuple[int, str]] = {
    Status.INVALID_TRANSACTION: (12, "an unknown or wrong-direction opcode; the session goes on"),
    Status.INVALID_AMOUNT: (13, "a DEPOSIT or WITHDRAW amount of 0 or over the maximum"),
    Status.FORMAT_ERROR: (0, "a frame whose header could not be read; the server closes"),
    Status.INSUFFICIENT_FUNDS: (14, "every status can travel in an ERROR frame"),
    Status.INCORRECT_PIN: (15, "every status can travel in an ERROR frame"),
    Status.EXCEEDS_WITHDRAWAL_LIMIT: (16, "every status can travel in an ERROR frame"),
    Status.PIN_TRIES_EXCEEDED: (17, "every status can travel in an ERROR frame"),
    Status.ISSUER_UNAVAILABLE: (18, "every status can travel in an ERROR frame"),
    Status.DUPLICATE_TRANSMISSION: (19, "every status can travel in an ERROR frame"),
    Status.SYSTEM_MALFUNCTION: (20, "every status can travel in an ERROR frame"),
    Status.ACCOUNT_IN_USE: (21, "every status can travel in an ERROR frame"),
    Status.NOT_LOGGED_IN: (22, "every status can travel in an ERROR frame"),
    Status.ALREADY_LOGGED_IN: (23, "every status can travel in an ERROR frame"),
    Status.SERVER_BUSY: (0, "sent instead of HELLO when the server is at its connection limit"),
    Status.UNSUPPORTED_VERSION: (0, "the client's frame carried another protocol version"),
}


def server_hello() -> Hello:
    """The HELLO of a server running with the default configuration."""
    return ServerConfig().hello()


def golden_frames() -> list[Golden]:
    hello = server_hello()
    cases = [
        # Requests, client to server.
        Golden("login", Login(ACCOUNT, PIN), 1, "open a session"),
        Golden("balance", Balance(), 2, "ask for the balance"),
        Golden("deposit", Deposit(TXN_DEPOSIT, 250_000), 3, "deposit $2,500.00"),
        Golden("withdraw", Withdraw(TXN_WITHDRAW, 6_000), 4, "withdraw $60.00"),
        Golden("withdraw-max-amount", Withdraw(TXN_MAX, AMOUNT_CENTS_MAX), 5,
               "the largest amount one transaction may move"),
        Golden("history", History(5), 6, "the five most recent entries"),
        Golden("history-max-count", History(HISTORY_ENTRIES_MAX), 7, "the largest count"),
        Golden("ping", Ping(), 8, "keep the session alive"),
        Golden("ping-max-request-id", Ping(), REQUEST_ID_MAX, "the largest request id"),
        Golden("logout", Logout(), 9, "end the session"),
        # Notices, server to client, request id 0.
        Golden("hello", hello, 0, "first frame on every connection: the server's limits"),
        Golden("shutdown", Shutdown(30), 0, "the server stops; the connection closes in 30 s"),
        Golden("session-expired", SessionExpired(), 0, "idle too long; the server closes"),
        # Replies, server to client, echoing the request id.
        Golden("login-reply", LoginReply(Status.APPROVED), 1, "session authenticated"),
        Golden("login-reply-incorrect-pin", LoginReply(Status.INCORRECT_PIN), 1,
               "unknown account or wrong PIN: the same answer"),
        Golden("login-reply-pin-tries-exceeded", LoginReply(Status.PIN_TRIES_EXCEEDED), 1,
               "the account is locked"),
        Golden("login-reply-account-in-use", LoginReply(Status.ACCOUNT_IN_USE), 1,
               "PIN accepted, but another ATM holds the account"),
        Golden("login-reply-already-logged-in", LoginReply(Status.ALREADY_LOGGED_IN), 10,
               "LOGIN on an authenticated session"),
        Golden("balance-reply", BalanceReply(Status.APPROVED, balance_cents=123_456), 2,
               "balance $1,234.56"),
        Golden("balance-reply-not-logged-in", BalanceReply(Status.NOT_LOGGED_IN), 2,
               "BALANCE before LOGIN"),
        Golden("deposit-reply", _approved_money_reply(DepositReply), 3,
               "receipt: new balance, ledger entry id, time"),
        Golden("deposit-reply-duplicate", DepositReply(Status.DUPLICATE_TRANSMISSION), 3,
               "a transaction id reused with different content"),
        Golden("withdraw-reply", _approved_money_reply(WithdrawReply), 4, "receipt"),
        Golden("withdraw-reply-insufficient-funds", WithdrawReply(Status.INSUFFICIENT_FUNDS), 4,
               "refused: no money moved"),
        Golden("withdraw-reply-over-limit", WithdrawReply(Status.EXCEEDS_WITHDRAWAL_LIMIT), 5,
               "refused: over the server's per-transaction withdrawal limit"),
        Golden("withdraw-reply-issuer-unavailable", WithdrawReply(Status.ISSUER_UNAVAILABLE), 4,
               "storage failure, or the server is shutting down"),
        Golden("history-reply-empty", HistoryReply(Status.APPROVED, ()), 6,
               "an account with no entries yet"),
        Golden("history-reply", HistoryReply(Status.APPROVED, (_entry(0),)), 6, "one entry"),
        Golden("history-reply-3", HistoryReply(Status.APPROVED, tuple(map(_entry, range(3)))), 6,
               "three entries, newest first"),
        Golden("history-reply-max",
               HistoryReply(Status.APPROVED, tuple(map(_entry, range(HISTORY_ENTRIES_MAX)))), 7,
               "the most entries one reply may carry"),
        Golden("history-reply-not-logged-in", HistoryReply(Status.NOT_LOGGED_IN), 6,
               "refused: entry count 0"),
        Golden("ping-reply", PingReply(Status.APPROVED), 8, "pong"),
        Golden("logout-reply", LogoutReply(Status.APPROVED), 9,
               "lease released; the server closes next"),
    ]
    for status, (request_id, note) in ERROR_REQUEST_IDS.items():
        name = "error-" + status.name.lower().replace("_", "-")
        cases.append(Golden(name, Error(status), request_id, note))
    return cases


# -- Negative vectors --------------------------------------------------------------


@dataclass(frozen=True)
class Negative:
    name: str
    receiver: Sender  # the side whose decoder gets these bytes
    data: bytes
    status: Status
    fatal: bool
    request_id: int
    note: str


def raw_frame(
    opcode: int,
    request_id: int,
    payload: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, with a correct CRC unless the caller damages it later."""
    announced = len(payload) if length is None else length
    body = (
        magic
        + bytes([version, opcode])
        + request_id.to_bytes(4, "big")
        + announced.to_bytes(2, "big")
        + payload
    )
    return body + zlib.crc32(body).to_bytes(4, "big")


def header_only(opcode: int, request_id: int, length: int) -> bytes:
    return MAGIC + bytes([PROTOCOL_VERSION, opcode]) + request_id.to_bytes(4, "big") + (
        length.to_bytes(2, "big")
    )


def flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def entry_bytes(entry_id: int, time_ms: int, kind: int, amount: int, balance: int) -> bytes:
    return u64(entry_id) + u64(time_ms) + bytes([kind]) + u64(amount) + u64(balance)


def negative_vectors() -> list[Negative]:
    server, client = Sender.SERVER, Sender.CLIENT
    login_payload = ACCOUNT.encode() + PIN.encode()
    good_entry = entry_bytes(1, TIME_MS, EntryKind.DEPOSIT, 100, 100)
    fmt, bad_op, amount = Status.FORMAT_ERROR, Status.INVALID_TRANSACTION, Status.INVALID_AMOUNT
    ping = raw_frame(Opcode.PING, 8, b"")
    return [
        # What the server's decoder must refuse.
        Negative("bad-magic", server, b"XT" + ping[2:], fmt, True, 0,
                 "first byte is not 0x41: refused on that byte alone"),
        Negative("bad-magic-second-byte", server, b"AX" + ping[2:], fmt, True, 0,
                 "second byte is not 0x54"),
        Negative("http-request", server, b"GET / HTTP/1.1\r\n\r\n", fmt, True, 0,
                 "not this protocol at all"),
        Negative("unsupported-version", server, raw_frame(Opcode.PING, 8, b"", version=2),
                 Status.UNSUPPORTED_VERSION, True, 0, "version byte 2"),
        Negative("version-zero", server, raw_frame(Opcode.PING, 8, b"", version=0),
                 Status.UNSUPPORTED_VERSION, True, 0, "version byte 0"),
        Negative("length-over-limit", server, header_only(Opcode.LOGIN, 1, PAYLOAD_BYTES_MAX + 1),
                 fmt, True, 1, "header alone announces 1025 payload bytes: refused at once"),
        Negative("length-max-u16", server, header_only(Opcode.PING, 8, 0xFFFF), fmt, True, 8,
                 "header alone announces 65535 payload bytes"),
        Negative("crc-mismatch", server, flip_last_byte(raw_frame(Opcode.LOGIN, 1, login_payload)),
                 fmt, True, 1, "last CRC bit flipped"),
        Negative("crc-mismatch-payload", server,
                 raw_frame(Opcode.LOGIN, 1, login_payload)[:-5] + b"5"
                 + raw_frame(Opcode.LOGIN, 1, login_payload)[-4:],
                 fmt, True, 1, "PIN digit changed after the CRC was computed"),
        Negative("unknown-opcode", server, raw_frame(0x08, 11, b""), bad_op, False, 11,
                 "opcode 0x08 is not assigned; the frame is consumed, decoding goes on"),
        Negative("unknown-opcode-zero", server, raw_frame(0x00, 11, b"\x00\x01"), bad_op, False,
                 11, "opcode 0x00 with a 2-byte payload, consumed whole"),
        Negative("wrong-direction-reply", server, raw_frame(Opcode.LOGIN_REPLY, 12, b"\x00"),
                 bad_op, False, 12, "LOGIN_REPLY is a server's opcode"),
        Negative("wrong-direction-hello", server, encode(server_hello(), 0), bad_op, False, 0,
                 "HELLO is a server's opcode"),
        Negative("truncated-login", server, raw_frame(Opcode.LOGIN, 1, login_payload[:-1]),
                 fmt, True, 1, "LOGIN payload of 11 bytes, CRC repaired"),
        Negative("truncated-deposit", server,
                 raw_frame(Opcode.DEPOSIT, 3, TXN_DEPOSIT + u64(250_000)[:-1]), fmt, True, 3,
                 "DEPOSIT payload of 23 bytes, CRC repaired"),
        Negative("trailing-byte-balance", server, raw_frame(Opcode.BALANCE, 2, b"\x00"),
                 fmt, True, 2, "BALANCE carries no payload; one byte added, CRC repaired"),
        Negative("trailing-byte-login", server, raw_frame(Opcode.LOGIN, 1, login_payload + b"0"),
                 fmt, True, 1, "LOGIN payload of 13 bytes, CRC repaired"),
        Negative("bad-account-no-hyphen", server, raw_frame(Opcode.LOGIN, 1, b"AB123456" + b"1234"),
                 fmt, True, 1, "account must be AA-NNNNN"),
        Negative("bad-account-letter-in-digits", server,
                 raw_frame(Opcode.LOGIN, 1, b"AB-1234X" + b"1234"), fmt, True, 1,
                 "account must be AA-NNNNN"),
        Negative("bad-account-not-ascii", server,
                 raw_frame(Opcode.LOGIN, 1, b"\xc3\x84B-12345" + b"1234"[:3]), fmt, True, 1,
                 "non-ASCII bytes in the account"),
        Negative("bad-pin-letter", server, raw_frame(Opcode.LOGIN, 1, b"AB-12345" + b"12a4"),
                 fmt, True, 1, "PIN must be four ASCII digits"),
        Negative("bad-pin-space", server, raw_frame(Opcode.LOGIN, 1, b"AB-12345" + b"123 "),
                 fmt, True, 1, "PIN must be four ASCII digits"),
        Negative("zero-amount", server, raw_frame(Opcode.DEPOSIT, 3, TXN_DEPOSIT + u64(0)),
                 amount, False, 3, "amount 0: refused, the connection goes on"),
        Negative("amount-over-max", server,
                 raw_frame(Opcode.WITHDRAW, 4, TXN_WITHDRAW + u64(AMOUNT_CENTS_MAX + 1)),
                 amount, False, 4, "amount 10000001: one cent over the maximum"),
        Negative("amount-max-u64", server,
                 raw_frame(Opcode.DEPOSIT, 3, TXN_DEPOSIT + u64(2**64 - 1)),
                 amount, False, 3, "amount 2^64 - 1"),
        Negative("request-id-zero", server, raw_frame(Opcode.PING, 0, b""), fmt, True, 0,
                 "request id 0 is reserved for notices"),
        Negative("history-count-zero", server, raw_frame(Opcode.HISTORY, 6, b"\x00"),
                 fmt, True, 6, "count must be 1..20"),
        Negative("history-count-over-max", server,
                 raw_frame(Opcode.HISTORY, 6, bytes([HISTORY_ENTRIES_MAX + 1])), fmt, True, 6,
                 "count 21"),
        # What the client's decoder must refuse.
        Negative("client-bad-magic", client, b"XT" + raw_frame(Opcode.PING_REPLY, 8, b"\x00")[2:],
                 fmt, True, 0, "first byte is not 0x41"),
        Negative("client-crc-mismatch", client,
                 flip_last_byte(raw_frame(Opcode.PING_REPLY, 8, b"\x00")), fmt, True, 8,
                 "last CRC bit flipped"),
        Negative("client-wrong-direction-request", client, raw_frame(Opcode.BALANCE, 2, b""),
                 bad_op, False, 2, "BALANCE is a client's opcode"),
        Negative("client-unknown-opcode", client, raw_frame(0xC3, 0, b""), bad_op, False, 0,
                 "opcode 0xC3 is not assigned"),
        Negative("hello-with-request-id", client,
                 raw_frame(Opcode.HELLO, 1, encode(server_hello(), 0)[10:-4]), fmt, True, 1,
                 "notices carry request id 0"),
        Negative("reply-with-request-id-zero", client, raw_frame(Opcode.PING_REPLY, 0, b"\x00"),
                 fmt, True, 0, "replies echo a non-zero request id"),
        Negative("unknown-status", client, raw_frame(Opcode.PING_REPLY, 8, b"\x01"), fmt, True, 8,
                 "status byte 0x01 is not assigned"),
        Negative("error-approved", client, raw_frame(Opcode.ERROR, 8, b"\x00"), fmt, True, 8,
                 "an ERROR cannot carry APPROVED"),
        Negative("refused-reply-with-balance", client,
                 raw_frame(Opcode.BALANCE_REPLY, 2, bytes([Status.NOT_LOGGED_IN]) + u64(5)),
                 fmt, True, 2, "fields after a refusing status must be zero"),
        Negative("balance-over-i64", client,
                 raw_frame(Opcode.BALANCE_REPLY, 2, b"\x00" + u64(2**63)), fmt, True, 2,
                 "balance 2^63 does not fit a signed 64-bit integer"),
        Negative("money-reply-entry-id-zero", client,
                 raw_frame(Opcode.DEPOSIT_REPLY, 3, b"\x00" + u64(100) + u64(0) + u64(TIME_MS)),
                 fmt, True, 3, "an approved receipt needs a ledger entry id"),
        Negative("history-reply-count-mismatch", client,
                 raw_frame(Opcode.HISTORY_REPLY, 6, b"\x00\x02" + good_entry), fmt, True, 6,
                 "count says 2, one entry follows"),
        Negative("history-reply-too-many", client,
                 raw_frame(Opcode.HISTORY_REPLY, 6, b"\x00" + bytes([HISTORY_ENTRIES_MAX + 1])
                           + good_entry * (HISTORY_ENTRIES_MAX + 1)), fmt, True, 6,
                 "21 entries"),
        Negative("history-entry-unknown-kind", client,
                 raw_frame(Opcode.HISTORY_REPLY, 6, b"\x00\x01" + entry_bytes(1, TIME_MS, 3, 1, 1)),
                 fmt, True, 6, "entry kind 3 is not assigned"),
        Negative("hello-payload-bytes-max-over-limit", client,
                 raw_frame(Opcode.HELLO, 0, (PAYLOAD_BYTES_MAX + 1).to_bytes(2, "big")
                           + encode(server_hello(), 0)[12:-4]), fmt, True, 0,
                 "payload_bytes_max 1025: a server may announce less than 1024, never more"),
        Negative("truncated-hello", client,
                 raw_frame(Opcode.HELLO, 0, encode(server_hello(), 0)[10:-5]), fmt, True, 0,
                 "HELLO payload one byte short, CRC repaired"),
    ]


# -- JSON values -------------------------------------------------------------------


def json_value(value: object) -> object:
    """Bytes as hex, enums by name, entries as objects: how vectors.json writes fields."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, HistoryEntry):  # a tuple underneath, written as an object
        return {name: json_value(getattr(value, name)) for name in HistoryEntry.FIELDS}
    if isinstance(value, tuple):
        return [json_value(item) for item in value]
    if dataclasses.is_dataclass(value):
        return message_fields(value)
    return value


def message_fields(message: object) -> dict[str, object]:
    return {f.name: json_value(getattr(message, f.name)) for f in dataclasses.fields(message)}


def sender_of(message: Message) -> Sender:
    return message.SENDER


def other(side: Sender) -> Sender:
    return Sender.SERVER if side is Sender.CLIENT else Sender.CLIENT


def check_negative(vector: Negative) -> None:
    """Stop generation unless the decoder refuses ``vector`` exactly as listed."""
    decoder = Decoder(other(vector.receiver))
    decoder.receive_data(vector.data)
    try:
        frame = decoder.next_frame()
    except WireError as error:
        got = (error.status, error.fatal, error.request_id)
        if got != (vector.status, vector.fatal, vector.request_id):
            raise SystemExit(f"{vector.name}: decoder says {got}") from error
        return
    raise SystemExit(f"{vector.name}: decoder accepted it as {frame}")


def vectors_document() -> dict[str, object]:
    golden = []
    for case in golden_frames():
        data = encode(case.message, case.request_id)
        golden.append({
            "name": case.name,
            "sender": case.message.SENDER.value,
            "receiver": other(case.message.SENDER).value,
            "opcode": case.message.OPCODE.name,
            "request_id": case.request_id,
            "fields": message_fields(case.message),
            "hex": data.hex(),
            "note": case.note,
        })
    negative = []
    for vector in negative_vectors():
        check_negative(vector)
        negative.append({
            "name": vector.name,
            "receiver": vector.receiver.value,
            "hex": vector.data.hex(),
            "status": vector.status.name,
            "fatal": vector.fatal,
            "request_id": vector.request_id,
            "note": vector.note,
        })
    return {
        "description": (
            "Test vectors for the ATM protocol (spec/PROTOCOL.md), generated by "
            "spec/generate.py. golden: frames to decode to 'fields' and to encode back to "
            "'hex'. reply_statuses: the statuses a server may answer each request with; a "
            "known status outside its row is a refusal, not a format error. negative: bytes "
            "the 'receiver' must refuse with 'status' and 'request_id'. fatal: a server sends "
            "ERROR with them and closes the connection, a client closes it; not fatal: a "
            "server answers ERROR with them and reads on, a client skips the frame."
        ),
        "protocol_version": PROTOCOL_VERSION,
        "opcodes": {op.name: op.value for op in Opcode},
        "statuses": {
            s.name: {"value": s.value, "iso8583": ISO8583_RESPONSE_CODE.get(s)} for s in Status
        },
        "reply_statuses": {
            op.name: [s.name for s in Status if s in statuses]
            for op, statuses in REPLY_STATUSES.items()
        },
        "golden": golden,
        "negative": negative,
    }


# -- Annotated examples ------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    offset: int
    data: bytes
    field: str
    value: object


def walk(con: Struct, data: bytes, offset: int, prefix: str) -> tuple[list[Row], int]:
    """One row per field of ``con`` parsed from ``data`` at ``offset``, and the end offset.

    Understands what ``wire.layout`` declares: fixed-size fields, nested Structs and
    one trailing ``PrefixedArray`` of Structs.
    """
    rows: list[Row] = []
    for sub in con.subcons:
        name = prefix + sub.name
        inner = sub.subcon
        array = wire_layout._prefixed_array(inner)
        if isinstance(inner, Struct):
            nested, offset = walk(inner, data, offset, name + ".")
            rows.extend(nested)
        elif array is not None:
            count_con, item = array
            count_row, offset = fixed_row(count_con, data, offset, name + ".count")
            rows.append(count_row)
            for index in range(count_row.value):
                nested, offset = walk(item, data, offset, f"{name}[{index}].")
                rows.extend(nested)
        else:
            row, offset = fixed_row(inner, data, offset, name)
            rows.append(row)
    return rows, offset


def fixed_row(con: Construct, data: bytes, offset: int, name: str) -> tuple[Row, int]:
    end = offset + con.sizeof()
    chunk = data[offset:end]
    return Row(offset, chunk, name, con.parse(chunk)), end


def frame_rows(message: Message, data: bytes) -> list[Row]:
    rows, offset = walk(wire_layout.HEADER, data, 0, "header.")
    payload_rows, offset = walk(message.LAYOUT, data, offset, "payload.")
    crc_row, end = fixed_row(wire_layout.CRC, data, offset, "crc32")
    assert end == len(data), f"{message.OPCODE.name}: layout walk ended at {end}"
    return [*rows, *payload_rows, crc_row]


def describe(field: str, value: object) -> str:
    leaf = field.rsplit(".", 1)[-1]
    if isinstance(value, bytes):
        printable = all(0x20 <= b < 0x7F for b in value)
        return f'"{value.decode()}"' if printable and leaf != "txn_id" else value.hex()
    if leaf == "opcode":
        return f"0x{value:02X} {Opcode(value).name}"
    if leaf == "status":
        return f"{value} {Status(value).name}"
    if leaf == "kind":
        return f"{value} {EntryKind(value).name}"
    if leaf == "crc32":
        return f"0x{value:08X}"
    if leaf.endswith("_cents"):
        return f"{value} ({format_cents(value)})"
    if leaf == "time_ms" and value:
        stamp = datetime.fromtimestamp(value / 1000, tz=UTC)
        return f"{value} ({stamp.strftime('%Y-%m-%dT%H:%M:%S')}Z)"
    if leaf == "length":
        return f"{value} payload bytes"
    if leaf.endswith("_s"):
        return f"{value} s"
    return str(value)


def spaced_hex(data: bytes) -> str:
    return data.hex(" ")


def wrapped_hex(data: bytes, width: int = 16) -> str:
    return "\n".join(spaced_hex(data[i : i + width]) for i in range(0, len(data), width))


def examples_markdown() -> str:
    out = [
        "# Annotated examples",
        "",
        "Generated by `spec/generate.py` from the layouts in `wire/layout.py`; do not edit.",
        "The same frames, with their decoded fields as JSON, are in",
        "[vectors.json](vectors.json). The format is specified in [PROTOCOL.md](PROTOCOL.md).",
        "",
        "All integers are big-endian. Offsets are from the first byte of the frame.",
        "",
        "## Golden frames",
        "",
    ]
    for case in golden_frames():
        message = case.message
        data = encode(message, case.request_id)
        arrow = "client → server" if message.SENDER is Sender.CLIENT else "server → client"
        out += [
            f"### {case.name}: {message.OPCODE.name} (0x{message.OPCODE:02X}), "
            f"request id {case.request_id}, {arrow}",
            "",
            f"{case.note[0].upper()}{case.note[1:]}. {len(data)} bytes:",
            "",
            "```",
            wrapped_hex(data),
            "```",
            "",
            "| offset | size | bytes | field | value |",
            "|-------:|-----:|-------|-------|-------|",
        ]
        for row in frame_rows(message, data):
            out.append(
                f"| {row.offset} | {len(row.data)} | `{spaced_hex(row.data)}` | {row.field} "
                f"| {describe(row.field, row.value)} |"
            )
        out.append("")
    out += [
        "## Negative vectors",
        "",
        "Bytes a receiver must refuse with `WireError(status)` naming the request id shown.",
        "Fatal: a server sends ERROR with that status and request id, then closes the",
        "connection; a client closes the connection without sending anything.",
        "Not fatal: the frame was consumed whole and decoding goes on. A server answers it with",
        "ERROR, that status and request id, and reads the next frame; a client, which never",
        "answers a frame, skips it and reads the next.",
        "",
        "| name | receiver | status | fatal | request id | what is wrong | bytes |",
        "|------|----------|--------|-------|-----------:|---------------|-------|",
    ]
    for vector in negative_vectors():
        shown = spaced_hex(vector.data)
        if len(vector.data) > 48:
            shown = spaced_hex(vector.data[:48]) + f" … ({len(vector.data)} bytes)"
        out.append(
            f"| {vector.name} | {vector.receiver.value} | {vector.status.name} "
            f"({vector.status.value}) | {'yes' if vector.fatal else 'no'} | {vector.request_id} "
            f"| {vector.note} | `{shown}` |"
        )
    out.append("")
    return "\n".join(out)


def render() -> dict[Path, str]:
    """Every generated file and its exact text."""
    return {
        VECTORS_PATH: json.dumps(vectors_document(), indent=2, ensure_ascii=False) + "\n",
        EXAMPLES_PATH: examples_markdown(),
    }


def main() -> int:
    for path, text in render().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(SPEC_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
