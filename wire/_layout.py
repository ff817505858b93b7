"""Byte layouts of the frame and of every payload, declared with construct.

These declarations are the single source of truth: the specification's field tables and
annotated examples are generated from them, and tests parse every vector with them.

The hot path does not call construct. Measured on this project's 2-core machine, a
compiled construct Struct costs about 5.5 us to parse and 7.7 us to build even a
10-byte header (it allocates a context Container per call), which alone exceeds the
10 us per-frame budget for encode plus decode. So each layout here is restricted to
fixed-size fields, optionally followed by one count-prefixed array of fixed-size items,
and ``FastLayout`` derives a ``struct.Struct`` from the declaration mechanically.
``struct.unpack`` checks sizes exactly, which is the length check compiled construct
skips. Anything the derivation does not understand raises at import time.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from construct import (
    Array,
    Bytes,
    Const,
    FocusedSeq,
    FormatField,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PrefixedArray,
    Rebuild,
    Renamed,
    Struct,
    this,
)

from wire._limits import ACCOUNT_BYTES, MAGIC, PIN_BYTES, SESSION_TOKEN_BYTES, TXN_ID_BYTES

# -- Frame -------------------------------------------------------------------------

HEADER = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ub,
    "opcode" / Int8ub,
    "request_id" / Int32ub,
    "length" / Int16ub,
)
"""Fixed 10-byte frame header, big-endian. ``length`` counts payload bytes only."""

FRAME = Struct(
    "header" / HEADER,
    "payload" / Bytes(this.header.length),
    "crc32" / Int32ub,
)
"""A whole frame: header, payload, then CRC-32 (IEEE 802.3) of header and payload."""

CRC = Int32ub

# -- Payloads ----------------------------------------------------------------------

EMPTY = Struct()

LOGIN = Struct("account" / Bytes(ACCOUNT_BYTES), "pin" / Bytes(PIN_BYTES))
MONEY_REQUEST = Struct("txn_id" / Bytes(TXN_ID_BYTES), "amount_cents" / Int64ub)
HISTORY = Struct("count" / Int8ub)
RESUME = Struct("account" / Bytes(ACCOUNT_BYTES), "token" / Bytes(SESSION_TOKEN_BYTES))
TRANSFER = Struct(
    "txn_id" / Bytes(TXN_ID_BYTES),
    "amount_cents" / Int64ub,
    "to_account" / Bytes(ACCOUNT_BYTES),
)
CHANGE_PIN = Struct("pin" / Bytes(PIN_BYTES), "new_pin" / Bytes(PIN_BYTES))
FEATURES = Struct("features" / Int8ub)

STATUS_ONLY = Struct("status" / Int8ub)
BALANCE_REPLY = Struct("status" / Int8ub, "balance_cents" / Int64ub)
MONEY_REPLY = Struct(
    "status" / Int8ub,
    "balance_cents" / Int64ub,
    "entry_id" / Int64ub,
    "time_ms" / Int64ub,
)
HISTORY_ENTRY = Struct(
    "entry_id" / Int64ub,
    "time_ms" / Int64ub,
    "kind" / Int8ub,
    "amount_cents" / Int64ub,
    "balance_cents" / Int64ub,
)
HISTORY_REPLY = Struct("status" / Int8ub, "entries" / PrefixedArray(Int8ub, HISTORY_ENTRY))
FEATURES_REPLY = Struct("status" / Int8ub, "features" / Int8ub)

HELLO = Struct(
    "payload_bytes_max" / Int16ub,
    "history_entries_max" / Int8ub,
    "amount_cents_max" / Int64ub,
    "frame_timeout_s" / Int16ub,
    "login_timeout_s" / Int16ub,
    "idle_timeout_s" / Int16ub,
)
SHUTDOWN = Struct("grace_s" / Int16ub)
SESSION_TOKEN = Struct("token" / Bytes(SESSION_TOKEN_BYTES))


# -- Derived fast path -------------------------------------------------------------


def _format_of(con: object) -> str:
    """The ``struct`` format letters for one fixed-size construct field."""
    if isinstance(con, FormatField):
        if con.fmtstr[0] != ">":
            raise TypeError(f"field {con!r} is not big-endian")
        fmtstr: str = con.fmtstr
        return fmtstr[1:]
    if isinstance(con, Const):
        return _format_of(con.subcon)
    if isinstance(con, Bytes) and isinstance(con.length, int):
        return f"{con.length}s"
    raise TypeError(f"field {con!r} has no fixed-size struct equivalent")


def _prefixed_array(con: object) -> tuple[object, Struct] | None:
    """(count field, item Struct) if ``con`` is ``PrefixedArray(count, item)``, else None.

    construct builds PrefixedArray as a FocusedSeq of a Rebuild count and an Array.
    """
    if not isinstance(con, FocusedSeq) or len(con.subcons) != 2:
        return None
    count, items = (sub.subcon for sub in con.subcons)
    if isinstance(count, Rebuild) and isinstance(items, Array):
        return count.subcon, items.subcon
    return None


def _fixed_struct(fields: list[Renamed]) -> struct.Struct:
    return struct.Struct(">" + "".join(_format_of(f.subcon) for f in fields))


@dataclass(frozen=True, slots=True)
class FastLayout:
    """A payload layout compiled to ``struct.Struct``: fixed fields, then maybe an array.

    ``names`` lists the fixed fields in wire order. When ``items`` is set, the payload
    continues with a count byte (``count``) and that many fixed-size items, whose
    values come last: one tuple per item (``unpack``) or one per item field
    (``unpack_columns``).

    An array payload is packed and unpacked with one struct for all of it, built for
    its item count on first use (``whole``). Item by item, the 20 entries of a
    HISTORY_REPLY took 5.2 us to pack and 2.2 us to unpack; as one struct, 2.7 and
    1.2 us (timeit). ``framing`` puts the frame's header in front of that struct, so
    that an encoder packs header and payload in one call.
    """

    names: tuple[str, ...]
    head: struct.Struct
    array_name: str | None = None
    count: struct.Struct | None = None
    items: struct.Struct | None = None
    columns: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
    """From the flat values of a whole array payload, one tuple per item field."""
    _wholes: dict[int, struct.Struct] = field(default_factory=dict, compare=False, repr=False)
    _framings: dict[int, tuple[struct.Struct, int]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def derive(cls, con: Struct) -> FastLayout:
        fields: list[Renamed] = list(con.subcons)
        array = _prefixed_array(fields[-1].subcon) if fields else None
        if array is not None:
            count, item = array
            array_name = fields.pop().name
            first, width = len(fields) + 1, len(item.subcons)  # items follow the count
            if width < 2:  # itemgetter of one slice would return it bare, not in a tuple
                raise TypeError(f"array {array_name!r} items need at least two fields")
            return cls(
                names=tuple(f.name for f in fields),
                head=_fixed_struct(fields),
                array_name=array_name,
                count=struct.Struct(">" + _format_of(count)),
                items=_fixed_struct(list(item.subcons)),
                columns=itemgetter(*(slice(first + i, None, width) for i in range(width))),
            )
        return cls(names=tuple(f.name for f in fields), head=_fixed_struct(fields))

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        """Field values in wire order. Raises ``struct.error`` unless sizes match exactly."""
        if self.items is None:
            return self.head.unpack(payload)
        *head, columns = self.unpack_columns(payload)
        return (*head, tuple(zip(*columns, strict=True)))

    def unpack_columns(self, payload: bytes) -> tuple[Any, ...]:
        """As ``unpack`` for an array layout, but the items come as one tuple per item
        field, so that a receiver can check each field of all items with one C call."""
        count, items, columns = self.count, self.items, self.columns
        if count is None or items is None or columns is None:
            raise TypeError("unpack_columns is for array layouts")
        head_end = self.head.size
        (n,) = count.unpack_from(payload, head_end)
        if len(payload) != head_end + count.size + n * items.size:
            raise struct.error(f"payload is {len(payload)} bytes, layout says otherwise")
        values = self.whole(n).unpack(payload)
        return (*values[: len(self.names)], columns(values))

    def pack(self, values: tuple[Any, ...]) -> bytes:
        """Bytes of field values given in wire order (the array, if any, last)."""
        if self.items is None:
            return self.head.pack(*values)
        *head, items = values
        return self.whole(len(items)).pack(*head, len(items), *itertools.chain.from_iterable(items))

    def whole(self, n: int) -> struct.Struct:
        """An array payload with ``n`` items as one big-endian struct, kept per ``n``.

        Callers bound ``n``: ``unpack`` only once the payload's size proves it (a payload
        is at most PAYLOAD_BYTES_MAX), ``pack`` by what a message may carry."""
        whole = self._wholes.get(n)
        if whole is None:
            if self.count is None or self.items is None:
                raise TypeError("whole is for array layouts")
            formats = (self.head.format, self.count.format, self.items.format * n)
            whole = self._wholes[n] = struct.Struct(">" + "".join(formats).replace(">", ""))
        return whole

    def framing(self, n: int = 0) -> tuple[struct.Struct, int]:
        """(struct, payload bytes) for a frame of this payload but its CRC: ``HEADER``'s
        fields, then the payload's (with ``n`` items if it has an array; ``n`` is
        ignored otherwise). Kept per ``n``, which callers bound as for ``whole``.

        Header and payload in one ``pack`` call, rather than a payload packed, a
        header packed and the two joined: 0.2-0.4 us less per frame (timeit), and the
        same bytes (tests/test_wire_framing.py checks every layout and count).
        """
        if self.items is None:
            n = 0
        found = self._framings.get(n)
        if found is None:
            payload = self.head if self.items is None else self.whole(n)
            formats = FAST_HEADER.head.format + payload.format
            framing = struct.Struct(">" + formats.replace(">", ""))
            found = self._framings[n] = (framing, payload.size)
        return found


FAST_HEADER = FastLayout.derive(HEADER)
HEADER_BYTES = FAST_HEADER.head.size
CRC_BYTES = CRC.sizeof()
FAST_CRC = struct.Struct(">" + _format_of(CRC))
