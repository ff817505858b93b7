"""The operator log: what each level shows, and what it never shows.

INFO is one line per session event and per transaction: the transaction id an ATM tells
its customer to quote, and the entry it was booked as, but never a balance (the log is
not a statement). WARNING is hostile input and refusals; DEBUG adds every frame.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import logging
import signal
import time
from pathlib import Path

import pytest
import trio

from bank.__main__ import build_parser, log_handler
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig, from_arguments
from bank.ledger import PinResult
from bank.tools import launcher
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    RECEIVE_TIMEOUT_S,
    RunningServer,
    WireClient,
    bank_process_args,
    logged_in,
    settle,
    txn_id,
)
from wire import Deposit, DepositReply, Logout, Status, Withdraw, WithdrawReply, format_cents


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


async def test_a_declined_withdrawal_logs_no_balance_and_its_transaction_id(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await logged_in(bank)
    first = await client.request(Withdraw(txn_id(), 1000_00))
    assert first.status is Status.APPROVED
    txn = txn_id()
    reply = await client.request(Withdraw(txn, 700_00))
    assert isinstance(reply, WithdrawReply) and reply.status is Status.INSUFFICIENT_FUNDS
    _, line = lines(caplog, "WITHDRAW")
    assert line.endswith(f"AC-***45 WITHDRAW $700.00 INSUFFICIENT_FUNDS txn {txn.hex()}")
    assert "entry" not in line
    left = format_cents(DEMO_BALANCE_CENTS - 1000_00)
    assert "balance" not in caplog.text and "$0.00" not in caplog.text
    assert left not in caplog.text
    await client.aclose()


async def test_a_booked_deposit_logs_its_transaction_id_and_entry_but_no_balance(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await logged_in(bank)
    txn = txn_id()
    reply = await client.request(Deposit(txn, 12_34))
    assert isinstance(reply, DepositReply) and reply.status is Status.APPROVED
    (line,) = lines(caplog, "DEPOSIT")
    assert line.endswith(f"DEPOSIT $12.34 APPROVED txn {txn.hex()} entry {reply.entry_id}")
    text = caplog.text
    assert format_cents(reply.balance_cents) not in text and "balance" not in text
    await client.aclose()


async def test_a_replayed_deposit_is_logged_as_replayed(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await logged_in(bank)
    txn = txn_id()
    first = await client.request(Deposit(txn, 5_00))
    again = await client.request(Deposit(txn, 5_00))
    assert first == again
    assert isinstance(first, DepositReply)
    booked, replayed = lines(caplog, "DEPOSIT")
    assert "replayed" not in booked
    assert replayed.endswith(
        f"DEPOSIT $5.00 APPROVED (replayed) txn {txn.hex()} entry {first.entry_id}"
    )
    assert await client.request(Logout())
    await client.aclose()


async def test_info_has_one_line_per_session_event_and_debug_adds_the_frames(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="bank")
    client = await logged_in(bank)
    txn = txn_id()
    deposit = await client.request(Deposit(txn, 1_00))
    assert isinstance(deposit, DepositReply)
    assert await client.request(Logout())
    assert await client.closed()
    await client.aclose()
    await settle()
    info = [
        r.getMessage().split(": ", 1)[1] for r in caplog.records
        if r.levelno == logging.INFO and r.getMessage().startswith("conn 1 ")
    ]
    assert info == [
        "connected",
        "login AC-***45 APPROVED",
        f"AC-***45 DEPOSIT $1.00 APPROVED txn {txn.hex()} entry {deposit.entry_id}",
        "logout AC-***45",
        "closed",
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(line.endswith(": LOGIN -> LOGIN_REPLY APPROVED") for line in debug)
    assert any(line.endswith(": DEPOSIT -> DEPOSIT_REPLY APPROVED") for line in debug)
    assert DEMO_PIN not in caplog.text


async def test_a_bad_frame_is_a_warning_and_the_close_says_why(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await bank.client()
    await client.send_raw(b"\xff" * 64)
    while await client.receive() is not None:
        pass
    await client.aclose()
    await settle()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("bad frames from 127.0.0.1: ")
    assert [line for line in lines(caplog, "conn 1 ") if ": closed" in line]


async def test_the_shutdown_line_counts_one_connection_in_the_singular(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await logged_in(bank)
    bank.server.shutdown()
    await settle()
    assert "shutting down: 1 connection gets 10 s" in caplog.messages
    await client.aclose()


def test_the_json_format_is_one_object_per_line_even_for_a_traceback():
    stream = io.StringIO()
    logger = logging.getLogger("bank.test-json")
    logger.propagate = False
    logger.addHandler(log_handler("json", stream))
    try:
        logger.warning("two\nlines from %s", "127.0.0.1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first.keys() == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == (
        "WARNING", "bank.test-json", "two\nlines from 127.0.0.1"
    )
    assert datetime.datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "RuntimeError: boom" in second["exception"]


def test_the_log_format_is_text_by_default_json_by_flag_or_env_var_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
):
    assert from_arguments(build_parser().parse_args([])).log_format == "text"
    assert from_arguments(build_parser().parse_args(["--log-format", "json"])).log_format == "json"
    monkeypatch.setenv("BANK_LOG_FORMAT", "json")
    assert from_arguments(build_parser().parse_args([])).log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="xml")


async def test_a_server_logging_json_writes_nothing_but_json_lines(tmp_path: Path):
    server = launcher.start(
        bank_process_args(tmp_path), workdir=tmp_path, env={"BANK_LOG_FORMAT": "json"}
    )
    with server:
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            client = await WireClient.connect(server.port)
            await client.hello()
            assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
            await client.aclose()
            server.process.send_signal(signal.SIGTERM)
            exited = functools.partial(server.process.wait, RECEIVE_TIMEOUT_S)
            assert await trio.to_thread.run_sync(exited) == 0
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    messages = [entry["message"] for entry in entries]
    assert any(message.endswith(": login AC-***45 APPROVED") for message in messages)
    assert messages[-1] == "database closed"


async def test_a_login_to_no_such_account_is_logged_as_such_but_answered_alike(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await bank.client()
    assert await client.login("ZZ-00000", DEMO_PIN) is Status.INCORRECT_PIN
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    await client.aclose()
    logins = [line.split(": ", 1)[1] for line in lines(caplog, ": login ")]
    assert logins == [
        "login ZZ-***00 INCORRECT_PIN (no such account)", "login AC-***45 INCORRECT_PIN",
    ]


async def test_a_lockout_is_a_warning_that_says_until_when(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await bank.client()
    before_ms = time.time_ns() // 1_000_000
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.INCORRECT_PIN
    assert await client.login(DEMO_ACCOUNT, "0000") is Status.PIN_TRIES_EXCEEDED
    await client.aclose()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert ": login AC-***45 PIN_TRIES_EXCEEDED: locked until " in message
    until = datetime.datetime.strptime(
        message.rsplit("locked until ", 1)[1], "%Y-%m-%d %H:%M:%S UTC"
    ).replace(tzinfo=datetime.UTC)
    expected_s = before_ms / 1000 + ServerConfig().pin_lockout_s
    assert abs(until.timestamp() - expected_s) < 5


async def test_the_ledger_tells_an_unknown_account_even_once_it_is_locked(ledger: BatchLedger):
    verdicts = [await ledger.verify_pin("ZZ-00000", "0000") for _ in range(4)]
    assert [v.result for v in verdicts] == [PinResult.WRONG] * 2 + [PinResult.LOCKED] * 2
    assert not any(v.account_known for v in verdicts)
    assert verdicts[2].locked_until_ms == verdicts[3].locked_until_ms is not None
    assert (await ledger.verify_pin(DEMO_ACCOUNT, DEMO_PIN)).account_known
