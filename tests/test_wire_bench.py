"""The benchmark (``python -m wire.bench``) runs and reports every opcode; no timing is asserted."""

import json
import subprocess
import sys

from wire import Opcode


def test_quick_bench_reports_every_opcode() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "wire.bench", "--quick"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {r["opcode"] for r in report["results"]} == {op.name for op in Opcode}
    labels = {r["label"] for r in report["results"]}
    assert {"HISTORY_REPLY[1]", "HISTORY_REPLY[20]"} <= labels
    assert all(r["total_us"] > 0 and r["frame_bytes"] >= 14 for r in report["results"])


def test_quick_bench_reports_the_servers_work_for_every_request() -> None:
    """Decode of each request plus encode of its reply (the 10 us target), HISTORY with a
    1-entry and a full reply; through the engine for a logged-in session's requests."""
    run = subprocess.run(
        [sys.executable, "-m", "wire.bench", "--quick"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    served = json.loads(run.stdout.strip().splitlines()[-1])["server"]
    requests = {op.name for op in Opcode if op < 0x80}
    assert {r["opcode"] for r in served} == requests
    labels = {r["label"] for r in served}
    assert {"HISTORY -> HISTORY_REPLY[1]", "HISTORY -> HISTORY_REPLY[20]"} <= labels
    assert all(r["codec_us"] > 0 and type(r["target_met"]) is bool for r in served)
    by_label = {r["label"]: r for r in served}
    assert by_label["BALANCE"]["engine_us"] > 0 and by_label["LOGIN"]["engine_us"] is None


def test_only_and_server_only_choose_what_is_measured() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "wire.bench", "--quick", "--server-only", "--only", "history",
         "--only", "PING"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["results"] == []
    assert {r["label"] for r in report["server"]} == {
        "HISTORY -> HISTORY_REPLY[1]", "HISTORY -> HISTORY_REPLY[20]", "PING",
    }
