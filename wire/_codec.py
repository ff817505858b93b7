"""Frames to bytes and back, without I/O (sans-IO, in the manner of h11).

``encode`` turns a message into one frame. ``Decoder`` takes bytes in whatever chunks
the network delivers (``receive_data``) and hands out whole frames (``next_frame``),
returning None when it needs more bytes. Every problem with the bytes raises
``WireError`` and nothing else; after a fatal one the decoder refuses to go on.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from itertools import chain

from wire._errors import WireError
from wire._layout import CRC_BYTES, FAST_CRC, FAST_HEADER, HEADER_BYTES
from wire._limits import MAGIC, PAYLOAD_BYTES_MAX, PROTOCOL_VERSION
from wire._messages import MESSAGE_TYPES, Message, Sender
from wire._status import Status

_MAGIC_BYTES = len(MAGIC)
_VERSION_END = _MAGIC_BYTES + 1
_HEADER = FAST_HEADER.head

_RECEIVED_BY: dict[Sender, dict[int, type[Message]]] = {
    sender: {op: cls for op, cls in MESSAGE_TYPES.items() if cls.SENDER is sender}
    for sender in Sender
}
"""The message class of each opcode a side receives, by the side that sends them: one
lookup per frame. Shared by every decoder: one per connection would be 570 bytes each
(tracemalloc), on a server that holds thousands of idle sessions."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: the request id from its header and the message it carried."""

    request_id: int
    message: Message


def encode(message: Message, request_id: int = 0) -> bytes:
    """One whole frame for ``message``. Raises ``WireError`` if anything does not fit.

    The bytes are ``frame_bytes(message.OPCODE, request_id, message.FAST.pack(values))``;
    header and payload are packed with one struct (``FastLayout.framing``).
    """
    if type(request_id) is not int or request_id not in message.REQUEST_IDS:
        raise WireError(
            Status.FORMAT_ERROR,
            f"request id {request_id!r} not allowed for {message.OPCODE.name}",
        )
    framing = message.FRAMING
    if framing is not None:  # fixed fields: their size was checked at registration
        layout, payload_bytes = framing
        body = layout.pack(
            MAGIC, PROTOCOL_VERSION, message.OPCODE, request_id, payload_bytes,
            *message.wire_values(),
        )
    else:
        *head, items = message.wire_values()
        layout, payload_bytes = message.FAST.framing(len(items))
        if payload_bytes > PAYLOAD_BYTES_MAX:
            raise WireError(
                Status.FORMAT_ERROR, f"payload of {payload_bytes} bytes is over the limit"
            )
        body = layout.pack(
            MAGIC, PROTOCOL_VERSION, message.OPCODE, request_id, payload_bytes,
            *head, len(items), *chain.from_iterable(items),
        )
    return body + FAST_CRC.pack(zlib.crc32(body))


def frame_bytes(
    opcode: int, request_id: int, payload: bytes, *, version: int = PROTOCOL_VERSION
) -> bytes:
    """A frame around ``payload``: header with its length, then the CRC. Nothing is checked.

    ``encode`` calls this once it has checked the message. Tests and the fuzzer call it to
    put any opcode, request id or payload bytes behind a valid CRC, so that damaged
    content reaches the checks after it. Raises ``struct.error`` if a header field does
    not fit its width.
    """
    body = _HEADER.pack(MAGIC, version, opcode, request_id, len(payload)) + payload
    return body + FAST_CRC.pack(zlib.crc32(body))


class Decoder:
    """Incremental decoder for the frames one side receives.

    ``Decoder(Sender.CLIENT)`` is the server's: it accepts what clients send
    (requests). ``Decoder(Sender.SERVER)`` is the client's: replies and notices.
    A frame of the other direction is treated as an unknown opcode.

    A server keeps one per connection, idle ones included: hence ``__slots__`` and no
    table of its own.
    """

    __slots__ = ("_buffer", "_failure", "_payload_bytes_max", "_sender", "_types")

    def __init__(self, sender: Sender, *, payload_bytes_max: int = PAYLOAD_BYTES_MAX) -> None:
        self._sender = sender
        self._payload_bytes_max = payload_bytes_max
        self._buffer = bytearray()
        self._failure: WireError | None = None
        self._types = _RECEIVED_BY[sender]

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet consumed: non-zero means a frame has begun."""
        return len(self._buffer)

    @property
    def unconsumed(self) -> bytes:
        """The bytes received but not yet made into frames."""
        return bytes(self._buffer)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes as they arrived. Call ``next_frame`` until it returns None."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None if more bytes are needed.

        Raises ``WireError``. A non-fatal one consumed its frame and decoding may go
        on; after a fatal one every call raises it again.
        """
        if self._failure is not None:
            failure = self._failure  # a fresh exception: re-raising one grows its traceback
            raise WireError(
                failure.status, f"decoder stopped: {failure.detail}",
                request_id=failure.request_id,
            )
        try:
            return self._next_frame()
        except WireError as error:
            if error.fatal:
                self._failure = error
            raise

    def _next_frame(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < HEADER_BYTES:
            _check_header_start(buffer)
            return None
        magic, version, opcode, request_id, length = _HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise WireError(Status.FORMAT_ERROR, "bad magic")
        if version != PROTOCOL_VERSION:
            raise WireError(Status.UNSUPPORTED_VERSION, f"protocol version {version}")
        if length > self._payload_bytes_max:
            raise WireError(
                Status.FORMAT_ERROR,
                f"payload of {length} bytes announced, limit {self._payload_bytes_max}",
                request_id=request_id,
            )
        crc_start = HEADER_BYTES + length
        frame_end = crc_start + CRC_BYTES
        if len(buffer) < frame_end:
            return None
        (crc,) = FAST_CRC.unpack_from(buffer, crc_start)
        body = bytes(buffer[:crc_start])  # immutable: views of it cannot pin the buffer
        del buffer[:frame_end]
        if zlib.crc32(body) != crc:
            raise WireError(Status.FORMAT_ERROR, "CRC mismatch", request_id=request_id)
        return Frame(request_id, self._message(opcode, request_id, body[HEADER_BYTES:]))

    def _message(self, opcode: int, request_id: int, payload: bytes) -> Message:
        cls = self._types.get(opcode)
        if cls is None:
            raise WireError(
                Status.INVALID_TRANSACTION,
                f"opcode 0x{opcode:02X} is not one a {self._sender.value} sends",
                fatal=False,
                request_id=request_id,
            )
        if request_id not in cls.REQUEST_IDS:
            raise WireError(
                Status.FORMAT_ERROR,
                f"request id {request_id} not allowed for {cls.OPCODE.name}",
                request_id=request_id,
            )
        try:
            return cls.DECODE(payload)  # cls.from_payload(payload), in fewer calls
        except WireError as error:
            error.request_id = request_id
            raise
        except struct.error as error:
            raise WireError(
                Status.FORMAT_ERROR,
                f"{cls.OPCODE.name} payload does not match its layout: {error}",
                request_id=request_id,
            ) from error


def _check_header_start(buffer: bytearray) -> None:
    """Refuse garbage as soon as the bytes that prove it have arrived, before a whole
    header has: a peer sending junk is stopped at its first wrong byte."""
    if buffer[:_MAGIC_BYTES] != MAGIC[: len(buffer)]:
        raise WireError(Status.FORMAT_ERROR, "bad magic")
    if len(buffer) >= _VERSION_END and buffer[_MAGIC_BYTES] != PROTOCOL_VERSION:
        raise WireError(Status.UNSUPPORTED_VERSION, f"protocol version {buffer[_MAGIC_BYTES]}")
