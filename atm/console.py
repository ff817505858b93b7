"""The keyboard and screen, read without blocking the Trio event loop.

A blocking read runs in a worker thread so the session can watch the bank for notices
(SHUTDOWN, SESSION_EXPIRED) while a customer thinks. If that wait is cancelled the
read is not lost: it stays pending and the next ``read_line`` collects it, so there is
never more than one thread reading the terminal.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import termios
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

import outcome
import trio

LINE_BYTES_MAX = 1024
"""Longest line kept; the rest of a longer one is skipped, up to its newline, so that it
cannot become the answers to the next questions (no valid answer is anywhere near it)."""

READ_BYTES = 1024


class Console(Protocol):
    """What the session needs from a terminal; tests pass a scripted one."""

    async def read_line(self, prompt: str, *, secret: bool = False) -> str | None:
        """One line without its newline, or None when input has ended."""
        ...

    def write(self, line: str) -> None:
        """Show ``line`` (which may hold several lines) followed by a newline."""
        ...


class LineReader:
    """Lines from a file descriptor with ``os.read``.

    Raw ``os.read`` rather than ``sys.stdin``: a worker thread abandoned in a read then
    holds no Python-level lock, so the interpreter can still exit cleanly.

    Input that cannot be read is input that has ended: a read failing with OSError, or a
    descriptor already closed when the reader is made (``python -m atm <&-``). That one
    is never read at all, since the number may since have been reused for a socket.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = not _is_open(fd)

    def read_line(self) -> str | None:
        while b"\n" not in self._buffer and not self._eof and len(self._buffer) < LINE_BYTES_MAX:
            self._read_more()
        if not self._buffer:
            return None
        end = self._buffer.find(b"\n")
        if 0 <= end <= LINE_BYTES_MAX:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
        elif len(self._buffer) >= LINE_BYTES_MAX:  # too long: keep its start only
            line = bytes(self._buffer[:LINE_BYTES_MAX])
            self._skip_line()
        else:  # input ended without a newline
            line = bytes(self._buffer)
            self._buffer.clear()
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def _read_more(self) -> None:
        try:
            chunk = os.read(self._fd, READ_BYTES)
        except OSError:
            chunk = b""
        self._eof = not chunk
        self._buffer += chunk

    def _skip_line(self) -> None:
        """Drop bytes up to and including the next newline, holding at most one read."""
        while (end := self._buffer.find(b"\n")) < 0 and not self._eof:
            self._buffer.clear()
            self._read_more()
        del self._buffer[: end + 1 if end >= 0 else len(self._buffer)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _PendingRead:
    """A blocking call running in a thread whose result outlives a cancelled wait."""

    def __init__(self, blocking: Callable[[], str | None]) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[str | None] | None = None
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[str | None]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._finish, result)

        trio.lowlevel.start_thread_soon(blocking, deliver, name="atm keyboard")

    def _finish(self, result: outcome.Outcome[str | None]) -> None:
        self._result = result
        self._done.set()

    async def result(self) -> str | None:
        await self._done.wait()
        assert self._result is not None
        return self._result.unwrap()


class TerminalConsole:
    """The real keyboard and screen.

    On a terminal the PIN is read with ``getpass`` (not echoed). When input is piped
    the answers are echoed after their prompts (the PIN as asterisks) so a transcript
    reads like a session typed by hand.
    """

    def __init__(self, *, fd: int = 0, out: TextIO = sys.stdout) -> None:
        self._fd = fd
        self._out = out
        self._interactive = os.isatty(fd)
        self._reader = LineReader(fd)
        self._pending: _PendingRead | None = None
        self._mid_line = False
        """A prompt is on screen with no line ended after it: the next line written must
        start on a new line (Ctrl-D at a prompt ends no line; a notice can come mid-read)."""

    async def read_line(self, prompt: str, *, secret: bool = False) -> str | None:
        if self._pending is None:
            self._pending = _PendingRead(self._blocking_read(prompt, secret=secret))
        line = await self._pending.result()
        self._pending = None
        if not self._interactive:
            self._echo(line, secret=secret)
        elif line is None:
            self._end_line()  # Ctrl-D ended no line; the shell's prompt may come next
        else:
            self._mid_line = False  # the terminal echoed the Enter that ended it
        return line

    def _blocking_read(self, prompt: str, *, secret: bool) -> Callable[[], str | None]:
        self._mid_line = True
        if secret and self._interactive:
            return lambda: _getpass_or_none(prompt)
        self._out.write(prompt)
        self._out.flush()
        return self._reader.read_line

    def _echo(self, line: str | None, *, secret: bool) -> None:
        """Piped input, shown after its prompt on the prompt's line."""
        self._mid_line = False
        if line is None:
            self.write("")
        else:
            self.write("*" * len(line) if secret else line)

    def _end_line(self) -> None:
        if self._mid_line:
            self._mid_line = False
            self._out.write("\n")
            self._out.flush()

    def write(self, line: str) -> None:
        if self._mid_line:
            self._mid_line = False
            line = "\n" + line
        self._out.write(line + "\n")
        self._out.flush()

    @contextlib.contextmanager
    def terminal_restored(self) -> Iterator[None]:
        """Put the terminal's settings back on the way out.

        ``getpass`` turns echo off while it reads; if the session ends during that read
        (Ctrl-C, a SHUTDOWN) the abandoned thread never turns it back on.
        """
        if not self._interactive:
            yield
            return
        saved = termios.tcgetattr(self._fd)
        try:
            yield
        finally:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)


def _getpass_or_none(prompt: str) -> str | None:
    try:
        return getpass.getpass(prompt)
    except EOFError:
        return None
