"""``python -m atm`` as a process, and the real console it reads from.

The ATM runs as a subprocess against the fake bank on 127.0.0.1 (port 0), with its
input piped and, once, on a pseudo-terminal (pexpect) to check the PIN is not echoed.
The console's line reader is tested on an ``os.pipe``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest
import trio
import trio.testing

from atm import text
from atm.__main__ import DEFAULT_HOST, DEFAULT_PORT, parse_args, run_until_signalled
from atm.console import LINE_BYTES_MAX, LineReader, TerminalConsole
from atm.errors import ExitCode, TransactionUnconfirmed
from atm.inputs import Choice
from tests.helpers import (
    ACCOUNT,
    PIN,
    START_BALANCE_CENTS,
    FakeBank,
    ScriptedConsole,
    listen_on_loopback,
)

ROOT = Path(__file__).resolve().parent.parent


ATM_PROCESS_TIMEOUT_S = 60
"""Bound on one ATM process, far above its usual second, so a hang fails the test."""


async def run_atm_process(port: int, stdin: bytes) -> trio.CompletedProcess:
    with trio.fail_after(ATM_PROCESS_TIMEOUT_S):
        return await trio.run_process(
            [sys.executable, "-m", "atm", "--port", str(port)],
            stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )


async def test_piped_session_prints_what_a_person_would_see() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        answers = f"{ACCOUNT}\n{PIN}\nb\nd\n12.34\nx\n".encode()
        done = await run_atm_process(port, answers)
        nursery.cancel_scope.cancel()
    out = done.stdout.decode()
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stderr == b""
    assert f"{text.ACCOUNT_PROMPT}{ACCOUNT}\n" in out
    assert f"{text.PIN_PROMPT}****\n" in out
    assert PIN not in out.replace(ACCOUNT, "")
    assert text.balance(START_BALANCE_CENTS) in out
    assert "$112.34" in out
    assert out.endswith(text.GOODBYE + "\n")


async def test_end_of_piped_input_logs_out_with_status_0() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        done = await run_atm_process(port, f"{ACCOUNT}\n{PIN}\nb".encode())
        nursery.cancel_scope.cancel()
    assert done.returncode == ExitCode.OK
    assert done.stdout.decode().endswith(text.GOODBYE + "\n")


async def test_refused_login_exits_non_zero_without_a_traceback() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        bank.accounts[ACCOUNT].locked = True
        port = await listen_on_loopback(nursery, bank)
        done = await run_atm_process(port, f"{ACCOUNT}\n{PIN}\n".encode())
        nursery.cancel_scope.cancel()
    assert done.returncode == ExitCode.ACCOUNT_LOCKED
    assert done.stderr == b""


async def test_input_that_ends_after_a_refused_login_exits_with_the_refusal() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        done = await run_atm_process(port, f"{ACCOUNT}\n0000\n".encode())
        nursery.cancel_scope.cancel()
    assert done.returncode == ExitCode.LOGIN_REFUSED
    assert done.stderr == b""


async def test_unreachable_bank_exits_1() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # Bound, not listening: the connect is refused.
        port = sock.getsockname()[1]
        done = await run_atm_process(port, b"")
    assert done.returncode == ExitCode.CONNECTION_LOST
    # As the README's troubleshooting section quotes it: host:port and the OS's reason.
    assert done.stdout.decode().splitlines()[-1] == (
        f"Could not connect to the bank: could not reach 127.0.0.1:{port}: Connection refused."
    )
    assert done.stderr == b""


async def test_a_host_name_that_cannot_be_looked_up_exits_1_without_a_traceback() -> None:
    host = "a" * 64 + ".example"  # a label over 63 characters: refused before any lookup
    with trio.fail_after(ATM_PROCESS_TIMEOUT_S):
        done = await trio.run_process(
            [sys.executable, "-m", "atm", "--host", host], stdin=b"",
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )
    assert done.returncode == ExitCode.CONNECTION_LOST
    last = done.stdout.decode().splitlines()[-1]  # after the tries it says it made
    assert last.startswith(f"Could not connect to the bank: could not reach {host}")
    assert b"not a valid host name" in done.stdout
    assert done.stderr == b""


async def test_closed_input_is_input_that_has_ended() -> None:
    """``python -m atm <&-``: nothing to read, so the session ends at once, cleanly."""
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        with trio.fail_after(ATM_PROCESS_TIMEOUT_S):
            done = await trio.run_process(
                ["sh", "-c", 'exec "$0" -m atm --port "$1" <&-', sys.executable, str(port)],
                capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
            )
        nursery.cancel_scope.cancel()
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stderr == b""
    assert done.stdout.decode().startswith(text.WELCOME)
    assert bank.requests == []


async def test_a_closed_output_ends_the_session_without_a_traceback() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `python -m atm | head` after head has quit
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        with trio.fail_after(ATM_PROCESS_TIMEOUT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "atm", "--port", str(port)],
                stdin=f"{ACCOUNT}\n{PIN}\nb\n".encode(), stdout=write_end,
                capture_stderr=True, check=False, cwd=ROOT,
            )
        nursery.cancel_scope.cancel()
    os.close(write_end)
    assert done.returncode == ExitCode.OUTPUT_CLOSED
    assert done.stderr == b""


async def test_pin_is_not_echoed_on_a_terminal() -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        output = await trio.to_thread.run_sync(drive_a_terminal, port)
        nursery.cancel_scope.cancel()
    assert PIN not in output.replace(ACCOUNT, "")
    assert text.balance(START_BALANCE_CENTS) in output


def drive_a_terminal(port: int) -> str:
    """Type a session into a pseudo-terminal as a person would; returns the screen."""
    child = pexpect.spawn(sys.executable, ["-m", "atm", "--port", str(port)], cwd=str(ROOT),
                          encoding="utf-8", timeout=10)
    screen = io.StringIO()
    child.logfile_read = screen
    child.expect_exact(text.ACCOUNT_PROMPT)
    child.sendline(ACCOUNT)
    child.expect_exact(text.PIN_PROMPT)
    child.sendline(PIN)
    child.expect_exact(text.MENU_PROMPT)
    child.sendline("b")
    child.expect_exact(text.MENU_PROMPT)
    child.sendline("x")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == ExitCode.OK
    return screen.getvalue()


# -- Arguments and environment ------------------------------------------------------------


def test_defaults() -> None:
    args = parse_args([], environ={})
    assert (args.host, args.port) == (DEFAULT_HOST, DEFAULT_PORT)


def test_environment_then_flags() -> None:
    environ = {"ATM_HOST": "::1", "ATM_PORT": "4000", "ATM_REPLY_TIMEOUT_S": "7"}
    args = parse_args([], environ)
    assert (args.host, args.port, args.reply_timeout_s) == ("::1", 4000, 7)
    args = parse_args(["--host", "127.0.0.2", "--port", "5000", "--reply-timeout-s", "9"], environ)
    assert (args.host, args.port, args.reply_timeout_s) == ("127.0.0.2", 5000, 9)


@pytest.mark.parametrize(("argv", "environ"), [
    (["--port", "0"], {}), (["--port", "http"], {}), ([], {"ATM_PORT": "70000"}),
    (["--reply-timeout-s", "0"], {}), ([], {"ATM_REPLY_TIMEOUT_S": "soon"}),
])
def test_bad_ports_and_timeouts_are_usage_errors(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv, environ)
    assert raised.value.code == ExitCode.USAGE


# -- The console ------------------------------------------------------------------------


def test_line_reader_splits_lines_and_ends() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"one\r\ntwo\n" + b"x" * (LINE_BYTES_MAX + 5))
    os.close(write_fd)
    reader = LineReader(read_fd)
    assert [reader.read_line(), reader.read_line()] == ["one", "two"]
    assert reader.read_line() == "x" * LINE_BYTES_MAX  # the rest of the line is dropped
    assert reader.read_line() is None
    os.close(read_fd)


@pytest.mark.parametrize("overflow_bytes", [1, 5, 3 * LINE_BYTES_MAX])
def test_an_overlong_line_is_one_answer_not_several(overflow_bytes: int) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"y" * (LINE_BYTES_MAX + overflow_bytes) + b"\nnext\n")
    os.close(write_fd)
    reader = LineReader(read_fd)
    assert reader.read_line() == "y" * LINE_BYTES_MAX
    assert reader.read_line() == "next"
    assert reader.read_line() is None
    os.close(read_fd)


def test_a_closed_descriptor_is_ended_input_and_never_read() -> None:
    closed_fd, write_fd = os.pipe()
    os.close(closed_fd)
    os.close(write_fd)
    reader = LineReader(closed_fd)
    reused_fd, other_write = os.pipe()  # the lowest free number: the closed one, reused
    try:
        assert reused_fd == closed_fd
        os.write(other_write, b"not input\n")
        assert reader.read_line() is None
        assert os.read(reused_fd, 100) == b"not input\n"  # left for its real owner
    finally:
        os.close(reused_fd)
        os.close(other_write)


def test_a_failing_read_is_ended_input() -> None:
    fd = os.open(ROOT, os.O_RDONLY)  # a directory: reading it fails with EISDIR
    try:
        assert LineReader(fd).read_line() is None
    finally:
        os.close(fd)


def test_a_line_of_exactly_the_limit_is_kept_whole() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"z" * LINE_BYTES_MAX + b"\nnext\n")
    os.close(write_fd)
    reader = LineReader(read_fd)
    assert [reader.read_line(), reader.read_line()] == ["z" * LINE_BYTES_MAX, "next"]
    os.close(read_fd)


async def test_a_line_written_while_a_read_waits_starts_below_the_prompt() -> None:
    """A notice from the bank can come while the ATM waits at a prompt (piped input)."""
    read_fd, write_fd = os.pipe()
    out = io.StringIO()
    console = TerminalConsole(fd=read_fd, out=out)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.read_line, "choice? ")
        await trio.testing.wait_all_tasks_blocked()  # the prompt is out, the read waits
        console.write("The bank is shutting down.")
        nursery.cancel_scope.cancel()
    os.write(write_fd, b"b\n")
    os.close(write_fd)
    assert await console.read_line("again? ") == "b"  # the read that waited
    assert out.getvalue() == "choice? \nThe bank is shutting down.\nb\n"
    os.close(read_fd)


async def test_after_ctrl_d_at_a_terminal_prompt_the_next_line_starts_below_it() -> None:
    """At a terminal, Ctrl-D ends input without ending the prompt's line."""
    main_fd, terminal_fd = os.openpty()
    out = io.StringIO()
    console = TerminalConsole(fd=terminal_fd, out=out)
    os.write(main_fd, b"\x04")  # Ctrl-D at the start of a line: end of input
    assert await console.read_line("choice? ") is None
    console.write("Goodbye.")
    assert out.getvalue() == "choice? \nGoodbye.\n"
    os.close(terminal_fd)
    os.close(main_fd)


async def test_a_cancelled_read_is_not_lost() -> None:
    read_fd, write_fd = os.pipe()
    out = io.StringIO()
    console = TerminalConsole(fd=read_fd, out=out)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.read_line, "first? ")
        await trio.testing.wait_all_tasks_blocked()  # waiting for the read in its thread
        nursery.cancel_scope.cancel()
    os.write(write_fd, b"answer\n")
    os.close(write_fd)
    assert await console.read_line("again? ") == "answer"
    assert await console.read_line("more? ") is None
    assert out.getvalue() == "first? answer\nmore? \n"
    os.close(read_fd)


def test_help_names_every_menu_key(capsys: pytest.CaptureFixture[str]) -> None:
    """The menu grew t and p after --help was written; each key must be in it."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for choice in Choice:
        assert re.search(rf"^\s.*\b{choice.value}  [a-z]", shown, re.MULTILINE), choice


SIGNAL_WAITS_MAX = 100
"""Bound on the scheduler rounds a test waits for the ATM to send its deposit."""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
async def test_sigterm_or_sighup_mid_deposit_ends_the_visit_telling_its_transaction_id(
    signum: int,
) -> None:
    """A supervisor's SIGTERM (or the terminal's SIGHUP) ends the session as Ctrl-C does:
    the deposit in flight may have gone through, so its id is shown, not lost."""
    console = ScriptedConsole([ACCOUNT, PIN, "d", "5"], then_wait=True)
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        bank.hang_replies = 1

        async def signal_once_sent() -> None:
            for _ in range(SIGNAL_WAITS_MAX):
                await trio.testing.wait_all_tasks_blocked()
                if bank.money_requests():
                    os.kill(os.getpid(), signum)
                    return
            raise AssertionError("the deposit was never sent")

        nursery.start_soon(signal_once_sent)
        code = await run_until_signalled(console, bank.connect)
        nursery.cancel_scope.cancel()
    assert code is None  # main then says the session was interrupted, status 130
    [deposit] = bank.money_requests()
    assert console.output[-1] == text.ending(TransactionUnconfirmed(
        kind="deposit", amount_cents=5_00, txn_id=deposit.txn_id,
    ))


ECHO_REPORTER = """\
import subprocess, sys, termios
atm = subprocess.Popen([sys.executable, "-m", "atm", *sys.argv[1:]])
print(f"PID={atm.pid}", flush=True)
status = atm.wait()
echo = termios.tcgetattr(0)[3] & termios.ECHO
print(f"STATUS={status} ECHO={'on' if echo else 'off'}", flush=True)
"""
"""Runs the ATM on its own terminal and says, once it has exited, whether that terminal
echoes: a test cannot ask the terminal of a process that is gone."""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
async def test_a_signal_at_the_hidden_pin_prompt_gives_the_terminal_its_echo_back(
    signum: int,
) -> None:
    async with trio.open_nursery() as nursery:
        bank = FakeBank(nursery)
        port = await listen_on_loopback(nursery, bank)
        atm = pexpect.spawn(sys.executable, ["-c", ECHO_REPORTER, "--port", str(port)],
                            cwd=str(ROOT), encoding="utf-8", timeout=ATM_PROCESS_TIMEOUT_S)
        await trio.to_thread.run_sync(atm.expect, r"PID=(\d+)")
        pid = int(atm.match.group(1))
        await trio.to_thread.run_sync(atm.expect_exact, text.ACCOUNT_PROMPT)
        atm.sendline(ACCOUNT)
        await trio.to_thread.run_sync(atm.expect_exact, text.PIN_PROMPT)
        os.kill(pid, signum)
        await trio.to_thread.run_sync(atm.expect, r"STATUS=(-?\d+) ECHO=(\w+)")
        nursery.cancel_scope.cancel()
    atm.close()
    assert text.INTERRUPTED in atm.before
    assert (int(atm.match.group(1)), atm.match.group(2)) == (ExitCode.INTERRUPTED, "on")
