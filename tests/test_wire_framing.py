"""The codec's shortcut paths give what the general paths give, byte for byte.

``wire.encode`` packs header and payload with one struct per layout (per item count for
HISTORY_REPLY: ``FastLayout.framing``), where ``frame_bytes`` packs the payload with
``FastLayout.pack`` and puts a header in front; and the decoder makes a message with
``cls.DECODE``, ``from_payload`` in fewer calls. Every opcode, and every entry count
0..HISTORY_ENTRIES_MAX, is checked against the general path; and for the decoder, good
payloads and damaged ones alike (same message, or same error, status and detail).
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest

from wire import (
    HISTORY_ENTRIES_MAX,
    MESSAGE_TYPES,
    PAYLOAD_BYTES_MAX,
    EntryKind,
    HistoryEntry,
    HistoryReply,
    Status,
    WireError,
    encode,
    frame_bytes,
)
from wire._layout import FAST_HEADER
from wire._messages import Message, Opcode
from wire.bench import cases

VECTORS = json.loads((Path(__file__).parent.parent / "spec" / "vectors.json").read_text())


def general_frame(message: Message, request_id: int) -> bytes:
    """The frame as built before the shortcut: payload, then header and CRC around it."""
    return frame_bytes(message.OPCODE, request_id, message.FAST.pack(message.wire_values()))


def entries(count: int) -> tuple[HistoryEntry, ...]:
    kinds = itertools.cycle(EntryKind)
    return tuple(
        HistoryEntry(2**63 - 1 - n, n * 1_000, next(kinds), n + 1, 2**63 - 1 - n)
        for n in range(count)
    )


@pytest.mark.parametrize(("label", "message", "request_id"), cases(), ids=[c[0] for c in cases()])
def test_encode_is_the_general_frame_for_every_opcode(
    label: str, message: Message, request_id: int
) -> None:
    assert encode(message, request_id) == general_frame(message, request_id)


@pytest.mark.parametrize("count", range(HISTORY_ENTRIES_MAX + 1))
@pytest.mark.parametrize("status", [Status.APPROVED, Status.NOT_LOGGED_IN])
def test_encode_is_the_general_frame_for_every_entry_count(count: int, status: Status) -> None:
    reply = HistoryReply(status, entries(count) if status is Status.APPROVED else ())
    for request_id in (1, 2**32 - 1):
        assert encode(reply, request_id) == general_frame(reply, request_id)


def test_each_fixed_layouts_framing_is_the_header_then_its_payload() -> None:
    for cls in MESSAGE_TYPES.values():
        if cls.FAST.items is not None:
            assert cls.FRAMING is None
            continue
        assert cls.FRAMING is not None
        layout, payload_bytes = cls.FRAMING
        assert payload_bytes == cls.FAST.head.size <= PAYLOAD_BYTES_MAX
        assert layout.size == FAST_HEADER.head.size + payload_bytes
        assert layout.format.count(">") == 1


def test_framing_for_an_array_is_kept_per_count() -> None:
    fast = HistoryReply.FAST
    assert fast.framing(3) is fast.framing(3)
    layout, payload_bytes = fast.framing(3)
    assert payload_bytes == fast.whole(3).size
    assert layout.size == FAST_HEADER.head.size + payload_bytes


def payloads() -> list[tuple[str, bytes]]:
    """(opcode, payload) of every golden vector, and damaged copies of each: a byte
    short, a byte over, and each byte set to 0x00 and to 0xFF in turn."""
    found = []
    for vector in VECTORS["golden"]:
        payload = bytes.fromhex(vector["hex"])[10:-4]
        found += [(vector["opcode"], payload), (vector["opcode"], payload[:-1]),
                  (vector["opcode"], payload + b"\x00")]
        for at, byte in itertools.product(range(len(payload)), (0x00, 0xFF)):
            damaged = bytearray(payload)
            damaged[at] = byte
            found.append((vector["opcode"], bytes(damaged)))
    return found


def outcome(decode: object, payload: bytes) -> object:
    try:
        return decode(payload)  # type: ignore[operator]
    except WireError as error:
        return (WireError, error.status, error.detail, error.fatal)
    except struct.error as error:
        return (struct.error, str(error))


def test_the_decoders_path_is_from_payload_for_good_and_damaged_payloads() -> None:
    for opcode, payload in payloads():
        cls = MESSAGE_TYPES[Opcode[opcode]]
        assert outcome(cls.DECODE, payload) == outcome(cls.from_payload, payload), (
            opcode, payload.hex(),
        )
