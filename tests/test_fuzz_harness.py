"""The fuzz harnesses (fuzz/) run in the normal suite, without atheris, and can fail.

Covers: each harness's check function passes over its seed corpus and over a bounded,
seeded set of random and mutated inputs (the mutator's structured edits with the blind
byte mutator standing in for atheris); the mutator's repair really gives frames whose
length and CRC are right, so damage reaches the payload checks; and each kind of
check reports a deliberately broken decoder, ledger or lease table as a Finding.
The coverage-guided runs themselves are in fuzz/README.md.
"""

from __future__ import annotations

import random
import zlib

import pytest

from bank.leases import Leases
from bank.ledger import PinResult, PinVerdict, Posting, PostResult
from fuzz import fuzz_decoder, fuzz_session
from fuzz.frames import (
    WHOLE_STREAM,
    Finding,
    chunks,
    crc_is_correct,
    custom_mutator,
    golden_frames,
    random_byte_mutator,
    repair,
    split_frames,
    split_input,
)
from wire import (
    MESSAGE_TYPES,
    Decoder,
    Deposit,
    EntryKind,
    Frame,
    Login,
    Message,
    Opcode,
    Sender,
    Status,
    WireError,
    encode,
)
from wire._codec import frame_bytes
from wire._kinds import KIND_OF_ENTRY
from wire._layout import HEADER_BYTES

RANDOM_INPUTS = 150
MUTATED_INPUTS = 150
"""Bounded so the whole module stays near a few seconds; the fuzzer does the long runs."""


def mutants(corpus: list[bytes], count: int, seed: int) -> list[bytes]:
    """Inputs the custom mutator derives from the corpus, with mutants becoming parents."""
    rng = random.Random(seed)
    pool, out = list(corpus), []
    for _ in range(count):
        child = custom_mutator(rng.choice(pool), 4096, rng.randrange(2**32),
                               mutate_bytes=random_byte_mutator(rng))
        out.append(child)
        pool.append(child)
    return out


def random_inputs(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 300)) for _ in range(count)]


HARNESSES = [fuzz_decoder, fuzz_session]


# -- The harnesses pass on good, random and mutated inputs -----------------------------------


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda h: h.__name__)
def test_harness_passes_its_seed_corpus(harness) -> None:
    seeds = harness.seeds()
    assert len(seeds) >= 40
    for data in seeds:
        harness.test_one_input(data)


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda h: h.__name__)
def test_harness_passes_random_and_mutated_inputs(harness) -> None:
    for data in random_inputs(RANDOM_INPUTS, seed=1):
        harness.test_one_input(data)
    for data in mutants(harness.seeds(), MUTATED_INPUTS, seed=2):
        harness.test_one_input(data)


def test_harness_passes_the_edge_inputs() -> None:
    for data in (b"", b"\x00", b"\xff", b"\xffAT", b"\x00AT\x01"):
        fuzz_decoder.test_one_input(data)
        fuzz_session.test_one_input(data)


# -- Input layout and mutator ------------------------------------------------------------


def test_chunks_cover_the_stream_exactly() -> None:
    stream = bytes(range(100))
    assert list(chunks(stream, WHOLE_STREAM)) == [stream]
    assert all(len(c) == 1 for c in chunks(stream, 0x00))
    for control in range(256):
        assert b"".join(chunks(stream, control)) == stream
    assert split_input(b"") == (WHOLE_STREAM, b"")


def test_split_frames_rejoins_any_bytes() -> None:
    for data in [*random_inputs(50, seed=3), b"".join(golden_frames())]:
        assert b"".join(split_frames(data)) == data
    assert split_frames(b"".join(golden_frames())) == list(golden_frames())


def test_repair_makes_damaged_frames_pass_the_crc_and_reach_the_payload_checks() -> None:
    """Without the repair nearly every mutant dies at the CRC; with it none does."""
    rng = random.Random(4)
    mutate = random_byte_mutator(rng)
    statuses = []
    for _ in range(300):
        frame = rng.choice(golden_frames("client"))
        damaged = frame[:HEADER_BYTES] + mutate(frame[HEADER_BYTES:-4], 1024) + frame[-4:]
        fixed = repair(damaged)
        assert crc_is_correct(fixed)
        assert fixed[HEADER_BYTES:-4] == damaged[HEADER_BYTES:-4]  # the damage is kept
        decoder = Decoder(Sender.CLIENT)
        decoder.receive_data(fixed)
        try:
            decoder.next_frame()
            statuses.append(Status.APPROVED)
        except WireError as error:
            assert "CRC" not in error.detail
            statuses.append(error.status)
        assert not crc_is_correct(damaged) or damaged == fixed
    assert Status.FORMAT_ERROR in statuses  # payload checks reached and refusing
    assert Status.APPROVED in statuses or Status.INVALID_AMOUNT in statuses


def test_the_mutator_mostly_yields_frames_with_a_correct_crc() -> None:
    corpus = fuzz_decoder.seeds()
    children = mutants(corpus, 400, seed=5)
    frames = [f for child in children for f in split_frames(split_input(child)[1])]
    valid = sum(crc_is_correct(f) for f in frames)
    assert valid / len(frames) > 0.6, f"only {valid} of {len(frames)} frames pass the CRC"


def test_the_mutator_is_deterministic_in_its_seed() -> None:
    data = fuzz_decoder.seeds()[0]
    first = custom_mutator(data, 4096, 99)
    assert custom_mutator(data, 4096, 99) == first
    assert all(len(custom_mutator(data, 20, s)) <= 20 for s in range(50))


# -- The checks can fail ------------------------------------------------------------------

PING_INPUT = bytes([WHOLE_STREAM]) + frame_bytes(Opcode.PING, 7, b"")


class ValueErrorDecoder(Decoder):
    """A decoder with a bug: a plain ValueError escapes instead of WireError."""

    def next_frame(self) -> Frame | None:
        if self.buffered_bytes:
            raise ValueError("bug")
        return None


class WrongIdDecoder(Decoder):
    """A decoder with a bug: the frame it yields is not the one it was given."""

    def next_frame(self) -> Frame | None:
        frame = super().next_frame()
        return None if frame is None else Frame(frame.request_id + 1, frame.message)


class AlwaysAcceptingDecoder(Decoder):
    """A decoder with a bug: it ignores direction, accepting replies as well as requests."""

    def _message(self, opcode: int, request_id: int, payload: bytes) -> Message:
        cls = MESSAGE_TYPES[Opcode(opcode)]
        return cls.from_wire(cls.FAST.unpack(payload))


def test_a_decoder_raising_value_error_is_a_finding() -> None:
    assert not isinstance(ValueError("x"), WireError)  # WireError is a ValueError, not conversely
    with pytest.raises(Finding, match="ValueError, not WireError"):
        fuzz_decoder.check_stream(PING_INPUT, ValueErrorDecoder)


def test_a_frame_that_does_not_reencode_is_a_finding() -> None:
    with pytest.raises(Finding, match="encodes as"):
        fuzz_decoder.check_stream(PING_INPUT, WrongIdDecoder)


def test_both_directions_accepting_a_frame_is_a_finding() -> None:
    with pytest.raises(Finding, match="the other handled"):
        fuzz_decoder.check_stream(PING_INPUT, AlwaysAcceptingDecoder)


def test_lower_case_account_is_the_one_allowed_reencoding_difference() -> None:
    lower = frame_bytes(Opcode.LOGIN, 1, b"ab-123451234")
    fuzz_decoder.test_one_input(bytes([0x00]) + lower)
    upper = frame_bytes(Opcode.LOGIN, 1, b"AB-123451234")
    assert fuzz_decoder.canonical(lower) == upper
    ping = frame_bytes(Opcode.PING, 1, b"")
    assert fuzz_decoder.canonical(ping) == ping


def conversation(*frames: bytes, control: int = 0x00) -> bytes:
    """A session input; control 0 means no other ATM and no shutdown."""
    return bytes([control]) + b"".join(frames)


LOGIN = frame_bytes(Opcode.LOGIN, 1, b"AB-123451234")


def deposit(amount_cents: int, request_id: int = 2) -> bytes:
    return encode(Deposit(zlib.crc32(b"%d" % request_id).to_bytes(16, "big"), amount_cents),
                  request_id)


def withdraw_frame(amount_cents: int) -> bytes:
    return frame_bytes(Opcode.WITHDRAW, 3, bytes(16) + amount_cents.to_bytes(8, "big"))


class OverdraftLedger(fuzz_session.FakeLedger):
    """A ledger with a bug: it lets a withdrawal take the balance below zero."""

    def _apply(self, txn_id: bytes, content: tuple[str, EntryKind, int]) -> Posting:
        account, kind, amount_cents = content
        record = self.accounts[account]
        record.balance_cents += KIND_OF_ENTRY[kind].balance_change_cents(amount_cents)
        return Posting(PostResult.BOOKED, 0, 1, 0)


class CrashingLedger(fuzz_session.FakeLedger):
    """A ledger with a bug that ``Session.handle`` catches and turns into SYSTEM_MALFUNCTION."""

    async def balance(self, account: str) -> int:
        raise KeyError(account)


class LeakyLeases(Leases):
    """A lease table with a bug: release forgets to drop the account."""

    def release(self, account: str) -> None:
        self._locks[account].release()


class LeaseIgnoringLedger(fuzz_session.FakeLedger):
    """A ledger whose PIN check approves anyone: ACCOUNT_IN_USE then leaks to strangers."""

    async def verify_pin(self, account: str, pin: str) -> PinVerdict:
        return PinVerdict(PinResult.MATCHED)


def test_a_correct_conversation_passes() -> None:
    fuzz_session.check_conversation(conversation(LOGIN, deposit(500), withdraw_frame(100)))


def test_a_negative_balance_is_a_finding() -> None:
    with pytest.raises(Finding, match="negative"):
        fuzz_session.check_conversation(conversation(LOGIN, withdraw_frame(100_000)),
                                        make_ledger=lambda: _drained(OverdraftLedger()))


def _drained(ledger: fuzz_session.FakeLedger) -> fuzz_session.FakeLedger:
    ledger.accounts["AB-12345"].balance_cents = ledger.accounts["AB-12345"].opening_cents = 0
    return ledger


def test_an_internal_error_in_the_session_is_a_finding() -> None:
    balance = frame_bytes(Opcode.BALANCE, 2, b"")
    with pytest.raises(Finding, match="SYSTEM_MALFUNCTION"):
        fuzz_session.check_conversation(conversation(LOGIN, balance), make_ledger=CrashingLedger)


def test_a_lease_left_after_the_session_ends_is_a_finding() -> None:
    logout = frame_bytes(Opcode.LOGOUT, 2, b"")
    with pytest.raises(Finding, match="leases"):
        fuzz_session.check_conversation(conversation(LOGIN, logout), make_leases=LeakyLeases)


def test_account_in_use_without_the_pin_is_a_finding() -> None:
    other = Login(fuzz_session.OTHER_ACCOUNT, "0000")
    data = conversation(encode(other, 1), control=fuzz_session.OTHER_ATM_BIT)
    fuzz_session.check_conversation(data)  # the real order: PIN first, so INCORRECT_PIN
    with pytest.raises(Finding, match="ACCOUNT_IN_USE"):
        fuzz_session.check_conversation(data, make_ledger=LeaseIgnoringLedger)
