"""Start a server process on a free loopback port and learn when it serves: the one launcher
the tools and the tests share.

``start`` runs ``python -m bank`` (or another module taking the same ``--host``, ``--port``
and ``--ready-file`` flags, such as the bench's echo server) with ``--port 0`` and a ready
file in the caller's work directory, and returns once that file says the server listens;
if the process exits first or is not ready in time, it is killed and ``LaunchError``
quotes the tail of its log. The port comes from the ready file, never from the log.

Everything here blocks, each wait bounded by a named timeout. Trio code calls it through
``trio.to_thread.run_sync`` (as ``bank.tools.chaos`` does): once the thread runs, a
cancelled caller still waits for it, so a start is never abandoned halfway, and a stop
or kill in cleanup needs a shield, as any awaited cleanup does. The ready file is polled
every READY_POLL_S: a launcher has no other way to learn about another process's file.
That is the launcher's business only; tests synchronise on what the server tells them.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bank.readiness import Ready, read_ready_file, remove_ready_file

LOOPBACK = "127.0.0.1"
"""Every launched server listens here only: a tool or test never exposes one."""

START_TIMEOUT_S = 30.0
"""From spawning a server to its ready file. A healthy start takes well under a second; a
loaded CI machine can take several."""

STOP_TIMEOUT_S = 15.0
"""From SIGTERM to exit before SIGKILL follows, and from SIGKILL to exit. A graceful exit
takes the server's --shutdown-grace-s (if connections stay) plus closing the database."""

READY_POLL_S = 0.02
"""Between looks for the ready file while a server starts."""

LOG_TAIL_LINES = 20
"""Lines of a server's log quoted in a LaunchError."""


class LaunchError(Exception):
    """A server exited before it was ready, was not ready in time, or outlived SIGKILL."""


@dataclass(frozen=True, slots=True)
class Server:
    """A started server process; as a context manager, stopped when the block ends."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    ready_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, as an operator would, then SIGKILL if it is still running after
        ``timeout_s``; the exit status (0 when graceful, -9 when killed)."""
        status = _signal_and_wait(self.process, signal.SIGTERM, timeout_s)
        return self.kill() if status is None else self._ended(status)

    def kill(self) -> int:
        """SIGKILL (a crash, as far as the server can tell) and wait; the exit status."""
        status = _signal_and_wait(self.process, signal.SIGKILL, STOP_TIMEOUT_S)
        if status is None:
            raise LaunchError(f"pid {self.pid} still runs {STOP_TIMEOUT_S} s after SIGKILL")
        return self._ended(status)

    def _ended(self, status: int) -> int:
        remove_ready_file(self.ready_path)  # one killed by a signal cannot remove its own
        return status

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start(
    args: Sequence[str] = (),
    *,
    workdir: Path,
    name: str = "bank",
    module: str = "bank",
    env: Mapping[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Server:
    """Run ``python -m {module} {args}`` on a free loopback port; return once it serves.

    It logs (stdout and stderr) to ``workdir/{name}.log``, truncated first, and announces
    itself in ``workdir/{name}.ready``, so servers that share a work directory need
    different names. ``env`` is added to this process's environment. The launcher sets
    ``--host``, ``--port`` and ``--ready-file`` after ``args``, so its values win.
    """
    log_path, ready_path = workdir / f"{name}.log", workdir / f"{name}.ready"
    remove_ready_file(ready_path)  # left behind by a killed predecessor
    command = [
        sys.executable, "-m", module, *args,
        "--host", LOOPBACK, "--port", "0", "--ready-file", str(ready_path),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=None if env is None else {**os.environ, **env},
        )
    label = f"python -m {module} (pid {process.pid})"
    try:
        ready = _wait_until_ready(process, label, ready_path, log_path, timeout_s)
    except BaseException:
        _signal_and_wait(process, signal.SIGKILL, STOP_TIMEOUT_S)
        remove_ready_file(ready_path)
        raise
    host, port = ready.addresses[0]
    return Server(process, host, port, log_path, ready_path)


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    label: str,
    ready_path: Path,
    log_path: Path,
    timeout_s: float,
) -> Ready:
    """The process's ready file once it exists; LaunchError if the process exits first or
    the file does not appear within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (ready := _read_ready(ready_path, label)) is None:
        if process.poll() is not None:
            raise LaunchError(
                f"{label} exited with status {process.returncode} before it was ready; "
                f"the end of {log_path}:\n{_log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"{label} not ready after {timeout_s} s; the end of {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        time.sleep(READY_POLL_S)
    if ready.pid != process.pid or not ready.addresses:
        raise LaunchError(f"{ready_path} does not announce {label}: {ready}")
    return ready


def _read_ready(ready_path: Path, label: str) -> Ready | None:
    try:
        return read_ready_file(ready_path)
    except ValueError as error:
        raise LaunchError(f"{label}: {error}") from None


def _signal_and_wait(
    process: subprocess.Popen[bytes], signum: signal.Signals, timeout_s: float
) -> int | None:
    """Send ``signum`` unless the process has exited; its exit status, or None if it is
    still running after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _log_tail(log_path: Path) -> str:
    """The last LOG_TAIL_LINES lines, read through once so a long log costs no memory."""
    try:
        with log_path.open(errors="replace") as log:
            return "".join(collections.deque(log, maxlen=LOG_TAIL_LINES))
    except OSError as error:
        return f"(unreadable: {error})"
