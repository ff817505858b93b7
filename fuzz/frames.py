"""What both fuzz harnesses share: the input layout, the seed corpus and the mutator.

An input is one control byte followed by a byte stream as it would arrive on a socket.
The control byte is the harness's own knob (how the stream is chunked, or which
scenario the session runs in); keeping it outside the stream lets the mutator treat the
stream as a sequence of frames.

Random mutations almost never survive the CRC-32, so a coverage-guided fuzzer left to
itself would spend its time on the CRC check. ``custom_mutator`` therefore usually edits
one frame's opcode, request id or payload and then repairs the header's length field
and the CRC, so the damage reaches the opcode, request id and payload checks behind
them; sometimes it mutates the raw bytes instead, so framing errors stay covered too.

Nothing here imports atheris: the byte-level mutation is passed in (``atheris.Mutate``
under the fuzzer, ``random_byte_mutator`` in the test suite and the fallback mode).
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from wire._codec import frame_bytes
from wire._layout import CRC_BYTES, FAST_CRC, HEADER_BYTES
from wire._limits import PAYLOAD_BYTES_MAX
from wire._messages import Opcode

VECTORS_PATH = Path(__file__).resolve().parents[1] / "spec" / "vectors.json"

CONTROL_BYTES = 1
"""Length of the control prefix of every input."""

WHOLE_STREAM = 0xFF
"""Control byte meaning "deliver the stream in one chunk"."""

RAW_MUTATION_PROBABILITY = 0.25
"""Share of mutations left unrepaired, so magic, version, length and CRC errors stay covered."""

INPUT_BYTES_MAX = 4096
"""libFuzzer's default ``-max_len``; the random fallback keeps to it as well."""

ByteMutator = Callable[[bytes, int], bytes]
"""``(data, max_size) -> mutated``: the signature of ``atheris.Mutate``."""


class Finding(AssertionError):
    """A harness invariant failed: the input that raised it is a bug report.

    An AssertionError, so pytest shows it as a failed check; raised explicitly, not with
    ``assert``, so ``python -O`` cannot strip the checks.
    """


# -- Input layout -------------------------------------------------------------------------


def split_input(data: bytes) -> tuple[int, bytes]:
    """(control byte, stream). An empty input is an empty stream delivered whole."""
    if not data:
        return WHOLE_STREAM, b""
    return data[0], data[CONTROL_BYTES:]


def chunks(stream: bytes, control: int) -> Iterator[bytes]:
    """The stream cut as the control byte says: whole, or alternating sizes 1-16.

    Control 0x00 delivers one byte at a time, the worst case for an incremental decoder;
    the high and low nibble otherwise give two alternating chunk sizes, so every
    frame boundary falls at many different places within a chunk.
    """
    if control == WHOLE_STREAM:
        yield stream
        return
    sizes = ((control >> 4) + 1, (control & 0x0F) + 1)
    position, turn = 0, 0
    while position < len(stream):
        size = sizes[turn]
        yield stream[position : position + size]
        position += size
        turn ^= 1


# -- Frames -------------------------------------------------------------------------------


def split_frames(stream: bytes) -> list[bytes]:
    """Cut a stream where its length fields say frames end; the last piece may be short.

    Garbage is cut the same way (a header's worth at a time), so any bytes split and
    join back to themselves: ``b"".join(split_frames(s)) == s``.
    """
    pieces = []
    position = 0
    while position < len(stream):
        header = stream[position : position + HEADER_BYTES]
        if len(header) < HEADER_BYTES:
            pieces.append(header)
            break
        length = int.from_bytes(header[HEADER_BYTES - 2 :], "big")
        end = position + HEADER_BYTES + length + CRC_BYTES
        pieces.append(stream[position:end])
        position = end
    return pieces


def repair(frame: bytes) -> bytes:
    """The frame with its length field and CRC made to fit its payload.

    Opcode and request id are kept, magic and version restored; a piece too short to
    hold a header is returned unchanged. A payload over the limit is cut to it, so the
    repaired frame passes every framing check and is judged on its contents.
    """
    if len(frame) < HEADER_BYTES + CRC_BYTES:
        return frame
    opcode = frame[3]
    request_id = int.from_bytes(frame[4:8], "big")
    payload = frame[HEADER_BYTES:-CRC_BYTES][:PAYLOAD_BYTES_MAX]
    return frame_bytes(opcode, request_id, payload)


def crc_is_correct(frame: bytes) -> bool:
    """Whether a whole frame's length field and CRC agree with its bytes."""
    if len(frame) < HEADER_BYTES + CRC_BYTES:
        return False
    length = int.from_bytes(frame[HEADER_BYTES - 2 : HEADER_BYTES], "big")
    if len(frame) != HEADER_BYTES + length + CRC_BYTES:
        return False
    (crc,) = FAST_CRC.unpack_from(frame, len(frame) - CRC_BYTES)
    return zlib.crc32(frame[: -CRC_BYTES]) == crc


# -- Seed corpus --------------------------------------------------------------------------


@functools.cache
def load_vectors() -> dict:
    """spec/vectors.json, read once: the mutator splices golden frames in on every call."""
    return json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


@functools.cache
def golden_frames(sender: str | None = None) -> tuple[bytes, ...]:
    """The specification's golden frames (spec/vectors.json), of one sender or all."""
    return tuple(
        bytes.fromhex(vector["hex"])
        for vector in load_vectors()["golden"]
        if sender is None or vector["sender"] == sender
    )


def negative_frames() -> tuple[bytes, ...]:
    """The specification's malformed byte strings, each refused with a known status."""
    return tuple(bytes.fromhex(vector["hex"]) for vector in load_vectors()["negative"])


def write_corpus(directory: Path, seeds: list[bytes]) -> int:
    """Write each seed as one file named by its CRC; how many distinct files were written."""
    directory.mkdir(parents=True, exist_ok=True)
    names = set()
    for seed in seeds:
        name = f"seed-{zlib.crc32(seed):08x}-{len(seed)}"
        (directory / name).write_bytes(seed)
        names.add(name)
    return len(names)


# -- Mutation -----------------------------------------------------------------------------


def random_byte_mutator(rng: random.Random) -> ByteMutator:
    """A stand-in for ``atheris.Mutate`` without coverage feedback: flip, set, insert, cut.

    Used by the test suite and by the clearly labelled ``--no-atheris`` fallback; it is
    blind, so it finds shallow bugs only.
    """

    def mutate(data: bytes, max_size: int) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            edit = rng.randrange(4)
            if edit == 2 or not out:  # insert
                out.insert(rng.randint(0, len(out)), rng.randrange(256))
            elif edit == 0:
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            elif edit == 1:
                out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF,
                                                          rng.randrange(256)))
            else:
                del out[rng.randrange(len(out))]
        return bytes(out[:max_size])

    return mutate


def _mutate_payload(frame: bytes, rng: random.Random, mutate_bytes: ByteMutator) -> bytes:
    payload = frame[HEADER_BYTES:-CRC_BYTES] if len(frame) >= HEADER_BYTES + CRC_BYTES else b""
    head = frame[:HEADER_BYTES] if len(frame) >= HEADER_BYTES else frame_bytes(
        rng.choice(list(Opcode)), 1, b"")[:HEADER_BYTES]
    return head + mutate_bytes(payload, PAYLOAD_BYTES_MAX) + bytes(CRC_BYTES)


def _mutate_header(frame: bytes, rng: random.Random, mutate_bytes: ByteMutator) -> bytes:
    """Change the opcode or request id (mutated, or set to a boundary value)."""
    if len(frame) < HEADER_BYTES + CRC_BYTES:
        frame = frame_bytes(rng.choice(list(Opcode)), 1, b"")
    opcode, request_id = frame[3], int.from_bytes(frame[4:8], "big")
    choice = rng.randrange(3)
    if choice == 0:
        opcode = rng.choice([*Opcode, rng.randrange(256)])
    elif choice == 1:
        request_id = rng.choice((0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)))
    else:
        mutated = mutate_bytes(frame[3:8], 5).ljust(5, b"\x00")
        opcode, request_id = mutated[0], int.from_bytes(mutated[1:5], "big")
    return frame_bytes(opcode, request_id, frame[HEADER_BYTES:-CRC_BYTES])


def custom_mutator(
    data: bytes, max_size: int, seed: int, *, mutate_bytes: ByteMutator | None = None
) -> bytes:
    """libFuzzer's custom mutator: edit frames, then repair length and CRC (usually).

    ``seed`` drives every choice, as libFuzzer requires for reproducible runs.
    """
    rng = random.Random(seed)
    mutate_bytes = mutate_bytes or random_byte_mutator(rng)
    if rng.random() < RAW_MUTATION_PROBABILITY:
        return mutate_bytes(data, max_size)[:max_size]
    control, stream = split_input(data)
    frames = split_frames(stream) or [b""]
    index = rng.randrange(len(frames))
    operation = rng.randrange(6)
    if operation <= 1:
        frames[index] = repair(_mutate_payload(frames[index], rng, mutate_bytes))
    elif operation == 2:
        frames[index] = _mutate_header(frames[index], rng, mutate_bytes)
    elif operation == 3:  # splice: a copy of one frame, or a golden one, somewhere
        extra = rng.choice([*frames, *golden_frames()])
        frames.insert(rng.randint(0, len(frames)), extra)
    elif operation == 4 and len(frames) > 1:
        del frames[index]
    else:
        control = rng.randrange(256)
    out = bytes([control]) + b"".join(frames)
    return out[:max_size]
