"""Encode and decode cost per frame, for each message type: ``python -m wire.bench``.

For every opcode a representative message (HISTORY_REPLY at 1 entry and at the maximum)
is encoded and then decoded by a ``Decoder`` of the receiving side, as a peer would. Each
figure is the best of several ``timeit`` repeats of a fixed number of iterations, in
microseconds per frame; the best run is the one least disturbed by the rest of the machine.
The last line printed is JSON, for scripts. ``--quick`` runs few iterations, to check that
the benchmark works, not to measure.

The second table is the server's own codec work per request, which is what the 10 us
target applies to (issue 15): for each request, its decode by the server's ``Decoder``
plus the encode of its reply (for HISTORY, a 1-entry and a full reply), in one loop;
and the same through the server's protocol engine (``wire.Connection``: the state table,
request ids), as ``bank.server`` calls it, for the requests a logged-in session sends.
The ATM's decode of a reply is not in it (the first table has that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass

from wire._codec import Decoder, Frame, encode
from wire._connection import Connection
from wire._limits import AMOUNT_CENTS_MAX, HISTORY_ENTRIES_MAX, PAYLOAD_BYTES_MAX
from wire._messages import (
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Deposit,
    DepositReply,
    EntryKind,
    Error,
    Features,
    FeaturesReply,
    Hello,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    Ping,
    PingReply,
    Reply,
    Request,
    Resume,
    ResumeReply,
    Sender,
    SessionExpired,
    SessionToken,
    Shutdown,
    Transfer,
    TransferReply,
    Withdraw,
    WithdrawReply,
)
from wire._status import Status

TARGET_US = 10.0
"""The budget for encoding plus decoding one frame, in microseconds."""

TXN_ID = bytes(range(16))
TOKEN = bytes(range(16, 32))
TIME_MS = 1_700_000_000_000


def _entries(count: int) -> tuple[HistoryEntry, ...]:
    return tuple(
        HistoryEntry(100 - i, TIME_MS - i * 60_000, EntryKind.WITHDRAWAL, 2_000, 500_000)
        for i in range(count)
    )


def cases() -> list[tuple[str, Message, int]]:
    """(label, message, request id): one or more representative frames per opcode."""
    money = {"balance_cents": 273_456, "entry_id": 42, "time_ms": TIME_MS}
    hello = Hello(PAYLOAD_BYTES_MAX, HISTORY_ENTRIES_MAX, AMOUNT_CENTS_MAX, 10, 30, 120)
    return [
        ("LOGIN", Login("AB-12345", "1234"), 1),
        ("LOGOUT", Logout(), 2),
        ("BALANCE", Balance(), 3),
        ("DEPOSIT", Deposit(TXN_ID, 250_000), 4),
        ("WITHDRAW", Withdraw(TXN_ID, 6_000), 5),
        ("HISTORY", History(HISTORY_ENTRIES_MAX), 6),
        ("PING", Ping(), 7),
        ("RESUME", Resume("AB-12345", TOKEN), 8),
        ("TRANSFER", Transfer(TXN_ID, 5_000, "WF-14351"), 9),
        ("CHANGE_PIN", ChangePin("1324", "2580"), 10),
        ("FEATURES", Features(3), 11),
        ("LOGIN_REPLY", LoginReply(Status.APPROVED), 1),
        ("LOGOUT_REPLY", LogoutReply(Status.APPROVED), 2),
        ("BALANCE_REPLY", BalanceReply(Status.APPROVED, 123_456), 3),
        ("DEPOSIT_REPLY", DepositReply(Status.APPROVED, **money), 4),
        ("WITHDRAW_REPLY", WithdrawReply(Status.APPROVED, **money), 5),
        ("HISTORY_REPLY[1]", HistoryReply(Status.APPROVED, _entries(1)), 6),
        (f"HISTORY_REPLY[{HISTORY_ENTRIES_MAX}]",
         HistoryReply(Status.APPROVED, _entries(HISTORY_ENTRIES_MAX)), 6),
        ("PING_REPLY", PingReply(Status.APPROVED), 7),
        ("RESUME_REPLY", ResumeReply(Status.APPROVED), 8),
        ("TRANSFER_REPLY", TransferReply(Status.APPROVED, **money), 9),
        ("CHANGE_PIN_REPLY", ChangePinReply(Status.APPROVED), 10),
        ("FEATURES_REPLY", FeaturesReply(Status.APPROVED, 3), 11),
        ("HELLO", hello, 0),
        ("SHUTDOWN", Shutdown(30), 0),
        ("SESSION_EXPIRED", SessionExpired(), 0),
        ("SESSION_TOKEN", SessionToken(TOKEN), 0),
        ("ERROR", Error(Status.FORMAT_ERROR), 9),
    ]


@dataclass(frozen=True, slots=True)
class Result:
    label: str
    opcode: str
    frame_bytes: int
    encode_us: float
    decode_us: float
    total_us: float


def best_us(func: Callable[[], object], *, number: int, repeat: int) -> float:
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def measure(label: str, message: Message, request_id: int, *, number: int, repeat: int) -> Result:
    data = encode(message, request_id)
    decoder = Decoder(message.SENDER)

    def encode_one() -> bytes:
        return encode(message, request_id)

    def decode_one() -> object:
        decoder.receive_data(data)
        return decoder.next_frame()

    def round_trip() -> Frame | None:
        decoder.receive_data(encode(message, request_id))
        return decoder.next_frame()

    frame = round_trip()
    assert frame is not None and frame.message == message, label
    return Result(
        label=label,
        opcode=message.OPCODE.name,
        frame_bytes=len(data),
        encode_us=best_us(encode_one, number=number, repeat=repeat),
        decode_us=best_us(decode_one, number=number, repeat=repeat),
        total_us=best_us(round_trip, number=number, repeat=repeat),
    )


@dataclass(frozen=True, slots=True)
class ServerResult:
    """The server's codec work for one request: decode it, encode its reply."""

    label: str
    opcode: str
    reply_bytes: int
    codec_us: float
    engine_us: float | None
    """Through ``wire.Connection``; None for a request a logged-in session does not
    send again (LOGIN, RESUME) or that ends it (LOGOUT)."""


def server_pairs(
    all_cases: list[tuple[str, Message, int]],
) -> list[tuple[str, Request, int, Reply]]:
    """(label, request, request id, reply): every request case with every case of its
    reply type, so that a new message pair is measured as soon as ``cases`` has both."""
    replies = [(label, m) for label, m, _ in all_cases if isinstance(m, Reply)]
    pairs = []
    for label, request, request_id in all_cases:
        if not isinstance(request, Request):
            continue
        for reply_label, reply in replies:
            if reply.OPCODE == request.OPCODE | 0x80:
                pair_label = label if reply_label == reply.OPCODE.name else (
                    f"{label} -> {reply_label}")
                pairs.append((pair_label, request, request_id, reply))
    return pairs


def _logged_in_engine(request: Request, reply: Reply) -> Connection | None:
    """A server engine after HELLO and an approved LOGIN, if it serves ``request`` with
    ``reply`` and stays logged in; None otherwise."""
    engine = Connection(Sender.SERVER)
    client = Connection(Sender.CLIENT)
    engine.send(Hello(PAYLOAD_BYTES_MAX, HISTORY_ENTRIES_MAX, AMOUNT_CENTS_MAX, 10, 30, 120))
    engine.receive_data(client.send(Login("AB-12345", "1234")))
    engine.next_event()
    engine.send(LoginReply(Status.APPROVED))
    state = engine.state
    try:
        engine.receive_data(encode(request, 1))
        engine.next_event()
        engine.send(reply)
    except Exception:  # refused by the state table: not a logged-in session's request
        return None
    return engine if engine.state is state else None


def measure_server(
    label: str, request: Request, request_id: int, reply: Reply, *, number: int, repeat: int
) -> ServerResult:
    data = encode(request, request_id)
    decoder = Decoder(Sender.CLIENT)

    def codec_work() -> bytes:
        decoder.receive_data(data)
        frame = decoder.next_frame()
        assert frame is not None
        return encode(reply, frame.request_id)

    assert codec_work() == encode(reply, request_id), label
    engine = _logged_in_engine(request, reply)
    engine_us = None
    if engine is not None:
        served = engine

        def engine_work() -> bytes:
            served.receive_data(data)
            served.next_event()
            return served.send(reply)

        engine_us = best_us(engine_work, number=number, repeat=repeat)
    return ServerResult(
        label=label, opcode=request.OPCODE.name, reply_bytes=len(encode(reply, request_id)),
        codec_us=best_us(codec_work, number=number, repeat=repeat), engine_us=engine_us,
    )


def server_table(results: list[ServerResult]) -> str:
    lines = [
        "server's work per request: decode of the request + encode of its reply",
        f"{'request -> reply':<28} {'reply bytes':>11} {'codec us':>9} {'engine us':>10}  "
        f"target {TARGET_US:g} us (codec)",
    ]
    for r in results:
        verdict = "ok" if r.codec_us <= TARGET_US else "MISSED"
        engine = f"{r.engine_us:>10.2f}" if r.engine_us is not None else f"{'-':>10}"
        lines.append(
            f"{r.label:<28} {r.reply_bytes:>11} {r.codec_us:>9.2f} {engine}  {verdict}"
        )
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    lines = [
        f"{'message':<20} {'bytes':>5} {'encode us':>10} {'decode us':>10} {'total us':>9}  "
        f"target {TARGET_US:g} us",
    ]
    for r in results:
        verdict = "ok" if r.total_us <= TARGET_US else "MISSED"
        lines.append(
            f"{r.label:<20} {r.frame_bytes:>5} {r.encode_us:>10.2f} {r.decode_us:>10.2f} "
            f"{r.total_us:>9.2f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wire.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run, not a measurement")
    parser.add_argument("--number", type=int, default=20_000,
                        help="iterations per timed repeat (%(default)s)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="timed repeats, of which the best counts (%(default)s); on a "
                        "busy machine, many short repeats find its quiet moments")
    parser.add_argument("--only", action="append", default=[], metavar="OPCODE",
                        help="measure only the cases of this opcode (a request's name "
                        "also selects its row of the server table); repeatable")
    parser.add_argument("--server-only", action="store_true",
                        help="only the server's table (the 10 us target), not the first")
    args = parser.parse_args(argv)
    number, repeat = (200, 2) if args.quick else (max(1, args.number), max(1, args.repeat))
    only = {name.upper() for name in args.only}

    def chosen(message: Message) -> bool:
        return not only or message.OPCODE.name in only

    results = [] if args.server_only else [
        measure(*case, number=number, repeat=repeat) for case in cases() if chosen(case[1])
    ]
    served = [measure_server(*pair, number=number, repeat=repeat)
              for pair in server_pairs(cases()) if chosen(pair[1])]
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{number} iterations, best of {repeat}, load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(table(results))
    print(server_table(served))
    print(json.dumps({
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "iterations": number,
        "repeats": repeat,
        "target_us": TARGET_US,
        "results": [
            {"label": r.label, "opcode": r.opcode, "frame_bytes": r.frame_bytes,
             "encode_us": round(r.encode_us, 3), "decode_us": round(r.decode_us, 3),
             "total_us": round(r.total_us, 3)}
            for r in results
        ],
        "server": [
            {"label": r.label, "opcode": r.opcode, "reply_bytes": r.reply_bytes,
             "codec_us": round(r.codec_us, 3),
             "engine_us": round(r.engine_us, 3) if r.engine_us is not None else None,
             "target_met": r.codec_us <= TARGET_US}
            for r in served
        ],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
