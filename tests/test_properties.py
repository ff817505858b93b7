"""Property tests (Hypothesis) of the codec over generated messages and hostile bytes.

Covers: every message type, built from strategies of valid fields, survives encode then
decode unchanged for any request id its opcode allows, also when many frames are glued
together and delivered in arbitrary chunks; and a decoder of either side fed random bytes,
random frames with a correct CRC, or valid frames with bytes flipped, inserted or deleted
(with the length and CRC repaired so the damage reaches the payload checks, and without)
either yields frames or raises WireError, and nothing else. A frame it does yield encodes
and decodes back to itself.
"""

from __future__ import annotations

import itertools
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import (
    AMOUNT_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    MESSAGE_TYPES,
    REQUEST_ID_MAX,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Decoder,
    Deposit,
    DepositReply,
    EntryKind,
    Error,
    Features,
    FeaturesReply,
    Frame,
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
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    Status,
    Transfer,
    TransferReply,
    WireError,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire._limits import BALANCE_CENTS_MAX, PAYLOAD_BYTES_MAX, SECONDS_MAX

settings.register_profile(
    "wire", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("wire")

# -- Strategies of valid messages ---------------------------------------------------------

accounts = st.from_regex(r"[A-Za-z]{2}-[0-9]{5}", fullmatch=True)
pins = st.from_regex(r"[0-9]{4}", fullmatch=True)
txn_ids = st.binary(min_size=16, max_size=16)
amounts = st.integers(1, AMOUNT_CENTS_MAX)
balances = st.integers(0, BALANCE_CENTS_MAX)
entry_ids = st.integers(1, BALANCE_CENTS_MAX)
seconds = st.integers(1, SECONDS_MAX)
refusals = st.sampled_from([s for s in Status if s is not Status.APPROVED])

entries = st.builds(
    HistoryEntry,
    entry_id=entry_ids,
    time_ms=balances,
    kind=st.sampled_from(EntryKind),
    amount_cents=amounts,
    balance_cents=balances,
)


def status_only(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, st.sampled_from(Status))


def money_reply(cls: type[Message]) -> st.SearchStrategy[Message]:
    approved = st.builds(
        cls, st.just(Status.APPROVED), balance_cents=balances, entry_id=entry_ids,
        time_ms=balances,
    )
    return approved | st.builds(cls, refusals)


MESSAGES: dict[Opcode, st.SearchStrategy[Message]] = {
    Opcode.LOGIN: st.builds(Login, accounts, pins),
    Opcode.LOGOUT: st.builds(Logout),
    Opcode.BALANCE: st.builds(Balance),
    Opcode.DEPOSIT: st.builds(Deposit, txn_ids, amounts),
    Opcode.WITHDRAW: st.builds(Withdraw, txn_ids, amounts),
    Opcode.HISTORY: st.builds(History, st.integers(1, HISTORY_ENTRIES_MAX)),
    Opcode.PING: st.builds(Ping),
    Opcode.RESUME: st.builds(Resume, accounts, st.binary(min_size=16, max_size=16)),
    Opcode.RESUME_REPLY: status_only(ResumeReply),
    Opcode.TRANSFER: st.builds(Transfer, txn_ids, amounts, accounts),
    Opcode.TRANSFER_REPLY: money_reply(TransferReply),
    Opcode.CHANGE_PIN: st.builds(ChangePin, pins, pins),
    Opcode.CHANGE_PIN_REPLY: status_only(ChangePinReply),
    Opcode.FEATURES: st.builds(Features, st.integers(0, 255)),
    Opcode.FEATURES_REPLY: st.builds(FeaturesReply, st.just(Status.APPROVED), st.integers(0, 255))
    | st.builds(FeaturesReply, refusals),
    Opcode.SESSION_TOKEN: st.builds(SessionToken, st.binary(min_size=16, max_size=16)),
    Opcode.LOGIN_REPLY: status_only(LoginReply),
    Opcode.LOGOUT_REPLY: status_only(LogoutReply),
    Opcode.PING_REPLY: status_only(PingReply),
    Opcode.BALANCE_REPLY: st.builds(BalanceReply, st.just(Status.APPROVED), balances)
    | st.builds(BalanceReply, refusals),
    Opcode.DEPOSIT_REPLY: money_reply(DepositReply),
    Opcode.WITHDRAW_REPLY: money_reply(WithdrawReply),
    Opcode.HISTORY_REPLY: st.builds(
        HistoryReply,
        st.just(Status.APPROVED),
        st.lists(entries, max_size=HISTORY_ENTRIES_MAX).map(tuple),
    )
    | st.builds(HistoryReply, refusals),
    Opcode.HELLO: st.builds(
        Hello,
        payload_bytes_max=st.integers(1, PAYLOAD_BYTES_MAX),
        history_entries_max=st.integers(1, HISTORY_ENTRIES_MAX),
        amount_cents_max=amounts,
        frame_timeout_s=seconds,
        login_timeout_s=seconds,
        idle_timeout_s=seconds,
    ),
    Opcode.SHUTDOWN: st.builds(Shutdown, st.integers(0, SECONDS_MAX)),
    Opcode.SESSION_EXPIRED: st.builds(SessionExpired),
    Opcode.ERROR: st.builds(Error, refusals),
}
assert set(MESSAGES) == set(Opcode), "every opcode needs a strategy"


@st.composite
def frames(draw: st.DrawFn, sender: Sender | None = None) -> Frame:
    """A valid message of any type (or of one sender's) with a request id it allows."""
    opcodes = [op for op in Opcode if sender is None or MESSAGE_TYPES[op].SENDER is sender]
    message = draw(st.sampled_from(opcodes).flatmap(MESSAGES.__getitem__))
    ids = message.REQUEST_IDS
    request_id = draw(st.sampled_from([ids.start, ids.stop - 1]) | st.integers(ids.start,
                                                                             ids.stop - 1))
    return Frame(request_id, message)


senders = st.sampled_from(Sender)


def decoder_receiving_from(sender: Sender) -> Decoder:
    return Decoder(sender)


def decode_all(decoder: Decoder, chunks: list[bytes]) -> list[Frame]:
    """Feed ``chunks``; collect frames, skipping non-fatal errors, stopping at a fatal one.

    Only WireError is caught: any other exception fails the calling test. Every frame
    yielded must survive its own round trip.
    """
    out: list[Frame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while True:
            try:
                frame = decoder.next_frame()
            except WireError as error:
                assert isinstance(error.status, Status)
                assert error.status is not Status.APPROVED
                if error.fatal:
                    return out
                continue
            if frame is None:
                break
            assert_round_trips(frame)
            out.append(frame)
    return out


def assert_round_trips(frame: Frame) -> None:
    again = Decoder(frame.message.SENDER)
    again.receive_data(encode(frame.message, frame.request_id))
    assert again.next_frame() == frame


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- Round trips --------------------------------------------------------------------------


@given(frames())
def test_encode_then_decode_is_identity(frame: Frame) -> None:
    data = encode(frame.message, frame.request_id)
    assert len(data) <= 14 + PAYLOAD_BYTES_MAX
    decoder = Decoder(frame.message.SENDER)
    decoder.receive_data(data)
    assert decoder.next_frame() == frame
    assert decoder.buffered_bytes == 0


@given(senders.flatmap(lambda s: st.lists(frames(s), min_size=1, max_size=8)),
       st.lists(st.integers(0, 10_000), max_size=12))
def test_glued_frames_in_any_chunks_come_out_in_order(batch: list[Frame], cuts: list[int]) -> None:
    sender = batch[0].message.SENDER
    stream = b"".join(encode(f.message, f.request_id) for f in batch)
    decoder = Decoder(sender)
    assert decode_all(decoder, split(stream, cuts)) == batch
    assert decoder.buffered_bytes == 0


# -- Hostile bytes ------------------------------------------------------------------------


@given(senders, st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_random_bytes_only_raise_wire_error(sender: Sender, data: bytes, cuts: list[int]) -> None:
    decode_all(decoder_receiving_from(sender), split(data, cuts))


@given(senders, st.binary(max_size=300))
def test_random_bytes_after_a_good_header_prefix_only_raise_wire_error(
    sender: Sender, data: bytes
) -> None:
    decode_all(decoder_receiving_from(sender), [b"AT\x01" + data])


def framed(opcode: int, request_id: int, payload: bytes) -> bytes:
    body = b"AT\x01" + bytes([opcode]) + request_id.to_bytes(4, "big")
    body += len(payload).to_bytes(2, "big") + payload
    return body + zlib.crc32(body).to_bytes(4, "big")


@given(
    senders,
    st.sampled_from(list(Opcode)) | st.integers(0, 255),
    st.sampled_from([0, 1, REQUEST_ID_MAX]) | st.integers(0, REQUEST_ID_MAX),
    st.binary(max_size=80),
)
def test_random_payloads_with_a_correct_crc_only_raise_wire_error(
    sender: Sender, opcode: int, request_id: int, payload: bytes
) -> None:
    decode_all(decoder_receiving_from(sender), [framed(opcode, request_id, payload)])


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 2000),
              st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


def mutate(body: bytearray, edits: list[tuple[str, int, int]]) -> bytearray:
    for kind, position, value in edits:
        if kind != "insert" and not body:
            continue
        index = position % (len(body) + (kind == "insert"))
        if kind == "flip":
            body[index] ^= 1 << (value % 8)
        elif kind == "insert":
            body.insert(index, value)
        else:
            del body[index]
    return body


@given(frames(), mutations, st.sampled_from(["none", "crc", "length and crc"]))
def test_mutated_frames_only_raise_wire_error(
    frame: Frame, edits: list[tuple[str, int, int]], repair: str
) -> None:
    data = encode(frame.message, frame.request_id)
    body, crc = bytearray(data[:-4]), data[-4:]
    body = mutate(body, edits)
    if repair == "length and crc" and len(body) >= 10:
        body[8:10] = (len(body) - 10).to_bytes(2, "big")
    if repair != "none":
        crc = zlib.crc32(body).to_bytes(4, "big")
    decode_all(Decoder(frame.message.SENDER), [bytes(body) + crc])


@given(frames(), mutations)
def test_mutated_payloads_behind_an_intact_header_only_raise_wire_error(
    frame: Frame, edits: list[tuple[str, int, int]]
) -> None:
    """Damage confined to the payload, length and CRC repaired: the payload checks decide."""
    data = encode(frame.message, frame.request_id)
    payload = mutate(bytearray(data[10:-4]), edits)
    decoder = Decoder(frame.message.SENDER)
    decode_all(decoder, [framed(data[3], frame.request_id, bytes(payload))])
