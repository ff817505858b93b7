"""``bank.tools.launcher`` against the real ``python -m bank``: the port comes from the ready
file (the server's own, removed by it on a graceful exit), a stale ready file is not
mistaken for a new server, a server that exits early or is not ready in time is a
LaunchError quoting its log, and stop and kill end the process and its ready file.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import pytest
import trio

from bank.readiness import Ready, read_ready_file, write_ready_file
from bank.tools import launcher
from tests.helpers import DEMO_ACCOUNT, DEMO_PIN, WireClient, bank_process_args
from wire import Status

EXIT_TIMEOUT_S = 30
"""Bound on a server's graceful exit; it takes well under a second when well."""


async def test_the_server_serves_where_its_ready_file_says_and_removes_it_on_exit(
    tmp_path: Path,
):
    start = functools.partial(launcher.start, bank_process_args(tmp_path), workdir=tmp_path)
    server = await trio.to_thread.run_sync(start)  # how Trio code uses the launcher
    with server:
        assert (server.host, server.log_path) == (launcher.LOOPBACK, tmp_path / "bank.log")
        assert read_ready_file(server.ready_path) == Ready(server.pid, (server.address,))
        client = await WireClient.connect(server.port)
        await client.hello()
        assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.APPROVED
        await client.aclose()
        server.process.send_signal(signal.SIGTERM)  # not stop(): the server must clean up
        wait = functools.partial(server.process.wait, EXIT_TIMEOUT_S)
        assert await trio.to_thread.run_sync(wait) == 0
        assert not server.ready_path.exists()


def test_a_stale_ready_file_is_not_taken_for_the_new_server(tmp_path: Path):
    stale = tmp_path / "bank.ready"
    write_ready_file(stale, [(launcher.LOOPBACK, 1)])  # as a killed server leaves it
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        assert server.port != 1
        assert read_ready_file(stale) == Ready(server.pid, (server.address,))


def test_stop_is_graceful_and_kill_is_a_crash(tmp_path: Path):
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        assert server.stop() == 0
    assert "database closed" in server.log_path.read_text()
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        assert server.kill() == -signal.SIGKILL
        assert not server.ready_path.exists()
    assert "database closed" not in server.log_path.read_text()


def test_a_server_too_slow_to_stop_is_killed(tmp_path: Path):
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        assert server.stop(timeout_s=0) == -signal.SIGKILL
        assert not server.ready_path.exists()


def test_a_server_that_exits_before_it_is_ready_is_an_error_quoting_its_log(tmp_path: Path):
    unopenable = ["--db", str(tmp_path / "missing" / "bank.db")]
    with pytest.raises(launcher.LaunchError, match="exited with status 1") as error:
        launcher.start([*unopenable, "--key-file", str(tmp_path / "bank.key")],
                       workdir=tmp_path)
    assert "bank: cannot open" in str(error.value)


def test_a_server_not_ready_in_time_is_an_error_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(launcher.LaunchError, match="not ready after 0 s"):
        launcher.start(bank_process_args(tmp_path), workdir=tmp_path, timeout_s=0)
    assert not (tmp_path / "bank.ready").exists()


def test_env_reaches_the_server_and_the_launchers_flags_win(tmp_path: Path):
    args = ["--db", str(tmp_path / "bank.db"), "--key-file", str(tmp_path / "bank.key")]
    env = {"BANK_LOG_LEVEL": "WARNING", "BANK_PORT": "1", "BANK_HOST": "0.0.0.0"}
    with launcher.start(args, workdir=tmp_path, env=env) as server:
        assert server.address[0] == launcher.LOOPBACK and server.port != 1
        assert server.stop() == 0
    assert "listening on" not in server.log_path.read_text()  # an INFO line
