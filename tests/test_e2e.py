"""End to end: the real ``python -m bank`` driven by the real ``python -m atm``.

Through a pipe (scripted input, exit statuses) and through a pseudo-terminal with
pexpect (prompts, hidden PIN): a full session; an overdraft refused; a second ATM
refused while the first holds the account and admitted after its logout; three wrong
PINs locking the account; transfers to no account locking the account's transfers until
the operator unlocks them; the SHUTDOWN notice reaching a connected ATM; and a deposit
whose reply is lost in the network, retried by the ATM and applied exactly once.

Every scenario but the lost reply runs three times: in plaintext, inside TLS with
terminal certificates, and in plaintext over PostgreSQL (``bank`` is parametrized; the
PostgreSQL bank is given a URL with a password, which its log must never show). The lost
reply needs a relay that reads frames, which TLS exists to prevent; what it proves, the
ATM's confirm-by-replay, is the same code over either transport.
"""

from __future__ import annotations

import functools
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest
import trio

from atm import text
from atm.errors import ExitCode
from bank.config import ServerConfig
from bank.store import read_books
from bank.tls import init_ca_and_server, issue_terminal
from bank.tools import launcher
from tests.helpers import DEMO_ACCOUNT, DEMO_PIN, OTHER_ACCOUNT, OTHER_PIN, bank_process_args
from tests.pg import Cluster
from wire import Decoder, DepositReply, Sender, Status, encode

ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 30
"""Bound on any one process step; generous for a loaded CI machine, never reached when well."""

PG_PASSWORD = "s3cret-never-logged"

MENU = re.escape(text.MENU_PROMPT)


def balance_cents(db: str | Path, account: str) -> int:
    """From the books of the bank database, read-only."""
    return read_books(db).balance_cents[account]


@dataclass(frozen=True)
class Bank:
    """A real bank process, and the flags that make an ATM reach it."""

    server: launcher.Server
    atm_flags: tuple[str, ...]
    db: str
    """The bank's --db: its SQLite file, or its PostgreSQL URL."""


@pytest.fixture(params=["plaintext", "tls", "postgresql"])
def bank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bank]:
    """``python -m bank`` on a fresh database; under TLS with the certificates its own
    tls-init and tls-terminal commands make, requiring a terminal certificate; or on a
    fresh PostgreSQL database, named by a URL with a password (trust auth ignores it)."""
    args = bank_process_args(tmp_path)
    db = str(tmp_path / "bank.db")
    flags: tuple[str, ...] = ()
    if request.param == "postgresql":
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        schema = cluster.new_database().rsplit("search_path=", 1)[1].strip("'")
        db = (f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{cluster.port}/bank"
              f"?options=-csearch_path%3D{schema}")
        args[args.index("--db") + 1] = db
    if request.param == "tls":
        tls = tmp_path / "tls"
        files = init_ca_and_server(tls, ["127.0.0.1"])
        terminal = issue_terminal(tls, "atm-0001")
        args += ["--tls-cert", str(files.cert), "--tls-key", str(files.key),
                 "--tls-client-ca", str(files.ca)]
        flags = ("--host", "127.0.0.1", "--tls-ca", str(files.ca),
                 "--tls-cert", str(terminal.cert), "--tls-key", str(terminal.key))
    with launcher.start(args, workdir=tmp_path) as server:
        yield Bank(server, ("--port", str(server.port), *flags), db)
        assert PG_PASSWORD not in server.log_path.read_text()


def atm_piped(bank: Bank, *answers: str) -> subprocess.CompletedProcess[str]:
    """Run an ATM with ``answers`` as its input lines, to the end."""
    return subprocess.run(
        [sys.executable, "-m", "atm", *bank.atm_flags],
        input="".join(f"{a}\n" for a in answers), capture_output=True, text=True,
        cwd=ROOT, timeout=PROCESS_TIMEOUT_S, check=False,  # tests assert the exit status
    )


def atm_terminal(bank: Bank) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable, ["-m", "atm", *bank.atm_flags], cwd=str(ROOT),
        encoding="utf-8", timeout=PROCESS_TIMEOUT_S, dimensions=(40, 120),
    )


def log_in_at_terminal(atm: pexpect.spawn, account: str, pin: str) -> None:
    atm.expect_exact("Account number (AA-NNNNN): ")
    atm.sendline(account)
    atm.expect_exact("PIN (4 digits): ")
    atm.sendline(pin)
    atm.expect_exact("Logged in to")
    atm.expect(MENU)


def test_full_session_at_a_terminal(bank: Bank, tmp_path: Path):
    atm = atm_terminal(bank)
    atm.expect_exact("Account number (AA-NNNNN): ")
    atm.sendline("ac-1234")  # a typo: asked again, locally
    atm.expect_exact("Account number (AA-NNNNN): ")
    atm.sendline(DEMO_ACCOUNT.lower())
    atm.expect_exact("PIN (4 digits): ")
    atm.sendline(DEMO_PIN)
    atm.expect_exact("Logged in to AC-***45.")
    assert DEMO_PIN not in atm.before  # the PIN is not echoed
    atm.expect(MENU)
    atm.sendline("b")
    atm.expect_exact("Your balance is $1,024.32.")
    atm.expect(MENU)
    atm.sendline("d")
    atm.expect_exact("(empty line to cancel): ")
    atm.sendline("20.5")
    atm.expect_exact("New balance")
    atm.expect_exact("$1,044.82")
    atm.expect(MENU)
    atm.sendline("w")
    atm.expect_exact("(empty line to cancel): ")
    atm.sendline("1.234")  # three decimals: refused locally, asked again
    atm.expect_exact("(empty line to cancel): ")
    atm.sendline("$44.82")
    atm.expect_exact("$1,000.00")
    atm.expect(MENU)
    atm.sendline("h")
    atm.expect_exact("Withdrawal")
    atm.expect(MENU)
    atm.sendline("x")
    atm.expect_exact("Logged out.")
    atm.expect(pexpect.EOF)
    atm.close()
    assert atm.exitstatus == ExitCode.OK
    assert balance_cents(bank.db, DEMO_ACCOUNT) == 1_000_00


def test_full_session_through_a_pipe(bank: Bank, tmp_path: Path):
    result = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "b", "d", "100", "w", "24.32",
                       "h", "b", "x")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "Your balance is $1,024.32." in result.stdout
    assert "Your balance is $1,100.00." in result.stdout
    assert result.stdout.count("RECEIPT") == 2
    assert "Logged out." in result.stdout and result.stderr == ""
    assert balance_cents(bank.db, DEMO_ACCOUNT) == 1_100_00
    # Under TLS each entry names the terminal that booked it, as does the bank's log.
    terminal = "CN=atm-0001" if "--tls-cert" in bank.atm_flags else None
    assert {entry.terminal for entry in read_books(bank.db).entries} == {terminal}
    if terminal is not None:
        assert f"{terminal}: login AC-***45 APPROVED" in bank.server.log_path.read_text()


def test_end_of_input_logs_out_cleanly(bank: Bank):
    result = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "b")
    assert result.returncode == ExitCode.OK
    assert "Logged out." in result.stdout


def test_an_overdraft_is_refused(bank: Bank, tmp_path: Path):
    result = atm_piped(bank, OTHER_ACCOUNT, OTHER_PIN, "w", "45.73", "b", "x")
    assert "Insufficient funds (51)" in result.stdout
    assert "Your balance is $45.72." in result.stdout
    assert result.returncode == ExitCode.OK
    assert balance_cents(bank.db, OTHER_ACCOUNT) == 45_72


def test_a_second_atm_is_refused_until_the_first_logs_out(bank: Bank):
    first = atm_terminal(bank)
    log_in_at_terminal(first, DEMO_ACCOUNT, DEMO_PIN)
    refused = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "b", "x")
    assert refused.returncode == ExitCode.ACCOUNT_IN_USE
    assert "in use at another ATM (160)" in refused.stdout
    first.sendline("x")
    first.expect(pexpect.EOF)
    first.close()
    admitted = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "b", "x")
    assert admitted.returncode == ExitCode.OK, admitted.stdout
    assert "Your balance is $1,024.32." in admitted.stdout


def test_three_wrong_pins_lock_the_account(bank: Bank):
    wrong = ["0000", "1111", "2222"]
    result = atm_piped(bank, *[line for pin in wrong for line in (DEMO_ACCOUNT, pin)])
    assert "Incorrect PIN (55)" in result.stdout
    assert "ask the bank (75)" in result.stdout
    assert result.returncode == ExitCode.ACCOUNT_LOCKED
    right = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "b", "x")
    assert right.returncode == ExitCode.ACCOUNT_LOCKED
    assert "Your balance" not in right.stdout


def test_the_shutdown_notice_reaches_a_connected_atm(bank: Bank):
    atm = atm_terminal(bank)
    log_in_at_terminal(atm, DEMO_ACCOUNT, DEMO_PIN)
    bank.server.process.send_signal(signal.SIGTERM)
    atm.expect(re.compile(r"shutting down", re.IGNORECASE))
    atm.expect(pexpect.EOF)
    atm.close()
    assert atm.exitstatus == ExitCode.SERVER_UNAVAILABLE
    assert bank.server.process.wait(PROCESS_TIMEOUT_S) == 0
    assert "SIGTERM received" in bank.server.log_path.read_text()


async def test_a_deposit_whose_reply_is_lost_is_applied_exactly_once(
    bank_process: launcher.Server, tmp_path: Path
):
    """A proxy between ATM and bank cuts the connection when the first DEPOSIT_REPLY
    comes back, after the bank has committed it: the ATM must reconnect, retry with the
    same transaction id and get the original outcome, not a second deposit."""
    cut = trio.Event()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp, functools.partial(relay, bank_port=bank_process.port, cut=cut), 0,
                host="127.0.0.1",
            )
        )
        proxy_port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(PROCESS_TIMEOUT_S):
            result = await trio.run_process(
                [sys.executable, "-m", "atm", "--port", str(proxy_port)],
                stdin=f"{DEMO_ACCOUNT}\n{DEMO_PIN}\nd\n12.34\nb\nx\n".encode(),
                capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
            )
        nursery.cancel_scope.cancel()
    stdout = result.stdout.decode()
    assert cut.is_set(), "the proxy never saw a deposit reply"
    assert result.returncode == ExitCode.OK, stdout + result.stderr.decode()
    assert "Your balance is $1,036.66." in stdout
    assert balance_cents(tmp_path / "bank.db", DEMO_ACCOUNT) == 1_024_32 + 12_34


async def relay(atm: trio.SocketStream, *, bank_port: int, cut: trio.Event) -> None:
    """Forward both ways; on the first DEPOSIT_REPLY, drop both connections instead."""
    bank = await trio.open_tcp_stream("127.0.0.1", bank_port)
    async with atm, bank, trio.open_nursery() as nursery:

        async def upstream() -> None:
            while data := await atm.receive_some(4096):
                await bank.send_all(data)

        async def downstream() -> None:
            decoder = Decoder(Sender.SERVER)
            while data := await bank.receive_some(4096):
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not None:
                    if isinstance(frame.message, DepositReply) and not cut.is_set():
                        cut.set()
                        nursery.cancel_scope.cancel()
                        return
                    await atm.send_all(encode(frame.message, frame.request_id))

        nursery.start_soon(upstream)
        nursery.start_soon(downstream)


def test_a_transfer_and_a_pin_change_with_the_real_programs(bank: Bank):
    """Both new keys through ``python -m atm`` and ``python -m bank``: the money is in
    the other account, the other ATM's balance shows it, and the new PIN logs in."""
    holder = atm_terminal(bank)  # the destination is in use at another ATM meanwhile
    log_in_at_terminal(holder, OTHER_ACCOUNT, OTHER_PIN)
    done = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "t", OTHER_ACCOUNT.lower(), "24.32", "y",
                     "p", DEMO_PIN, "2580", "2580", "x")
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "Transfer $24.32 to BC-***73? [y/n]: " in done.stdout
    assert "$1,000.00" in done.stdout  # the source's new balance on the receipt
    assert text.PIN_CHANGED in done.stdout
    holder.sendline("b")
    holder.expect_exact("Your balance is $70.04.")
    holder.expect(MENU)
    holder.sendline("h")
    holder.expect_exact("Transfer in")
    holder.expect(MENU)
    holder.sendline("x")
    holder.expect(pexpect.EOF)
    assert balance_cents(bank.db, OTHER_ACCOUNT) == 45_72 + 24_32
    again = atm_piped(bank, DEMO_ACCOUNT, "2580", "b", "x")
    assert "Your balance is $1,000.00." in again.stdout


def test_transfers_to_no_account_lock_the_atms_transfers_until_the_operator_unlocks(
    bank: Bank, tmp_path: Path
):
    """Walking account numbers with one-cent transfers through ``python -m atm``: the
    ATM shows the lock in words (it announced FREQUENCY_LIMIT, so the bank says 65), takes
    it as settled, and ``python -m bank unlock`` lifts it."""
    tries = ServerConfig().destination_tries_max
    walk = [line for n in range(tries) for line in ("t", f"QQ-{n:05d}", "0.01", "y")]
    done = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, *walk, "t", OTHER_ACCOUNT, "1", "y", "x")
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    refused = functools.partial(text.refused, text.TRANSFER_NOUN)
    assert done.stdout.count(refused(Status.INVALID_TO_ACCOUNT)) == tries - 1
    assert done.stdout.count(refused(Status.EXCEEDS_FREQUENCY_LIMIT)) == 2  # settled, said
    assert balance_cents(bank.db, DEMO_ACCOUNT) == 1_024_32
    log = bank.server.log_path.read_text()
    assert log.count("transfers locked until") == 2 and DEMO_ACCOUNT not in log
    unlock = subprocess.run(
        [sys.executable, "-m", "bank", "--db", bank.db, "--key-file", str(tmp_path / "bank.key"),
         "unlock", DEMO_ACCOUNT],
        capture_output=True, text=True, cwd=ROOT, timeout=PROCESS_TIMEOUT_S, check=False,
    )
    assert unlock.returncode == 0, unlock.stderr
    assert re.fullmatch(r"AC-12345 had no wrong PINs; its transfers were locked until .+;"
                        r" unlocked\n", unlock.stdout)
    again = atm_piped(bank, DEMO_ACCOUNT, DEMO_PIN, "t", OTHER_ACCOUNT, "1", "y", "x")
    assert again.returncode == ExitCode.OK and "$1,023.32" in again.stdout
