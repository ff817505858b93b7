"""``python -m bank``: settings from flags and env vars, the ready file (written whole or
not at all, refused when malformed), the operator commands, and the real server process
(it serves, logs no PIN, and exits 0 after SIGTERM with a SHUTDOWN notice)."""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from bank import __main__ as bank_main
from bank.__main__ import (
    STATEMENT_LIMIT_DEFAULT,
    STATEMENT_LIMIT_MAX,
    build_parser,
    log_opened,
    main,
)
from bank.batch_ledger import open_ledger
from bank.config import ServerConfig, from_arguments
from bank.ledger import PinResult, PostResult
from bank.pins import load_or_create_key
from bank.readiness import Ready, read_ready_file, write_ready_file
from bank.server import open_files_needed, raise_open_files_limit
from bank.store import DEMO_ACCOUNTS, PinPolicy, Store, UnknownAccount
from bank.tools import launcher
from tests.helpers import DEMO_ACCOUNT, DEMO_PIN, DESTINATIONS, RECEIVE_TIMEOUT_S, WireClient
from tests.pg import open_store as bank_store
from wire import (
    Balance,
    BalanceReply,
    EntryKind,
    Shutdown,
    Status,
    is_trivial_pin,
    mask_account,
)

ROOT = Path(__file__).resolve().parent.parent
POLICY = PinPolicy(tries_max=3, lockout_ms=15 * 60 * 1000)


def test_flags_override_env_vars_which_override_defaults(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BANK_PORT", "7000")
    monkeypatch.setenv("BANK_IDLE_TIMEOUT_S", "45")
    config = from_arguments(build_parser().parse_args(["--idle-timeout-s", "60"]))
    assert (config.port, config.idle_timeout_s) == (7000, 60)
    assert config.login_timeout_s == ServerConfig().login_timeout_s


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--withdrawal-cents-max", "0"], "--withdrawal-cents-max must"),
        (["--pin-lockout-s", "-5"], "--pin-lockout-s must"),
        (["--log-level", "LOUD"], "--log-level must"),
        (["unlock", "AC-12345", "--log-level", "LOUD"], "--log-level must"),
    ],
)
def test_an_impossible_setting_is_refused_naming_its_flag(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
):
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert named in err and "_" not in err and "Traceback" not in err


def test_a_malformed_env_var_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("BANK_PORT", "abc")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 2
    assert "BANK_PORT='abc'" in capsys.readouterr().err


def test_an_unopenable_database_is_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    status = main(["--port", "0", "--db", str(tmp_path / "missing" / "bank.db"),
                   "--key-file", str(tmp_path / "bank.key")])
    assert status == 1
    err = capsys.readouterr().err
    assert "cannot open" in err and "Traceback" not in err


def test_a_port_in_use_is_a_clear_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status = main(["--port", str(port), "--db", str(tmp_path / "bank.db"),
                       "--key-file", str(tmp_path / "bank.key")])
    assert status == 1
    err = capsys.readouterr().err
    assert err == f"bank: cannot serve on 127.0.0.1:{port}: Address already in use\n"
    assert list(tmp_path.iterdir()) == []


def test_an_admin_port_in_use_is_named_in_the_oss_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status = main(["--port", "0", "--admin-port", str(port),
                       "--db", str(tmp_path / "bank.db"), "--key-file", str(tmp_path / "bank.key")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.endswith(f": admin port {port}: Address already in use\n"), err
    assert list(tmp_path.iterdir()) == []


def test_the_ready_file_is_off_unless_the_flag_or_env_var_names_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    assert from_arguments(build_parser().parse_args([])).ready_file is None
    monkeypatch.setenv("BANK_READY_FILE", str(tmp_path / "env.json"))
    assert from_arguments(build_parser().parse_args([])).ready_file == tmp_path / "env.json"
    flags = ["--ready-file", str(tmp_path / "flag.json")]
    assert from_arguments(build_parser().parse_args(flags)).ready_file == tmp_path / "flag.json"


def test_a_ready_file_is_replaced_whole_and_leaves_no_temporary_file(tmp_path: Path):
    path = tmp_path / "bank.ready"
    write_ready_file(path, [("127.0.0.1", 1)])
    write_ready_file(path, [("127.0.0.1", 2), ("::1", 2)])
    assert read_ready_file(path) == Ready(os.getpid(), (("127.0.0.1", 2), ("::1", 2)))
    assert list(tmp_path.iterdir()) == [path]


def test_a_ready_file_that_cannot_be_renamed_into_place_leaves_nothing(tmp_path: Path):
    (tmp_path / "bank.ready").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        write_ready_file(tmp_path / "bank.ready", [("127.0.0.1", 1)])
    assert list(tmp_path.iterdir()) == [tmp_path / "bank.ready"]


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", '{"pid": 1}', '{"pid": "1", "addresses": []}',
     '{"pid": 1, "addresses": [["127.0.0.1"]]}', '{"pid": 1, "addresses": [[1, 2]]}'],
)
def test_a_malformed_ready_file_is_refused(tmp_path: Path, text: str):
    (tmp_path / "bank.ready").write_text(text)
    with pytest.raises(ValueError, match="not a ready file"):
        read_ready_file(tmp_path / "bank.ready")


def test_a_missing_ready_file_means_not_ready_yet(tmp_path: Path):
    assert read_ready_file(tmp_path / "bank.ready") is None


def test_an_unwritable_ready_file_is_a_clear_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ready_file = tmp_path / "missing" / "bank.ready"
    status = main(["--port", "0", "--db", str(tmp_path / "bank.db"),
                   "--key-file", str(tmp_path / "bank.key"), "--ready-file", str(ready_file)])
    assert status == 1
    err = capsys.readouterr().err
    assert f"cannot write the ready file {ready_file}" in err and "Traceback" not in err


def test_an_unusable_key_file_is_named_as_such_not_as_a_listen_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "elsewhere.key").write_bytes(bytes(32))
    (tmp_path / "bank.key").symlink_to(tmp_path / "elsewhere.key")
    status = main(["--port", "0", "--db", str(tmp_path / "bank.db"),
                   "--key-file", str(tmp_path / "bank.key")])
    assert status == 1
    err = capsys.readouterr().err
    assert "cannot use the PIN key" in err and "cannot serve" not in err
    assert "Traceback" not in err


@pytest.fixture
def open_files_limit() -> Iterator[tuple[int, int]]:
    """This process's (soft, hard) open-files limit, put back after the test."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield limits
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_the_open_files_limit_is_raised_to_what_connections_max_needs(open_files_limit):
    soft, hard = open_files_limit
    if soft == resource.RLIM_INFINITY or soft < 300:
        pytest.skip(f"open-files limit {soft} does not leave room for this test")
    lowered = soft - 100  # lowering the soft limit needs no privilege, nor raising it back
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    assert raise_open_files_limit(lowered + 50) == lowered + 50
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (lowered + 50, hard)
    assert raise_open_files_limit(lowered) == lowered + 50  # never lowered


def test_a_server_that_could_not_open_all_its_connections_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], open_files_limit
):
    _, hard = open_files_limit
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    status = main(["--port", "0", "--connections-max", str(hard),
                   "--db", str(tmp_path / "bank.db"), "--key-file", str(tmp_path / "bank.key")])
    assert status == 1
    err = capsys.readouterr().err
    assert f"needs up to {open_files_needed(hard)} open files" in err
    assert f"may open {hard}" in err and "Traceback" not in err
    assert not (tmp_path / "bank.db").exists()  # refused before anything was created


def operator(tmp_path: Path, *args: str, stdin: str = "") -> int:
    """Run an operator command on the bank in ``tmp_path``, made as the server's first
    start makes it if there is none yet."""
    db, key = str(tmp_path / "bank.db"), str(tmp_path / "bank.key")
    if not Path(db).exists():
        Store(db, load_or_create_key(key)).close()
    sys.stdin = io.StringIO(stdin)
    try:
        return main([args[0], "--db", db, "--key-file", key, *args[1:]])
    finally:
        sys.stdin = sys.__stdin__


def open_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "bank.db", (tmp_path / "bank.key").read_bytes())


def test_add_account_reads_the_pin_from_input_not_the_command_line(tmp_path: Path):
    assert operator(tmp_path, "add-account", "xy-00001", "--balance-cents", "1234",
                    stdin="4932\n") == 0
    with open_store(tmp_path) as store:
        assert store.balance("XY-00001") == 12_34
        assert store.verify_pin("XY-00001", "4932", now_ms=0, policy=POLICY) is PinResult.MATCHED


def test_add_account_refuses_a_bad_pin_and_a_duplicate(tmp_path: Path):
    assert operator(tmp_path, "add-account", "XY-00001", stdin="12\n") == 1
    assert operator(tmp_path, "add-account", DEMO_ACCOUNT, stdin="1739\n") == 1


def test_database_flags_may_come_before_or_after_the_command_and_after_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    other, key = tmp_path / "other.db", tmp_path / "other.key"
    Store(other, load_or_create_key(key)).close()
    monkeypatch.setattr(sys, "stdin", io.StringIO("4932\n"))
    before = ["--db", str(other), "--key-file", str(key), "--log-level", "ERROR"]
    assert main([*before, "add-account", "QX-00001", "--balance-cents", "500"]) == 0
    assert main(["--db", "elsewhere.db", "unlock", "QX-00001", *before]) == 0
    assert sorted(path.name for path in tmp_path.glob("*.db")) == ["other.db"]
    with Store(other, key.read_bytes()) as store:
        assert store.balance("QX-00001") == 5_00


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["--port", "7000", "unlock", "AC-12345"], "unlock does not take --port"),
        (["unlock", "AC-12345", "--port", "7000"], "unrecognized arguments: --port"),
        (["--db", "x.db", "tls-init", "tls", "--host", "localhost"],
         "tls-init does not take --db"),
    ],
)
def test_a_command_refuses_the_flags_it_does_not_use(
    argv: list[str], refusal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert refusal in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "typo", "named"),
    [
        (["unlock", DEMO_ACCOUNT], ["--db", "typo.db"], "there is no database typo.db"),
        (["reset-pin", DEMO_ACCOUNT], ["--key-file", "bank.kye"], "no PIN key bank.kye"),
        (["import", "accounts.txt"], ["--db", "typo.db"], "there is no database typo.db"),
    ],
)
def test_an_operator_command_creates_no_database_and_no_key(
    command: list[str], typo: list[str], named: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
):
    monkeypatch.chdir(tmp_path)
    Store("bank.db", load_or_create_key("bank.key")).close()
    Path("accounts.txt").write_text("QX-00001, 1111, 1.00\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("4932\n"))
    before = sorted(tmp_path.iterdir())
    assert main([*command, *typo]) == 1
    assert named in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_an_operator_command_does_not_seed_an_empty_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert operator(tmp_path, "unlock", DEMO_ACCOUNT, "--db", str(empty)) == 1
    assert f"{empty} is not a bank database" in capsys.readouterr().err
    assert empty.stat().st_size == 0


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["import", "/no/such/file"], "cannot read /no/such/file: No such file or directory"),
        (["import", "{tmp}"], "cannot read {tmp}: Is a directory"),
        (["import", "{tmp}/binary"], "cannot read {tmp}/binary: it is not UTF-8 text"),
        (["add-account", "QX-00001", "--balance-cents", "99999999999999999999"],
         "an opening balance is at most $92,233,720,368,547,758.07"),
        (["add-account", "QX-00001", "--balance-cents", "12.34"],
         "--balance-cents takes whole cents, e.g. 2500 for $25.00"),
        (["unlock", DEMO_ACCOUNT, "--db", "{tmp}/binary"], "cannot use the database"),
    ],
)
def test_bad_input_to_an_operator_command_is_a_sentence_not_a_traceback(
    command: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 64)
    command = [part.format(tmp=tmp_path) for part in command]
    assert operator(tmp_path, *command, stdin="4932\n") == 1
    err = capsys.readouterr().err
    assert err.startswith("bank: ") and said.format(tmp=tmp_path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["unlock", "ZZ-00000"], "bank: no account ZZ-00000\n"),
        (["reset-pin", "ZZ-00000"], "bank: no account ZZ-00000\n"),
        (["add-account", DEMO_ACCOUNT],
         f"bank: account {DEMO_ACCOUNT} exists already\n"),
        (["import", "{tmp}/accounts.txt"],
         f"bank: account {DEMO_ACCOUNT} exists already: nothing was imported"
         " from {tmp}/accounts.txt\n"),
    ],
)
def test_a_missing_or_existing_account_is_said_in_a_sentence(
    command: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "accounts.txt").write_text(f"QX-00001, 1111, 1\n{DEMO_ACCOUNT}, 1111, 1\n")
    command = [part.format(tmp=tmp_path) for part in command]
    assert operator(tmp_path, *command, stdin="4932\n") == 1
    assert capsys.readouterr().err == said.format(tmp=tmp_path)
    with open_store(tmp_path) as store, pytest.raises(UnknownAccount):
        store.balance("QX-00001")


def test_reset_pin_and_unlock(tmp_path: Path):
    assert operator(tmp_path, "reset-pin", DEMO_ACCOUNT, stdin="8529\n") == 0
    with open_store(tmp_path) as store:
        for _ in range(3):
            store.verify_pin(DEMO_ACCOUNT, "0000", now_ms=0, policy=POLICY)
        assert store.verify_pin(DEMO_ACCOUNT, "8529", now_ms=0, policy=POLICY) is PinResult.LOCKED
    assert operator(tmp_path, "unlock", DEMO_ACCOUNT) == 0
    with open_store(tmp_path) as store:
        assert store.verify_pin(DEMO_ACCOUNT, "8529", now_ms=0, policy=POLICY) is PinResult.MATCHED


def test_unlock_says_whether_it_lifted_a_lock_or_only_forgot_wrong_pins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    masked = DEMO_ACCOUNT  # the operator typed it: their own terminal shows it whole

    def unlock_after_wrong_pins(count: int) -> str:
        with open_store(tmp_path) as store:
            for _ in range(count):
                store.verify_pin(DEMO_ACCOUNT, "0000", int(time.time() * 1000), POLICY)
        assert operator(tmp_path, "unlock", DEMO_ACCOUNT) == 0
        return capsys.readouterr().out

    operator(tmp_path, "unlock", DEMO_ACCOUNT)  # makes the bank
    capsys.readouterr()
    assert re.fullmatch(rf"{re.escape(masked)} was locked until 20\d\d-.+; unlocked\n",
                        unlock_after_wrong_pins(3))
    forgotten = f"{masked} was not locked; its"
    assert unlock_after_wrong_pins(2) == f"{forgotten} 2 wrong PINs are forgotten\n"
    assert unlock_after_wrong_pins(1) == f"{forgotten} 1 wrong PIN is forgotten\n"
    assert unlock_after_wrong_pins(0) == (
        f"{masked} was not locked and had no wrong PINs; nothing changed\n"
    )


def test_unlock_says_what_it_did_to_a_transfer_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    masked = DEMO_ACCOUNT  # the operator typed it: their own terminal shows it whole
    operator(tmp_path, "unlock", DEMO_ACCOUNT)  # makes the bank
    capsys.readouterr()

    def unlock_after(*, misses: int, wrong_pins: int = 0) -> str:
        now_ms = int(time.time() * 1000)
        with open_store(tmp_path) as store:
            for n in range(misses):
                store.transfer(account=DEMO_ACCOUNT, txn_id=bytes([n + 1]) * 16,
                               to_account="QQ-00000", amount_cents=1, now_ms=now_ms,
                               limit_cents=10**6, policy=DESTINATIONS)
            for _ in range(wrong_pins):
                store.verify_pin(DEMO_ACCOUNT, "0000", now_ms, POLICY)
        assert operator(tmp_path, "unlock", DEMO_ACCOUNT) == 0
        return capsys.readouterr().out

    locked = DESTINATIONS.tries_max
    assert re.fullmatch(
        rf"{re.escape(masked)} had no wrong PINs; its transfers were locked until 20\d\d-.+;"
        r" unlocked\n", unlock_after(misses=locked),
    )
    assert unlock_after(misses=2, wrong_pins=1) == (
        f"{masked} was not locked; its 1 wrong PIN is forgotten;"
        " its 2 transfers to no account are forgotten\n"
    )
    assert re.fullmatch(
        rf"{re.escape(masked)} was locked until 20\d\d-.+; unlocked; its transfers were"
        r" locked until 20\d\d-.+; unlocked\n", unlock_after(misses=locked, wrong_pins=3),
    )
    assert unlock_after(misses=1) == (
        f"{masked} had no wrong PINs; its 1 transfer to no account is forgotten\n"
    )
    with open_store(tmp_path) as store:  # lifted: a transfer goes through
        moved = store.transfer(account=DEMO_ACCOUNT, txn_id=bytes([99]) * 16,
                               to_account="WF-14351", amount_cents=1,
                               now_ms=int(time.time() * 1000), limit_cents=10**6,
                               policy=DESTINATIONS)
    assert moved.result is PostResult.BOOKED


TRIVIAL_SAMPLES = ["0000", "7777", "1234", "6789", "9876", "3210"]


@pytest.mark.parametrize("pin", TRIVIAL_SAMPLES)
def test_add_account_refuses_a_pin_a_customer_could_not_choose(
    pin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert operator(tmp_path, "add-account", "XY-00001", stdin=f"{pin}\n") == 2
    assert capsys.readouterr().err == (
        "bank: a PIN of four equal digits (such as 7777) or four digits in a row (such as"
        " 1234 or 9876) is too easy to guess, and a customer could not choose it; nothing"
        " changed\n"
    )
    with open_store(tmp_path) as store, pytest.raises(UnknownAccount):
        store.balance("XY-00001")


@pytest.mark.parametrize("pin", TRIVIAL_SAMPLES)
def test_reset_pin_refuses_a_pin_a_customer_could_not_choose(
    pin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert operator(tmp_path, "reset-pin", DEMO_ACCOUNT, stdin=f"{pin}\n") == 2
    err = capsys.readouterr().err
    assert err.startswith("bank: a PIN of four equal digits") and err.count("\n") == 1
    with open_store(tmp_path) as store:
        assert store.verify_pin(DEMO_ACCOUNT, pin, now_ms=0, policy=POLICY) is not PinResult.MATCHED
        assert store.verify_pin(DEMO_ACCOUNT, DEMO_PIN, now_ms=0,
                                policy=POLICY) is PinResult.MATCHED


def test_a_trivial_pin_typed_at_the_terminal_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    operator(tmp_path, "unlock", DEMO_ACCOUNT)  # makes the bank
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "1234")
    monkeypatch.setattr(sys, "stdin", _Terminal())
    db, key = str(tmp_path / "bank.db"), str(tmp_path / "bank.key")
    assert main(["reset-pin", DEMO_ACCOUNT, "--db", db, "--key-file", key]) == 2
    assert "too easy to guess" in capsys.readouterr().err


def test_import_keeps_trivial_pins_and_warns_naming_the_accounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("qq-11111, 1111, 1\nqq-22222, 2580, 1\nqq-33333, 4321, 1\n")
    assert operator(tmp_path, "import", str(accounts)) == 0
    out, err = capsys.readouterr()
    assert out == f"imported 3 accounts from {accounts}\n"
    assert err == (
        "bank: WARNING: 2 imported accounts have a PIN too easy to guess, which a customer"
        " could not choose (four equal digits, or four digits in a row): QQ-11111,"
        " QQ-33333; give them new ones with reset-pin\n"
    )
    with open_store(tmp_path) as store:  # kept: their customers know them
        assert store.verify_pin("QQ-11111", "1111", now_ms=0, policy=POLICY) is PinResult.MATCHED


def test_imports_warning_lists_at_most_its_limit_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    accounts = tmp_path / "accounts.txt"
    listed = bank_main.WEAK_PINS_LISTED_MAX
    accounts.write_text("".join(f"QQ-{n:05}, 0000, 1\n" for n in range(listed + 3)))
    assert operator(tmp_path, "import", str(accounts)) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"bank: WARNING: {listed + 3} imported accounts have")
    assert f"QQ-{listed - 1:05} and 3 more; give them new ones" in err
    assert f"QQ-{listed:05}" not in err


def test_imports_warning_of_one_account_says_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("qq-11111, 9876, 1\nqq-22222, 2580, 1\n")
    assert operator(tmp_path, "import", str(accounts)) == 0
    err = capsys.readouterr().err
    assert err.startswith("bank: WARNING: 1 imported account has a PIN too easy to guess")
    assert err.endswith(": QQ-11111; give it a new one with reset-pin\n")


def test_import_without_trivial_pins_warns_of_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("qq-11111, 2580, 1\n")
    assert operator(tmp_path, "import", str(accounts)) == 0
    assert capsys.readouterr().err == ""


def test_which_demo_accounts_have_a_pin_a_customer_could_not_choose():
    """The course's accounts are seeded as they are; this is the one with a trivial PIN
    (the README says so), so a change to the list or the rule is seen here."""
    assert [a for a, pin, _ in DEMO_ACCOUNTS if is_trivial_pin(pin)] == ["ZZ-99999"]


def test_import_of_a_course_accounts_file(tmp_path: Path):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("# course accounts\nqq-11111, 1111, 10.50\n\nqq-22222,2222,0\n")
    assert operator(tmp_path, "import", str(accounts)) == 0
    with open_store(tmp_path) as store:
        assert store.balance("QQ-11111") == 10_50
        assert store.verify_pin("QQ-22222", "2222", now_ms=0, policy=POLICY) is PinResult.MATCHED


async def test_the_server_process_serves_and_exits_cleanly_on_sigterm(
    bank_process: launcher.Server,
):
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        client = await WireClient.connect(bank_process.port)
        await client.hello()
        assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
        assert (await client.request(Balance())).status is Status.APPROVED
        bank_process.process.send_signal(signal.SIGTERM)
        frame = await client.receive()
        assert frame is not None and isinstance(frame.message, Shutdown)
        assert await client.request(Balance()) == BalanceReply(Status.ISSUER_UNAVAILABLE)
        await client.aclose()
        exited = functools.partial(bank_process.process.wait, RECEIVE_TIMEOUT_S)
        assert await trio.to_thread.run_sync(exited) == 0
    text = bank_process.log_path.read_text()
    assert "SIGTERM received" in text and "database closed" in text
    assert DEMO_PIN not in text and DEMO_ACCOUNT not in text  # masked, never a PIN
    assert f"database created: {bank_process.log_path.parent / 'bank.db'}" in text
    assert "demo accounts seeded: AC-***45, WF-***51," in text
    assert "(their PINs are in the README: not for real money)" in text
    assert f"PIN key file created: {bank_process.log_path.parent / 'bank.key'}" in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_ends_the_grace_at_once_and_still_closes_cleanly(
    bank_process: launcher.Server, signum: signal.Signals,
):
    """The operator who cannot wait the grace out (5 s here) signals again: the server
    closes the open connection at once, still closes the database (no -wal file left),
    and exits 0 without a traceback, rather than being killed by the signal."""
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        client = await WireClient.connect(bank_process.port)
        await client.hello()
        assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
        bank_process.process.send_signal(signum)
        frame = await client.receive()
        assert frame is not None and isinstance(frame.message, Shutdown)
        bank_process.process.send_signal(signum)
        exited = functools.partial(bank_process.process.wait, 3.0)  # before the grace ends
        assert await trio.to_thread.run_sync(exited) == 0
        await client.aclose()
    text = bank_process.log_path.read_text()
    assert f"{signum.name} received again" in text and "database closed" in text
    assert "Traceback" not in text
    assert not list(bank_process.log_path.parent.glob("*-wal"))


# -- TLS operator commands and start-up ---------------------------------------------------


def test_tls_init_and_tls_terminal_write_the_files_and_never_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    tls = tmp_path / "tls"
    assert main(["tls-init", str(tls), "--host", "127.0.0.1", "--host", "localhost"]) == 0
    assert main(["tls-terminal", str(tls), "atm-0001"]) == 0
    assert sorted(path.name for path in tls.iterdir()) == [
        "ca.key", "ca.pem", "server.key", "server.pem",
        "terminal-atm-0001.key", "terminal-atm-0001.pem",
    ]
    assert {oct(path.stat().st_mode & 0o777) for path in tls.glob("*.key")} == {"0o600"}
    assert "--tls-cert" in capsys.readouterr().out
    before = (tls / "ca.key").read_bytes()
    assert main(["tls-init", str(tls), "--host", "127.0.0.1"]) == 1
    assert main(["tls-terminal", str(tls), "atm-0001"]) == 1
    assert (tls / "ca.key").read_bytes() == before
    errors = capsys.readouterr().err
    assert errors.count("bank: ") == 2 and "Traceback" not in errors


def test_a_server_with_an_unusable_certificate_says_which_file_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    status = main(["--port", "0", "--db", str(tmp_path / "bank.db"),
                   "--key-file", str(tmp_path / "bank.key"),
                   "--tls-cert", str(tmp_path / "missing.pem"),
                   "--tls-key", str(tmp_path / "missing.key")])
    assert status == 1
    assert "missing.pem" in capsys.readouterr().err
    assert not (tmp_path / "bank.db").exists() and not (tmp_path / "bank.key").exists()


def reader(tmp_path: Path, *args: str) -> int:
    """Run a reading command (no PIN key) on the bank ``operator`` makes in ``tmp_path``."""
    db = tmp_path / "bank.db"
    if not db.exists():
        Store(db, load_or_create_key(tmp_path / "bank.key")).close()
    return main([args[0], "--db", str(db), *args[1:]])


TXN_A, TXN_B = bytes(range(16)), bytes(range(16, 32))


def book_two_entries(tmp_path: Path) -> None:
    """A withdrawal by terminal atm-7, then a deposit by no terminal, on the demo account."""
    with open_store(tmp_path) as store:
        store.post(account=DEMO_ACCOUNT, txn_id=TXN_A, kind=EntryKind.WITHDRAWAL,
                   amount_cents=20_00, now_ms=1_700_000_000_000, limit_cents=10**9,
                   terminal="atm-7")
        store.post(account=DEMO_ACCOUNT, txn_id=TXN_B, kind=EntryKind.DEPOSIT,
                   amount_cents=5_50, now_ms=1_700_000_060_000, limit_cents=10**9)


def test_accounts_lists_every_balance_in_dollars_and_the_locks_in_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reader(tmp_path, "accounts")  # makes the bank
    capsys.readouterr()
    far_future_ms = 4_102_444_800_000  # 2100-01-01 UTC
    with open_store(tmp_path) as store:
        for _ in range(POLICY.tries_max):
            store.verify_pin("WF-14351", "0000", now_ms=far_future_ms, policy=POLICY)
        store.verify_pin("TN-13731", "0000", now_ms=0, policy=POLICY)  # not locked
        for n in range(DESTINATIONS.tries_max):  # KH-10406's transfers, to no account
            store.transfer(account="KH-10406", txn_id=bytes([n + 1]) * 16,
                           to_account="QQ-00000", amount_cents=1, now_ms=far_future_ms,
                           limit_cents=10**6, policy=DESTINATIONS)
    assert reader(tmp_path, "accounts") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "account", "balance", "locked", "until", "(UTC)", "transfers", "locked", "until", "(UTC)"
    ]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert len(rows) == 7
    assert rows["AC-12345"] == ["$1,024.32", "-", "-"]
    assert rows["TN-13731"] == ["$6,462.75", "-", "-"]
    assert rows["WF-14351"] == ["$5,428.22", "2100-01-01", "00:15:00", "-"]
    assert rows["KH-10406"] == ["$15,327.89", "-", "2100-01-01", "00:15:00"]


def test_statement_shows_the_newest_entries_first_with_their_details(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reader(tmp_path, "accounts")
    book_two_entries(tmp_path)
    capsys.readouterr()
    assert reader(tmp_path, "statement", DEMO_ACCOUNT.lower()) == 0
    header, newest, oldest = (line.split() for line in capsys.readouterr().out.splitlines())
    assert header[0] == "entry" and "terminal" in header
    assert newest == ["2", "2023-11-14", "22:14:20", "deposit", "$5.50", "$1,009.82",
                      TXN_B.hex(), "-"]
    assert oldest == ["1", "2023-11-14", "22:13:20", "withdrawal", "$20.00", "$1,004.32",
                      TXN_A.hex(), "atm-7"]
    assert reader(tmp_path, "statement", DEMO_ACCOUNT, "--limit", "1") == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert reader(tmp_path, "statement", "WF-14351") == 0
    assert capsys.readouterr().out == "WF-14351 has no entries\n"
    assert reader(tmp_path, "statement", "QX-00001") == 1
    assert "no account QX-00001" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-1", str(STATEMENT_LIMIT_MAX + 1), "ten"])
def test_a_statement_limit_out_of_bounds_is_a_usage_error(
    limit: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        reader(tmp_path, "statement", DEMO_ACCOUNT, "--limit", limit)
    assert exit_info.value.code == 2
    assert f"1..{STATEMENT_LIMIT_MAX}" in capsys.readouterr().err
    assert STATEMENT_LIMIT_DEFAULT <= STATEMENT_LIMIT_MAX


def test_txn_shows_the_booked_entry_or_exits_3_when_it_moved_no_money(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reader(tmp_path, "accounts")
    book_two_entries(tmp_path)
    capsys.readouterr()
    assert reader(tmp_path, "txn", TXN_A.hex().upper()) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"booked: transaction {TXN_A.hex()}, withdrawal of $20.00,")
    for detail in (f"account {DEMO_ACCOUNT}", "2023-11-14 22:13:20 UTC", "entry 1",
                   "balance after $1,004.32", "terminal atm-7"):
        assert detail in out
    unknown = "ab" * 16
    assert reader(tmp_path, "txn", unknown) == 3
    assert capsys.readouterr().out == f"not booked: transaction {unknown} moved no money\n"


def test_statement_and_txn_show_both_legs_of_a_transfer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reader(tmp_path, "accounts")
    with open_store(tmp_path) as store:
        store.transfer(account=DEMO_ACCOUNT, txn_id=TXN_A, to_account="WF-14351",
                       amount_cents=20_00, now_ms=1_700_000_000_000, limit_cents=10**9,
                       policy=DESTINATIONS)
    capsys.readouterr()
    assert reader(tmp_path, "statement", "WF-14351") == 0
    _, row = (line.split() for line in capsys.readouterr().out.splitlines())
    assert row[3:8] == ["transfer_in", "from", DEMO_ACCOUNT, "$20.00", "$5,448.22"]
    assert reader(tmp_path, "txn", TXN_A.hex()) == 0
    first, source, destination = capsys.readouterr().out.splitlines()
    assert first.startswith(
        f"booked: transaction {TXN_A.hex()}, transfer of $20.00 from {DEMO_ACCOUNT} to WF-14351,"
    )
    assert source == f"  transfer_out: account {DEMO_ACCOUNT}, entry 1, balance after $1,004.32"
    assert destination == "  transfer_in: account WF-14351, entry 2, balance after $5,448.22"


@pytest.mark.parametrize("txn_id", ["ab" * 15, "ab" * 17, "zz" * 16, "0x" + "ab" * 15])
def test_a_malformed_txn_id_is_a_usage_error_naming_the_form(
    txn_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        reader(tmp_path, "txn", txn_id)
    assert exit_info.value.code == 2
    assert "32 hexadecimal digits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["accounts"], ["statement", DEMO_ACCOUNT], ["txn", "ab" * 16]]
)
def test_the_reading_commands_create_nothing_and_change_nothing(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--db", "typo.db"]) == 1
    assert "there is no database typo.db: check --db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    Path("empty.db").touch()
    assert main([*command, "--db", "empty.db"]) == 1
    assert "empty.db is not a bank database" in capsys.readouterr().err
    assert Path("empty.db").stat().st_size == 0
    Store("bank.db", load_or_create_key("bank.key")).close()
    before, files = Path("bank.db").read_bytes(), sorted(tmp_path.iterdir())
    assert main([*command, "--db", "bank.db"]) in (0, 3)
    assert Path("bank.db").read_bytes() == before
    # A read-only connection cannot fold the WAL back and remove it: SQLite may leave an
    # empty one (and its shared-memory index) beside the database, but nothing else.
    assert {path.name for path in tmp_path.iterdir()} - {path.name for path in files} <= {
        "bank.db-wal", "bank.db-shm"
    }
    assert not Path("bank.db-wal").exists() or Path("bank.db-wal").stat().st_size == 0
    with pytest.raises(SystemExit):
        main([*command, "--key-file", "bank.key"])  # a reader needs no PIN key
    assert "unrecognized arguments: --key-file" in capsys.readouterr().err


def test_the_reading_commands_read_while_the_server_holds_the_database_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    reader(tmp_path, "accounts")
    with open_store(tmp_path) as store:  # as the server holds it: WAL, writes uncheckpointed
        store.post(account=DEMO_ACCOUNT, txn_id=TXN_A, kind=EntryKind.DEPOSIT,
                   amount_cents=1_00, now_ms=0, limit_cents=10**9)
        capsys.readouterr()
        assert reader(tmp_path, "txn", TXN_A.hex()) == 0
        assert reader(tmp_path, "accounts") == 0
        out = capsys.readouterr().out
        assert "deposit of $1.00" in out and "$1,025.32" in out
        store.post(account=DEMO_ACCOUNT, txn_id=TXN_B, kind=EntryKind.DEPOSIT,
                   amount_cents=1_00, now_ms=0, limit_cents=10**9)  # the server still writes
        assert store.balance(DEMO_ACCOUNT) == 1_026_32


@pytest.mark.parametrize(
    ("argv", "env", "seeds"),
    [
        ([], {}, True),
        (["--host", "::1"], {}, True),
        (["--no-demo-accounts"], {}, False),
        ([], {"BANK_DEMO_ACCOUNTS": "0"}, False),
        (["--demo-accounts"], {"BANK_DEMO_ACCOUNTS": "0"}, True),
        (["--host", "0.0.0.0", "--insecure-plaintext"], {}, False),
        (["--host", "192.0.2.1", "--insecure-plaintext"], {"BANK_DEMO_ACCOUNTS": "1"}, True),
    ],
)
def test_demo_accounts_are_seeded_only_on_loopback_and_can_be_turned_off(
    argv: list[str], env: dict[str, str], seeds: bool, monkeypatch: pytest.MonkeyPatch
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert from_arguments(build_parser().parse_args(argv)).seeds_demo_accounts is seeds


def start_up_lines(config: ServerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                   ) -> list[str]:
    """What starting ``config``'s server logs about its database and key, and no more."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bank"):
        ledger = trio.run(functools.partial(
            open_ledger, config.db, config.key_file, seed_demo=config.seeds_demo_accounts
        ))
        trio.run(ledger.aclose)
        log_opened(config, ledger.opened)
    return [record.getMessage() for record in caplog.records]


def test_start_up_says_what_it_created_seeded_and_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    db, key = tmp_path / "bank.db", tmp_path / "bank.key"
    config = ServerConfig(db=db, key_file=key)
    first = start_up_lines(config, tmp_path, caplog)
    masked = ", ".join(mask_account(account) for account, _, _ in DEMO_ACCOUNTS)
    assert first == [
        f"database created: {db}",
        f"demo accounts seeded: {masked} (their PINs are in the README: not for real money)",
        f"PIN key file created: {key}",
    ]
    assert start_up_lines(config, tmp_path, caplog) == [
        f"database opened: {db}", f"PIN key file loaded: {key}",
    ]


def test_start_up_says_why_it_seeded_no_demo_accounts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    off = ServerConfig(db=tmp_path / "off.db", key_file=tmp_path / "bank.key",
                       demo_accounts=False)
    assert "no demo accounts seeded (--no-demo-accounts)" in start_up_lines(off, tmp_path, caplog)
    remote = ServerConfig(db=tmp_path / "remote.db", key_file=tmp_path / "bank.key",
                          host="0.0.0.0", insecure_plaintext=True)
    said = start_up_lines(remote, tmp_path, caplog)
    assert "no demo accounts seeded: 0.0.0.0 is not loopback (add accounts with add-account" \
        " or import; --demo-accounts seeds them anyway)" in said
    assert not any("demo accounts seeded:" in line and "AC-" in line for line in said)
    for db in (off.db, remote.db):
        with (
            Store(db, (tmp_path / "bank.key").read_bytes(), create=False) as store,
            pytest.raises(UnknownAccount),
        ):
            store.balance(DEMO_ACCOUNT)


def test_every_operator_command_works_on_either_backend(
    any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """add-account, import, unlock, reset-pin, accounts, statement and txn, each against
    an SQLite file and a PostgreSQL database made as the server's first start makes them."""
    key = tmp_path / "bank.key"
    bank_store(any_db, load_or_create_key(key)).close()

    def run(*args: str, stdin: str = "") -> tuple[int, str]:
        sys.stdin = io.StringIO(stdin)
        try:
            status = main([*args, "--db", any_db])
        finally:
            sys.stdin = sys.__stdin__
        return status, capsys.readouterr().out

    keyed = ("--key-file", str(key))
    assert run("add-account", "XY-00001", "--balance-cents", "1234", *keyed,
               stdin="4932\n") == (0, "added XY-00001 with $12.34\n")
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("qq-11111, 1111, 10.50\nqq-22222, 2222, 0\n")
    assert run("import", str(accounts), *keyed) == (0, f"imported 2 accounts from {accounts}\n")
    with bank_store(any_db, key.read_bytes()) as store:
        for _ in range(POLICY.tries_max):
            store.verify_pin("XY-00001", "0000", now_ms=4_102_444_800_000, policy=POLICY)
        store.post(account="XY-00001", txn_id=TXN_A, kind=EntryKind.WITHDRAWAL,
                   amount_cents=2_34, now_ms=1_700_000_000_000, limit_cents=10**9)
        for n in range(DESTINATIONS.tries_max):
            store.transfer(account="XY-00001", txn_id=bytes([n + 1]) * 16,
                           to_account="QQ-00000", amount_cents=1, now_ms=4_102_444_800_000,
                           limit_cents=10**9, policy=DESTINATIONS)
    status, out = run("accounts")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert status == 0 and len(rows) == 7 + 3
    assert rows["XY-00001"] == ["$10.00", *["2100-01-01", "00:15:00"] * 2]
    assert rows["QQ-11111"] == ["$10.50", "-", "-"]
    status, out = run("unlock", "XY-00001", *keyed)
    assert status == 0 and out.startswith("XY-00001 was locked until 2100-01-01")
    assert "; its transfers were locked until 2100-01-01" in out
    assert run("reset-pin", "XY-00001", *keyed, stdin="5071\n") == (0, "PIN reset for XY-00001\n")
    status, out = run("statement", "XY-00001")
    assert status == 0 and out.splitlines()[1].split()[3:6] == ["withdrawal", "$2.34", "$10.00"]
    status, out = run("txn", TXN_A.hex())
    assert status == 0 and out.startswith(f"booked: transaction {TXN_A.hex()}, withdrawal")
    assert run("txn", TXN_B.hex()) == (3, f"not booked: transaction {TXN_B.hex()} moved no money\n")
    with bank_store(any_db, key.read_bytes()) as store:
        assert store.verify_pin("XY-00001", "5071", now_ms=0, policy=POLICY) is PinResult.MATCHED
        assert store.balance("QQ-11111") == 10_50


class _Terminal(io.StringIO):
    """Standard input that says it is a terminal, so that the PIN is asked with getpass."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command", ["add-account", "reset-pin"])
def test_ctrl_d_at_a_pin_prompt_is_a_sentence_and_changes_nothing(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    def end_of_input(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", end_of_input)
    account = "XY-00001" if command == "add-account" else DEMO_ACCOUNT
    operator(tmp_path, "unlock", DEMO_ACCOUNT)  # makes the bank
    monkeypatch.setattr(sys, "stdin", _Terminal())
    db, key = str(tmp_path / "bank.db"), str(tmp_path / "bank.key")
    assert main([command, account, "--db", db, "--key-file", key]) == 1
    err = capsys.readouterr().err
    assert err == "bank: no PIN given (input ended); nothing changed\n"
    with open_store(tmp_path) as store:
        with pytest.raises(UnknownAccount):
            store.balance("XY-00001")
        assert store.verify_pin(DEMO_ACCOUNT, DEMO_PIN, now_ms=0,
                                policy=POLICY) is PinResult.MATCHED


def test_ctrl_c_at_a_pin_prompt_is_a_sentence_and_status_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
):
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    operator(tmp_path, "unlock", DEMO_ACCOUNT)  # makes the bank
    monkeypatch.setattr("getpass.getpass", interrupted)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    db, key = str(tmp_path / "bank.db"), str(tmp_path / "bank.key")
    assert main(["reset-pin", DEMO_ACCOUNT, "--db", db, "--key-file", key]) == 130
    assert capsys.readouterr().err == "bank: interrupted\n"


def test_sigint_while_the_server_opens_its_database_is_a_sentence_and_status_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
):
    """A PostgreSQL connect that hangs is where an operator presses Ctrl-C; the
    KeyboardInterrupt then comes out of trio.run."""
    async def interrupted_open(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bank.__main__.open_configured_ledger", interrupted_open)
    db, key = str(tmp_path / "bank.db"), str(tmp_path / "bank.key")
    assert main(["--db", db, "--key-file", key, "--port", "0"]) == 130
    assert capsys.readouterr().err.endswith("bank: interrupted\n")


@pytest.mark.parametrize("command", ["add-account", "unlock", "accounts"])
def test_an_operator_commands_help_does_not_promise_to_create_the_database(
    command: str, capsys: pytest.CaptureFixture[str]
):
    """Operator commands never create the database or the key (a mistyped path is an
    error, not a new bank); their --help must not borrow the server's words."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "created and seeded if missing" not in shown
    assert "creates it" not in shown
    assert "which the server made on its first start (never created here)" in shown
