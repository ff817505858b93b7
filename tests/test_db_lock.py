"""The serving bank's lock on its SQLite file (``bank.db_lock``).

In-process: a second hold on one file is refused and the first one's release frees it;
the lock file is created 0600 beside the file the database resolves to (a symlink to it
shares the real file's lock); a lock file that cannot be opened is a sentence. Real
``python -m bank`` processes: a second server on the same file exits 1 with one
sentence naming it, having changed nothing; operator commands work while the server
holds it; the lock is let go when the server exits, gracefully or killed; and a served
BALANCE, from the cache, shows a transfer into the account from another session. Over
PostgreSQL there is no lock at all.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bank.db_lock import DatabaseInUse, DatabaseLock, lock_path
from bank.store import read_accounts_summary
from bank.tools import launcher
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    WireClient,
    bank_process_args,
    txn_id,
)
from wire import Balance, BalanceReply, Status, Transfer, TransferReply

ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 60
"""Bound on a refused server or an operator command, which end in well under a second."""


def test_a_second_hold_on_one_file_is_refused_until_the_first_is_released(tmp_path: Path):
    db = tmp_path / "bank.db"
    first, second = DatabaseLock(db), DatabaseLock(db)
    first.acquire()
    assert first.held
    with pytest.raises(DatabaseInUse, match=re.escape(f"serving the database {db} ")):
        second.acquire()
    assert not second.held
    first.release()
    first.release()  # twice is harmless
    second.acquire()
    assert second.held
    second.release()


def test_the_lock_file_is_made_0600_beside_the_real_database_and_left_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = tmp_path / "data" / "bank.db"
    real.parent.mkdir()
    (tmp_path / "link.db").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    lock = DatabaseLock("link.db")
    umask = os.umask(0)  # the mode is the lock's own, not the umask's
    try:
        lock.acquire()
    finally:
        os.umask(umask)
    try:
        assert lock_path("link.db") == lock_path(real) == real.parent / "bank.db.lock"
        assert stat.S_IMODE((real.parent / "bank.db.lock").stat().st_mode) == 0o600
        with pytest.raises(DatabaseInUse):  # another name for the same file
            DatabaseLock(real).acquire()
    finally:
        lock.release()
    assert (real.parent / "bank.db.lock").exists()  # removing it would be a race


def test_a_lock_file_that_cannot_be_opened_is_a_sentence(tmp_path: Path):
    with pytest.raises(DatabaseInUse, match=r"cannot open .*bank\.db\.lock, the lock file of"):
        DatabaseLock(tmp_path / "missing" / "bank.db").acquire()
    (tmp_path / "bank.db.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DatabaseInUse, match="cannot open"):
        DatabaseLock(tmp_path / "bank.db").acquire()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("db", ["", "."])
def test_a_directory_named_as_the_database_is_left_for_the_store_to_refuse(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    lock = DatabaseLock(db)
    lock.acquire()
    assert not lock.held
    assert not lock_path(tmp_path).exists()  # no tmp_path.lock beside the directory


def test_postgresql_takes_no_lock(pg_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    lock = DatabaseLock(pg_db)
    lock.acquire()
    assert not lock.held
    assert list(tmp_path.iterdir()) == []


def run_bank(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bank", *args], input=stdin, capture_output=True, text=True,
        cwd=ROOT, timeout=PROCESS_TIMEOUT_S, check=False,
    )


def test_a_second_server_on_the_same_file_is_refused_in_one_sentence(
    bank_process: launcher.Server, tmp_path: Path
):
    db = tmp_path / "bank.db"
    before = db.read_bytes()
    second = run_bank(*bank_process_args(tmp_path), "--port", "0")
    assert second.returncode == 1
    assert second.stderr == (
        f"bank: another bank server is serving the database {db} (it holds"
        f" {lock_path(db)}): stop it first, or serve another file\n"
    )
    assert db.read_bytes() == before
    assert bank_process.process.poll() is None  # the first serves on


def test_operator_commands_work_while_the_server_holds_the_lock(
    bank_process: launcher.Server, tmp_path: Path
):
    flags = ["--db", str(tmp_path / "bank.db"), "--key-file", str(tmp_path / "bank.key")]
    added = run_bank("add-account", "QX-00001", "--balance-cents", "500", *flags,
                     stdin="4932\n")
    assert added.returncode == 0, added.stderr
    listed = run_bank("accounts", "--db", str(tmp_path / "bank.db"))
    assert listed.returncode == 0 and "QX-00001" in listed.stdout
    assert run_bank("unlock", DEMO_ACCOUNT, *flags).returncode == 0
    assert bank_process.process.poll() is None


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_the_lock_is_let_go_when_the_server_exits(ending: str, tmp_path: Path):
    db = tmp_path / "bank.db"
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        with pytest.raises(DatabaseInUse):
            DatabaseLock(db).acquire()
        assert (server.stop() if ending == "stop" else server.kill()) in (0, -signal.SIGKILL)
    after = DatabaseLock(db)
    after.acquire()
    assert after.held
    after.release()
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path):
        pass  # the next server serves the file


async def logged_in(port: int, account: str, pin: str) -> WireClient:
    client = await WireClient.connect(port)
    await client.hello()
    assert await client.login(account, pin) is Status.APPROVED
    return client


async def test_a_served_balance_shows_a_transfer_into_the_account_from_another_session(
    bank_process: launcher.Server, tmp_path: Path
):
    """Through the serving path, where the cache is on: the destination's session reads
    its balance (cached), another session transfers into it, and the next read shows it."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        source = await logged_in(bank_process.port, DEMO_ACCOUNT, DEMO_PIN)
        destination = await logged_in(bank_process.port, OTHER_ACCOUNT, OTHER_PIN)
        first = await destination.request(Balance())
        assert isinstance(first, BalanceReply) and first.status is Status.APPROVED
        assert await destination.request(Balance()) == first
        sent = await source.request(Transfer(txn_id(), 5_00, OTHER_ACCOUNT))
        assert isinstance(sent, TransferReply) and sent.status is Status.APPROVED
        assert sent.balance_cents == DEMO_BALANCE_CENTS - 5_00
        after = await destination.request(Balance())
        assert isinstance(after, BalanceReply)
        assert after.balance_cents == first.balance_cents + 5_00
        mine = await source.request(Balance())
        assert isinstance(mine, BalanceReply) and mine.balance_cents == sent.balance_cents
        await source.aclose()
        await destination.aclose()
    stored = {a.account: a.balance_cents for a in read_accounts_summary(tmp_path / "bank.db")}
    assert stored[OTHER_ACCOUNT] == after.balance_cents
