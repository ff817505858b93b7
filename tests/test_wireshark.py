"""The Wireshark dissector, spec/wireshark/atm.lua, run in the real tshark.

Covers: every golden vector of spec/vectors.json decodes to its opcode (value and name),
request id, length, status (value, name and ISO 8583 code), every payload field in wire
order, each at its offset, and a good CRC, in each of the three conversations of
spec/wireshark/vectors.pcapng: a segment per frame on the bank's port; all of them glued
and cut at random points, so that frames span segments and segments hold several frames;
and glued and cut again on another port, found by the heuristic. Every negative vector
decodes its header and raises exactly the expert info that its defect calls for, as
predicted from wire's own decoder and layouts (a flipped CRC bit: atmbank.crc_ok false
and the CRC warning). PINs and session tokens are hidden unless the preference
atmbank.show_secrets asks. The real session of spec/wireshark/session.pcapng decodes frame
for frame as wire's decoder reads its TCP streams, and so does a fresh one made by
``python -m bank.tools.capture``; the README's decoded deposit is tshark's real output.

tshark is Debian's package; ``.ci/run`` installs it. Under CI=true a missing tshark fails
these tests, as a missing openssl fails the TLS tests; elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import ssl
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache
from pathlib import Path

import pytest

from bank.config import ServerConfig
from bank.tls import client_context, init_ca_and_server, server_context
from bank.tools.pcapng import Capture
from wire import (
    MAGIC,
    MESSAGE_TYPES,
    PAYLOAD_BYTES_MAX,
    PROTOCOL_VERSION,
    Decoder,
    HistoryEntry,
    Login,
    Message,
    Sender,
    WireError,
    encode,
    frame_bytes,
)
from wire._layout import CRC_BYTES, HEADER_BYTES

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
DISSECTOR = SPEC / "wireshark" / "atm.lua"
VECTORS_CAPTURE = SPEC / "wireshark" / "vectors.pcapng"
SESSION_CAPTURE = SPEC / "wireshark" / "session.pcapng"
VECTORS = json.loads((SPEC / "vectors.json").read_text(encoding="utf-8"))
GOLDEN: list[dict] = VECTORS["golden"]
NEGATIVE: list[dict] = VECTORS["negative"]

BANK_PORT = ServerConfig().port
HEURISTIC_PORT = 50505
"""The port of the vectors capture's third conversation (spec/generate.py): not the bank's."""

TSHARK_TIMEOUT_S = 120
"""For one tshark run over a capture; a second or two when well."""

CAPTURE_TIMEOUT_S = 120
"""For ``python -m bank.tools.capture``: a server start, one ATM session, a stop."""

PROTO = "atmbank"
HEADER_FIELDS = {f"{PROTO}.{name}" for name in ("magic", "version", "opcode", "request_id",
                                                 "length")}
TRAILER_FIELDS = {f"{PROTO}.crc32", f"{PROTO}.crc_ok", f"{PROTO}.status.iso8583"}
REFUSED = f"{PROTO}.status.refused"
"""The note on every refusing status: shown, but no defect of the frame."""

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(
    TSHARK is None and os.environ.get("CI") != "true",
    reason="no tshark (under CI=true the tests run, and fail without one)",
)


# -- tshark's view ------------------------------------------------------------------


@dataclass
class Field:
    name: str
    show: str
    showname: str
    value: str
    pos: int
    size: int


@dataclass
class Decoded:
    """One frame as the dissector showed it: one atmbank protocol item."""

    showname: str
    pos: int
    size: int
    fields: list[Field] = field(default_factory=list)
    """Fields and text items in tree order, expert items left out."""
    experts: list[str] = field(default_factory=list)

    def first(self, name: str) -> Field:
        (found, *_) = (f for f in self.fields if f.name == name)
        return found

    def named(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]


@dataclass
class Packet:
    number: int
    src_port: int
    dst_port: int
    comment: str
    frames: list[Decoded]
    protocols: list[str]


def _field(element: ET.Element) -> Field:
    return Field(
        element.get("name", ""), element.get("show", ""), element.get("showname", ""),
        element.get("value", ""), int(element.get("pos", "0")), int(element.get("size", "0")),
    )


def _walk(element: ET.Element, decoded: Decoded) -> None:
    for child in element.findall("field"):
        if child.get("name") == "_ws.expert":
            decoded.experts.extend(
                sub.get("name", "") for sub in child.iter("field")
                if sub.get("name", "").startswith(PROTO + ".")
            )
            continue
        decoded.fields.append(_field(child))
        _walk(child, decoded)


def _packet(element: ET.Element) -> Packet:
    fields = {f.get("name"): f for f in element.iter("field")}

    def show(name: str) -> str:
        found = fields.get(name)
        return "" if found is None else found.get("show", "")

    frames = []
    for proto in element.findall("proto"):
        if proto.get("name") == PROTO:
            decoded = Decoded(proto.get("showname", ""), int(proto.get("pos", "0")),
                              int(proto.get("size", "0")))
            _walk(proto, decoded)
            frames.append(decoded)
    return Packet(int(show("frame.number")), int(show("tcp.srcport") or 0),
                  int(show("tcp.dstport") or 0), show("frame.comment"), frames,
                  [proto.get("name", "") for proto in element.findall("proto")])


def run_tshark(capture: Path, *args: str) -> str:
    assert TSHARK is not None, "tshark is needed (Debian's tshark package; .ci/run installs it)"
    result = subprocess.run(
        [TSHARK, "-n", "-r", str(capture), *args],
        capture_output=True, text=True,
        timeout=TSHARK_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Lua" not in result.stderr, result.stderr  # a load error is only a warning there
    return result.stdout


def dissect(capture: Path, *, show_secrets: bool) -> list[Packet]:
    """Every packet of ``capture`` as tshark with atm.lua shows it (PDML: for each field
    its value, its displayed line, which holds a status's name, and its position)."""
    pdml = run_tshark(capture, "-X", f"lua_script:{DISSECTOR}", "-T", "pdml",
                      "-o", f"{PROTO}.show_secrets:{'TRUE' if show_secrets else 'FALSE'}")
    assert "Lua Error" not in pdml
    return [_packet(element) for element in ET.fromstring(pdml).iter("packet")]


@cache
def vectors_packets(show_secrets: bool) -> list[Packet]:
    return dissect(VECTORS_CAPTURE, show_secrets=show_secrets)


# -- What the frames hold, according to wire and spec/vectors.json --------------------


def decode(data: bytes, sender: Sender) -> Message:
    decoder = Decoder(sender)
    decoder.receive_data(data)
    frame = decoder.next_frame()
    assert frame is not None
    return frame.message


def json_value(value: object) -> object:
    """As spec/vectors.json writes a field: bytes as hex, enums by name, entries as objects."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, HistoryEntry):
        return {name: json_value(getattr(value, name)) for name in HistoryEntry.FIELDS}
    if isinstance(value, tuple):
        return [json_value(item) for item in value]
    return value


def json_fields(message: Message) -> dict[str, object]:
    return {f.name: json_value(getattr(message, f.name)) for f in dataclasses.fields(message)}


def secrets_of(message: Message) -> dict[str, object]:
    """The fields wire keeps out of a message's repr (the PIN, the token), as JSON."""
    return {f.name: json_value(getattr(message, f.name))
            for f in dataclasses.fields(message) if not f.repr}


def expected_rows(fields: dict, values: object) -> list[tuple[str, object, object]]:
    """(field name, JSON value from the vectors, decoded Python value) in wire order; an
    array is its count, then each item's fields."""
    rows: list[tuple[str, object, object]] = []
    for name, value in fields.items():
        decoded = getattr(values, name)
        if isinstance(value, list):
            rows.append((f"{name}_count", len(value), len(decoded)))
            for item, decoded_item in zip(value, decoded, strict=True):
                rows += expected_rows(item, decoded_item)
        else:
            rows.append((name, value, decoded))
    return rows


def assert_shows(shown: Field, value: object, decoded: object) -> None:
    if isinstance(decoded, IntEnum):  # the value, and its name on the line shown
        assert value == decoded.name
        assert int(shown.show) == decoded.value, shown
        assert f": {value} ({decoded.value})" in shown.showname, shown
    elif isinstance(decoded, bytes):
        assert shown.value == value, shown
    elif isinstance(decoded, str):
        assert shown.show == value, shown
    else:
        assert int(shown.show) == value, shown


def assert_decoded(frame: Decoded, data: bytes, message: Message, fields: dict,
                   *, show_secrets: bool = True) -> None:
    """``frame`` shows the header of ``data``, then every field of ``fields`` (as the
    vectors write them) in wire order and contiguous, then its good CRC."""
    opcode = frame.first(f"{PROTO}.opcode")
    assert int(opcode.show, 0) == VECTORS["opcodes"][message.OPCODE.name] == data[3]
    assert f": {message.OPCODE.name} (" in opcode.showname
    assert int(frame.first(f"{PROTO}.version").show) == VECTORS["protocol_version"]
    assert int(frame.first(f"{PROTO}.request_id").show) == int.from_bytes(data[4:8], "big")
    length = int(frame.first(f"{PROTO}.length").show)
    assert length == len(data) - HEADER_BYTES - CRC_BYTES
    assert frame.first(f"{PROTO}.crc32").value == data[-CRC_BYTES:].hex()
    assert frame.first(f"{PROTO}.crc_ok").show == "1"
    assert frame.size == len(data)
    assert frame.experts in ([], [REFUSED])
    secrets = {} if show_secrets else secrets_of(message)
    payload = [  # the payload's fields, and the text items that stand for hidden ones
        f for f in frame.fields
        if (f.name.startswith(PROTO + ".") and f.name not in HEADER_FIELDS | TRAILER_FIELDS)
        or (f.name == "_ws.lua.text" and "[hidden" in f.showname)
    ]
    rows = expected_rows(fields, message)
    assert [f.name for f in payload] == [
        "_ws.lua.text" if name in secrets else f"{PROTO}.{name}" for name, _, _ in rows
    ]
    at = frame.pos + HEADER_BYTES
    for shown, (name, value, decoded) in zip(payload, rows, strict=True):
        assert shown.pos == at, f"{name} at {shown.pos - frame.pos}, not {at - frame.pos}"
        at += shown.size
        if name in secrets:
            assert shown.showname.endswith("[hidden: the preference atmbank.show_secrets"
                                           " shows it]"), shown
            assert str(value) not in shown.showname and not shown.value, shown
        else:
            assert_shows(shown, value, decoded)
        if name == "status":
            iso = VECTORS["statuses"][value]["iso8583"]
            assert [f.show for f in frame.named(f"{PROTO}.status.iso8583")] == (
                [] if iso is None else [iso]
            )
            assert (REFUSED in frame.experts) == (value != "APPROVED")
    assert at == frame.pos + HEADER_BYTES + length


def golden_by_frame() -> dict[bytes, dict]:
    """Each golden vector by its bytes' header and CRC, which tell them all apart."""
    keyed = {}
    for vector in GOLDEN:
        data = bytes.fromhex(vector["hex"])
        keyed[data[:HEADER_BYTES] + data[-CRC_BYTES:]] = vector
    assert len(keyed) == len(GOLDEN)
    return keyed


def frame_key(frame: Decoded) -> bytes:
    header = b"".join(bytes.fromhex(frame.first(name).value)
                      for name in (f"{PROTO}.{n}" for n in ("magic", "version", "opcode",
                                                            "request_id", "length")))
    return header + bytes.fromhex(frame.first(f"{PROTO}.crc32").value)


# -- Golden vectors -------------------------------------------------------------------


@pytest.mark.parametrize("show_secrets", [True, False], ids=["secrets-shown", "secrets-hidden"])
def test_every_golden_vector_decodes_in_each_conversation(show_secrets: bool) -> None:
    by_frame = golden_by_frame()
    seen: Counter[tuple[str, str]] = Counter()
    for packet in vectors_packets(show_secrets):
        if packet.comment.startswith("negative "):
            continue
        conversation = ("heuristic" if HEURISTIC_PORT in (packet.src_port, packet.dst_port)
                        else "glued" if packet.comment.startswith("golden, bytes")
                        else "segments")
        if conversation == "segments" and packet.comment:
            assert len(packet.frames) == 1, packet  # its own segment: decoded right there
        for frame in packet.frames:
            vector = by_frame[frame_key(frame)]
            data = bytes.fromhex(vector["hex"])
            message = decode(data, Sender(vector["sender"]))
            assert json_fields(message) == vector["fields"]
            assert_decoded(frame, data, message, vector["fields"], show_secrets=show_secrets)
            seen[conversation, vector["name"]] += 1
    assert seen == Counter({(conversation, vector["name"]): 1 for vector in GOLDEN
                            for conversation in ("segments", "glued", "heuristic")})


def test_the_glued_conversation_splits_frames_and_packs_several_in_a_segment() -> None:
    glued = [p for p in vectors_packets(True) if p.comment.startswith("golden, bytes")]
    assert any(len(p.frames) >= 3 for p in glued)  # several whole frames in one segment
    assert any(not p.frames for p in glued)  # a segment inside one frame: reassembled later


def test_secrets_are_hidden_unless_the_preference_shows_them() -> None:
    """Hidden, no field of a secret exists at all (assert_decoded checks that the line
    standing for one does not show it); shown, each is there, once per conversation."""
    conversations = 3
    expected: Counter[str] = Counter()
    for vector in GOLDEN:
        message = decode(bytes.fromhex(vector["hex"]), Sender(vector["sender"]))
        for name in secrets_of(message):
            expected[f"{PROTO}.{name}"] += conversations
    assert {f"{PROTO}.pin", f"{PROTO}.token"} <= set(expected)
    for show_secrets in (False, True):
        shown = Counter(f.name for packet in vectors_packets(show_secrets)
                        if not packet.comment.startswith("negative ")
                        for frame in packet.frames for f in frame.fields)
        assert {name: shown[name] for name in expected} == (
            dict(expected) if show_secrets else dict.fromkeys(expected, 0)
        )


# -- Negative vectors -----------------------------------------------------------------


def predicted_experts(vector: dict) -> set[str]:
    """The expert infos the dissector owes ``vector``, from its bytes and wire's rules:
    what stops a receiver at the header, a bad CRC, an opcode unassigned or of the other
    side, a request id the message may not carry, a payload its layout does not fit,
    an enum value unassigned (as wire's decoder says of the frame with those repaired)."""
    data = bytes.fromhex(vector["hex"])
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        return {f"{PROTO}.magic.bad"}
    if data[len(MAGIC)] != PROTOCOL_VERSION:
        return {f"{PROTO}.version.unsupported"}
    opcode, request_id, length = struct.unpack_from(">BIH", data, 3)
    if length > PAYLOAD_BYTES_MAX:
        return {f"{PROTO}.length.over_limit"}
    body, crc = data[: HEADER_BYTES + length], data[HEADER_BYTES + length :]
    experts = set()
    if frame_bytes(opcode, request_id, body[HEADER_BYTES:])[-CRC_BYTES:] != crc:
        experts.add(f"{PROTO}.crc.bad")
    cls = MESSAGE_TYPES.get(opcode)  # type: ignore[call-overload]
    if cls is None:
        return experts | {f"{PROTO}.opcode.unknown"}
    sender = Sender.CLIENT if vector["receiver"] == "server" else Sender.SERVER
    if cls.SENDER is not sender:
        experts.add(f"{PROTO}.opcode.wrong_direction")
    if request_id not in cls.REQUEST_IDS:
        experts.add(f"{PROTO}.request_id.not_allowed")
    payload = body[HEADER_BYTES:]
    try:
        cls.FAST.unpack(payload)
    except struct.error:
        return experts | {f"{PROTO}.payload.size"}
    try:
        decode(frame_bytes(opcode, cls.REQUEST_IDS.start, payload), cls.SENDER)
    except WireError as error:
        if re.search(r"=\d+ is not a \w+$", error.detail):  # wire._messages._as_enum
            experts.add(f"{PROTO}.value.unknown")
    return experts


@pytest.mark.parametrize("vector", NEGATIVE, ids=[v["name"] for v in NEGATIVE])
def test_each_negative_vector_gets_the_expert_info_its_defect_calls_for(vector: dict) -> None:
    (packet,) = (p for p in vectors_packets(False)
                 if p.comment.startswith(f"negative {vector['name']}: "))
    data = bytes.fromhex(vector["hex"])
    (frame,) = packet.frames
    experts = set(frame.experts) - {REFUSED}
    assert experts == predicted_experts(vector)
    if experts & {f"{PROTO}.magic.bad", f"{PROTO}.version.unsupported"}:
        return
    assert int(frame.first(f"{PROTO}.opcode").show, 0) == data[3]
    assert int(frame.first(f"{PROTO}.request_id").show) == int.from_bytes(data[4:8], "big")
    assert int(frame.first(f"{PROTO}.length").show) == int.from_bytes(data[8:10], "big")
    if f"{PROTO}.length.over_limit" not in experts:
        crc_ok = f"{PROTO}.crc.bad" not in experts
        assert frame.first(f"{PROTO}.crc_ok").show == ("1" if crc_ok else "0")


def test_a_flipped_crc_bit_is_a_checksum_warning() -> None:
    (packet,) = (p for p in vectors_packets(False)
                 if p.comment.startswith("negative crc-mismatch:"))
    (frame,) = packet.frames
    assert frame.first(f"{PROTO}.crc_ok").show == "0"
    assert frame.experts == [f"{PROTO}.crc.bad"]
    pdml = run_tshark(VECTORS_CAPTURE, "-X", f"lua_script:{DISSECTOR}", "-T", "pdml",
                      "-Y", f"frame.number == {packet.number}")
    expert = next(e for e in ET.fromstring(pdml).iter("field") if e.get("name") == "_ws.expert"
                  and any(s.get("name") == f"{PROTO}.crc.bad" for s in e.iter("field")))
    assert "Expert Info (Warning/Checksum): CRC-32 mismatch" in expert.get("showname", "")


# -- Real sessions --------------------------------------------------------------------


def tcp_streams(capture: Path, server_port: int) -> dict[Sender, bytes]:
    """The bytes each side sent, from tshark's TCP alone (no atm.lua): one connection."""
    lines = run_tshark(capture, "-Y", "tcp.len > 0", "-T", "fields", "-e", "tcp.stream",
                       "-e", "tcp.srcport", "-e", "tcp.payload").splitlines()
    streams = {Sender.CLIENT: b"", Sender.SERVER: b""}
    assert {line.split("\t")[0] for line in lines} == {"0"}, "one TCP connection"
    for line in lines:
        _stream, src_port, payload = line.split("\t")
        side = Sender.SERVER if int(src_port) == server_port else Sender.CLIENT
        streams[side] += bytes.fromhex(payload.replace(":", ""))
    return streams


def split_frames(stream: bytes) -> list[bytes]:
    frames = []
    while stream:
        (length,) = struct.unpack_from(">H", stream, HEADER_BYTES - 2)
        end = HEADER_BYTES + length + CRC_BYTES
        frames.append(stream[:end])
        stream = stream[end:]
    return frames


def assert_session_decodes(capture: Path, server_port: int) -> Counter[str]:
    """Every frame of the one connection in ``capture`` is shown as wire decodes it, in
    order on each side; the opcodes seen, by name."""
    streams = tcp_streams(capture, server_port)
    shown: dict[Sender, list[Decoded]] = {Sender.CLIENT: [], Sender.SERVER: []}
    for packet in dissect(capture, show_secrets=True):
        side = Sender.SERVER if packet.src_port == server_port else Sender.CLIENT
        shown[side] += packet.frames
    opcodes: Counter[str] = Counter()
    for side, stream in streams.items():
        frames = split_frames(stream)
        assert len(shown[side]) == len(frames)
        for decoded, data in zip(shown[side], frames, strict=True):
            message = decode(data, side)
            assert_decoded(decoded, data, message, json_fields(message))
            opcodes[message.OPCODE.name] += 1
    return opcodes


def test_the_sample_session_decodes_frame_for_frame() -> None:
    opcodes = assert_session_decodes(SESSION_CAPTURE, BANK_PORT)
    assert set(opcodes) >= {"HELLO", "LOGIN", "LOGIN_REPLY", "SESSION_TOKEN", "BALANCE",
                            "DEPOSIT", "DEPOSIT_REPLY", "WITHDRAW", "HISTORY_REPLY",
                            "LOGOUT_REPLY"}


def test_the_capture_tool_records_a_session_the_dissector_decodes(tmp_path: Path) -> None:
    """One command remakes the sample, here on a free port (found by the heuristic)."""
    output = tmp_path / "session.pcapng"
    result = subprocess.run(
        [sys.executable, "-m", "bank.tools.capture", "--port", "0", "--output", str(output)],
        capture_output=True, text=True, timeout=CAPTURE_TIMEOUT_S, check=False, cwd=tmp_path,
    )
    if "did not start capturing" in result.stderr and os.environ.get("CI") != "true":
        pytest.skip(f"no capture permission here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    port = int(re.search(r"on port (\d+)$", result.stdout.strip())[1])
    assert port != BANK_PORT
    opcodes = assert_session_decodes(output, port)
    assert opcodes["DEPOSIT"] == opcodes["WITHDRAW"] == 1


README_DEPOSIT_FILTER = "atmbank.opcode == 0x04 || atmbank.opcode == 0x84"


def test_the_readme_shows_tshark_decoding_the_sample_deposit() -> None:
    """The README's decoded deposit is what the dissector shows of the sample capture today,
    so it stays real output: remaking session.pcapng means pasting the new view there.
    Only the dissector's own lines are compared; the lines of Wireshark's own dissectors
    above them (frame, Ethernet, IP, TCP) vary between Wireshark versions."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"-O atmbank -Y '{README_DEPOSIT_FILTER}'" in readme
    view = run_tshark(SESSION_CAPTURE, "-X", f"lua_script:{DISSECTOR}", "-O", PROTO,
                      "-Y", README_DEPOSIT_FILTER)
    trees = re.findall(r"^ATM bank protocol.*\n(?:    .*\n)*", view, flags=re.MULTILINE)
    assert [tree.split(",")[1] for tree in trees] == [" DEPOSIT", " DEPOSIT_REPLY"]
    for tree in trees:
        indented = "".join(f"    {line}\n" for line in tree.splitlines())
        assert indented in readme, (
            "README.md's decoded deposit is not tshark's view of the sample capture: paste"
            " the output of tshark -X lua_script:spec/wireshark/atm.lua -r"
            f" spec/wireshark/session.pcapng -O atmbank -Y '{README_DEPOSIT_FILTER}'"
        )


@dataclass
class TlsEnd:
    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


def tls_end(context: ssl.SSLContext, **wrap: object) -> TlsEnd:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return TlsEnd(context.wrap_bio(incoming, outgoing, **wrap), incoming, outgoing)


def tls_conversation(tmp_path: Path) -> bytes:
    """A real TLS 1.3 handshake between the bank's and the ATM's contexts, then a LOGIN
    inside it, as TCP on the bank's port; each flight cut in two segments."""
    pki = init_ca_and_server(tmp_path / "tls", ["127.0.0.1"])
    bank = tls_end(server_context(pki.cert, pki.key, client_ca=None), server_side=True)
    atm = tls_end(client_context(pki.ca, cert=None, key=None), server_hostname="127.0.0.1")
    capture = Capture(start_us=0, application="tests/test_wireshark.py")
    conversation = capture.conversation(client_port=40000, server_port=BANK_PORT)

    def flight(sender: TlsEnd, receiver: TlsEnd, *, from_client: bool) -> None:
        data = sender.outgoing.read()
        if data:
            half = len(data) // 2
            conversation.send(data[:half], from_client=from_client)
            conversation.send(data[half:], from_client=from_client)
            receiver.incoming.write(data)

    for _ in range(3):  # a TLS 1.3 handshake takes one round trip and a half
        for end in (atm, bank):
            with contextlib.suppress(ssl.SSLWantReadError):  # waiting on the other end
                end.tls.do_handshake()
        flight(atm, bank, from_client=True)
        flight(bank, atm, from_client=False)
    atm.tls.write(encode(Login("AC-12345", "1324"), 1))
    flight(atm, bank, from_client=True)
    conversation.close()
    return capture.pcapng()


def test_a_bank_serving_tls_on_its_port_is_shown_as_tls(tmp_path: Path) -> None:
    """A TLS capture holds TLS records, and the dissector hands them to Wireshark's TLS
    dissector instead of calling them broken frames."""
    capture = tmp_path / "tls.pcapng"
    capture.write_bytes(tls_conversation(tmp_path))
    packets = [p for p in dissect(capture, show_secrets=True) if "tls" in p.protocols
               or PROTO in p.protocols]
    assert len(packets) >= 3  # ClientHello, the server's flight, the ATM's Finished, data
    assert all(PROTO not in p.protocols for p in packets)
    summary = run_tshark(capture, "-X", f"lua_script:{DISSECTOR}", "-Y", "tls")
    assert "Client Hello" in summary
    assert "Application Data" in summary
