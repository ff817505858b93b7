"""What several test modules share: the demo accounts, a wire-level test client, and a
bank server started in the test's nursery. Fixtures live in conftest.py; test modules
import helpers from here, never from each other."""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import trio

from bank.config import ServerConfig
from bank.server import BankServer
from bank.sqlite_ledger import SqliteLedger
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
