"""Short coverage-guided fuzzing runs of both harnesses under atheris (libFuzzer).

The harnesses' checks run on their own in tests/test_fuzz_harness.py; here libFuzzer
drives them for a bounded, seeded number of inputs, as CI's short run. The long runs
are documented in fuzz/README.md. A finding makes libFuzzer exit non-zero and write
the input to a crash file in the working directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNS = 2000
"""Inputs per harness: a few seconds each here, enough to pass the seeds and mutate."""

RUN_TIMEOUT_S = 300
"""Bound on one run, far above its usual few seconds, so a hang fails instead of stalling."""


@pytest.mark.parametrize("harness", ["fuzz_decoder.py", "fuzz_session.py"])
def test_a_short_fuzzing_run_finds_nothing(harness: str, tmp_path: Path):
    pytest.importorskip("atheris", reason="atheris ships wheels for Linux x86_64 only")
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / harness), f"-atheris_runs={RUNS}", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} " in result.stderr
    assert not list(tmp_path.glob("crash-*"))
