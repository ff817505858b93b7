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

from bank.tools.bench import (
    OPS,
    SETUP_CONCURRENCY_MAX,
    TxnIds,
    bank_args,
    echo_reply,
    make_request,
    parse_mix,
    percentile_ns,
    turns,
)
from wire import encode
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


@pytest.mark.parametrize("op", OPS)
def test_echo_answers_each_request_with_its_reply_type(op: str) -> None:
    request = make_request(op, TxnIds())
    reply = echo_reply(request)
    assert type(reply) is reply_type(request)
    assert encode(reply, 1)  # a frame the wire codec accepts


def test_windows_take_turns_in_a_rotating_order() -> None:
    assert list(turns(3, 2)) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0)]
    assert list(turns(2, 1)) == [(0, 0), (0, 1)]  # one window each: bank, then echo


def test_transaction_ids_are_unique_across_runs() -> None:
    first, second = TxnIds(), TxnIds()
    ids = {first.next() for _ in range(100)} | {second.next() for _ in range(100)}
    assert len(ids) == 200 and all(len(i) == 16 for i in ids)
