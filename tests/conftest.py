"""Shared fixtures: a bank server on 127.0.0.1 port 0 over a fresh ledger, a real
``python -m bank`` process started by the tools' launcher, and a client that speaks the
wire protocol directly (no ATM logic), for server-side tests."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from bank.config import ServerConfig
from bank.server import BankServer
from bank.sqlite_ledger import SqliteLedger, open_ledger
from bank.tools import launcher
from wire import Decoder, Frame, Hello, Login, LoginReply, Message, Sender, Status, encode

RECEIVE_TIMEOUT_S = 10
"""Guard against a hung test when the real clock runs; far above any honest wait."""

DEMO_ACCOUNT, DEMO_PIN, DEMO_BALANCE_CENTS = "AC-12345", "1324", 1024_32
OTHER_ACCOUNT, OTHER_PIN = "BC-01373", "2947"


class WireClient:
    """A test peer: sends messages or raw bytes, returns frames as the server sent them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = Decoder(Sender.SERVER)
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, port: int) -> WireClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, message: Message) -> int:
        request_id = next(self._ids)
        await self.stream.send_all(encode(message, request_id))
        return request_id

    async def receive(self) -> Frame | None:
        """The next frame, or None when the server closed the connection."""
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.stream.receive_some(4096)
                if not data:
                    return None
                self.decoder.receive_data(data)
        return frame

    async def request(self, message: Message) -> Message:
        """Send one request and return its reply, checking the request id is echoed."""
        request_id = await self.send(message)
        frame = await self.receive()
        assert frame is not None, f"connection closed instead of answering {message}"
        assert frame.request_id == request_id
        return frame.message

    async def hello(self) -> Hello:
        frame = await self.receive()
        assert frame is not None and isinstance(frame.message, Hello)
        return frame.message

    async def login(self, account: str = DEMO_ACCOUNT, pin: str = DEMO_PIN) -> Status:
        reply = await self.request(Login(account, pin))
        assert isinstance(reply, LoginReply)
        return reply.status

    async def closed(self) -> bool:
        """True once the server has closed the connection (after any frames it sent)."""
        return await self.receive() is None

    async def aclose(self) -> None:
        await self.stream.aclose()


def txn_id() -> bytes:
    return uuid.uuid4().bytes


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    ledger = await open_ledger(tmp_path / "bank.db", tmp_path / "bank.key")
    try:
        yield ledger
    finally:
        await ledger.aclose()


class RunningServer:
    def __init__(self, server: BankServer, port: int) -> None:
        self.server = server
        self.port = port

    async def client(self, *, hello: bool = True) -> WireClient:
        client = await WireClient.connect(self.port)
        if hello:
            await client.hello()
        return client


async def start_server(
    nursery: trio.Nursery, config: ServerConfig, ledger: SqliteLedger, **overrides: object
) -> RunningServer:
    server = BankServer(dataclasses.replace(config, **overrides), ledger)
    listeners = await nursery.start(server.serve)
    return RunningServer(server, listeners[0].socket.getsockname()[1])


@pytest.fixture
async def bank(nursery: trio.Nursery, config: ServerConfig, ledger: SqliteLedger) -> RunningServer:
    return await start_server(nursery, config, ledger)


def bank_process_args(workdir: Path) -> list[str]:
    """Flags for a real server on a fresh database in ``workdir``: bank.db and bank.key."""
    return [
        "--db", str(workdir / "bank.db"), "--key-file", str(workdir / "bank.key"),
        "--log-level", "INFO", "--shutdown-grace-s", "5",
    ]


@pytest.fixture
def bank_process(tmp_path: Path) -> Iterator[launcher.Server]:
    """A real ``python -m bank`` on a fresh database in tmp_path, stopped after the test."""
    with launcher.start(bank_process_args(tmp_path), workdir=tmp_path) as server:
        yield server
