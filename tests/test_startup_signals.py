"""A SIGTERM while the bank starts up (here: while it connects to PostgreSQL, creating
the schema) ends it as a SIGTERM while serving does: a sentence in the log, the database
closed and whole, exit status 0; no traceback, no death by signal.

The moment is found without sleeping: the bank's --db points at a gate in this test,
which relays to the throwaway PostgreSQL cluster; the bank's first connection to it is
the event, and the signal goes out before a byte is relayed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio
from psycopg.conninfo import make_conninfo

from bank.store import DEMO_ACCOUNTS
from tests.pg import Cluster

PROCESS_TIMEOUT_S = 60
ROOT = Path(__file__).resolve().parent.parent


async def relay(client: trio.SocketStream, host: str, port: int) -> None:
    """Copy bytes both ways between ``client`` and PostgreSQL until either side ends."""
    async with await trio.open_tcp_stream(host, port) as server, client:

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)


async def test_sigterm_while_starting_up_is_a_clean_stop(
    pg_db: str, pg_cluster: Cluster, tmp_path: Path
):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    gate_port = listener.socket.getsockname()[1]
    via_gate = make_conninfo(pg_db, host="127.0.0.1", port=str(gate_port))
    key = tmp_path / "bank.key"
    command = [sys.executable, "-m", "bank", "--db", via_gate, "--key-file", str(key),
               "--port", "0"]
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bank = await trio.lowlevel.open_process(
                command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            first = await listener.accept()  # the bank is starting: connecting
            bank.send_signal(signal.SIGTERM)
            nursery.start_soon(relay, first, "127.0.0.1", pg_cluster.port)

            async def relay_the_rest() -> None:
                while True:
                    nursery.start_soon(relay, await listener.accept(), "127.0.0.1",
                                       pg_cluster.port)

            nursery.start_soon(relay_the_rest)
            assert bank.stderr is not None
            err = b""
            while chunk := await bank.stderr.receive_some(65536):
                err += chunk
            status = await bank.wait()
            nursery.cancel_scope.cancel()
    await listener.aclose()
    log = err.decode()
    assert status == 0, log
    assert "SIGTERM received while starting up: stopping before serving" in log
    assert log.rstrip().endswith("database closed")
    assert "Traceback" not in log and "listening" not in log.lower()
    # Nothing half-created: the schema and the demo accounts are whole, for the next start.
    with trio.fail_after(PROCESS_TIMEOUT_S):
        accounts = await trio.run_process(
            [sys.executable, "-m", "bank", "accounts", "--db", pg_db], cwd=ROOT,
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert accounts.returncode == 0, accounts.stderr
    assert len(accounts.stdout.splitlines()) == 1 + len(DEMO_ACCOUNTS)
    assert key.stat().st_size == 32
