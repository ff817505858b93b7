"""Fixtures: a bank server on 127.0.0.1 port 0 over a fresh ledger, and a real
``python -m bank`` process started by the tools' launcher. What tests share besides
fixtures (the wire-level test client, the demo accounts) is in helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from bank.batch_ledger import BatchLedger, open_ledger
from bank.config import ServerConfig
from bank.tools import launcher
from tests.helpers import RunningServer, bank_process_args, start_server
from tests.pg import any_db, pg_cluster, pg_db

__all__ = ["any_db", "pg_cluster", "pg_db"]  # fixtures for every test module


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[BatchLedger]:
    ledger = await open_ledger(tmp_path / "bank.db", tmp_path / "bank.key")
    try:
        yield ledger
    finally:
        await ledger.aclose()


@pytest.fixture
async def bank(nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger) -> RunningServer:
    return await start_server(nursery, config, ledger)


@pytest.fixture
def bank_process(tmp_path: Path) -> Iterator[launcher.Server]:
    """A real ``python -m bank`` on a fresh database in tmp_path, stopped after the test."""
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        yield server
