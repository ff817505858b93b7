"""The real ``python -m atm`` through a bad network: a fault-injecting proxy
(tests/faultproxy.py) between it and the bank cuts the connection at every point of the
conversation, openly (FIN or reset) and silently (the bank's side left open, as in a WAN
partition), delays and jitters it, and cuts frames in half.

In every run the ATM exits 0 having done what the customer typed, and the money moves
exactly once: the bank's books show each deposit and withdrawal once. After a silent cut
the ATM resumes its own session on a new connection at once (RESUME), so a deposit is
confirmed without waiting for the bank's idle timeout: the output shows no wait for a
session the bank still holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from atm.errors import ExitCode
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.store import read_books
from tests.faultproxy import Action, Cut, Delay, FaultProxy, PlanEntry
from tests.helpers import DEMO_ACCOUNT, DEMO_BALANCE_CENTS, DEMO_PIN, start_server
from wire import Opcode

ROOT = Path(__file__).resolve().parent.parent
ATM_TIMEOUT_S = 60
"""Bound on one ATM run; a healthy one takes about a second."""

REPLY_TIMEOUT_S = 5
"""The ATM's reply timeout in these runs (its default is 15 s)."""

VISIT = [DEMO_ACCOUNT, DEMO_PIN, "d", "12.34", "b", "w", "2.34", "b", "x"]
"""A deposit and a withdrawal, with a balance after each: 12.34 in, 2.34 out."""

AFTER_VISIT_CENTS = DEMO_BALANCE_CENTS + 12_34 - 2_34

WAITED_OUT = "still holds the session"
"""What the ATM says when it must wait for the bank to let go of a session."""


async def visit_through(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger,
    plan: list[PlanEntry], *, lines: list[str] = VISIT, **settings: object,
) -> tuple[int, str, FaultProxy]:
    """Run the real ATM through a proxy with ``plan`` to an in-process bank."""
    bank = await start_server(nursery, config, ledger, **settings)
    proxy = FaultProxy(bank.port, plan, seed=1)
    port = await nursery.start(proxy.serve)
    with trio.fail_after(ATM_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "atm", "--port", str(port),
             "--reply-timeout-s", str(REPLY_TIMEOUT_S)],
            stdin="".join(f"{line}\n" for line in lines).encode(),
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )
    await proxy.stop()
    return result.returncode, result.stdout.decode() + result.stderr.decode(), proxy


def booked_once(tmp_path: Path) -> bool:
    """The visit's deposit and withdrawal are in the books, each once, and nothing else."""
    books = read_books(tmp_path / "bank.db")
    moved = sorted(entry.amount_cents for entry in books.entries)
    return moved == [2_34, 12_34] and books.balance_cents[DEMO_ACCOUNT] == AFTER_VISIT_CENTS


CUTS: dict[str, PlanEntry] = {
    "before HELLO": Cut(Opcode.HELLO, forward_bytes=0),
    "after HELLO": Cut(Opcode.HELLO),
    "LOGIN lost": Cut(Opcode.LOGIN, forward_bytes=0),
    "after LOGIN, reply lost": Cut(Opcode.LOGIN),
    "LOGIN_REPLY cut in half": Cut(Opcode.LOGIN_REPLY, forward_bytes=5, action=Action.RST),
    "at the menu": Cut(Opcode.SESSION_TOKEN),
    "DEPOSIT lost": Cut(Opcode.DEPOSIT, forward_bytes=0),
    "after DEPOSIT, reply lost": Cut(Opcode.DEPOSIT, action=Action.RST),
    "after DEPOSIT_REPLY": Cut(Opcode.DEPOSIT_REPLY),
    "BALANCE reply lost": Cut(Opcode.BALANCE, action=Action.RST),
    "WITHDRAW_REPLY cut in half": Cut(Opcode.WITHDRAW_REPLY, forward_bytes=9),
    "LOGOUT reply lost": Cut(Opcode.LOGOUT),
}


@pytest.mark.parametrize("cut", list(CUTS.values()), ids=list(CUTS))
async def test_an_open_cut_anywhere_ends_well_and_moves_money_once(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
    cut: PlanEntry,
):
    code, output, proxy = await visit_through(nursery, config, ledger, [cut])
    assert code == ExitCode.OK, output
    assert len(proxy.events) == 1, output  # the cut did happen
    assert booked_once(tmp_path), output
    assert "Your balance is $1,036.66." in output or "Your balance is $1,024.32." in output


SILENT: dict[str, PlanEntry] = {
    "at the menu": Cut(Opcode.SESSION_TOKEN, action=Action.SILENT_FIN),
    "after DEPOSIT, reply lost": Cut(Opcode.DEPOSIT, action=Action.SILENT_RST),
    "DEPOSIT_REPLY cut in half": Cut(
        Opcode.DEPOSIT_REPLY, forward_bytes=7, action=Action.SILENT_FIN
    ),
    "after WITHDRAW, reply lost": Cut(Opcode.WITHDRAW, action=Action.SILENT_FIN),
}


@pytest.mark.parametrize("cut", list(SILENT.values()), ids=list(SILENT))
async def test_after_a_silent_cut_the_atm_resumes_its_session_at_once(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
    cut: PlanEntry,
):
    """The bank never sees the connection end and keeps the session (and its lease) until
    its idle timeout; the ATM takes it over at once with its token instead of waiting."""
    code, output, proxy = await visit_through(nursery, config, ledger, [cut])
    assert code == ExitCode.OK, output
    assert len(proxy.events) == 1, output
    assert booked_once(tmp_path), output
    assert WAITED_OUT not in output, output


async def test_a_confirmed_deposit_after_a_silent_cut_says_so(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
):
    cut = Cut(Opcode.DEPOSIT, action=Action.SILENT_RST)
    code, output, _ = await visit_through(
        nursery, config, ledger, [cut], lines=[DEMO_ACCOUNT, DEMO_PIN, "d", "12.34", "x"]
    )
    assert code == ExitCode.OK, output
    assert "confirmed, your deposit went through once" in output, output
    assert read_books(tmp_path / "bank.db").balance_cents[DEMO_ACCOUNT] == (
        DEMO_BALANCE_CENTS + 12_34
    )


async def test_a_silent_cut_at_login_is_waited_out_as_the_bank_lets_go(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
):
    """The LOGIN's answer never arrives and the bank keeps the session it opened, of
    which the ATM has no token: it logs in again once the bank's idle timeout (short
    here) has released it."""
    cut = Cut(Opcode.LOGIN_REPLY, forward_bytes=0, action=Action.SILENT_FIN)
    code, output, _ = await visit_through(
        nursery, config, ledger, [cut], idle_timeout_s=2
    )
    assert code == ExitCode.OK, output
    assert booked_once(tmp_path), output


async def test_a_slow_jittery_network_only_slows_the_visit(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
):
    code, output, proxy = await visit_through(
        nursery, config, ledger, [Delay(0.03, jitter_s=0.02)]
    )
    assert code == ExitCode.OK, output
    assert proxy.events, "the delay was applied"
    assert booked_once(tmp_path), output
    assert "reconnecting" not in output
