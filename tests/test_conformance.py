"""Conformance of the code to the specification: spec/vectors.json and spec/PROTOCOL.md.

Covers: every golden vector decodes to its listed fields and encodes back to the same bytes,
fed whole, one byte at a time, and glued with the others into one stream split at seeded
random points; every negative vector raises WireError with the listed status, fatal flag and
request id, and the running server and the reference ATM's connection treat it as listed;
the reference construct parse (FRAME and each LAYOUT, not compiled) agrees with the fast
path; PROTOCOL.md's opcode, status, statuses-per-reply, limit and payload tables and its ABNF
agree with the code, and so does vectors.json; the generated files are up to date. Rules the
prose states (PIN lockout, the order of a money request's checks, which LOGINs and RESUMEs
count, HELLO limits, settings refused at start, end of stream, what a session token opens
and when a RESUME is answered) are read from PROTOCOL.md sentence by sentence and checked
against the server, its session or its store.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import random
import re
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing
from construct import Struct

from atm import session as atm_session
from atm.connection import Connection as AtmConnection
from atm.errors import ConnectionLost
from bank import __main__ as bank_main
from bank import resumption as bank_resumption
from bank import session as bank_session
from bank.batch_ledger import BatchLedger, open_ledger
from bank.config import PIN_LOCKOUT_S_MAX, ServerConfig
from bank.leases import Leases
from bank.ledger import Ledger
from bank.resumption import SessionRegistry
from bank.server import REFUSALS_MAX
from bank.session import PIN_STATUS, RESUME_TAKEOVER_S, Session
from bank.store import PinPolicy, Store
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RECEIVE_TIMEOUT_S,
    FaultyLedger,
    RunningServer,
    ServedSession,
    WireClient,
    frames_until_closed,
    logged_in,
    settle,
    start_server,
    txn_id,
)
from wire import (
    ALL_FEATURES,
    BALANCE_CENTS_MAX,
    MESSAGE_TYPES,
    Balance,
    BalanceReply,
    ChangePin,
    Decoder,
    Deposit,
    DepositReply,
    EntryKind,
    Error,
    Features,
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
    Reply,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    Shutdown,
    Status,
    Transfer,
    WireError,
    Withdraw,
    encode,
)
from wire import Connection as WireConnection
from wire import _layout as wire_layout
from wire import _limits as limits
from wire._codec import frame_bytes
from wire._messages import REPLY_STATUSES, Notice
from wire._state import LOGIN_FAILURES, State, next_state
from wire._status import ISO8583_RESPONSE_CODE

PIN_TRIES_MAX = ServerConfig().pin_tries_max

SPEC = Path(__file__).resolve().parent.parent / "spec"
VECTORS = json.loads((SPEC / "vectors.json").read_text(encoding="utf-8"))
GOLDEN: list[dict] = VECTORS["golden"]
NEGATIVE: list[dict] = VECTORS["negative"]
PROTOCOL = (SPEC / "PROTOCOL.md").read_text(encoding="utf-8")


def by_name(vectors: list[dict]) -> dict:
    return {"argvalues": vectors, "ids": [v["name"] for v in vectors]}


def decoder_for(receiver: str) -> Decoder:
    """The decoder of the side that receives: the server decodes what clients send."""
    return Decoder({"server": Sender.CLIENT, "client": Sender.SERVER}[receiver])


# -- Fields as JSON, read back independently of spec/generate.py ---------------------


def field_value(type_name: str, value: object) -> object:
    if type_name == "bytes":
        return bytes.fromhex(value)
    if type_name == "Status":
        return Status[value]
    if type_name == "EntryKind":
        return EntryKind[value]
    if type_name == "tuple[HistoryEntry, ...]":
        return tuple(build(HistoryEntry, entry) for entry in value)
    assert type_name in {"int", "str"}, type_name
    return value


def declared_types(cls: type) -> dict[str, str]:
    """Each field's type as written in the class, which is what vectors.json follows."""
    if cls is HistoryEntry:  # a validated tuple, not a dataclass: its fields are fixed
        return {name: "EntryKind" if name == "kind" else "int" for name in HistoryEntry.FIELDS}
    return {f.name: f.type for f in dataclasses.fields(cls)}


def build(cls: type, json_fields: dict) -> object:
    declared = declared_types(cls)
    assert set(json_fields) == set(declared), f"{cls.__name__} fields differ"
    return cls(**{name: field_value(declared[name], v) for name, v in json_fields.items()})


def golden_message(vector: dict) -> Message:
    return build(MESSAGE_TYPES[Opcode[vector["opcode"]]], vector["fields"])


def golden_frame(vector: dict) -> Frame:
    return Frame(vector["request_id"], golden_message(vector))


def drain(decoder: Decoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


# -- Golden vectors --------------------------------------------------------------------


@pytest.mark.parametrize("vector", **by_name(GOLDEN))
def test_golden_decodes_to_its_fields(vector: dict) -> None:
    decoder = decoder_for(vector["receiver"])
    decoder.receive_data(bytes.fromhex(vector["hex"]))
    frame = decoder.next_frame()
    assert frame == golden_frame(vector)
    assert frame.message.OPCODE.name == vector["opcode"]
    assert frame.message.SENDER.value == vector["sender"]
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("vector", **by_name(GOLDEN))
def test_golden_encodes_to_its_bytes(vector: dict) -> None:
    assert encode(golden_message(vector), vector["request_id"]).hex() == vector["hex"]


@pytest.mark.parametrize("vector", **by_name(GOLDEN))
def test_golden_fed_one_byte_at_a_time(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    decoder = decoder_for(vector["receiver"])
    for byte in data[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.receive_data(data[-1:])
    assert decoder.next_frame() == golden_frame(vector)


@pytest.mark.parametrize("receiver", ["server", "client"])
@pytest.mark.parametrize("seed", range(5))
def test_golden_glued_into_one_stream(receiver: str, seed: int) -> None:
    vectors = [v for v in GOLDEN if v["receiver"] == receiver]
    stream = b"".join(bytes.fromhex(v["hex"]) for v in vectors)
    expected = [golden_frame(v) for v in vectors]

    whole = decoder_for(receiver)
    whole.receive_data(stream)
    assert drain(whole) == expected

    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), 40))
    chunked = decoder_for(receiver)
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        chunked.receive_data(stream[start:end])
        frames.extend(drain(chunked))
    assert frames == expected
    assert chunked.buffered_bytes == 0


def test_golden_vectors_cover_every_opcode_and_status() -> None:
    assert {v["opcode"] for v in GOLDEN} == {op.name for op in Opcode}
    statuses = {v["fields"]["status"] for v in GOLDEN if "status" in v["fields"]}
    assert statuses == {s.name for s in Status}
    error_statuses = {v["fields"]["status"] for v in GOLDEN if v["opcode"] == "ERROR"}
    assert error_statuses == {s.name for s in Status} - {"APPROVED"}


def test_vectors_tables_match_the_code() -> None:
    assert VECTORS["protocol_version"] == limits.PROTOCOL_VERSION
    assert VECTORS["opcodes"] == {op.name: op.value for op in Opcode}
    assert VECTORS["statuses"] == {
        s.name: {"value": s.value, "iso8583": ISO8583_RESPONSE_CODE.get(s)} for s in Status
    }


# -- Reference parse with construct ---------------------------------------------------


def reference_values(container: object, con: Struct) -> tuple:
    """Field values of a construct parse in wire order, arrays as tuples of tuples."""
    values = []
    for sub in con.subcons:
        value = container[sub.name]
        if isinstance(value, list):
            item = wire_layout._prefixed_array(sub.subcon)[1]
            value = tuple(reference_values(entry, item) for entry in value)
        values.append(value)
    return tuple(values)


@pytest.mark.parametrize("vector", **by_name(GOLDEN))
def test_reference_construct_parse_agrees_with_fast_path(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    parsed = wire_layout.FRAME.parse(data)
    header = parsed.header
    assert header.magic == limits.MAGIC
    assert header.version == limits.PROTOCOL_VERSION
    assert header.opcode == Opcode[vector["opcode"]]
    assert header.request_id == vector["request_id"]
    assert header.length == len(parsed.payload) == len(data) - 14
    assert parsed.crc32 == zlib.crc32(data[:-4])

    cls = MESSAGE_TYPES[Opcode[vector["opcode"]]]
    reference = reference_values(cls.LAYOUT.parse(parsed.payload), cls.LAYOUT)
    assert reference == cls.FAST.unpack(parsed.payload)
    # Values as plain ints and tuples: a HistoryEntry is its row, but equals only entries.
    values = tuple(
        tuple(map(tuple, value)) if isinstance(value, tuple) else value
        for value in golden_message(vector).wire_values()
    )
    assert reference == values
    assert cls.LAYOUT.build(cls.LAYOUT.parse(parsed.payload)) == parsed.payload
    assert wire_layout.FRAME.build(parsed) == data


@pytest.mark.parametrize("vector", **by_name(GOLDEN))
def test_the_decoders_payload_path_agrees_with_the_layouts_values(vector: dict) -> None:
    """``from_payload`` (HISTORY_REPLY's checks a column at a time) against ``from_wire``."""
    payload = bytes.fromhex(vector["hex"])[10:-4]
    cls = MESSAGE_TYPES[Opcode[vector["opcode"]]]
    decoded = cls.from_payload(payload)
    assert decoded == cls.from_wire(cls.FAST.unpack(payload)) == golden_message(vector)
    assert cls.FAST.pack(decoded.wire_values()) == payload


# -- Negative vectors -----------------------------------------------------------------


def assert_listed_error(error: WireError, vector: dict) -> None:
    assert (error.status.name, error.fatal, error.request_id) == (
        vector["status"],
        vector["fatal"],
        vector["request_id"],
    )


@pytest.mark.parametrize("vector", **by_name(NEGATIVE))
def test_negative_vector_fed_whole(vector: dict) -> None:
    decoder = decoder_for(vector["receiver"])
    decoder.receive_data(bytes.fromhex(vector["hex"]))
    with pytest.raises(WireError) as caught:
        decoder.next_frame()
    assert_listed_error(caught.value, vector)


@pytest.mark.parametrize("vector", **by_name(NEGATIVE))
def test_negative_vector_fed_one_byte_at_a_time(vector: dict) -> None:
    decoder = decoder_for(vector["receiver"])
    with pytest.raises(WireError) as caught:
        for byte in bytes.fromhex(vector["hex"]):
            decoder.receive_data(bytes([byte]))
            assert decoder.next_frame() is None
    assert_listed_error(caught.value, vector)


@pytest.mark.parametrize("vector", **by_name(NEGATIVE))
def test_after_negative_vector_only_non_fatal_decoding_goes_on(vector: dict) -> None:
    """A non-fatal error consumed its frame; a fatal one poisons the decoder for good."""
    decoder = decoder_for(vector["receiver"])
    follower = next(v for v in GOLDEN if v["receiver"] == vector["receiver"])
    decoder.receive_data(bytes.fromhex(vector["hex"]) + bytes.fromhex(follower["hex"]))
    with pytest.raises(WireError):
        decoder.next_frame()
    if vector["fatal"]:
        with pytest.raises(WireError) as again:
            decoder.next_frame()
        assert_listed_error(again.value, vector)
    else:
        assert decoder.next_frame() == golden_frame(follower)
        assert decoder.next_frame() is None


def test_negative_vectors_cover_both_receivers_and_both_kinds() -> None:
    kinds = {(v["receiver"], v["fatal"]) for v in NEGATIVE}
    assert kinds == {("server", True), ("server", False), ("client", True), ("client", False)}
    assert len({v["name"] for v in NEGATIVE}) == len(NEGATIVE)


# -- PROTOCOL.md ----------------------------------------------------------------------


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table in ``text``: its header cells and its body rows' cells."""
    tables = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            header = split_row(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_with(*columns: str) -> list[dict[str, str]]:
    """The one table in PROTOCOL.md whose header has all ``columns``, as dicts by header cell."""
    found = [
        [dict(zip(header, row, strict=True)) for row in rows]
        for header, rows in markdown_tables(PROTOCOL)
        if all(c in header for c in columns)
    ]
    assert len(found) == 1, f"expected one table with columns {columns}, found {len(found)}"
    return found[0]


def test_opcode_table_matches_the_code() -> None:
    rows = table_with("opcode", "hex", "dec", "direction")
    assert [row["opcode"] for row in rows] == [op.name for op in Opcode]
    for row in rows:
        op = Opcode[row["opcode"]]
        assert row["hex"] == f"0x{op.value:02X}"
        assert row["dec"] == str(op.value)
        sender = MESSAGE_TYPES[op].SENDER
        receiver = Sender.SERVER if sender is Sender.CLIENT else Sender.CLIENT
        assert row["direction"] == f"{sender.value} → {receiver.value}"
        assert row["payload bytes"] == payload_bytes_cell(MESSAGE_TYPES[op].FAST)
        assert row["request id"] == request_id_cell(MESSAGE_TYPES[op])


def payload_bytes_cell(fast: wire_layout.FastLayout) -> str:
    """What the opcode table says of a layout's size: a number, or a formula in entries."""
    if fast.items is None:
        return str(fast.head.size)
    fixed = fast.head.size + fast.count.size
    return f"{fixed} + {fast.items.size} \N{MULTIPLICATION SIGN} {fast.array_name}"


def request_id_cell(cls: type) -> str:
    """What the opcode table says of a message's request ids (its REQUEST_IDS, in words)."""
    ids = cls.REQUEST_IDS
    if ids == range(0, 1):
        return "0"
    if cls.SENDER is Sender.CLIENT:
        return f"{ids.start}..{ids.stop - 1}"
    if ids.start == 0:  # ERROR: any id, 0 when there is no frame to point at
        return "the offending frame's, or 0"
    return "the request's"


def test_status_table_matches_the_code() -> None:
    rows = table_with("hex", "dec", "name", "ISO 8583")
    assert [row["name"] for row in rows] == [s.name for s in Status]
    for row in rows:
        status = Status[row["name"]]
        assert row["hex"] == f"0x{status.value:02X}"
        assert row["dec"] == str(status.value)
        assert row["ISO 8583"] == ISO8583_RESPONSE_CODE.get(status, "—")


def limit_constants() -> dict[str, int | bytes]:
    return {
        name: value
        for name, value in vars(limits).items()
        if name.isupper() and isinstance(value, int | bytes)
    }


def test_every_limit_appears_in_the_spec_with_its_value() -> None:
    rows = {row["constant"]: row["value"] for row in table_with("constant", "value", "unit")}
    constants = limit_constants()
    assert set(rows) == {f"`{name}`" for name in constants}
    for name, value in constants.items():
        cell = rows[f"`{name}`"]
        if isinstance(value, bytes):
            assert f'"{value.decode("ascii")}"' in cell
            assert " ".join(f"0x{b:02X}" for b in value) in cell
        else:
            assert re.split(r"\s", cell)[0] == str(value), name


def test_server_settings_announced_in_hello_are_hello_fields() -> None:
    rows = table_with("setting", "default", "in HELLO")
    hello_fields = {f.name for f in dataclasses.fields(MESSAGE_TYPES[Opcode.HELLO])}
    for row in rows:
        name = row["setting"].strip("`")
        assert (row["in HELLO"] == "yes") == (name in hello_fields), name



def test_server_settings_table_gives_the_servers_defaults() -> None:
    rows = table_with("setting", "default", "in HELLO")
    config = ServerConfig()
    for row in rows:
        name = row["setting"].strip("`")
        assert row["default"] == str(getattr(config, name)), name


def test_the_servers_fixed_limits_are_the_ones_the_spec_states() -> None:
    """Limits the server fixes, which the spec gives in prose rather than in a table."""
    prose = " ".join(PROTOCOL.split())
    assert f"once {REFUSALS_MAX} refusals are in progress at once" in prose
    assert f"(0: no locking; at most {PIN_LOCKOUT_S_MAX}, one year)" in prose
    assert f"(the reference server: at most {RESUME_TAKEOVER_S:g} s)" in prose


def test_the_example_in_section_11_is_what_encode_gives() -> None:
    section = PROTOCOL[PROTOCOL.index("## 11. Examples"):]
    block = re.search(r"```\n([0-9a-f ]+)\n```", section)
    assert block is not None, "section 11 has no hex block"
    assert bytes.fromhex(block.group(1)) == encode(Login("AB-12345", "1234"), 1)
    assert "account `AB-12345` with PIN `1234`" in section and "request id 1" in section


def abnf_rules() -> dict[str, str]:
    block = re.search(r"```abnf\n(.*?)```", PROTOCOL, re.DOTALL)
    assert block is not None, "PROTOCOL.md has no ```abnf block"
    rules: dict[str, str] = {}
    name = None
    for line in block.group(1).splitlines():
        text = line.split(";", 1)[0].rstrip()
        if match := re.match(r"([a-z][a-z0-9-]*)\s*=\s*(.*)", text):
            name = match.group(1)
            rules[name] = match.group(2)
        elif text.strip() and name is not None:
            rules[name] += " " + text.strip()
    return rules


def test_every_opcode_has_an_abnf_rule_with_its_value_and_length() -> None:
    rules = abnf_rules()
    for op in Opcode:
        rule = op.name.lower().replace("_", "-")
        assert rule in rules, f"no ABNF rule {rule}"
        tokens = rules[rule].split()
        assert tokens[0] == f"%x{op.value:02X}", rule
        fast = MESSAGE_TYPES[op].FAST
        if fast.items is None:
            assert tokens[2] == f"%x00.{fast.head.size:02X}", rule
        else:
            assert tokens[2] == "length", rule


def test_every_abnf_rule_used_is_defined() -> None:
    rules = abnf_rules()
    core = {"OCTET", "ALPHA", "DIGIT"}
    for name, body in rules.items():
        unquoted = re.sub(r'"[^"]*"', "", body)
        for token in re.findall(r"(?<![%\w-])([A-Za-z][A-Za-z0-9-]*)", unquoted):
            assert token in rules or token in core, f"{name} uses undefined {token}"


def expected_payload_rows(con: Struct) -> list[tuple[str, str, str]]:
    """(offset, size, field) rows as the spec prints them, walked from the layout."""
    rows = []
    offset = 0
    for sub in con.subcons:
        array = wire_layout._prefixed_array(sub.subcon)
        if array is None:
            size = sub.subcon.sizeof()
            rows.append((str(offset), str(size), sub.name))
            offset += size
            continue
        count, item = array
        rows.append((str(offset), str(count.sizeof()), f"{sub.name}.count"))
        offset += count.sizeof()
        item_offset = 0
        for field in item.subcons:
            size = field.subcon.sizeof()
            position = f"{offset + item_offset} + {item.sizeof()}·i"
            rows.append((position, str(size), f"{sub.name}[i].{field.name}"))
            item_offset += size
    return rows


def section_for(op: Opcode) -> str:
    """The text of the ``###`` section whose heading names ``op`` with its value."""
    label = f"{op.name} (0x{op.value:02X})"
    for section in re.split(r"\n(?=#{2,3} )", PROTOCOL):
        heading = section.splitlines()[0]
        if heading.startswith("### ") and re.search(rf"(?<![A-Z_]){re.escape(label)}", heading):
            return section
    raise AssertionError(f"no section for {label}")


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_payload_table_matches_the_layout(op: Opcode) -> None:
    layout = MESSAGE_TYPES[op].LAYOUT
    section = section_for(op)
    if not layout.subcons:
        assert "Payload: empty (length 0)" in section
        return
    header, rows = markdown_tables(section)[0]
    assert header[:3] == ["offset", "size", "field"]
    assert [tuple(row[:3]) for row in rows] == expected_payload_rows(layout)


def test_spec_links_its_companion_files() -> None:
    assert "(examples.md)" in PROTOCOL
    assert "(vectors.json)" in PROTOCOL


# -- Generated files ------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spec_generate", SPEC / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_generated_files_are_up_to_date() -> None:
    for path, text in load_generator().render().items():
        expected = text.encode("utf-8") if isinstance(text, str) else text  # the capture
        assert path.read_bytes() == expected, (
            f"{path.name} is stale: run .venv/bin/python spec/generate.py"
        )


def test_examples_show_every_golden_frame() -> None:
    examples = (SPEC / "examples.md").read_text(encoding="utf-8")
    for vector in GOLDEN:
        spaced = bytes.fromhex(vector["hex"])[:16].hex(" ")
        assert f"### {vector['name']}: {vector['opcode']} " in examples
        assert spaced in examples



# -- Rules the prose states, checked against the code --------------------------------

PROSE = " ".join(PROTOCOL.split())
"""PROTOCOL.md with every run of white space made one space, so sentences match across
line breaks."""


def assert_spec_says(*sentences: str) -> None:
    for sentence in sentences:
        assert " ".join(sentence.split()) in PROSE, f"PROTOCOL.md does not say: {sentence!r}"


def abnf_comment(rule: str) -> str:
    """The comment on the ABNF line that defines ``rule``."""
    block = re.search(r"```abnf\n(.*?)```", PROTOCOL, re.DOTALL)
    assert block is not None, "PROTOCOL.md has no ```abnf block"
    for line in block.group(1).splitlines():
        if re.match(rf"{re.escape(rule)}\s*=", line):
            return line.split(";", 1)[1].strip()
    raise AssertionError(f"no ABNF rule {rule}")


def payload_row(op: Opcode, field: str) -> list[str]:
    """The row for ``field`` in the payload table of ``op``'s section."""
    _, rows = markdown_tables(section_for(op))[0]
    (row,) = [row for row in rows if row[2] == field]
    return row


def hello_with(**changes: int) -> Hello:
    return Hello(**{**dataclasses.asdict(ServerConfig().hello()), **changes})


def test_hello_payload_bytes_max_is_held_to_the_protocols_limit() -> None:
    assert abnf_comment("payload-bytes-max") == f"u16, 1..{limits.PAYLOAD_BYTES_MAX}"
    assert payload_row(Opcode.HELLO, "payload_bytes_max")[4].endswith(
        f", 1..{limits.PAYLOAD_BYTES_MAX}"
    )
    assert hello_with(payload_bytes_max=1).payload_bytes_max == 1
    assert hello_with(payload_bytes_max=limits.PAYLOAD_BYTES_MAX)
    for value in (0, limits.PAYLOAD_BYTES_MAX + 1, 2**16 - 1):
        with pytest.raises(WireError) as refused:
            hello_with(payload_bytes_max=value)
        assert (refused.value.status, refused.value.fatal) == (Status.FORMAT_ERROR, True)


@pytest.mark.parametrize(
    "config",
    [ServerConfig(), ServerConfig(amount_cents_max=500, withdrawal_cents_max=500)],
    ids=["defaults", "low-amounts"],
)
def test_announced_limits_are_enforced_as_the_protocols_are(config: ServerConfig) -> None:
    """A server that announces less checks the frame as the protocol's limit is checked.

    The reference server announces the protocol's own payload and HISTORY limits whatever
    its settings, so its decoder's checks are the announced ones; were it to announce
    less, the header check below (Decoder's ``payload_bytes_max``) is the one to apply.
    """
    payload_max, history_max = limits.PAYLOAD_BYTES_MAX, limits.HISTORY_ENTRIES_MAX
    assert_spec_says(
        "A server MAY announce less than the protocol's limits (§7): a `payload_bytes_max` below"
        f" {payload_max}, a `history_entries_max` below {history_max}, an `amount_cents_max`"
        f" below {limits.AMOUNT_CENTS_MAX}. It MUST NOT announce more",
        f"The reference server announces {payload_max} and {history_max} whatever its"
        " settings, and its own `amount_cents_max`.",
        "A client MUST NOT exceed the limits a server announced. A server answers a frame that"
        " does so exactly as one over the protocol's limit: a length field over its announced"
        f" `payload_bytes_max` is refused from the header alone as one over {payload_max} is"
        " (FORMAT_ERROR, fatal), and a HISTORY count over its announced `history_entries_max`"
        f" as one over {history_max} (FORMAT_ERROR, fatal).",
    )
    hello = config.hello()
    assert (hello.payload_bytes_max, hello.history_entries_max) == (payload_max, history_max)
    assert hello.amount_cents_max == config.amount_cents_max

    announced = 24  # a server announcing just enough for the largest request
    header = limits.MAGIC + bytes([limits.PROTOCOL_VERSION, Opcode.DEPOSIT])
    over = Decoder(Sender.CLIENT, payload_bytes_max=announced)
    over.receive_data(header + (5).to_bytes(4, "big") + (announced + 1).to_bytes(2, "big"))
    with pytest.raises(WireError) as refused:
        over.next_frame()
    assert (refused.value.status, refused.value.fatal, refused.value.request_id) == (
        Status.FORMAT_ERROR, True, 5
    )
    within = Decoder(Sender.CLIENT, payload_bytes_max=announced)
    within.receive_data(encode(Deposit(bytes(16), 1), 5))
    assert within.next_frame() == Frame(5, Deposit(bytes(16), 1))


async def login_as_typed(client: WireClient, account: str, pin: str, request_id: int) -> Status:
    """LOGIN with the account's bytes exactly as given: ``wire.Login`` would upper-case it."""
    payload = account.encode("ascii") + pin.encode("ascii")
    await client.send_raw(frame_bytes(Opcode.LOGIN, request_id, payload))
    frame = await client.receive()
    assert frame is not None and frame.request_id == request_id
    assert isinstance(frame.message, LoginReply)
    return frame.message.status


async def test_the_wrong_pin_that_locks_is_answered_pin_tries_exceeded(bank: RunningServer):
    assert_spec_says(
        "The wrong PIN that brings the count to `pin_tries_max` locks the account and is"
        " itself answered PIN_TRIES_EXCEEDED, not INCORRECT_PIN.",
        "While the account is locked, every LOGIN for it is answered PIN_TRIES_EXCEEDED"
        " without checking the PIN: a right PIN gets it too,",
        "answered PIN_TRIES_EXCEEDED (75), the locking one included,",
    )
    client = await bank.client()
    statuses = [await client.login(DEMO_ACCOUNT, "0000") for _ in range(PIN_TRIES_MAX)]
    assert statuses == [Status.INCORRECT_PIN] * (PIN_TRIES_MAX - 1) + [Status.PIN_TRIES_EXCEEDED]
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.PIN_TRIES_EXCEEDED
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.PIN_TRIES_EXCEEDED


def test_a_login_during_the_lock_neither_counts_nor_extends_it(tmp_path: Path) -> None:
    assert_spec_says(
        "a LOGIN during the lock counts nothing and does not extend the lock. The lock ends"
        " `pin_lockout_s` after the PIN that set it; the count then starts again from zero.",
    )
    lockout_ms, t0 = 60_000, 1_700_000_000_000
    policy = PinPolicy(tries_max=PIN_TRIES_MAX, lockout_ms=lockout_ms)
    with Store(tmp_path / "bank.db", bytes(32)) as store:

        def login(pin: str, now_ms: int) -> Status:
            return PIN_STATUS[store.verify_pin(DEMO_ACCOUNT, pin, now_ms, policy)]

        for _ in range(PIN_TRIES_MAX):
            login("0000", t0)
        end = t0 + lockout_ms
        assert login("0000", end - 1) is Status.PIN_TRIES_EXCEEDED
        assert login(DEMO_PIN, end - 1) is Status.PIN_TRIES_EXCEEDED
        # Neither attempt moved the end, and the next wrong PIN is the first of a new count.
        wrong = [login("0000", end) for _ in range(PIN_TRIES_MAX)]
        assert wrong == [Status.INCORRECT_PIN] * (PIN_TRIES_MAX - 1) + [Status.PIN_TRIES_EXCEEDED]


async def test_the_pin_failure_count_is_shared_by_every_letter_case(bank: RunningServer):
    assert_spec_says(
        "The server counts wrong PINs per account number in upper case, the form above:"
        " `ac-12345` and `AC-12345` share one count and one lock.",
        "The failure count is kept per account number in upper case,",
    )
    spellings = ["ac-12345", "Ac-12345", "aC-12345", "AC-12345"]
    assert {spelling.upper() for spelling in spellings} == {DEMO_ACCOUNT}
    client = await bank.client()
    statuses = [
        await login_as_typed(client, spellings[i % len(spellings)], "0000", request_id=i + 1)
        for i in range(PIN_TRIES_MAX)
    ]
    assert statuses == [Status.INCORRECT_PIN] * (PIN_TRIES_MAX - 1) + [Status.PIN_TRIES_EXCEEDED]
    client = await bank.client()
    assert await login_as_typed(client, spellings[-1], DEMO_PIN, 1) is Status.PIN_TRIES_EXCEEDED


def numbered_steps(section: str) -> list[str]:
    """The items of the first numbered list in ``section``, each as one line of text."""
    steps: list[str] = []
    for line in section.splitlines():
        if match := re.match(r"\d+\. (.*)", line):
            steps.append(match.group(1))
        elif steps and line.startswith("   ") and line.strip():
            steps[-1] += " " + line.strip()
        elif steps:
            break
    return steps


def statuses_named(text: str) -> list[Status]:
    words = re.findall(r"\b[A-Z][A-Z_]+\b", text)
    return [Status[word] for word in words if word in Status.__members__]


async def test_money_checks_run_in_the_order_the_spec_gives(ledger: BatchLedger):
    steps = numbered_steps(section_for(Opcode.DEPOSIT))
    assert [statuses_named(step) for step in steps] == [
        [Status.ISSUER_UNAVAILABLE],
        [Status.NOT_LOGGED_IN],
        [Status.APPROVED, Status.DUPLICATE_TRANSMISSION],
        [Status.EXCEEDS_WITHDRAWAL_LIMIT, Status.INVALID_AMOUNT],
        [Status.INSUFFICIENT_FUNDS, Status.INVALID_AMOUNT],
    ]
    assert_spec_says(
        "A withdrawal over both the withdrawal limit and the balance is therefore answered"
        " EXCEEDS_WITHDRAWAL_LIMIT."
    )
    config, leases = ServerConfig(), Leases()
    over_both = max(config.withdrawal_cents_max, DEMO_BALANCE_CENTS) + 1

    def session(config: ServerConfig = config) -> ServedSession:
        return ServedSession(ledger=ledger, leases=leases, config=config, name="conformance")

    async def status(session: ServedSession, request: Request) -> Status:
        return (await session.handle(request)).status

    # 1 before 2.
    shutting_down = session()
    shutting_down.begin_shutdown()
    assert await status(shutting_down, Withdraw(txn_id(), over_both)) is Status.ISSUER_UNAVAILABLE
    # 2 before the rest.
    assert await status(session(), Withdraw(txn_id(), over_both)) is Status.NOT_LOGGED_IN
    atm = session()
    assert await status(atm, Login(DEMO_ACCOUNT, DEMO_PIN)) is Status.APPROVED
    # 4 before 5.
    assert await status(atm, Withdraw(txn_id(), over_both)) is Status.EXCEEDS_WITHDRAWAL_LIMIT
    # 3 before 4 and 5: a booked id with other content, and one replayed under a lower limit.
    booked = txn_id()
    receipt = await atm.handle(Withdraw(booked, 2_000))
    assert receipt.status is Status.APPROVED
    assert await status(atm, Withdraw(booked, over_both)) is Status.DUPLICATE_TRANSMISSION
    assert await status(atm, Logout()) is Status.APPROVED
    stricter = session(dataclasses.replace(config, withdrawal_cents_max=1_000))
    assert await status(stricter, Login(DEMO_ACCOUNT, DEMO_PIN)) is Status.APPROVED
    assert await stricter.handle(Withdraw(booked, 2_000)) == receipt


def test_a_withdrawal_limit_above_the_amount_maximum_stops_the_server_from_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert_spec_says(
        "The withdrawal limit is never above `amount_cents_max`: a server configured with a"
        " higher one MUST NOT start, and does not lower either setting itself",
        "The server refuses to start when a setting is outside its range, and never clamps"
        f" one to fit: `python -m bank` prints the setting's rule and exits with status"
        f" {bank_main.EXIT_USAGE} before it listens. This includes a `withdrawal_cents_max`"
        " above `amount_cents_max`, so an operator who lowers `amount_cents_max` below"
        f" {ServerConfig().withdrawal_cents_max} lowers `withdrawal_cents_max` with it.",
    )
    rows = {row["setting"]: row["meaning"] for row in table_with("setting", "default", "in HELLO")}
    assert rows["`withdrawal_cents_max`"].endswith("; at most `amount_cents_max`")
    for amount_max in (1, 50_000, limits.AMOUNT_CENTS_MAX):
        config = ServerConfig(amount_cents_max=amount_max, withdrawal_cents_max=amount_max)
        assert config.withdrawal_cents_max == amount_max
        with pytest.raises(ValueError, match="withdrawal_cents_max"):
            ServerConfig(amount_cents_max=amount_max, withdrawal_cents_max=amount_max + 1)

    def serve(config: ServerConfig, _args: object) -> int:
        raise AssertionError(f"the server started with {config}")

    monkeypatch.setattr(bank_main, "serve", serve)
    lowered = str(ServerConfig().withdrawal_cents_max - 1)
    assert bank_main.main(["--amount-cents-max", lowered]) == bank_main.EXIT_USAGE


COUNTED_LOGIN_REFUSALS = (Status.INCORRECT_PIN, Status.PIN_TRIES_EXCEEDED, Status.ACCOUNT_IN_USE)
COUNTED_RESUME_REFUSAL = Status.UNKNOWN_SESSION


def test_the_spec_names_the_login_and_resume_answers_that_count() -> None:
    assert {*COUNTED_LOGIN_REFUSALS, COUNTED_RESUME_REFUSAL} == LOGIN_FAILURES
    counted = ", ".join(status.name for status in COUNTED_LOGIN_REFUSALS[:-1])
    counted += f" or {COUNTED_LOGIN_REFUSALS[-1].name}"
    assert_spec_says(
        f"A LOGIN counts toward `login_attempts_max` (default {ServerConfig().login_attempts_max})"
        f" if and only if it is answered {counted}, and a RESUME if and only if it is answered"
        f" {COUNTED_RESUME_REFUSAL.name}; LOGINs and RESUMEs count together, and when one"
        " connection has had that many, the server sends that reply and closes the connection."
        " A LOGIN or RESUME answered ISSUER_UNAVAILABLE (the server is shutting down, or its"
        " storage failed) does not count, nor does one answered ALREADY_LOGGED_IN, nor a LOGIN"
        " or RESUME frame answered with ERROR.",
    )
    rows = {row["setting"]: row["meaning"] for row in table_with("setting", "default", "in HELLO")}
    assert rows["`login_attempts_max`"].startswith(
        f"LOGINs answered {counted}, and RESUMEs answered {COUNTED_RESUME_REFUSAL.name}, on one"
        " connection"
    )


async def test_each_counted_login_refusal_counts(bank: RunningServer):
    """One of each counted refusal on one connection reaches the default limit of three."""
    assert len(COUNTED_LOGIN_REFUSALS) == ServerConfig().login_attempts_max
    locker = await bank.client()  # lock a second account, for PIN_TRIES_EXCEEDED
    for _ in range(PIN_TRIES_MAX):
        await locker.login(OTHER_ACCOUNT, "0000")
    holder = await bank.client()
    assert await holder.login() is Status.APPROVED
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.ACCOUNT_IN_USE
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.login(OTHER_ACCOUNT, OTHER_PIN) is Status.PIN_TRIES_EXCEEDED
    assert await client.closed()


async def test_refused_resumes_count_together_with_refused_logins(bank: RunningServer):
    client = await bank.client()
    nothing = bytes(limits.SESSION_TOKEN_BYTES)  # no session's token: none was ever sent
    assert await client.request(Resume(DEMO_ACCOUNT, nothing)) == ResumeReply(
        COUNTED_RESUME_REFUSAL
    )
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.request(Resume(DEMO_ACCOUNT, nothing)) == ResumeReply(
        COUNTED_RESUME_REFUSAL
    )
    assert await client.closed()


async def test_logins_answered_issuer_unavailable_for_storage_do_not_count(
    bank: RunningServer, ledger: BatchLedger
):
    await ledger.aclose()  # every request that needs the store now meets a StorageError
    client = await bank.client()
    for _ in range(ServerConfig().login_attempts_max + 1):
        assert await client.login() is Status.ISSUER_UNAVAILABLE
    assert await client.request(Ping()) == PingReply(Status.APPROVED)


async def test_logins_answered_issuer_unavailable_in_shutdown_do_not_count(
    config: ServerConfig, ledger: BatchLedger
):
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bank = await start_server(nursery, config, ledger)
            client = await bank.client()
            bank.server.shutdown()
            frame = await client.receive()
            assert frame is not None and isinstance(frame.message, Shutdown)
            for _ in range(config.login_attempts_max + 1):
                assert await client.login() is Status.ISSUER_UNAVAILABLE
            assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
            assert await client.closed()
            await client.aclose()


async def test_a_frame_cut_short_by_the_clients_eof_gets_no_answer(
    bank: RunningServer, ledger: BatchLedger
):
    assert_spec_says(
        "Every whole frame that arrived before the end of the stream is answered first, in"
        " order",
        "A frame cut short by the end of the stream is not an error to answer: the server sends"
        " nothing for it, no ERROR and so no request id, and carries out nothing of its request.",
    )
    client = await bank.client()
    assert await client.login() is Status.APPROVED
    deposit = encode(Deposit(txn_id(), 1_00), 3)
    await client.send_raw(encode(Ping(), 2) + deposit[: len(deposit) // 2])
    await client.stream.send_eof()
    frame = await client.receive()
    assert frame == Frame(2, PingReply(Status.APPROVED))
    assert await client.closed()  # and nothing between: no ERROR for the cut DEPOSIT
    assert bank.server.leases.held() == frozenset()
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS


# -- Statuses per reply ----------------------------------------------------------------


def status_cell(statuses: frozenset[Status]) -> str:
    """How §4.1 lists a row's statuses: by name, in the order of the status table."""
    return ", ".join(status.name for status in Status if status in statuses)


def test_the_statuses_per_reply_table_matches_the_code() -> None:
    rows = table_with("reply", "statuses it may carry")
    assert [row["reply"] for row in rows] == [op.name for op in REPLY_STATUSES]
    assert list(REPLY_STATUSES) == [op for op in Opcode if issubclass(MESSAGE_TYPES[op], Reply)]
    for row in rows:
        assert row["statuses it may carry"] == status_cell(REPLY_STATUSES[Opcode[row["reply"]]])
    assert VECTORS["reply_statuses"] == {
        op.name: status_cell(statuses).split(", ") for op, statuses in REPLY_STATUSES.items()
    }


@pytest.mark.parametrize("op", list(REPLY_STATUSES), ids=lambda op: op.name)
def test_a_known_status_outside_its_row_is_not_a_format_error(op: Opcode) -> None:
    assert_spec_says(
        "A receiver MUST NOT treat a reply whose status is in the table of §4 but not in its"
        " row as a format error: servers may grow, and a later one may add statuses to a row."
        " A client treats such a reply as a refusal (it is not APPROVED, so nothing it asked"
        " for is confirmed), shows the status to the customer,",
        "A status byte that is not in the table of §4 remains a format error (fatal) in any"
        " reply.",
    )
    cls = MESSAGE_TYPES[op]
    outside = [status for status in Status if status not in REPLY_STATUSES[op]]
    assert outside, "every row leaves some status out"
    decoder = Decoder(Sender.SERVER)
    decoder.receive_data(b"".join(encode(cls(status), 7) for status in outside))
    assert [frame.message.status for frame in drain(decoder)] == outside

    unassigned = next(value for value in range(256) if value not in Status._value2member_map_)
    payload = bytes([unassigned]) + encode(cls(Status.NOT_LOGGED_IN), 7)[11:-4]
    decoder.receive_data(frame_bytes(op, 7, payload))
    with pytest.raises(WireError) as refused:
        decoder.next_frame()
    assert (refused.value.status, refused.value.fatal) == (Status.FORMAT_ERROR, True)


async def test_the_server_answers_each_request_only_with_its_rows_statuses(
    ledger: BatchLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Every way the session answers a request, each taken once: the statuses seen per
    reply opcode are exactly the rows of REPLY_STATUSES, no more and no fewer."""
    assert_spec_says(
        "A server answers each request only with a status in its reply opcode's row below.",
    )
    config = ServerConfig(amount_cents_max=200_000, withdrawal_cents_max=100_000)
    leases, sessions = Leases(), SessionRegistry()
    seen: dict[Opcode, set[Status]] = {op: set() for op in REPLY_STATUSES}

    def session(ledger: Ledger = ledger) -> ServedSession:
        return ServedSession(
            ledger=ledger, leases=leases, config=config, name="conformance", sessions=sessions
        )

    async def ask(session: ServedSession, *requests: Request) -> None:
        for request in requests:
            reply = await session.handle(request)
            seen[reply.OPCODE].add(reply.status)

    def every_request() -> list[Request]:
        """Those that use the ledger first (LOGIN to CHANGE_PIN), then the rest."""
        return [
            Login(DEMO_ACCOUNT, DEMO_PIN), Balance(), Deposit(txn_id(), 1_00),
            Withdraw(txn_id(), 1_00), History(5), Transfer(txn_id(), 1_00, OTHER_ACCOUNT),
            ChangePin(DEMO_PIN, DEMO_PIN),
            Resume(DEMO_ACCOUNT, bytes(limits.SESSION_TOKEN_BYTES)),
            Features(int(ALL_FEATURES)), Ping(), Logout(),
        ]

    # Not logged in: the state refusals, a token that opens nothing, a wrong PIN, and a lock.
    await ask(session(), *[r for r in every_request() if not isinstance(r, Login | Logout)])
    await ask(session(), Login(DEMO_ACCOUNT, "0000"), Logout())
    await ask(session(), *[Login(OTHER_ACCOUNT, "0000")] * PIN_TRIES_MAX)
    # Logged in: every outcome of every request.
    atm = session()
    await ask(atm, Login(DEMO_ACCOUNT, DEMO_PIN))
    async with trio.open_nursery() as nursery:  # a lease belongs to a task: another ATM's
        nursery.start_soon(ask, session(), Login(DEMO_ACCOUNT, DEMO_PIN))  # ACCOUNT_IN_USE
    booked = txn_id()
    token = atm.session.token
    assert token is not None
    await ask(
        atm, Login(DEMO_ACCOUNT, DEMO_PIN), Resume(DEMO_ACCOUNT, token), Balance(), History(5),
        Ping(), Deposit(booked, 1_00), Deposit(booked, 2_00), Deposit(txn_id(), 200_001),
        Withdraw(booked, 1_00), Withdraw(txn_id(), 100_001),
        Withdraw(txn_id(), 90_000), Withdraw(txn_id(), 90_000),
    )
    # Transfers and PIN changes: every outcome (a destination that cannot take more too).
    ledger._store.add_account("FL-00001", "2580", BALANCE_CENTS_MAX)
    moved = txn_id()
    await ask(
        atm, Features(int(ALL_FEATURES)), Transfer(moved, 1_00, OTHER_ACCOUNT),
        Transfer(moved, 1_00, OTHER_ACCOUNT), Transfer(moved, 2_00, OTHER_ACCOUNT),
        Transfer(txn_id(), 1_00, DEMO_ACCOUNT), Transfer(txn_id(), 100_001, OTHER_ACCOUNT),
        Transfer(txn_id(), 90_000, OTHER_ACCOUNT), Transfer(txn_id(), 1_00, "QQ-00000"),
        Transfer(txn_id(), 1_00, "FL-00001"),
        ChangePin("0000", "2580"), ChangePin(DEMO_PIN, "1234"), ChangePin(DEMO_PIN, DEMO_PIN),
    )
    locker = session()
    await ask(locker, Login("WF-14351", "9834"), *[ChangePin("0000", "2580")] * PIN_TRIES_MAX)
    locker.end()
    prober = session()  # transfers to no account until its transfers lock
    await ask(prober, Login("TN-13731", "2435"), Features(int(ALL_FEATURES)), *[
        Transfer(txn_id(), 1, f"QQ-{n:05d}") for n in range(ServerConfig().destination_tries_max)
    ])
    prober.end()
    # Its connection lost, the ATM resumes the session on a new one with the session's
    # token; the old connection, waiting for its client, ends at once when superseded.
    atm.session.on_supersede = atm.end
    resumed = session()
    await ask(resumed, Resume(DEMO_ACCOUNT, token))
    await ask(session(), Resume(DEMO_ACCOUNT, token))  # spent: it opens nothing now
    await ask(resumed, Logout())
    # Shutting down: everything but LOGOUT is refused.
    shutting_down = session()
    shutting_down.begin_shutdown()
    await ask(shutting_down, *every_request())
    # Storage failing: every request that uses it.
    broken = await open_ledger(tmp_path / "broken.db", tmp_path / "broken.key")
    cut_off = session(broken)
    await ask(cut_off, Login(DEMO_ACCOUNT, DEMO_PIN))
    await broken.aclose()
    await ask(cut_off, *every_request()[1:])
    await ask(session(broken), Login(DEMO_ACCOUNT, DEMO_PIN))
    # A bug: each request on its own session, since SYSTEM_MALFUNCTION ends it.
    faulty = FaultyLedger(ledger)
    for request in every_request()[:7]:
        victim = session(faulty)
        if not isinstance(request, Login):
            await ask(victim, Login(DEMO_ACCOUNT, DEMO_PIN))
        faulty.failing = RuntimeError("a bug below the session")
        await ask(victim, request)
        faulty.failing = None
        victim.end()

    async def bug(_session: Session, _request: Request) -> Reply:
        raise RuntimeError("a bug in a handler that uses neither ledger nor leases")

    for handler, request in (
        ("_ping", Ping()), ("_logout", Logout()), ("_features", Features(0))
    ):
        with monkeypatch.context() as patch:
            patch.setattr(Session, handler, bug)
            await ask(session(), request)

    def registry_bug(_registry: SessionRegistry, _account: str, _token: bytes) -> None:
        raise RuntimeError("a bug in the registry of session tokens")

    with monkeypatch.context() as patch:
        patch.setattr(SessionRegistry, "claim", registry_bug)
        await ask(session(), Resume(DEMO_ACCOUNT, bytes(limits.SESSION_TOKEN_BYTES)))

    assert seen == {op: set(statuses) for op, statuses in REPLY_STATUSES.items()}


# -- Session resumption ------------------------------------------------------------------


async def test_a_resume_takes_the_session_over_at_once_and_spends_its_token(
    bank: RunningServer,
):
    assert_spec_says(
        "The server *supersedes* the session's old connection: it sends SESSION_EXPIRED"
        " (request id 0) there and closes it, at once if that connection is waiting for its"
        " client,",
        "RESUME_REPLY APPROVED, the session is AUTHENTICATED on the new connection, and"
        " SESSION_TOKEN follows with a new token.",
        "If the token opens the account's session, it is spent at once: it never opens"
        " anything again, whatever follows.",
    )
    old = await logged_in(bank)
    token = old.tokens[-1]
    new = await bank.client()
    assert await new.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(Status.APPROVED)
    assert await new.token() != token  # the very next frame, and a new token
    assert await frames_until_closed(old) == [Frame(0, SessionExpired())]
    assert await new.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    late = await bank.client()
    assert await late.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
        Status.UNKNOWN_SESSION
    )
    assert bank.server.leases.held() == frozenset({DEMO_ACCOUNT})


async def test_a_token_opens_only_its_own_accounts_session_and_a_wrong_one_spends_nothing(
    bank: RunningServer,
):
    assert_spec_says(
        "Nothing else changes; a session the account has on another connection goes on, and"
        " its token stays valid.",
    )
    holder = await logged_in(bank)
    token = holder.tokens[-1]
    await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)  # a live session of another account
    guesser = await bank.client()
    wrong = bytes(byte ^ 0xFF for byte in token)
    for account, presented in ((DEMO_ACCOUNT, wrong), (OTHER_ACCOUNT, token)):
        assert await guesser.request(Resume(account, presented)) == ResumeReply(
            Status.UNKNOWN_SESSION
        )
    assert await holder.request(Ping()) == PingReply(Status.APPROVED)
    assert await guesser.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(Status.APPROVED)


@pytest.mark.parametrize("ending", ["logout", "client closing", "idle timeout"])
async def test_a_token_dies_with_its_session(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, ending: str
):
    assert_spec_says(
        "the session has not ended: not by LOGOUT, nor SESSION_EXPIRED (the idle timeout, or"
        " the session was resumed elsewhere), nor by its connection's end for any other reason"
        " (the client closing it,",
    )
    bank = await start_server(nursery, config, ledger, idle_timeout_s=1)
    old = await logged_in(bank)
    token = old.tokens[-1]
    if ending == "logout":
        assert await old.request(Logout()) == LogoutReply(Status.APPROVED)
    elif ending == "client closing":
        await old.stream.send_eof()  # the end of its stream ends the session (section 8)
    else:
        assert await old.receive() == Frame(0, SessionExpired())
    assert await old.closed()  # the server released the lease before it closed
    assert bank.server.leases.held() == frozenset()
    client = await bank.client()
    assert await client.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
        Status.UNKNOWN_SESSION
    )
    assert await client.login() is Status.APPROVED  # what a client does next


async def test_a_restarted_server_knows_no_tokens(config: ServerConfig, ledger: BatchLedger):
    assert_spec_says("A restarted server knows no tokens: every RESUME to it is answered"
                     " UNKNOWN_SESSION.")
    async with trio.open_nursery() as before:
        old = await logged_in(await start_server(before, config, ledger))
        token = old.tokens[-1]
        before.cancel_scope.cancel()
    await old.aclose()
    async with trio.open_nursery() as after:
        client = await (await start_server(after, config, ledger)).client()
        assert await client.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
            Status.UNKNOWN_SESSION
        )
        assert await client.login() is Status.APPROVED
        await client.aclose()
        after.cancel_scope.cancel()


class GatedLedger(FaultyLedger):
    """The real ledger, except that BALANCE waits for ``gate`` while one is set: a request
    the server is working on for as long as a test likes."""

    def __init__(self, real: Ledger) -> None:
        super().__init__(real)
        self.gate: trio.Event | None = None

    async def balance(self, account: str) -> int:
        if self.gate is not None:
            await self.gate.wait()
        return await super().balance(account)


@pytest.mark.parametrize("takeover", ["in time", "too late"])
async def test_a_resume_is_answered_only_once_the_old_connection_has_ended(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger,
    monkeypatch: pytest.MonkeyPatch, takeover: str,
):
    assert_spec_says(
        "otherwise as soon as it has answered the request it is working on.",
        "The server answers APPROVED only after the old connection has ended, so nothing more"
        " happens there once the client has that answer.",
        "If the old connection has not ended by then, or another ATM took the account's lease"
        " between that end and the takeover, the answer is UNKNOWN_SESSION: the token is spent"
        " and the old connection superseded all the same.",
    )
    if takeover == "too late":
        monkeypatch.setattr(bank_session, "RESUME_TAKEOVER_S", 0.05)
    gated = GatedLedger(ledger)
    bank = await start_server(nursery, config, gated)  # type: ignore[arg-type]
    old = await logged_in(bank)
    token = old.tokens[-1]
    gated.gate = trio.Event()
    asked = await old.send(Balance())  # the old connection works on it until the gate opens
    new = await bank.client()
    resume = await new.send(Resume(DEMO_ACCOUNT, token))
    if takeover == "in time":
        await settle()
        with trio.move_on_after(0.1) as waited:
            await new.receive()
        assert waited.cancelled_caught, "RESUME answered while its old connection still serves"
        rival = await bank.client()  # the token was spent when it was presented: no waiting
        with trio.fail_after(RESUME_TAKEOVER_S / 2):
            assert await rival.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
                Status.UNKNOWN_SESSION
            )
        gated.gate.set()
        assert await new.receive() == Frame(resume, ResumeReply(Status.APPROVED))
    else:
        assert await new.receive() == Frame(resume, ResumeReply(Status.UNKNOWN_SESSION))
        gated.gate.set()
    assert await frames_until_closed(old) == [
        Frame(asked, BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)),
        Frame(0, SessionExpired()),
    ]
    if takeover == "too late":
        assert await new.request(Resume(DEMO_ACCOUNT, token)) == ResumeReply(
            Status.UNKNOWN_SESSION
        )
        assert await new.login() is Status.APPROVED


# -- Decoding order and field ranges (§8) ---------------------------------------------


def refusal_of(receiver: Sender, data: bytes) -> tuple[Status, bool, int]:
    """How the decoder of ``receiver``'s side refuses ``data``: status, fatal, request id."""
    decoder = Decoder(Sender.CLIENT if receiver is Sender.SERVER else Sender.SERVER)
    decoder.receive_data(data)
    with pytest.raises(WireError) as refused:
        decoder.next_frame()
    return refused.value.status, refused.value.fatal, refused.value.request_id


def test_a_fatal_fault_in_a_payload_is_found_before_its_amount() -> None:
    """Were the fields checked in wire order, the amount (offset 16) would come before
    the destination (offset 24) and the same bytes would be refused without closing."""
    assert_spec_says(
        "then every field's allowed values: a field whose fault is fatal before an amount, so a"
        " frame with both faults is refused for the fatal one (a TRANSFER with a malformed"
        " destination and an amount of 0 is FORMAT_ERROR, fatal, not INVALID_AMOUNT).",
    )
    both = frame_bytes(Opcode.TRANSFER, 11, bytes(16) + (0).to_bytes(8, "big") + b"WF 14351")
    assert refusal_of(Sender.SERVER, both) == (Status.FORMAT_ERROR, True, 11)
    amount_only = frame_bytes(Opcode.TRANSFER, 11, bytes(16) + (0).to_bytes(8, "big") + b"WF-14351")
    assert refusal_of(Sender.SERVER, amount_only) == (Status.INVALID_AMOUNT, False, 11)


def test_every_field_out_of_range_in_a_servers_frame_is_a_format_error() -> None:
    """The §8 row for reply and notice fields, example by example, on the client's decoder."""
    assert_spec_says(
        "| any other field of a reply or notice outside its allowed values (§3): a balance, entry"
        " id or time over 9223372036854775807, an approved receipt with entry id 0, a history"
        " entry's amount 0 or over 10000000, a HELLO limit of 0 or over the protocol's |"
        " FORMAT_ERROR |",
        "INVALID_AMOUNT concerns a request's amount only; an amount out of range in a server's"
        " frame (a history entry's) is a fatal FORMAT_ERROR, as above.",
    )
    over = BALANCE_CENTS_MAX + 1

    def u64(value: int) -> bytes:
        return value.to_bytes(8, "big")

    def entry(amount_cents: int) -> bytes:
        return u64(1) + u64(0) + bytes([EntryKind.DEPOSIT]) + u64(amount_cents) + u64(1)

    hello = encode(ServerConfig().hello())[10:-4]
    bad = [
        frame_bytes(Opcode.BALANCE_REPLY, 2, b"\x00" + u64(over)),
        frame_bytes(Opcode.DEPOSIT_REPLY, 3, b"\x00" + u64(1) + u64(over) + u64(0)),
        frame_bytes(Opcode.WITHDRAW_REPLY, 3, b"\x00" + u64(1) + u64(1) + u64(over)),
        frame_bytes(Opcode.TRANSFER_REPLY, 3, b"\x00" + u64(1) + u64(0) + u64(0)),
        frame_bytes(Opcode.HISTORY_REPLY, 6, b"\x00\x01" + entry(0)),
        frame_bytes(Opcode.HISTORY_REPLY, 6, b"\x00\x01" + entry(limits.AMOUNT_CENTS_MAX + 1)),
    ]
    # Each HELLO limit (offset, size) set to 0, and the three with a protocol maximum over it.
    def hello_with_field(offset: int, value: bytes) -> bytes:
        return frame_bytes(Opcode.HELLO, 0, hello[:offset] + value + hello[offset + len(value):])

    for offset, size in ((0, 2), (2, 1), (3, 8), (11, 2), (13, 2), (15, 2)):
        bad.append(hello_with_field(offset, bytes(size)))
    for offset, size, maximum in (
        (0, 2, limits.PAYLOAD_BYTES_MAX),
        (2, 1, limits.HISTORY_ENTRIES_MAX),
        (3, 8, limits.AMOUNT_CENTS_MAX),
    ):
        bad.append(hello_with_field(offset, (maximum + 1).to_bytes(size, "big")))
    for data in bad:
        status, fatal, _ = refusal_of(Sender.CLIENT, data)
        assert (status, fatal) == (Status.FORMAT_ERROR, True), data.hex()


async def test_decoding_comes_before_the_state_table(bank: RunningServer):
    """A DEPOSIT of 0 cents is answered ERROR INVALID_AMOUNT before login, not
    NOT_LOGGED_IN; and the engine refuses it so once a shutdown has begun."""
    assert_spec_says(
        "Decoding comes before the state table (§5) and the checks of §3.3: a request refused"
        " here is refused in every state, so a DEPOSIT of 0 cents is answered ERROR"
        " INVALID_AMOUNT whether or not the session is logged in, and also once SHUTDOWN is"
        " announced.",
    )
    zero = frame_bytes(Opcode.DEPOSIT, 7, bytes(16) + bytes(8))
    client = await bank.client()
    await client.send_raw(zero)
    assert await client.receive() == Frame(7, Error(Status.INVALID_AMOUNT))
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
    await client.send_raw(zero)
    assert await client.receive() == Frame(7, Error(Status.INVALID_AMOUNT))

    engine = WireConnection(Sender.SERVER)
    engine.send(ServerConfig().hello())
    engine.shutting_down = True
    engine.receive_data(zero)
    with pytest.raises(WireError) as refused:
        engine.next_event()
    assert (refused.value.status, refused.value.fatal) == (Status.INVALID_AMOUNT, False)


def test_a_server_sends_error_only_with_the_five_statuses_of_section_3_12() -> None:
    """The statuses a server's decoder refuses with (every server-side negative vector),
    and those the server itself puts in an ERROR, are the five §3.12 names; any other
    ends the session on the client's side as the transition table says."""
    assert_spec_says(
        "After an ERROR with FORMAT_ERROR, UNSUPPORTED_VERSION or SERVER_BUSY the server closes"
        " the connection; after INVALID_TRANSACTION or INVALID_AMOUNT the session goes on. A"
        " server sends ERROR with no other status. An ERROR with any other status (but"
        " APPROVED) is still well-formed, and ends the session as a fatal one does",
        "Opcodes `0xC0` to `0xFE` are notices: server messages that answer no request. `0xFF`"
        " is ERROR,",
    )
    closing = {Status.FORMAT_ERROR, Status.UNSUPPORTED_VERSION, Status.SERVER_BUSY}
    going_on = {Status.INVALID_TRANSACTION, Status.INVALID_AMOUNT}
    decoded = {Status[v["status"]] for v in NEGATIVE if v["receiver"] == "server"}
    built = {
        Status[name]
        for path in (SPEC.parent / "bank").glob("*.py")
        for name in re.findall(r"\bError\(Status\.(\w+)\)", path.read_text(encoding="utf-8"))
    }
    assert decoded == closing - {Status.SERVER_BUSY} | going_on
    assert built and built <= closing | going_on
    for op, cls in MESSAGE_TYPES.items():
        assert (op >= 0xC0) == issubclass(cls, (Notice, Error)), cls
        assert (op == Opcode.ERROR) == (cls is Error), cls
    for status in Status:
        if status is Status.APPROVED:
            continue
        after = next_state(State.AUTHENTICATED, Error(status))
        assert after is (State.AUTHENTICATED if status in going_on else State.CLOSED), status


def test_a_reply_answers_the_oldest_unanswered_request_or_the_client_closes() -> None:
    assert_spec_says(
        "Each reply answers the oldest request not yet answered: a reply with another request"
        " id, with another opcode than that request's reply opcode, or with no request"
        " unanswered, is treated as a malformed frame (FORMAT_ERROR, fatal, §8): the client"
        " closes the connection,",
        "An ERROR answers the oldest request only when it carries that request's id; with"
        " another id it answers none of them,",
    )

    def client_with_pings(count: int) -> WireConnection:
        client = WireConnection(Sender.CLIENT)
        client.receive_data(encode(ServerConfig().hello()))
        assert isinstance(client.next_event(), Frame)
        for _ in range(count):
            client.send(Ping())
        return client

    for pings, frame in (
        (2, encode(PingReply(Status.APPROVED), 2)),  # 1 is the oldest
        (1, encode(BalanceReply(Status.APPROVED, 5), 1)),  # PING's reply is PING_REPLY
        (0, encode(PingReply(Status.APPROVED), 1)),  # nothing asked
    ):
        client = client_with_pings(pings)
        client.receive_data(frame)
        with pytest.raises(WireError) as refused:
            client.next_event()
        assert (refused.value.status, refused.value.fatal) == (Status.FORMAT_ERROR, True)
        assert client.state is State.CLOSED

    client = client_with_pings(2)
    client.receive_data(encode(Error(Status.INVALID_TRANSACTION), 7))
    assert client.next_event() == Frame(7, Error(Status.INVALID_TRANSACTION))  # answers none
    client.receive_data(encode(Error(Status.INVALID_TRANSACTION), 1))
    answer = client.next_event()
    assert not isinstance(answer, Frame) and answer is not None
    assert (answer.request_id, answer.message) == (1, Error(Status.INVALID_TRANSACTION))


def test_the_answers_that_settle_a_deposit_are_the_reference_atms() -> None:
    """§6 lists them; atm.session.SETTLED is what the reference ATM judges by, for a reply
    and an ERROR alike (it compares the status)."""
    match = re.search(
        r"A DEPOSIT or WITHDRAW is settled only by an answer for which the server looked its"
        r" `txn_id` up: ([A-Z_, ]+?) or ([A-Z_]+); or by ERROR INVALID_AMOUNT,",
        PROSE,
    )
    assert match is not None, "§6 no longer lists the answers that settle a deposit"
    listed = {Status[name] for name in match.group(1).split(", ")} | {Status[match.group(2)]}
    assert listed == atm_session.SETTLED
    assert Status.INVALID_AMOUNT in atm_session.SETTLED
    assert_spec_says(
        "SYSTEM_MALFUNCTION, an ERROR other than INVALID_AMOUNT), is confirmed by resending it"
        " with the same `txn_id` (§6, §9).",
    )


async def test_an_opening_balance_is_no_history_entry(bank: RunningServer):
    assert_spec_says(
        "An account's opening balance, the one the bank gave it when it opened the account, is"
        " no entry: an account may have a balance and no entries,",
    )
    client = await logged_in(bank)
    balance = await client.request(Balance())
    assert balance == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS) and DEMO_BALANCE_CENTS > 0
    history = await client.request(History(20))
    assert isinstance(history, HistoryReply)
    assert (history.status, history.entries) == (Status.APPROVED, ())
    deposit = await client.request(Deposit(txn_id(), 1_00))
    assert isinstance(deposit, DepositReply) and deposit.status is Status.APPROVED
    history = await client.request(History(20))
    assert isinstance(history, HistoryReply)
    (entry,) = history.entries
    assert entry.balance_cents == DEMO_BALANCE_CENTS + 1_00 != entry.amount_cents


def test_the_refusal_that_reaches_login_attempts_max_is_not_in_the_transition_table() -> None:
    """The reply is an ordinary refusal, which leaves CONNECTED in the table; only the
    server's engine, which knows the limit, closes after it."""
    assert_spec_says(
        "This count is the one rule the second table cannot show, since the reply that"
        " reaches it is an ordinary refusal: HELLO does not announce `login_attempts_max`,",
    )
    assert "login_attempts_max" not in {f.name for f in dataclasses.fields(Hello)}
    refused = LoginReply(Status.INCORRECT_PIN)
    assert next_state(State.CONNECTED, refused) is State.CONNECTED
    server = WireConnection(Sender.SERVER, login_attempts_max=1)
    server.send(ServerConfig().hello())
    server.receive_data(encode(Login(DEMO_ACCOUNT, "0000"), 1))
    assert isinstance(server.next_event(), Frame)
    server.send(refused)
    assert server.state is State.CLOSED


def test_a_token_from_another_terminal_opens_nothing_and_is_not_spent() -> None:
    """§3.13's list of why a token opens nothing names the terminal as §3.15 and §10 do."""
    assert_spec_says(
        "If the token opens nothing (it was never sent for this account, or it is spent, or"
        " its session ended, or under TLS it came over another terminal's certificate than the"
        " LOGIN's): RESUME_REPLY UNKNOWN_SESSION. Nothing else changes;",
        "presented over another terminal's certificate it opens nothing (UNKNOWN_SESSION) and"
        " is not spent,",
    )

    @dataclasses.dataclass
    class Opened:
        terminal: str | None

    registry = SessionRegistry()
    session = Opened("atm-0001")
    token = registry.register(DEMO_ACCOUNT, session)  # only .terminal is read
    assert registry.claim(DEMO_ACCOUNT, token, "atm-0002") is None
    assert registry.claim(DEMO_ACCOUNT, token, None) is None
    assert registry.claim(DEMO_ACCOUNT, token, "atm-0001") is session
    assert registry.claim(DEMO_ACCOUNT, token, "atm-0001") is None  # spent now


async def test_session_tokens_never_reach_the_log_and_are_compared_in_constant_time(
    bank: RunningServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Two MUSTs of §3.13 and §3.15 that no wire exchange can show: the whole of a
    LOGIN, a RESUME that opens the session, and a LOGOUT logged at DEBUG holds neither
    token in any spelling, and the token is checked with hmac.compare_digest."""
    assert_spec_says(
        "A server MUST compare tokens in constant time.",
        "It MUST draw every token from a cryptographically secure random source and MUST NOT"
        " log tokens (§10).",
    )
    compared: list[bytes] = []
    real_compare = bank_resumption.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real_compare(a, b)

    monkeypatch.setattr(bank_resumption.hmac, "compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    first = await logged_in(bank)
    token = first.tokens[-1]
    second = await bank.client()
    reply = await second.request(Resume(DEMO_ACCOUNT, token))
    assert reply == ResumeReply(Status.APPROVED)
    newer = await second.token()
    assert await second.request(Logout()) == LogoutReply(Status.APPROVED)
    assert token in compared
    for secret in (token, newer):
        for spelling in (secret.hex(), secret.hex().upper(), repr(secret), str(list(secret))):
            assert spelling not in caplog.text


# -- What each side does with a negative vector ---------------------------------------

EXAMPLES = " ".join((SPEC / "examples.md").read_text(encoding="utf-8").split())


def test_the_examples_say_what_each_side_does_with_a_refused_frame() -> None:
    for sentence in (
        "Fatal: a server sends ERROR with that status and request id, then closes the"
        " connection; a client closes the connection without sending anything.",
        "Not fatal: the frame was consumed whole and decoding goes on. A server answers it"
        " with ERROR, that status and request id, and reads the next frame; a client, which"
        " never answers a frame, skips it and reads the next.",
    ):
        assert sentence in EXAMPLES
    assert "the receiver answers" not in EXAMPLES
    assert_spec_says(
        "A client that receives a malformed frame closes the connection without sending"
        " anything: a client never answers a server's frame.",
        "A client skips the frame and reads the next one",
    )


@pytest.mark.parametrize("vector", **by_name([v for v in NEGATIVE if v["receiver"] == "server"]))
async def test_the_server_treats_each_negative_vector_as_listed(
    bank: RunningServer, vector: dict
):
    client = await bank.client()
    await client.send_raw(bytes.fromhex(vector["hex"]) + encode(Ping(), 99))
    frame = await client.receive()
    assert frame == Frame(vector["request_id"], Error(Status[vector["status"]]))
    if vector["fatal"]:
        assert await client.closed()
    else:
        assert await client.receive() == Frame(99, PingReply(Status.APPROVED))


@pytest.mark.parametrize("vector", **by_name([v for v in NEGATIVE if v["receiver"] == "client"]))
async def test_the_reference_atm_treats_each_negative_vector_as_listed(vector: dict):
    """atm.connection skips a frame refused without being fatal, and on a fatal one
    ends the session without sending a byte."""
    atm_end, bank_end = trio.testing.memory_stream_pair()
    await bank_end.send_all(encode(ServerConfig().hello()))
    connection = await AtmConnection.handshake(atm_end)
    answer = None

    async def bank() -> None:
        decoder = Decoder(Sender.CLIENT)
        while (frame := decoder.next_frame()) is None:
            decoder.receive_data(await bank_end.receive_some(4096))
        reply = encode(PingReply(Status.APPROVED), frame.request_id)
        await bank_end.send_all(bytes.fromhex(vector["hex"]) + reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bank)
        if vector["fatal"]:
            with pytest.raises(ConnectionLost):
                await connection.request(Ping(), PingReply)
        else:
            answer = await connection.request(Ping(), PingReply)
    assert answer == (None if vector["fatal"] else PingReply(Status.APPROVED))
    await connection.aclose()
    assert await bank_end.receive_some(4096) == b""  # nothing after the request: closed
