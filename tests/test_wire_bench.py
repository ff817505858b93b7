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
