"""``python -m bank.bench`` runs end to end on a tiny configuration and reports JSON.

Load mode against a real bank subprocess and the echo baseline (with --tls, and a TLS
bank too), and idle mode: the keys and their types are checked, never the timings (a
loaded CI machine may be slow). The pure parts (the mix, percentiles, the echo server's
replies) are checked directly.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bank.tools.bench import (
    APPROVED,
    OPENING_CENTS,
    OPS,
    REPLY_OPCODES,
    SETUP_CONCURRENCY_MAX,
    BenchError,
    RequestTemplates,
    TxnIds,
    bank_args,
    echo_reply_frame,
    is_database_url,
    make_request,
    measure_fsync_ns,
    parse_mix,
    percentile_ns,
    reply_status,
    turns,
)
from bank.tools.floor import Floor, engine_connection
from wire import (
    HISTORY_ENTRIES_MAX,
    Answer,
    Balance,
    BalanceReply,
    Decoder,
    Deposit,
    DepositReply,
    Error,
    Frame,
    History,
    HistoryReply,
    Login,
    Sender,
    Status,
    Withdraw,
    encode,
    frame_bytes,
)
from wire import Connection as Engine
from wire._messages import reply_type

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 120
"""Bound on one tiny bench run; it takes a few seconds when well."""


def run_bench(*flags: str, tmp_path: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "bank.bench", *flags, "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def is_number(value: object) -> bool:
    return type(value) in (int, float) and value >= 0


def test_load_mode_reports_bank_echo_and_ratio(tmp_path: Path) -> None:
    report = run_bench("--sessions", "2", "--seconds", "1", tmp_path=tmp_path)
    assert report["sessions"] == 2 and report["seconds"] == 1
    for key in ("bank_ops_per_s", "echo_ops_per_s", "ratio", "p99_ms", "echo_p99_ms",
                "p50_ms", "p90_ms", "max_ms", "bank_logins_per_s", "echo_logins_per_s"):
        assert is_number(report[key]), key
    assert report["bank_ops_per_s"] > 0 and report["echo_ops_per_s"] > 0
    assert set(report["ops"]) == {"balance", "deposit", "withdraw"}
    for op, row in report["ops"].items():
        assert type(row["count"]) is int and row["count"] > 0, op
        assert all(is_number(row[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")), op
        assert type(row["refused"]) is int, op
    assert set(report["echo"]["ops"]) == set(report["ops"])
    assert is_number(report["bank_cpu_percent"]) and is_number(report["echo_cpu_percent"])
    # The generator's CPU beside each server's, their ratios, fsync and load averages.
    for key in ("bank_cpu_us_per_op", "echo_cpu_us_per_op", "cpu_ratio", "p99_ratio",
                "generator_cpu_percent", "generator_cpu_us_per_op",
                "echo_generator_cpu_percent", "echo_generator_cpu_us_per_op",
                "fsync_p50_ms", "fsync_p90_ms", "loadavg_max_1min", "window_s"):
        assert is_number(report[key]), key
    assert type(report["generator_saturated"]) is bool
    assert type(report["echo_generator_saturated"]) is bool
    assert len(report["loadavg_first"]) == 3 and len(report["loadavg_last"]) == 3
    assert report["generators"] == 1 and report["db"] == "sqlite"
    assert report["workers"] is None and report["compare_ratio"] is None
    for side in ("bank", "echo"):
        assert report[side]["generators"] == 1
        assert is_number(report[side]["generator_cpu_percent_max"]), side


def test_generators_share_the_sessions(tmp_path: Path) -> None:
    report = run_bench("--sessions", "3", "--seconds", "1", "--generators", "2",
                       tmp_path=tmp_path)
    assert report["generators"] == 2 and report["bank"]["generators"] == 2
    assert report["bank_ops_per_s"] > 0 and report["echo_ops_per_s"] > 0
    assert report["bank"]["count"] == sum(row["count"] for row in report["ops"].values())


def test_a_given_database_gets_the_accounts_and_a_second_bank_compares(
    tmp_path: Path
) -> None:
    """--db PATH is the bank's database (the bench adds its accounts); --compare-db
    starts a second bank, taking turns with the first."""
    db, other = tmp_path / "given.db", tmp_path / "other.db"
    report = run_bench(
        "--sessions", "2", "--seconds", "2", "--no-echo", "--db", str(db),
        "--compare-db", str(other), "--key-file", str(tmp_path / "bench.key"),
        tmp_path=tmp_path,
    )
    assert db.exists() and other.exists()
    assert report["db"] == "sqlite" and report["compare_db"] == "sqlite"
    assert is_number(report["compare_ratio"]) and report["compare_ops_per_s"] > 0
    assert is_number(report["compare_cpu_us_per_op"])
    assert report["compare"]["count"] > 0 and report["echo"] is None


def test_tls_mode_reports_the_tls_bank_beside_the_plaintext_one(tmp_path: Path) -> None:
    report = run_bench("--tls", "--sessions", "3", "--seconds", "1", tmp_path=tmp_path)
    for key in ("bank_ops_per_s", "echo_ops_per_s", "ratio", "p99_ms", "echo_p99_ms",
                "bank_logins_per_s", "bank_cpu_percent", "bank_cpu_us_per_op",
                "tls_ops_per_s", "tls_ratio", "tls_logins_per_s", "tls_p50_ms",
                "tls_p90_ms", "tls_p99_ms", "tls_max_ms", "tls_cpu_percent",
                "tls_cpu_us_per_op", "tls_generator_cpu_percent",
                "tls_generator_cpu_us_per_op"):
        assert is_number(report[key]), key
    assert report["tls_ops_per_s"] > 0 and type(report["tls_refused"]) is int
    assert type(report["tls_generator_saturated"]) is bool
    assert report["windows"] >= 1
    for side in ("bank", "tls", "echo"):
        assert set(report[side]["ops"]) == {"balance", "deposit", "withdraw"}, side
        assert report[side]["count"] > 0, side
        assert is_number(report[side]["generator_cpu_us_per_op"]), side
        assert type(report[side]["generator_saturated"]) is bool, side


def test_without_tls_the_tls_keys_are_null(tmp_path: Path) -> None:
    report = run_bench("--sessions", "2", "--seconds", "1", "--no-echo", tmp_path=tmp_path)
    assert report["tls_ratio"] is None and report["tls"] is None
    assert report["echo_ops_per_s"] is None and is_number(report["bank_ops_per_s"])


@pytest.mark.parametrize("flags", [["--idle", "2"], ["--port", "1"]])
def test_tls_is_refused_outside_load_mode_on_its_own_banks(
    flags: list[str], tmp_path: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bank.bench", "--tls", *flags, "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False,
    )
    assert run.returncode == 2 and "--tls is for load mode" in run.stderr


def test_idle_mode_reports_memory_and_latency(tmp_path: Path) -> None:
    report = run_bench("--idle", "5", tmp_path=tmp_path)
    assert report["sessions"] == 5
    assert type(report["rss_kib_per_session"]) in (int, float)  # may be 0 or even negative
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "logins_per_s"):
        assert is_number(report[key]), key
    assert report["count"] == report["probe_requests"] > 0


def test_a_postgresql_bank_is_loaded_beside_the_sqlite_one(
    pg_db: str, tmp_path: Path
) -> None:
    """issue 14: ``--db URL`` reports the same JSON; with --compare-db, the two in turns."""
    report = run_bench(
        "--sessions", "2", "--seconds", "2", "--no-echo", "--compare-db", pg_db,
        "--key-file", str(tmp_path / "bench.key"), tmp_path=tmp_path,
    )
    assert report["db"] == "sqlite" and report["compare_db"] == "postgresql"
    assert report["compare_ops_per_s"] > 0 and is_number(report["compare_ratio"])
    assert set(report["compare"]["ops"]) == {"balance", "deposit", "withdraw"}


def test_workers_and_database_pass_through_to_the_bank(tmp_path: Path) -> None:
    args = bank_args(tmp_path, 4, db="postgresql://bench@localhost/bank", workers=3)
    assert args[args.index("--db") + 1] == "postgresql://bench@localhost/bank"
    assert args[args.index("--workers") + 1] == "3"
    assert "--workers" not in bank_args(tmp_path, 4)  # a bank without the flag still runs
    assert is_database_url("postgresql://x/y") and is_database_url("host=/tmp dbname=bank")
    assert not is_database_url(str(tmp_path / "bank.db"))


def test_bank_admits_every_session_logging_in_at_once(tmp_path: Path) -> None:
    """All sessions come from 127.0.0.1, up to SETUP_CONCURRENCY_MAX at once: the bank's
    limit on connections per address that have not logged in must admit them."""
    args = bank_args(tmp_path, SETUP_CONCURRENCY_MAX)
    limit = int(args[args.index("--preauth-per-address-max") + 1])
    assert limit >= SETUP_CONCURRENCY_MAX


def test_mix_parses_weights_and_drops_zeros() -> None:
    mix = parse_mix("balance=2,deposit=0,withdraw=1")
    assert mix.as_dict() == {"balance": 2, "withdraw": 1}
    rng = random.Random(1)
    assert {mix.pick(rng) for _ in range(200)} == {"balance", "withdraw"}


@pytest.mark.parametrize("text", ["", "balance", "balance=x", "teleport=5", "balance=0"])
def test_bad_mix_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_mix(text)


def test_percentiles_are_nearest_rank() -> None:
    data = list(range(1, 101))
    assert [percentile_ns(data, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile_ns([7], 99) == 7
    assert percentile_ns([], 50) == 0


@pytest.mark.parametrize("op", [*OPS, "logout"])
def test_templates_make_the_frames_the_codec_makes(op: str) -> None:
    """A template patches request id, transaction id and CRC: the result is exactly
    what ``wire.encode`` makes of the same message, and the server's decoder takes it."""
    txn_ids, twin = TxnIds(), TxnIds()
    twin.prefix = txn_ids.prefix  # the same ids, in the same order
    templates = RequestTemplates(txn_ids)
    for request_id in (1, 7, 2**32 - 1):
        frame = templates.frame(op, request_id)
        expected = make_request(op, twin)
        assert frame == encode(expected, request_id)
        decoder = Decoder(Sender.CLIENT)
        decoder.receive_data(frame)
        decoded = decoder.next_frame()
        assert decoded is not None and decoded.request_id == request_id
        assert decoded.message == expected


def test_money_templates_never_repeat_a_transaction_id() -> None:
    templates = RequestTemplates(TxnIds())
    frames = [templates.frame(op, 1) for op in ("deposit", "withdraw") for _ in range(50)]
    assert len({frame[10:26] for frame in frames}) == 100


@pytest.mark.parametrize("op", OPS)
def test_echo_answers_each_request_with_its_reply_type(op: str) -> None:
    request = make_request(op, TxnIds())
    reply, last = echo_reply_frame(encode(request, 9))
    decoder = Decoder(Sender.SERVER)
    decoder.receive_data(reply)
    frame = decoder.next_frame()
    assert frame is not None and frame.request_id == 9 and not last
    assert type(frame.message) is reply_type(request)
    assert frame.message.status is Status.APPROVED
    assert reply_status(reply, opcode=REPLY_OPCODES[op], request_id=9) == APPROVED


def test_echo_ends_the_conversation_at_logout_and_at_a_foreign_frame() -> None:
    assert echo_reply_frame(RequestTemplates(TxnIds()).frame("logout", 3))[1]
    reply, last = echo_reply_frame(frame_bytes(0x81, 3, b"\x00"))  # a reply, not a request
    assert last and reply[3] == Error.OPCODE


def test_reply_check_accepts_refusals_and_a_full_history() -> None:
    refused = encode(BalanceReply(Status.NOT_LOGGED_IN, 0), 5)
    assert reply_status(refused, opcode=BalanceReply.OPCODE, request_id=5) == \
        Status.NOT_LOGGED_IN
    reply, _ = echo_reply_frame(encode(make_request("history", TxnIds()), 2))
    assert reply_status(reply, opcode=HistoryReply.OPCODE, request_id=2) == APPROVED
    empty = encode(HistoryReply(Status.APPROVED, ()), 2)
    assert reply_status(empty, opcode=HistoryReply.OPCODE, request_id=2) == APPROVED
    assert HISTORY_ENTRIES_MAX >= 1


@pytest.mark.parametrize("damage", ["request id", "opcode", "crc", "error", "status",
                                    "length"])
def test_reply_check_refuses_a_reply_that_does_not_answer_the_request(damage: str) -> None:
    """Cheap, but a check: a reply to another request, of another type, damaged, an
    ERROR, or with a status its type never carries, ends the run."""
    good = encode(DepositReply(Status.APPROVED, 100, 1, 1), 4)
    frames = {
        "request id": encode(DepositReply(Status.APPROVED, 100, 1, 1), 5),
        "opcode": encode(BalanceReply(Status.APPROVED, 100), 4),
        "crc": good[:-1] + bytes([good[-1] ^ 1]),
        "error": encode(Error(Status.FORMAT_ERROR), 4),
        "status": frame_bytes(DepositReply.OPCODE, 4, bytes([Status.INCORRECT_PIN]) + good[11:-4]),
        "length": frame_bytes(DepositReply.OPCODE, 4, good[10:-5]),
    }
    with pytest.raises(BenchError):
        reply_status(frames[damage], opcode=DepositReply.OPCODE, request_id=4)
    assert reply_status(good, opcode=DepositReply.OPCODE, request_id=4) == APPROVED


def test_fsync_is_timed_in_the_given_directory(tmp_path: Path) -> None:
    durations = measure_fsync_ns(tmp_path, 3)
    assert len(durations) == 3 and durations == sorted(durations) and durations[0] > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_windows_take_turns_in_a_rotating_order() -> None:
    assert list(turns(3, 2)) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0)]
    assert list(turns(2, 1)) == [(0, 0), (0, 1)]  # one window each: bank, then echo


def test_transaction_ids_are_unique_across_runs() -> None:
    first, second = TxnIds(), TxnIds()
    ids = {first.next() for _ in range(100)} | {second.next() for _ in range(100)}
    assert len(ids) == 200 and all(len(i) == 16 for i in ids)


def test_the_floor_takes_turns_and_reports_its_ratios(tmp_path: Path) -> None:
    mix = "balance=1,deposit=1,withdraw=1,history=1,ping=1"
    report = run_bench("--floor", "--sessions", "2", "--seconds", "1", "--mix", mix,
                       tmp_path=tmp_path)
    for key in ("floor_ops_per_s", "floor_cpu_us_per_op", "floor_p99_ms", "floor_ratio",
                "floor_cpu_ratio", "bank_floor_ratio"):
        assert is_number(report[key]), key
    # Every reply was the right one for its request: the floor answers the whole mix.
    assert report["floor_refused"] == 0
    assert set(report["floor"]["ops"]) == set(OPS)


def test_without_floor_its_keys_are_null(tmp_path: Path) -> None:
    report = run_bench("--sessions", "1", "--seconds", "1", "--no-echo", tmp_path=tmp_path)
    assert report["floor"] is None and report["floor_ratio"] is None
    assert report["bank_floor_ratio"] is None


def test_the_floor_books_in_its_dict_and_never_overdraws() -> None:
    floor, txn = Floor(), TxnIds()
    account, reply = floor.answer(None, Login("bn-00001", "4321"))
    assert account == "BN-00001" and reply.status is Status.APPROVED
    assert floor.balances[account] == OPENING_CENTS
    floor.balances[account] = 100  # an amount can be no larger than 10,000,000 cents
    _, deposit = floor.answer(account, Deposit(txn.next(), 250))
    assert isinstance(deposit, DepositReply) and deposit.balance_cents == 350
    _, refused = floor.answer(account, Withdraw(txn.next(), 351))
    assert refused.status is Status.INSUFFICIENT_FUNDS
    _, balance = floor.answer(account, Balance())
    assert isinstance(balance, BalanceReply) and balance.balance_cents == 350
    _, history = floor.answer(account, History(5))
    assert isinstance(history, HistoryReply)
    assert [entry.amount_cents for entry in history.entries] == [250]


async def test_the_floor_refuses_what_the_state_table_refuses() -> None:
    ours, theirs = trio.socket.socketpair()
    client = Engine(Sender.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine_connection, Floor(), trio.SocketStream(ours))
        peer = trio.SocketStream(theirs)
        client.receive_data(await peer.receive_some(4096))
        assert isinstance(client.next_event(), Frame)  # HELLO
        await peer.send_all(client.send(Balance()))
        answer = None
        while answer is None:
            data = await peer.receive_some(4096)
            assert data, "the floor closed the connection instead of answering"
            client.receive_data(data)
            answer = client.next_event()
        assert isinstance(answer, Answer)
        assert answer.message.status is Status.NOT_LOGGED_IN
        await peer.aclose()
