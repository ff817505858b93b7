"""``python -m bank.tools.floor``: the floor under the bank, for ``python -m bank.bench --floor``.

A server that speaks the whole protocol engine the bank speaks and does none of the
bank's work: it is what any server built on trio and ``wire.Connection`` pays per
request before it does anything for the customer. One trio task per connection, reading
and writing through ``bank.transport.SocketTransport`` as the bank and the bench's echo
server do; each request decoded, checked against the state table and answered through
``wire.Connection``; balances in a dict. No PIN check (any LOGIN is approved), no lease,
no ledger, no database, no fsync: **it keeps nothing and must never serve customers.**

The bench's three servers then split the bank's cost per request in two: echo to floor
is the protocol engine (decode, state, encode, the messages' dataclasses), floor to bank
is the banking (sessions, leases, the ledger's batches, SQLite and its COMMIT, metrics).
A target that asks the bank to come within some factor of echo can be no tighter than
what the floor reaches. ``--codec-only`` drops the engine's state layer too (the frames
are only decoded and encoded, with ``wire._codec``), to split the engine's share again.

It listens on loopback only, like every load target of the bench.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import sys
import time
from pathlib import Path

import trio

from bank.config import ServerConfig
from bank.readiness import listening_addresses, write_ready_file
from bank.tools.bench import OPENING_CENTS  # each account's balance at its first LOGIN
from bank.transport import SocketTransport
from wire import (
    HISTORY_ENTRIES_MAX,
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    EntryKind,
    Features,
    FeaturesReply,
    History,
    HistoryEntry,
    HistoryReply,
    Login,
    LoginReply,
    Logout,
    LogoutReply,
    Message,
    Ping,
    PingReply,
    RemoteProtocolError,
    Reply,
    Request,
    Sender,
    Status,
    Withdraw,
    WithdrawReply,
    reply_type,
)
from wire import Connection as Engine
from wire._codec import Decoder, encode


class Floor:
    """The floor's one piece of state: balances and the newest entries, per account."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.entries: dict[str, collections.deque[HistoryEntry]] = {}
        self._entry_ids = itertools.count(1)

    def answer(self, account: str | None, request: Request) -> tuple[str | None, Reply]:
        """The session's account after ``request``, and the reply to it (most frequent
        first: the bench's mix is mostly BALANCE, DEPOSIT and WITHDRAW)."""
        if isinstance(request, Balance) and account is not None:
            return account, BalanceReply(Status.APPROVED, self.balances[account])
        if isinstance(request, Deposit | Withdraw) and account is not None:
            return account, self._post(account, request)
        if isinstance(request, Login):
            account = request.account.upper()
            self.balances.setdefault(account, OPENING_CENTS)
            self.entries.setdefault(account, collections.deque(maxlen=HISTORY_ENTRIES_MAX))
            return account, LoginReply(Status.APPROVED)
        if isinstance(request, History) and account is not None:
            newest = list(self.entries[account])[::-1][: request.count]
            return account, HistoryReply(Status.APPROVED, tuple(newest))
        if isinstance(request, Logout):
            return None, LogoutReply(Status.APPROVED)
        if isinstance(request, Features):
            return account, FeaturesReply(Status.APPROVED, 0)
        if isinstance(request, Ping):
            return account, PingReply(Status.APPROVED)
        raise ValueError(f"the floor does not serve {request.OPCODE.name}")

    def _post(self, account: str, request: Deposit | Withdraw) -> Reply:
        balance, amount = self.balances[account], request.amount_cents
        reply = DepositReply if type(request) is Deposit else WithdrawReply
        if reply is WithdrawReply:
            if amount > balance:
                return WithdrawReply(Status.INSUFFICIENT_FUNDS)
            balance -= amount
        else:
            balance += amount
        self.balances[account] = balance
        entry_id, time_ms = next(self._entry_ids), time.time_ns() // 1_000_000
        kind = EntryKind.DEPOSIT if reply is DepositReply else EntryKind.WITHDRAWAL
        self.entries[account].append(HistoryEntry(entry_id, time_ms, kind, amount, balance))
        return reply(Status.APPROVED, balance, entry_id, time_ms)


async def engine_connection(floor: Floor, stream: trio.SocketStream) -> None:
    """One connection through ``wire.Connection``, as the bank's: HELLO, then each request
    the state table lets through answered by ``floor``, refusals by the table."""
    transport, engine = SocketTransport(stream), Engine(Sender.SERVER)
    account: str | None = None
    try:
        await transport.send_all(engine.send(ServerConfig().hello()))
        while True:
            while (frame := engine.next_event()) is None:
                data = await transport.receive_some()
                if not data:
                    return
                engine.receive_data(data)
            request = frame.message
            assert isinstance(request, Request), "a server's engine yields only requests"
            refused = engine.refusal(request)
            reply: Message
            if refused is not None:
                reply = reply_type(request)(refused)
            else:
                account, reply = floor.answer(account, request)
            await transport.send_all(engine.send(reply))
            if type(request) is Logout:
                return
    except RemoteProtocolError as error:
        await transport.send_all(engine.send_error(error))
    except Exception:  # one bad connection must not end the floor; the bench sees it
        pass
    finally:
        await transport.aclose()


async def codec_connection(floor: Floor, stream: trio.SocketStream) -> None:
    """One connection with the frames only decoded and encoded: no state table, no check
    that a reply answers its request; a frame the decoder refuses ends the connection."""
    transport, decoder = SocketTransport(stream), Decoder(Sender.CLIENT)
    account: str | None = None
    try:
        await transport.send_all(encode(ServerConfig().hello(), 0))
        while True:
            while (frame := decoder.next_frame()) is None:
                data = await transport.receive_some()
                if not data:
                    return
                decoder.receive_data(data)
            request = frame.message
            assert isinstance(request, Request), "a client's frames are requests"
            account, reply = floor.answer(account, request)
            await transport.send_all(encode(reply, frame.request_id))
            if type(request) is Logout:
                return
    except Exception:  # as above
        pass
    finally:
        await transport.aclose()


async def serve(host: str, port: int, ready_file: Path | None, *, codec_only: bool) -> None:
    floor = Floor()
    handler = codec_connection if codec_only else engine_connection
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, functools.partial(handler, floor), port, host=host)
        )
        if ready_file is not None:
            write_ready_file(ready_file, listening_addresses(listeners))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bank.tools.floor",
        description="A floor for the bench: the protocol engine without the bank (keeps "
        "nothing; never for customers). Serves until killed.",
    )
    parser.add_argument("--host", choices=["127.0.0.1", "::1"], default="127.0.0.1",
                        help="loopback address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port (%(default)s: any free one)")
    parser.add_argument("--ready-file", type=Path, help="where to say it is listening")
    parser.add_argument("--codec-only", action="store_true",
                        help="decode and encode frames only, without the engine's state table")
    args = parser.parse_args(argv)
    trio.run(functools.partial(serve, codec_only=args.codec_only),
             args.host, args.port, args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
