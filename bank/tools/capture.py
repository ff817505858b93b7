"""``python -m bank.tools.capture``: record a real ATM session over loopback with dumpcap.

It makes spec/wireshark/session.pcapng, the sample capture that the README decodes and
tests/test_wireshark.py checks the dissector against. A real ``python -m bank`` serves a
fresh database (the demo accounts) from a temporary directory on 127.0.0.1, where the
bank serves plaintext (off loopback it insists on TLS, and a capture would show only TLS
records); ``dumpcap`` records the loopback interface with a capture filter for the bank's
port alone, so nothing else on the machine lands in the file; a real ``python -m atm``
goes through a scripted session (a wrong PIN, then balance, a deposit, a withdrawal,
history, exit); the bank is stopped with SIGTERM as an operator would, then dumpcap.

Capturing needs root or dumpcap's capabilities (Debian's wireshark-common sets them for
the wireshark group when asked). The capture holds the demo PIN in clear, as every
plaintext capture holds every PIN: the demo PINs are public, real ones must never be
captured like this. Each run draws new transaction ids and session tokens, so the file
differs from run to run; what the dissector shows of it does not.

    .venv/bin/python -m bank.tools.capture                # spec/wireshark/session.pcapng
    .venv/bin/python -m bank.tools.capture --port 0 --output /tmp/session.pcapng
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bank.config import ServerConfig
from bank.readiness import read_ready_file
from bank.store import DEMO_ACCOUNTS
from bank.tools.launcher import LOOPBACK, READY_POLL_S, START_TIMEOUT_S, STOP_TIMEOUT_S

SESSION_PATH = Path(__file__).resolve().parents[2] / "spec" / "wireshark" / "session.pcapng"

INTERFACE = "lo"
"""Linux's loopback interface: the only one this tool ever captures on."""

DUMPCAP_START_TIMEOUT_S = 10.0
"""From starting dumpcap to its saying which file it writes, i.e. that it captures."""

ATM_TIMEOUT_S = 60.0
"""For the whole scripted ATM session; it takes well under a second."""

CAPTURE_DRAIN_S = 0.5
"""Left between the bank's exit and stopping dumpcap. The kernel has handed every packet
to dumpcap's socket by the time both processes are gone, but dumpcap reads its socket on
its own schedule, and packets it has not read when it stops are lost."""

_ACCOUNT, _PIN, _ = DEMO_ACCOUNTS[0]
_WRONG_PIN = "0000" if _PIN != "0000" else "1111"
_DESTINATION = DEMO_ACCOUNTS[5][0]
_NEW_PIN = "2580" if _PIN != "2580" else "3691"

SESSION_INPUT = (
    _ACCOUNT.lower(), _WRONG_PIN,  # INCORRECT_PIN (55); the ATM asks again
    _ACCOUNT.lower(), _PIN,
    "b",
    "d", "20",
    "w", "60",
    "t", _DESTINATION.lower(), "5", "y",  # TRANSFER to another demo account
    "p", _PIN, _NEW_PIN, _NEW_PIN,  # CHANGE_PIN
    "h",
    "x",
)
"""What a customer types, one answer per line: every request an ATM session makes."""


class CaptureError(Exception):
    """Something the capture needs failed; the message says what, in a sentence."""


def start_bank(workdir: Path, port: int) -> tuple[subprocess.Popen[bytes], int]:
    """A real bank on 127.0.0.1:``port`` (0: a free one); the process and its port.

    Not bank.tools.launcher.start, which always picks a free port: the sample capture is
    on the bank's default port, where Wireshark finds the dissector without a heuristic."""
    ready_path, log_path = workdir / "bank.ready", workdir / "bank.log"
    command = [
        sys.executable, "-m", "bank", "--db", str(workdir / "bank.db"),
        "--key-file", str(workdir / "bank.key"), "--host", LOOPBACK, "--port", str(port),
        "--ready-file", str(ready_path),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while (ready := read_ready_file(ready_path)) is None:
        if process.poll() is not None or time.monotonic() >= deadline:
            stop(process, signal.SIGKILL)
            log_text = log_path.read_text(errors="replace").strip()
            raise CaptureError(f"the bank did not start on port {port}: {log_text}")
        time.sleep(READY_POLL_S)  # another process's file: polling is the only way
    return process, ready.addresses[0][1]


def start_dumpcap(output: Path, port: int) -> subprocess.Popen[str]:
    """dumpcap on the loopback interface, TCP of ``port`` only, once it is capturing."""
    dumpcap = shutil.which("dumpcap")
    if dumpcap is None:
        raise CaptureError("dumpcap is not installed (Debian: apt-get install tshark)")
    process = subprocess.Popen(
        [dumpcap, "-i", INTERFACE, "-f", f"tcp port {port}", "-w", str(output)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    said: list[str] = []
    deadline = time.monotonic() + DUMPCAP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stderr.readline()  # dumpcap says "File: ..." once it captures
        if not line:
            break
        said.append(line.strip())
        if line.startswith("File:"):
            return process
    stop(process, signal.SIGKILL)
    raise CaptureError(f"dumpcap did not start capturing on {INTERFACE}: "
                       + " ".join([*said, process.stderr.read().strip()]).strip())


def run_atm(port: int) -> str:
    """The scripted session through a real ATM; its screen output."""
    result = subprocess.run(
        [sys.executable, "-m", "atm", "--host", LOOPBACK, "--port", str(port)],
        input="".join(line + "\n" for line in SESSION_INPUT), capture_output=True, text=True,
        timeout=ATM_TIMEOUT_S, check=False,
    )
    if result.returncode != 0:
        raise CaptureError(f"the ATM exited with status {result.returncode}: "
                           f"{(result.stdout + result.stderr).strip()}")
    return result.stdout


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], signum: int) -> int | None:
    """Send ``signum`` unless it has exited; its exit status, or None if it outlives
    STOP_TIMEOUT_S (then it is killed)."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)
        return None


def capture_session(output: Path, port: int) -> tuple[int, int]:
    """Record one scripted session into ``output``; the packets captured and the port."""
    with tempfile.TemporaryDirectory(prefix="atm-capture-") as tmp:
        workdir = Path(tmp)
        bank, port = start_bank(workdir, port)
        try:
            partial = workdir / "session.pcapng"
            dumpcap = start_dumpcap(partial, port)
            try:
                run_atm(port)
                if stop(bank, signal.SIGTERM) != 0:
                    raise CaptureError("the bank did not stop cleanly on SIGTERM")
                time.sleep(CAPTURE_DRAIN_S)
            finally:
                stop(dumpcap, signal.SIGINT)  # SIGINT: dumpcap finishes the file and reports
            assert dumpcap.stderr is not None
            report = dumpcap.stderr.read()
        finally:
            stop(bank, signal.SIGKILL)
        counted = re.search(r"Packets captured: (\d+)", report)
        if counted is None or int(counted[1]) == 0:
            raise CaptureError(f"dumpcap captured nothing: {report.strip()}")
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(partial, output)
        return int(counted[1]), port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bank.tools.capture",
        description="Record a real ATM session over loopback with dumpcap, for Wireshark.",
    )
    parser.add_argument("--output", type=Path, default=SESSION_PATH,
                        help="the pcapng file to write (default: %(default)s)")
    parser.add_argument("--port", type=int, default=ServerConfig().port,
                        help="the bank's port (default: %(default)s, the bank's default; 0"
                             " picks a free one, which Wireshark finds by heuristic)")
    args = parser.parse_args(argv)
    try:
        packets, port = capture_session(args.output, args.port)
    except (CaptureError, OSError, subprocess.SubprocessError) as error:
        print(f"capture failed: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {packets} packets of one ATM session on port {port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
