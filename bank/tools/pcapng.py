"""A pcapng file of made-up TCP conversations over loopback, byte for byte reproducible.

spec/generate.py writes every test vector into spec/wireshark/vectors.pcapng with it, so
that the Wireshark dissector (spec/wireshark/atm.lua) can be tested, and looked at, on
exactly the bytes of spec/vectors.json: no capture tool, no server, no clock involved.
Real captures of a running bank are made by ``bank.tools.capture`` with dumpcap instead.

The packets look like what dumpcap records on Linux's ``lo``: Ethernet frames with zero
addresses around IPv4 and TCP with correct checksums, a handshake opening each
conversation, an ACK after every data segment and a FIN exchange closing it, so
Wireshark's TCP analysis has nothing to complain about and its stream reassembly runs as
on a real capture. Times advance one millisecond per packet from a fixed start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

LINKTYPE_ETHERNET = 1
SNAPLEN_BYTES = 262_144
"""The snapshot length dumpcap records by default: whole packets."""

LOOPBACK_IP = bytes([127, 0, 0, 1])
ETHERTYPE_IPV4 = 0x0800
IP_PROTOCOL_TCP = 6
TTL = 64
TCP_WINDOW_BYTES = 65_535
TICK_US = 1_000
"""Time between consecutive packets, in microseconds."""

SEGMENT_BYTES_MAX = 65_495
"""Largest TCP payload one IPv4 packet on Linux's loopback (MTU 65536) carries."""

SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08

_BLOCK_SHB, _BLOCK_IDB, _BLOCK_EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT, _OPT_SHB_USERAPPL, _OPT_IF_NAME = 0, 1, 4, 2


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _options(*options: bytes) -> bytes:
    return b"".join(options) + struct.pack("<HH", _OPT_END, 0) if options else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


@dataclass
class _Packet:
    time_us: int
    data: bytes
    comment: str | None


@dataclass
class Capture:
    """Packets in the order they are added; ``pcapng()`` is the file."""

    start_us: int
    application: str
    packets: list[_Packet] = field(default_factory=list)
    _ip_id: int = 0

    def conversation(self, *, client_port: int, server_port: int) -> Conversation:
        """A new TCP connection from ``client_port`` to ``server_port``, handshake done."""
        conversation = Conversation(self, client_port, server_port)
        conversation.handshake()
        return conversation

    def add(self, data: bytes, comment: str | None = None) -> None:
        self.packets.append(_Packet(self.start_us + len(self.packets) * TICK_US, data, comment))

    def next_ip_id(self) -> int:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        return self._ip_id

    def pcapng(self) -> bytes:
        header = _block(_BLOCK_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
            _option(_OPT_SHB_USERAPPL, self.application.encode())
        ))
        interface = _block(
            _BLOCK_IDB,
            struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN_BYTES)
            + _options(_option(_OPT_IF_NAME, b"lo")),
        )
        blocks = [header, interface]
        for packet in self.packets:
            comments = () if packet.comment is None else (
                _option(_OPT_COMMENT, packet.comment.encode()),
            )
            blocks.append(_block(_BLOCK_EPB, struct.pack(
                "<IIIII", 0, packet.time_us >> 32, packet.time_us & 0xFFFFFFFF,
                len(packet.data), len(packet.data),
            ) + _pad4(packet.data) + _options(*comments)))
        return b"".join(blocks)


@dataclass
class Conversation:
    """One TCP connection over 127.0.0.1; each side's sequence number advances as it sends."""

    capture: Capture
    client_port: int
    server_port: int
    client_seq: int = 1_000
    server_seq: int = 5_000

    def handshake(self) -> None:
        self._segment(from_client=True, flags=SYN, seq_bytes=1)
        self._segment(from_client=False, flags=SYN | ACK, seq_bytes=1)
        self._segment(from_client=True, flags=ACK)

    def send(self, data: bytes, *, from_client: bool, comment: str | None = None) -> None:
        """``data`` as one segment, then the other side's ACK of it."""
        if not 0 < len(data) <= SEGMENT_BYTES_MAX:
            raise ValueError(f"a segment carries 1..{SEGMENT_BYTES_MAX} bytes, not {len(data)}")
        self._segment(from_client=from_client, flags=PSH | ACK, payload=data, comment=comment)
        self._segment(from_client=not from_client, flags=ACK)

    def close(self) -> None:
        """The client closes first, as the ATM does after LOGOUT_REPLY."""
        self._segment(from_client=True, flags=FIN | ACK, seq_bytes=1)
        self._segment(from_client=False, flags=FIN | ACK, seq_bytes=1)
        self._segment(from_client=True, flags=ACK)

    def _segment(
        self, *, from_client: bool, flags: int, payload: bytes = b"", seq_bytes: int = 0,
        comment: str | None = None,
    ) -> None:
        if from_client:
            ports, seq, ack = (self.client_port, self.server_port), self.client_seq, self.server_seq
            self.client_seq += len(payload) + seq_bytes
        else:
            ports, seq, ack = (self.server_port, self.client_port), self.server_seq, self.client_seq
            self.server_seq += len(payload) + seq_bytes
        if flags == SYN:
            ack = 0
        tcp = struct.pack(
            "!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, TCP_WINDOW_BYTES, 0, 0
        ) + payload
        pseudo = LOOPBACK_IP + LOOPBACK_IP + struct.pack("!BBH", 0, IP_PROTOCOL_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), self.capture.next_ip_id(), 0x4000, TTL,
            IP_PROTOCOL_TCP, 0, LOOPBACK_IP, LOOPBACK_IP,
        )
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethernet = bytes(12) + struct.pack("!H", ETHERTYPE_IPV4)
        self.capture.add(ethernet + ip + tcp, comment)
