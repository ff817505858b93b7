"""Start a harness under atheris (libFuzzer), or under a blind random loop as a fallback.

Harness modules keep their check function importable without atheris (the test suite
runs it); only ``main`` here imports atheris, and only when the harness is run as a
program. The seed corpus is written to a fresh temporary directory on every start, so
it always matches spec/vectors.json, and handed to libFuzzer after any corpus
directories given on the command line (libFuzzer writes new inputs to the first one),
unless the arguments name input files, which libFuzzer then just replays.
"""

from __future__ import annotations

import gc
import hashlib
import random
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from fuzz.frames import INPUT_BYTES_MAX, custom_mutator, random_byte_mutator, write_corpus

NO_ATHERIS_FLAG = "--no-atheris"
"""Run the blind random loop instead of atheris: no coverage feedback, label it so."""

INSTRUMENTED_PACKAGES = frozenset({"wire", "bank"})
"""Only the code under test gets coverage counters: instrumenting trio too would slow every
run, and counting the mutator's own branches would reward mutations, not inputs."""


def main(
    test_one_input: Callable[[bytes], None], seeds: Sequence[bytes], argv: list[str]
) -> None:
    """Fuzz ``test_one_input`` from ``seeds`` with libFuzzer-style ``argv``."""
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as seed_dir:
        count = write_corpus(Path(seed_dir), list(seeds))
        print(f"INFO: {count} seed inputs from spec/vectors.json in {seed_dir}", file=sys.stderr)
        if NO_ATHERIS_FLAG in argv:
            _random_loop(test_one_input, seeds, [a for a in argv if a != NO_ATHERIS_FLAG])
            return
        replaying = any(Path(arg).is_file() for arg in argv[1:] if not arg.startswith("-"))
        _atheris_fuzz(test_one_input, argv if replaying else [*argv, seed_dir])


def _atheris_fuzz(test_one_input: Callable[[bytes], None], argv: list[str]) -> None:
    import atheris  # noqa: PLC0415  (only the fuzzer needs it; the test suite must not)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return custom_mutator(data, max_size, seed, mutate_bytes=atheris.Mutate)

    _instrument(atheris.instrument_func)
    atheris.Setup(argv, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()


def _instrument(instrument_func: Callable[[types.FunctionType], object]) -> None:
    """Add coverage counters to every already-imported function of our packages.

    ``atheris.instrument_imports`` only sees modules imported inside it, but the
    harness imported ``wire`` and ``bank`` at the top so that the test suite can use it
    without atheris; ``atheris.instrument_all`` would also instrument trio and the
    standard library. So pick our functions out of the heap.
    """
    functions = [
        obj for obj in gc.get_objects()
        if isinstance(obj, types.FunctionType)
        and (getattr(obj, "__module__", None) or "").partition(".")[0] in INSTRUMENTED_PACKAGES
    ]
    for function in functions:
        instrument_func(function)
    print(f"INFO: instrumented {len(functions)} functions of {sorted(INSTRUMENTED_PACKAGES)}",
          file=sys.stderr)


def _flag(argv: list[str], name: str, default: int) -> int:
    prefix = f"-{name}="
    values = [int(arg[len(prefix):]) for arg in argv if arg.startswith(prefix)]
    return values[-1] if values else default


def _random_loop(
    test_one_input: Callable[[bytes], None], seeds: Sequence[bytes], argv: list[str]
) -> None:
    """FALLBACK, NOT COVERAGE-GUIDED: mutate seeds at random and run the check.

    For machines where atheris does not install. It honours ``-atheris_runs``/``-runs``,
    ``-max_total_time`` and ``-seed``, stops at the first finding like libFuzzer, and
    writes that input to ``crash-<sha1>`` in the working directory.
    """
    runs = _flag(argv, "atheris_runs", _flag(argv, "runs", 0)) or sys.maxsize
    deadline = time.monotonic() + (_flag(argv, "max_total_time", 0) or float("inf"))
    rng = random.Random(_flag(argv, "seed", 0))
    mutate_bytes = random_byte_mutator(rng)
    pool = list(seeds)
    print("INFO: --no-atheris: blind random mutation, NO coverage feedback", file=sys.stderr)
    started = time.monotonic()
    executions = 0
    while executions < runs and time.monotonic() < deadline:
        data = pool[executions] if executions < len(pool) else custom_mutator(
            rng.choice(pool), INPUT_BYTES_MAX, rng.randrange(2**32), mutate_bytes=mutate_bytes
        )
        try:
            test_one_input(data)
        except Exception:
            crash = Path(f"crash-{hashlib.sha1(data).hexdigest()}")  # as libFuzzer names it
            crash.write_bytes(data)
            traceback.print_exc()
            print(f"FINDING after {executions} executions; input {data.hex()} saved to {crash}",
                  file=sys.stderr)
            sys.exit(1)
        executions += 1
        if len(pool) < 10_000 and rng.random() < 0.01:
            pool.append(data)  # keep some mutants as parents, without coverage to rank them
    elapsed = time.monotonic() - started
    print(f"Done {executions} runs in {elapsed:.0f} s ({executions / max(elapsed, 1e-9):.0f} "
          "exec/s), no finding", file=sys.stderr)
