"""Unit tests of the wire package's rules, one behaviour per test.

Covers: the unchecked framing shared with the tests and the fuzzer; the decoder's failure
modes (a fatal error sticks, a non-fatal one consumes its frame and decoding goes on, the
length limit is enforced from the header alone, garbage is refused on its first byte);
request id rules on encode and decode; encode's refusal of out-of-range values, wrong types
and floats (it never truncates); HISTORY_REPLY entries checked a column at a time, and
entry counts the payload does not hold; account case-insensitivity and non-ASCII login
bytes; the PIN kept out of repr; RESUME's account read as LOGIN's, session tokens of
exactly 16 bytes and kept out of repr; and wire._money's exact dollar parsing and
formatting.
"""

from __future__ import annotations

import copy
import pickle
import zlib

import pytest

from wire import (
    AMOUNT_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    PAYLOAD_BYTES_MAX,
    REQUEST_ID_MAX,
    Balance,
    BalanceReply,
    Decoder,
    Deposit,
    EntryKind,
    Error,
    Frame,
    Hello,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Opcode,
    Ping,
    PingReply,
    Resume,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    Status,
    WireError,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire import _codec as codec
from wire._money import format_cents, parse_dollars

TXN = bytes(range(16))


def server_decoder() -> Decoder:
    """What the server runs: it decodes frames clients send."""
    return Decoder(Sender.CLIENT)


def client_decoder() -> Decoder:
    return Decoder(Sender.SERVER)


def frame_from_spec(opcode: int, request_id: int, payload: bytes) -> bytes:
    """A frame written from the spec's header table, independently of ``wire._codec``."""
    body = b"AT\x01" + bytes([opcode]) + request_id.to_bytes(4, "big")
    body += len(payload).to_bytes(2, "big") + payload
    return body + zlib.crc32(body).to_bytes(4, "big")


# -- Framing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("opcode", "request_id", "payload"), [
    (Opcode.PING, 1, b""), (0x7E, REQUEST_ID_MAX, b"\xff" * 5), (Opcode.LOGIN, 0, b"ab"),
])
def test_frame_bytes_frames_any_payload_as_the_spec_says(
    opcode: int, request_id: int, payload: bytes
) -> None:
    """The unchecked framing that encode, the tests and the fuzzer share."""
    assert codec.frame_bytes(opcode, request_id, payload) == frame_from_spec(
        opcode, request_id, payload
    )
    assert codec.frame_bytes(opcode, request_id, payload, version=2)[2] == 2


# -- Decoder ----------------------------------------------------------------------------


def test_needs_more_bytes_is_none_not_an_error() -> None:
    decoder = server_decoder()
    assert decoder.next_frame() is None
    decoder.receive_data(encode(Ping(), 1)[:5])
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 5


def test_fatal_error_keeps_raising_even_after_good_bytes() -> None:
    decoder = server_decoder()
    decoder.receive_data(b"XX")
    with pytest.raises(WireError) as first:
        decoder.next_frame()
    assert first.value.fatal
    assert first.value.status is Status.FORMAT_ERROR
    decoder.receive_data(encode(Ping(), 1))
    for _ in range(3):
        with pytest.raises(WireError) as again:
            decoder.next_frame()
        assert again.value.fatal
        assert (again.value.status, again.value.request_id) == (
            first.value.status, first.value.request_id
        )


def test_non_fatal_error_consumes_its_frame_and_decoding_goes_on() -> None:
    decoder = server_decoder()
    unknown = frame_from_spec(0x09, 5, b"\x01\x02\x03")  # 0x09: not assigned
    decoder.receive_data(unknown + encode(Ping(), 6))
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert (caught.value.status, caught.value.fatal, caught.value.request_id) == (
        Status.INVALID_TRANSACTION, False, 5,
    )
    assert decoder.next_frame() == Frame(6, Ping())
    assert decoder.buffered_bytes == 0


def test_zero_amount_is_refused_but_not_fatal() -> None:
    decoder = server_decoder()
    zero = frame_from_spec(0x04, 9, TXN + bytes(8))
    decoder.receive_data(zero + encode(Balance(), 10))
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert (caught.value.status, caught.value.fatal, caught.value.request_id) == (
        Status.INVALID_AMOUNT, False, 9,
    )
    assert decoder.next_frame() == Frame(10, Balance())


def test_length_limit_is_checked_from_the_header_alone() -> None:
    decoder = server_decoder()
    decoder.receive_data(b"AT\x01\x07" + (3).to_bytes(4, "big") + b"\xff\xff")
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert (caught.value.status, caught.value.fatal, caught.value.request_id) == (
        Status.FORMAT_ERROR, True, 3,
    )


def test_length_at_the_limit_waits_for_the_payload() -> None:
    decoder = server_decoder()
    decoder.receive_data(b"AT\x01\x07" + (3).to_bytes(4, "big") + PAYLOAD_BYTES_MAX.to_bytes(2))
    assert decoder.next_frame() is None


def test_a_smaller_configured_limit_is_enforced() -> None:
    decoder = Decoder(Sender.CLIENT, payload_bytes_max=8)
    decoder.receive_data(encode(Login("AB-12345", "1234"), 1))  # 12-byte payload
    with pytest.raises(WireError, match="limit 8"):
        decoder.next_frame()


def test_garbage_is_refused_on_its_first_byte() -> None:
    decoder = server_decoder()
    decoder.receive_data(b"G")
    with pytest.raises(WireError):
        decoder.next_frame()


def test_other_version_is_refused_on_its_third_byte() -> None:
    decoder = server_decoder()
    decoder.receive_data(b"AT\x02")
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert caught.value.status is Status.UNSUPPORTED_VERSION


def test_crc_mismatch_is_fatal_and_names_the_request() -> None:
    data = bytearray(encode(Deposit(TXN, 500), 77))
    data[-10] ^= 0x40  # one bit of the amount
    decoder = server_decoder()
    decoder.receive_data(bytes(data))
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert (caught.value.status, caught.value.fatal, caught.value.request_id) == (
        Status.FORMAT_ERROR, True, 77,
    )


def test_wrong_direction_is_an_unknown_opcode_for_each_side() -> None:
    to_server = server_decoder()
    to_server.receive_data(encode(PingReply(Status.APPROVED), 1))
    to_client = client_decoder()
    to_client.receive_data(encode(Ping(), 1))
    for decoder in (to_server, to_client):
        with pytest.raises(WireError) as caught:
            decoder.next_frame()
        assert (caught.value.status, caught.value.fatal) == (Status.INVALID_TRANSACTION, False)


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    decoder = client_decoder()
    replies = [Frame(1, LoginReply(Status.APPROVED)), Frame(2, BalanceReply(Status.APPROVED, 5)),
               Frame(0, SessionExpired())]
    decoder.receive_data(b"".join(encode(f.message, f.request_id) for f in replies))
    assert [decoder.next_frame() for _ in replies] == replies
    assert decoder.next_frame() is None


# -- Request ids ----------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [0, -1, REQUEST_ID_MAX + 1, True, 1.0])
def test_requests_and_replies_refuse_bad_request_ids(request_id: object) -> None:
    for message in (Ping(), PingReply(Status.APPROVED)):
        with pytest.raises(WireError):
            encode(message, request_id)


def test_request_ids_cover_the_whole_unsigned_range() -> None:
    decoder = server_decoder()
    decoder.receive_data(encode(Ping(), 1) + encode(Ping(), REQUEST_ID_MAX))
    assert [decoder.next_frame().request_id for _ in range(2)] == [1, REQUEST_ID_MAX]


def test_notices_carry_only_request_id_zero() -> None:
    assert encode(Shutdown(5))[4:8] == bytes(4)
    for request_id in (1, REQUEST_ID_MAX):
        with pytest.raises(WireError):
            encode(SessionExpired(), request_id)


def test_error_may_carry_any_request_id() -> None:
    decoder = client_decoder()
    decoder.receive_data(encode(Error(Status.SERVER_BUSY), 0) + encode(Error(Status.FORMAT_ERROR),
                                                                       REQUEST_ID_MAX))
    assert decoder.next_frame() == Frame(0, Error(Status.SERVER_BUSY))
    assert decoder.next_frame() == Frame(REQUEST_ID_MAX, Error(Status.FORMAT_ERROR))


# -- Encode refuses rather than truncates ---------------------------------------------


@pytest.mark.parametrize("amount", [0, -1, AMOUNT_CENTS_MAX + 1, 2**64])
def test_amount_out_of_range_is_refused(amount: int) -> None:
    with pytest.raises(WireError) as caught:
        Withdraw(TXN, amount)
    assert caught.value.status is Status.INVALID_AMOUNT


@pytest.mark.parametrize("amount", [10.0, 10.5, True, "10"])
def test_amount_must_be_an_int(amount: object) -> None:
    with pytest.raises(TypeError):
        Deposit(TXN, amount)


@pytest.mark.parametrize("txn_id", [b"", bytes(15), bytes(17)])
def test_txn_id_must_be_sixteen_bytes(txn_id: bytes) -> None:
    with pytest.raises(WireError):
        Deposit(txn_id, 100)


def test_txn_id_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Deposit(bytearray(16), 100)


@pytest.mark.parametrize("count", [0, HISTORY_ENTRIES_MAX + 1, 256])
def test_history_count_out_of_range_is_refused(count: int) -> None:
    with pytest.raises(WireError):
        History(count)


def test_balance_over_signed_64_bits_is_refused() -> None:
    with pytest.raises(WireError):
        BalanceReply(Status.APPROVED, 2**63)
    assert BalanceReply(Status.APPROVED, 2**63 - 1).balance_cents == 2**63 - 1


def test_balance_must_not_be_a_float() -> None:
    with pytest.raises(TypeError):
        BalanceReply(Status.APPROVED, 100.0)


def test_refusing_reply_must_leave_other_fields_zero() -> None:
    with pytest.raises(WireError):
        WithdrawReply(Status.INSUFFICIENT_FUNDS, balance_cents=100)
    with pytest.raises(WireError):
        HistoryReply(Status.NOT_LOGGED_IN, (HistoryEntry(1, 0, EntryKind.DEPOSIT, 1, 1),))


def test_approved_receipt_needs_an_entry_id() -> None:
    with pytest.raises(WireError):
        WithdrawReply(Status.APPROVED, balance_cents=100, entry_id=0, time_ms=1)


def test_history_reply_holds_at_most_the_maximum() -> None:
    entry = HistoryEntry(1, 0, EntryKind.WITHDRAWAL, 1, 0)
    assert len(HistoryReply(Status.APPROVED, (entry,) * HISTORY_ENTRIES_MAX).entries) == 20
    with pytest.raises(WireError):
        HistoryReply(Status.APPROVED, (entry,) * (HISTORY_ENTRIES_MAX + 1))


def test_unknown_status_and_kind_values_are_refused() -> None:
    with pytest.raises(WireError):
        LoginReply(1)
    with pytest.raises(WireError):
        HistoryEntry(1, 0, 5, 1, 1)


GOOD_ROW = {"entry_id": 7, "time_ms": 1_700_000_000_000, "kind": 1, "amount_cents": 2_500,
            "balance_cents": 100_000}
BAD_VALUES = [
    ("entry_id", 0), ("entry_id", 2**63), ("entry_id", 2**64 - 1),
    ("time_ms", 2**63),
    ("kind", 0), ("kind", 5), ("kind", 255),
    ("amount_cents", 0), ("amount_cents", AMOUNT_CENTS_MAX + 1), ("amount_cents", 2**64 - 1),
    ("balance_cents", 2**63),
]


def history_reply_payload(rows: list[dict[str, int]]) -> bytes:
    """A HISTORY_REPLY payload written byte by byte from the spec's field table."""
    payload = bytes([Status.APPROVED, len(rows)])
    for row in rows:
        payload += row["entry_id"].to_bytes(8, "big") + row["time_ms"].to_bytes(8, "big")
        payload += bytes([row["kind"]]) + row["amount_cents"].to_bytes(8, "big")
        payload += row["balance_cents"].to_bytes(8, "big")
    return payload


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
@pytest.mark.parametrize("position", [0, 2, HISTORY_ENTRIES_MAX - 1])
def test_a_bad_value_in_any_history_entry_is_refused(field: str, value: int, position: int):
    rows = [dict(GOOD_ROW, entry_id=n + 1) for n in range(HISTORY_ENTRIES_MAX)]
    rows[position][field] = value
    decoder = client_decoder()
    decoder.receive_data(frame_from_spec(Opcode.HISTORY_REPLY, 9, history_reply_payload(rows)))
    with pytest.raises(WireError) as refused:
        decoder.next_frame()
    assert refused.value.status is Status.FORMAT_ERROR
    assert refused.value.fatal and refused.value.request_id == 9
    assert field in refused.value.detail  # the column check falls back to naming it
    with pytest.raises(WireError) as built:
        HistoryEntry(**dict(GOOD_ROW, **{field: value}))
    assert built.value.status is Status.FORMAT_ERROR


@pytest.mark.parametrize("claimed", [2, 3, 255])
def test_an_entry_count_the_payload_does_not_hold_is_refused(claimed: int) -> None:
    payload = bytearray(history_reply_payload([GOOD_ROW, GOOD_ROW]))
    payload[1] = claimed
    if claimed == 2:
        payload += b"\x00"  # the count is right, one byte too many follows
    decoder = client_decoder()
    decoder.receive_data(frame_from_spec(Opcode.HISTORY_REPLY, 4, bytes(payload)))
    with pytest.raises(WireError) as refused:
        decoder.next_frame()
    assert refused.value.status is Status.FORMAT_ERROR and refused.value.request_id == 4


def test_a_claimed_count_builds_no_struct_before_the_size_proves_it() -> None:
    """The decoder keeps one struct per item count; only counts that fit a payload get one,
    so a peer cannot make it compile one for every count a byte can hold."""
    payload = bytearray(history_reply_payload([GOOD_ROW]))
    decoder = client_decoder()
    decoder.receive_data(frame_from_spec(Opcode.HISTORY_REPLY, 1, bytes(payload)))
    assert decoder.next_frame() is not None and 1 in HistoryReply.FAST._wholes
    for claimed in range(2, 256):
        payload[1] = claimed
        decoder.receive_data(frame_from_spec(Opcode.HISTORY_REPLY, claimed, bytes(payload)))
        with pytest.raises(WireError):
            decoder.next_frame()
        decoder = client_decoder()  # a refusal ends a decoder: start a fresh one
    fits = (PAYLOAD_BYTES_MAX - 2) // len(history_reply_payload([GOOD_ROW])[2:])
    assert max(HistoryReply.FAST._wholes) <= fits


def test_history_entries_decode_to_what_was_built() -> None:
    built = tuple(
        HistoryEntry(n + 1, n, EntryKind.WITHDRAWAL if n % 2 else EntryKind.DEPOSIT, n + 1, n)
        for n in range(HISTORY_ENTRIES_MAX)
    )
    decoder = client_decoder()
    decoder.receive_data(encode(HistoryReply(Status.APPROVED, built), 3))
    frame = decoder.next_frame()
    assert frame is not None and frame.message == HistoryReply(Status.APPROVED, built)
    decoded = frame.message.entries
    assert [entry.kind for entry in decoded] == [entry.kind for entry in built]
    assert all(type(entry.kind) is EntryKind for entry in decoded)
    assert decoded[1].amount_cents == 2 and decoded[1].balance_cents == 1


def test_a_history_entry_is_a_value_of_its_own_type() -> None:
    entry = HistoryEntry(1, 2, EntryKind.DEPOSIT, 3, 4)
    assert entry == HistoryEntry(1, 2, 1, 3, 4) and hash(entry) == hash(HistoryEntry(1, 2, 1, 3, 4))
    assert entry != (1, 2, 1, 3, 4)  # not equal to a bare tuple, as a dataclass would not be
    assert entry != HistoryEntry(1, 2, EntryKind.WITHDRAWAL, 3, 4)
    assert repr(entry) == (
        "HistoryEntry(entry_id=1, time_ms=2, kind=<EntryKind.DEPOSIT: 1>,"
        " amount_cents=3, balance_cents=4)"
    )
    assert copy.copy(entry) == entry and pickle.loads(pickle.dumps(entry)) == entry
    with pytest.raises(AttributeError):
        entry.amount_cents = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        HistoryEntry(1, 2, EntryKind.DEPOSIT, 3.0, 4)  # money is int cents


def test_error_cannot_carry_approved() -> None:
    with pytest.raises(WireError):
        Error(Status.APPROVED)


@pytest.mark.parametrize("field", ["frame_timeout_s", "login_timeout_s", "idle_timeout_s"])
@pytest.mark.parametrize("value", [0, 2**16])
def test_hello_timeouts_fit_u16_and_are_positive(field: str, value: int) -> None:
    values = dict(payload_bytes_max=1024, history_entries_max=20, amount_cents_max=100,
                  frame_timeout_s=10, login_timeout_s=30, idle_timeout_s=120)
    values[field] = value
    with pytest.raises(WireError):
        Hello(**values)


def test_shutdown_grace_fits_u16() -> None:
    assert encode(Shutdown(0))[10:12] == b"\x00\x00"
    assert encode(Shutdown(65535))[10:12] == b"\xff\xff"
    with pytest.raises(WireError):
        Shutdown(65536)


# -- Account and PIN ------------------------------------------------------------------


def test_lowercase_account_on_the_wire_decodes_to_uppercase() -> None:
    decoder = server_decoder()
    decoder.receive_data(frame_from_spec(0x01, 1, b"ab-12345" + b"0042"))
    assert decoder.next_frame() == Frame(1, Login("AB-12345", "0042"))


def test_account_is_sent_in_uppercase() -> None:
    assert encode(Login("xy-00001", "9999"), 1)[10:18] == b"XY-00001"


@pytest.mark.parametrize("account", ["AB12345", "AB-1234", "AB-123456", "A1-12345", "ÄB-12345",
                                     "AB-١٢٣٤٥", " AB-12345", "AB-12345\n"])
def test_malformed_account_is_refused(account: str) -> None:
    with pytest.raises(WireError):
        Login(account, "1234")


@pytest.mark.parametrize("pin", ["123", "12345", "12a4", "١٢٣٤", "123 "])
def test_malformed_pin_is_refused(pin: str) -> None:
    with pytest.raises(WireError):
        Login("AB-12345", pin)


@pytest.mark.parametrize(
    ("account", "pin", "detail"),
    [(b"AB-1234\xff", b"1234", "account"), (b"AB-12345", b"12\xe93", "PIN")],
)
def test_non_ascii_login_bytes_are_a_format_error(account: bytes, pin: bytes, detail: str):
    decoder = server_decoder()
    decoder.receive_data(frame_from_spec(Opcode.LOGIN, 6, account + pin))
    with pytest.raises(WireError) as refused:
        decoder.next_frame()
    assert refused.value.status is Status.FORMAT_ERROR and refused.value.request_id == 6
    assert refused.value.detail.startswith(detail)
    assert not isinstance(refused.value.__cause__, UnicodeDecodeError)


def test_pin_is_not_in_repr() -> None:
    login = Login("AB-12345", "8642")
    assert "8642" not in repr(login)
    assert "8642" not in repr(Frame(1, login))
    assert "AB-12345" in repr(login)


# -- Session tokens ---------------------------------------------------------------------

TOKEN = bytes(range(100, 116))


def test_resume_reads_its_account_as_login_does() -> None:
    decoder = server_decoder()
    decoder.receive_data(frame_from_spec(Opcode.RESUME, 1, b"ab-12345" + TOKEN))
    assert decoder.next_frame() == Frame(1, Resume("AB-12345", TOKEN))
    assert encode(Resume("xy-00001", TOKEN), 2)[10:18] == b"XY-00001"
    with pytest.raises(WireError):
        Resume("AB-1234X", TOKEN)


@pytest.mark.parametrize("size", [0, 15, 17])
def test_a_session_token_is_exactly_sixteen_bytes(size: int) -> None:
    token = bytes(size)
    for build in (lambda: Resume("AB-12345", token), lambda: SessionToken(token)):
        with pytest.raises(WireError) as refused:
            build()
        assert refused.value.status is Status.FORMAT_ERROR


def test_a_session_token_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        SessionToken(TOKEN.hex())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Resume("AB-12345", list(TOKEN))  # type: ignore[arg-type]


def test_a_session_token_is_not_in_repr() -> None:
    for request_id, message in ((1, Resume("AB-12345", TOKEN)), (0, SessionToken(TOKEN))):
        for shown in (repr(message), repr(Frame(request_id, message))):
            assert TOKEN.hex() not in shown and repr(TOKEN) not in shown, shown


# -- Money ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cents"),
    [("20", 2000), ("20.5", 2050), ("20.05", 2005), ("$1,000.00", 100_000), (".75", 75),
     ("$0", 0), (" 7 ", 700), ("1234567", 123_456_700), ("$1,234,567.89", 123_456_789)],
)
def test_parse_dollars(text: str, cents: int) -> None:
    assert parse_dollars(text) == cents


@pytest.mark.parametrize(
    "text", ["", "$", ".", "-5", "+5", "1.234", "1,00", "12,34.00", "abc", "1e3", "5.", "\u0665"]
)
def test_parse_dollars_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dollars(text)


@pytest.mark.parametrize(
    ("cents", "text"),
    [(0, "$0.00"), (5, "$0.05"), (123_456, "$1,234.56"), (-250, "-$2.50"),
     (AMOUNT_CENTS_MAX, "$100,000.00")],
)
def test_format_cents(cents: int, text: str) -> None:
    assert format_cents(cents) == text


@pytest.mark.parametrize("cents", [0, 1, 99, 100, 123_456, 10**15 + 7])
def test_format_then_parse_is_exact(cents: int) -> None:
    assert parse_dollars(format_cents(cents)) == cents
