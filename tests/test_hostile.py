"""A hostile-client battery against a running bank server over loopback TCP.

Every case attacks the server (random bytes, oversized or corrupted frames, slowloris,
floods of connections, wrong PINs, requests out of state, hostile amounts, replayed
transaction ids, pipelining, resets, a client that never reads) and then checks that
the bank is unharmed: a legitimate ATM session (login, deposit, withdraw, balance,
logout) succeeds, no lease is left behind, every connection is gone and the books
balance. ``tests/test_server.py`` covers each feature once; this module pushes on the
same places harder, so it reuses that module's helpers rather than its cases.

Waiting is event-driven: ``settle`` lets the server finish what it can (worker threads
included) before a check, and timeouts run on ``mock_clock`` with explicit jumps, as in
``tests/test_server.py``. Random inputs come from fixed seeds.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct

import pytest
import trio
import trio.testing

from bank import pins, store
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.store import DEMO_ACCOUNTS
from bank.transport import CLOSE_LINGER_S
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RunningServer,
    WireClient,
    frames_until_closed,
    legit_session,
    logged_in,
    settle,
    start_server,
    txn_id,
)
from wire import (
    AMOUNT_CENTS_MAX,
    MESSAGE_TYPES,
    PAYLOAD_BYTES_MAX,
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    Error,
    Hello,
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
    Request,
    SessionExpired,
    Shutdown,
    Status,
    Withdraw,
    WithdrawReply,
    encode,
)
from wire._codec import frame_bytes
from wire._kinds import KIND_OF_REQUEST
from wire._layout import FAST_HEADER
from wire._limits import MAGIC, PROTOCOL_VERSION

UNKNOWN_ACCOUNT = "QQ-00000"
WRONG_PIN = "0000"

async def assert_unharmed(
    bank: RunningServer,
    ledger: BatchLedger,
    account: str = DEMO_ACCOUNT,
    pin: str = DEMO_PIN,
) -> None:
    """The end of every case: served, no lease stuck, no connection left, books balance.

    Call it after every attacker's stream is closed.
    """
    await legit_session(bank, account, pin)
    await settle()
    assert bank.server.leases.held() == frozenset()
    assert bank.server.connection_count == 0
    assert await ledger.check_invariants() == []


def reset_on_close(client: WireClient) -> None:
    """SO_LINGER 0: closing the socket sends RST instead of FIN."""
    client.stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )


def money_payload(amount_cents: int, key: bytes | None = None) -> bytes:
    """A DEPOSIT/WITHDRAW payload with any u64, which ``Deposit`` itself would refuse."""
    return (key or txn_id()) + amount_cents.to_bytes(8, "big")


# -- Bytes that are not frames ----------------------------------------------------------


async def test_random_bytes_get_at_most_one_error_and_a_close(
    bank: RunningServer, ledger: BatchLedger
):
    sizes = (1, 2, 3, 9, 10, 11, 64, PAYLOAD_BYTES_MAX + 14, 5000)
    for seed in range(3):
        rng = random.Random(seed)
        for size in sizes:
            for prefix in (b"", MAGIC + bytes([PROTOCOL_VERSION])):  # noise, or a header of it
                attacker = await bank.client()
                await attacker.send_raw(prefix + rng.randbytes(size))
                await attacker.stream.send_eof()  # a frame left incomplete ends here
                frames = await frames_until_closed(attacker)
                assert len(frames) <= 1, frames
                for frame in frames:
                    assert isinstance(frame.message, Error)
                    assert frame.message.status in {
                        Status.FORMAT_ERROR, Status.UNSUPPORTED_VERSION
                    }
                await attacker.aclose()
    await assert_unharmed(bank, ledger)


async def test_an_oversized_length_is_refused_from_the_header_alone(
    bank: RunningServer, ledger: BatchLedger
):
    for length in (PAYLOAD_BYTES_MAX + 1, 2**16 - 1):
        for opcode in (Deposit.OPCODE, Login.OPCODE, 0x3E):
            attacker = await logged_in(bank)
            header = FAST_HEADER.pack((MAGIC, PROTOCOL_VERSION, opcode, 4242, length))
            await attacker.send_raw(header)  # the payload is never sent
            frames = await frames_until_closed(attacker)
            assert [(f.request_id, f.message) for f in frames] == [
                (4242, Error(Status.FORMAT_ERROR))
            ]
            await attacker.aclose()
            await settle()
            assert bank.server.leases.held() == frozenset()
    await assert_unharmed(bank, ledger)


async def test_every_single_bit_flip_in_a_deposit_is_refused_and_moves_nothing(
    bank: RunningServer, ledger: BatchLedger
):
    """CRC-32 catches every one-bit error: wherever it lands, no money moves."""
    good = encode(Deposit(txn_id(), 100_00), 31)
    rng = random.Random(7)
    for position in range(len(good)):
        corrupt = bytearray(good)
        corrupt[position] ^= 1 << rng.randrange(8)
        attacker = await logged_in(bank)
        await attacker.send_raw(bytes(corrupt))
        # A flip that makes the length larger leaves the server waiting for more bytes.
        await attacker.stream.send_eof()
        frames = await frames_until_closed(attacker)
        assert len(frames) <= 1, (position, frames)
        for frame in frames:
            assert frame.message in {
                Error(Status.FORMAT_ERROR), Error(Status.UNSUPPORTED_VERSION)
            }, (position, frame)
        await attacker.aclose()
        await settle()
        assert bank.server.leases.held() == frozenset()
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    await assert_unharmed(bank, ledger)


async def test_an_unsupported_version_is_refused_at_its_third_byte(
    bank: RunningServer, ledger: BatchLedger
):
    for version in (0, PROTOCOL_VERSION + 1, 0x7F, 0xFF):
        attacker = await logged_in(bank)
        await attacker.send_raw(MAGIC + bytes([version]))  # not even a header
        frames = await frames_until_closed(attacker)
        assert [(f.request_id, f.message) for f in frames] == [
            (0, Error(Status.UNSUPPORTED_VERSION))
        ]
        await attacker.aclose()
    await assert_unharmed(bank, ledger)


async def test_every_opcode_a_client_may_not_send_is_answered_and_the_session_goes_on(
    bank: RunningServer, ledger: BatchLedger
):
    client_opcodes = {op for op, cls in MESSAGE_TYPES.items() if issubclass(cls, Request)}
    foreign = [op for op in range(256) if op not in client_opcodes]
    client = await logged_in(bank)
    await client.send_raw(
        b"".join(frame_bytes(op, 1000 + op, b"") for op in foreign) + encode(Balance(), 1)
    )
    for op in foreign:
        frame = await client.receive()
        assert frame is not None
        assert (frame.request_id, frame.message) == (1000 + op, Error(Status.INVALID_TRANSACTION))
    frame = await client.receive()
    assert frame is not None
    assert frame.message == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    await client.aclose()
    await assert_unharmed(bank, ledger)


async def test_server_messages_sent_by_a_client_are_refused_and_grant_nothing(
    bank: RunningServer, ledger: BatchLedger
):
    """Well-formed replies and notices from a client: no forged login, no forged money."""
    rich = 10**12
    forged: list[tuple[Message, int]] = [
        (LoginReply(Status.APPROVED), 11),
        (BalanceReply(Status.APPROVED, rich), 12),
        (DepositReply(Status.APPROVED, rich, 1, 1), 13),
        (WithdrawReply(Status.APPROVED, 0, 1, 1), 14),
        (HistoryReply(Status.APPROVED, (HistoryEntry(1, 1, 1, 5, rich),)), 15),
        (LogoutReply(Status.APPROVED), 16),
        (PingReply(Status.APPROVED), 17),
        (Hello(PAYLOAD_BYTES_MAX, 20, AMOUNT_CENTS_MAX, 1, 1, 1), 0),
        (Shutdown(0), 0),
        (SessionExpired(), 0),
        (Error(Status.SERVER_BUSY), 18),
    ]
    attacker = await bank.client()
    await attacker.send_raw(b"".join(encode(m, rid) for m, rid in forged))
    for _message, request_id in forged:
        frame = await attacker.receive()
        assert frame is not None
        assert (frame.request_id, frame.message) == (request_id, Error(Status.INVALID_TRANSACTION))
    assert (await attacker.request(Balance())).status is Status.NOT_LOGGED_IN
    assert await attacker.login() is Status.APPROVED
    assert await attacker.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    await attacker.aclose()
    await assert_unharmed(bank, ledger)


# -- State: before login, a second login, leased accounts ------------------------------


async def test_money_requests_before_login_move_nothing_and_consume_no_txn_id(
    bank: RunningServer, ledger: BatchLedger
):
    keys = [txn_id() for _ in range(10)]
    attacker = await bank.client()
    requests: list[Request] = [Deposit(k, 1_00) for k in keys[:5]]
    requests += [Withdraw(k, 1_00) for k in keys[5:]]
    requests += [History(20), Balance()]
    await attacker.send_raw(b"".join(encode(r, i + 1) for i, r in enumerate(requests)))
    for i, _request in enumerate(requests):
        frame = await attacker.receive()
        assert frame is not None and frame.request_id == i + 1
        assert frame.message.status is Status.NOT_LOGGED_IN
    assert await attacker.login() is Status.APPROVED
    assert await attacker.request(History(20)) == HistoryReply(Status.APPROVED, ())
    reply = await attacker.request(Deposit(keys[0], 1_00))  # judged afresh, not a replay
    assert reply.status is Status.APPROVED
    assert reply.balance_cents == DEMO_BALANCE_CENTS + 1_00
    await attacker.aclose()
    await assert_unharmed(bank, ledger)


async def test_logins_on_an_authenticated_connection_are_refused_without_a_pin_check(
    bank: RunningServer, ledger: BatchLedger
):
    client = await logged_in(bank)
    attempts = [Login(DEMO_ACCOUNT, DEMO_PIN), Login(OTHER_ACCOUNT, OTHER_PIN)]
    attempts += [Login(OTHER_ACCOUNT, WRONG_PIN)] * 6  # would lock OTHER if they counted
    await client.send_raw(b"".join(encode(m, i + 1) for i, m in enumerate(attempts)))
    for i, _attempt in enumerate(attempts):
        frame = await client.receive()
        assert frame is not None
        assert (frame.request_id, frame.message) == (i + 1, LoginReply(Status.ALREADY_LOGGED_IN))
    assert bank.server.leases.held() == {DEMO_ACCOUNT}
    assert await client.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    await legit_session(bank, OTHER_ACCOUNT, OTHER_PIN)  # not locked, not leased
    await client.aclose()
    await assert_unharmed(bank, ledger)


async def test_a_leased_account_refuses_intruders_and_exactly_one_contender_wins(
    bank: RunningServer, ledger: BatchLedger
):
    holder = await logged_in(bank)
    intruder = await bank.client()
    assert await intruder.login(DEMO_ACCOUNT, WRONG_PIN) is Status.INCORRECT_PIN
    assert await intruder.login(DEMO_ACCOUNT, DEMO_PIN) is Status.ACCOUNT_IN_USE
    await intruder.aclose()

    async def contend(results: list[Status]) -> None:
        client = await bank.client()
        results.append(await client.login())
        contenders.append(client)

    contenders: list[WireClient] = []
    refused: list[Status] = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(contend, refused)
    assert refused == [Status.ACCOUNT_IN_USE] * 10
    deposit = await holder.request(Deposit(txn_id(), 1_00))
    assert deposit.balance_cents == DEMO_BALANCE_CENTS + 1_00
    for client in contenders:
        await client.aclose()
    contenders.clear()

    assert await holder.request(Logout()) == LogoutReply(Status.APPROVED)
    assert await holder.closed()
    await holder.aclose()
    raced: list[Status] = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(contend, raced)
    assert sorted(raced) == [Status.APPROVED] + [Status.ACCOUNT_IN_USE] * 9
    assert bank.server.leases.held() == {DEMO_ACCOUNT}
    for client in contenders:
        await client.aclose()
    await assert_unharmed(bank, ledger)


# -- PINs -------------------------------------------------------------------------------


async def pin_flood(
    bank: RunningServer, account: str, *, attempts: int, per_connection: int
) -> list[object]:
    """Wrong PINs over as many connections as it takes; statuses and closes, in order."""
    events: list[object] = []
    client = await bank.client()
    for attempt in range(1, attempts + 1):
        events.append(await client.login(account, WRONG_PIN))
        if attempt % per_connection == 0:  # the server closes here
            events.append("closed" if await client.closed() else "open")
            await client.aclose()
            client = await bank.client()
    await client.aclose()
    return events


async def test_a_wrong_pin_flood_locks_alike_for_known_and_unknown_accounts(
    bank: RunningServer, ledger: BatchLedger, config: ServerConfig
):
    assert config.login_attempts_max == 3
    known = await pin_flood(bank, DEMO_ACCOUNT, attempts=12, per_connection=3)
    unknown = await pin_flood(bank, UNKNOWN_ACCOUNT, attempts=12, per_connection=3)
    assert known == unknown  # nothing in the status sequence tells them apart
    locked = Status.PIN_TRIES_EXCEEDED  # the third wrong PIN locks, and says so
    assert known == [Status.INCORRECT_PIN, Status.INCORRECT_PIN, locked, "closed"] + [
        locked, locked, locked, "closed"
    ] * 3
    client = await bank.client()
    assert await client.login(DEMO_ACCOUNT, DEMO_PIN) is Status.PIN_TRIES_EXCEEDED
    assert await client.login(UNKNOWN_ACCOUNT, DEMO_PIN) is Status.PIN_TRIES_EXCEEDED
    await client.aclose()
    await assert_unharmed(bank, ledger, OTHER_ACCOUNT, OTHER_PIN)  # others unaffected


async def test_unknown_account_and_wrong_pin_do_the_same_pin_work(
    bank: RunningServer, ledger: BatchLedger, monkeypatch: pytest.MonkeyPatch
):
    """An unknown account is checked against a dummy PIN value, so it costs the keyed
    HMAC a wrong PIN for a real account costs; skipping it would make unknown accounts
    answer a few microseconds sooner, which tells a prober which accounts exist. A
    stopwatch over loopback cannot see so small a gap, so this counts the HMACs instead:
    every call of ``bank.pins.hash_pin``, by either name the store can reach it."""
    hmac_accounts: list[str] = []
    real_hash_pin = pins.hash_pin

    def counting_hash_pin(key: bytes, salt: bytes, account: str, pin: str) -> bytes:
        hmac_accounts.append(account)
        return real_hash_pin(key, salt, account, pin)

    monkeypatch.setattr(pins, "hash_pin", counting_hash_pin)
    monkeypatch.setattr(store, "hash_pin", counting_hash_pin)
    client = await bank.client()
    observed: dict[str, tuple[Status, int]] = {}
    for account in (DEMO_ACCOUNT, UNKNOWN_ACCOUNT):
        hmac_accounts.clear()
        status = await client.login(account, WRONG_PIN)
        assert set(hmac_accounts) <= {account}
        observed[account] = (status, len(hmac_accounts))
    assert observed[DEMO_ACCOUNT] == (Status.INCORRECT_PIN, 1)  # the counter sees the HMAC
    assert observed[UNKNOWN_ACCOUNT] == observed[DEMO_ACCOUNT], observed
    await client.aclose()
    await assert_unharmed(bank, ledger)


# -- Money ------------------------------------------------------------------------------


async def test_hostile_amounts_are_refused_and_the_session_goes_on(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    amount_cents_max = 1000_00
    bank = await start_server(
        nursery, config, ledger, amount_cents_max=amount_cents_max, withdrawal_cents_max=500_00
    )
    client = await logged_in(bank)
    wire_bad = [0, AMOUNT_CENTS_MAX + 1, 2**63, 2**64 - 100_00, 2**64 - 1]  # 2**64-1 is -1
    frames, expected, request_id = [], [], 100
    for opcode in (Deposit.OPCODE, Withdraw.OPCODE):
        for amount in wire_bad:
            request_id += 1
            frames.append(frame_bytes(opcode, request_id, money_payload(amount)))
            expected.append((request_id, Error(Status.INVALID_AMOUNT)))
    await client.send_raw(b"".join(frames) + encode(Ping(), 1))
    for want in expected:
        frame = await client.receive()
        assert frame is not None and (frame.request_id, frame.message) == want
    assert (await client.receive()).message == PingReply(Status.APPROVED)

    # Within the wire's range but over this server's limits: refused, nothing recorded.
    key = txn_id()
    assert await client.request(Deposit(key, amount_cents_max + 1)) == DepositReply(
        Status.INVALID_AMOUNT
    )
    # The withdrawal limit is never above amount_cents_max, so it is the one a
    # withdrawal over both meets.
    assert await client.request(Withdraw(txn_id(), amount_cents_max + 1)) == WithdrawReply(
        Status.EXCEEDS_WITHDRAWAL_LIMIT
    )
    assert await client.request(History(20)) == HistoryReply(Status.APPROVED, ())
    assert await client.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    reply = await client.request(Deposit(key, 1_00))  # the refused id was not consumed
    assert reply.status is Status.APPROVED
    await client.aclose()
    await assert_unharmed(bank, ledger)


async def test_replays_and_conflicting_txn_ids_move_money_once(
    bank: RunningServer, ledger: BatchLedger
):
    client = await logged_in(bank)
    key = txn_id()
    await client.send_raw(b"".join(encode(Deposit(key, 7_77), i + 1) for i in range(50)))
    replies = [await client.receive() for _ in range(50)]
    assert [f.request_id for f in replies] == list(range(1, 51))
    assert len({f.message for f in replies}) == 1  # one receipt, fifty times
    receipt = replies[0].message
    assert receipt.status is Status.APPROVED
    assert receipt.balance_cents == DEMO_BALANCE_CENTS + 7_77
    assert len((await client.request(History(20))).entries) == 1

    # The same id from another account is a conflict there, whatever it asks for.
    other = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
    other_balance = (await other.request(Balance())).balance_cents
    assert await other.request(Deposit(key, 7_77)) == DepositReply(Status.DUPLICATE_TRANSMISSION)
    assert await other.request(Withdraw(key, 1_00)) == WithdrawReply(
        Status.DUPLICATE_TRANSMISSION
    )
    # A refused withdrawal records nothing: the same id is judged afresh later, and its
    # receipt then stays the original one however the balance moves afterwards.
    late = txn_id()
    too_much = other_balance + 1
    assert await other.request(Withdraw(late, too_much)) == WithdrawReply(
        Status.INSUFFICIENT_FUNDS
    )
    assert (await other.request(Deposit(txn_id(), 10_00))).status is Status.APPROVED
    approved = await other.request(Withdraw(late, too_much))
    assert approved.status is Status.APPROVED
    assert (await other.request(Deposit(txn_id(), 3_00))).status is Status.APPROVED
    assert await other.request(Withdraw(late, too_much)) == approved
    assert await other.request(Balance()) == BalanceReply(
        Status.APPROVED, other_balance + 10_00 - too_much + 3_00
    )
    assert await client.request(Balance()) == BalanceReply(
        Status.APPROVED, DEMO_BALANCE_CENTS + 7_77
    )
    for c in (client, other):
        await c.aclose()
    await assert_unharmed(bank, ledger)


async def test_two_hundred_pipelined_requests_are_answered_in_order(
    bank: RunningServer, ledger: BatchLedger
):
    client = await logged_in(bank)
    requests: list[Request] = []
    for i in range(200):
        requests.append(
            (Deposit(txn_id(), 1_00), Withdraw(txn_id(), 40), Balance(), Ping(), History(5))[i % 5]
        )
    ids = [2**32 - 1 - i * 7919 for i in range(200)]  # large, unordered-looking ids
    await client.send_raw(b"".join(encode(r, i) for r, i in zip(requests, ids, strict=True)))
    balance = DEMO_BALANCE_CENTS
    for request, request_id in zip(requests, ids, strict=True):
        frame = await client.receive()
        assert frame is not None and frame.request_id == request_id
        reply = frame.message
        assert reply.OPCODE == request.OPCODE | 0x80 and reply.status is Status.APPROVED
        if isinstance(request, Deposit | Withdraw):
            balance += KIND_OF_REQUEST[type(request)].balance_change_cents(request.amount_cents)
            assert reply.balance_cents == balance
        elif isinstance(request, Balance):
            assert reply.balance_cents == balance
    await client.aclose()
    await assert_unharmed(bank, ledger)


async def test_frames_pipelined_behind_a_fatal_error_or_a_logout_never_run(
    bank: RunningServer, ledger: BatchLedger
):
    client = await logged_in(bank)
    corrupt = bytearray(encode(Deposit(txn_id(), 1_00), 6))
    corrupt[-1] ^= 0x01
    before = [encode(Deposit(txn_id(), 1_00), i) for i in range(1, 6)]
    after = [encode(Deposit(txn_id(), 1_00), i) for i in range(7, 12)]
    await client.send_raw(b"".join([*before, bytes(corrupt), *after]))
    frames = await frames_until_closed(client)
    assert [f.request_id for f in frames] == [1, 2, 3, 4, 5, 6]
    assert frames[-1].message == Error(Status.FORMAT_ERROR)
    await client.aclose()

    client = await logged_in(bank)
    pipelined = [Deposit(txn_id(), 1_00), Logout(), Deposit(txn_id(), 1_00)]
    await client.send_raw(b"".join(encode(m, i + 1) for i, m in enumerate(pipelined)))
    frames = await frames_until_closed(client)
    assert [type(f.message) for f in frames] == [DepositReply, LogoutReply]
    await client.aclose()
    await settle()
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS + 6_00
    await assert_unharmed(bank, ledger)


# -- Connections: resets, floods, slow and deaf peers -----------------------------------


async def test_resets_mid_frame_release_the_lease_and_move_nothing(
    bank: RunningServer, ledger: BatchLedger
):
    frame = encode(Deposit(txn_id(), 50_00), 3)
    for cut in (0, 1, 2, 3, 9, 10, 11, 20, len(frame) - 4, len(frame) - 1):
        attacker = await logged_in(bank)  # fails if the last reset left the lease held
        await attacker.send_raw(frame[:cut])
        reset_on_close(attacker)
        await attacker.aclose()
        await settle()
        assert bank.server.leases.held() == frozenset()
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    await assert_unharmed(bank, ledger)


async def test_a_reset_after_a_whole_deposit_then_a_retry_moves_money_exactly_once(
    bank: RunningServer, ledger: BatchLedger
):
    key = txn_id()
    attacker = await logged_in(bank)
    await attacker.send_raw(encode(Deposit(key, 25_00), 1))
    reset_on_close(attacker)
    await attacker.aclose()  # the reply, if any, is never read
    await settle()
    assert bank.server.leases.held() == frozenset()
    assert await ledger.balance(DEMO_ACCOUNT) in {DEMO_BALANCE_CENTS, DEMO_BALANCE_CENTS + 25_00}
    retry = await logged_in(bank)
    first = await retry.request(Deposit(key, 25_00))
    assert first.status is Status.APPROVED
    assert first.balance_cents == DEMO_BALANCE_CENTS + 25_00
    assert await retry.request(Deposit(key, 25_00)) == first
    assert await retry.request(Balance()) == BalanceReply(
        Status.APPROVED, DEMO_BALANCE_CENTS + 25_00
    )
    await retry.aclose()
    await assert_unharmed(bank, ledger)


async def test_when_every_slot_is_logged_in_clients_are_told_busy_at_once_and_never_queued(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
):
    bank = await start_server(nursery, config, ledger, connections_max=3)
    served = [await logged_in(bank, account, pin) for account, pin, _ in DEMO_ACCOUNTS[:3]]
    # The served three stay open throughout: a queued client would wait forever here
    # (and fail on the receive timeout) instead of being told at once. Logged-in
    # sessions are never evicted to make room (tests/test_exhaustion.py evicts others).
    for _ in range(8):
        extra = await WireClient.connect(bank.port)
        frames = await frames_until_closed(extra)
        assert [(f.request_id, f.message) for f in frames] == [(0, Error(Status.SERVER_BUSY))]
        await extra.aclose()
    for client in served:
        assert await client.request(Ping()) == PingReply(Status.APPROVED)
    for client in served:
        await client.aclose()
    await settle()
    assert bank.server.connection_count == 0
    await assert_unharmed(bank, ledger)  # the freed slots serve again


SLOWLORIS_CONNECTIONS = 200


async def test_slowloris_connections_are_dropped_at_the_frame_deadline(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, ledger: BatchLedger,
    config: ServerConfig,
):
    # All from 127.0.0.1: the per-address cap (tests/test_exhaustion.py) is lifted here
    # so that every one of them reaches the frame deadline under test.
    bank = await start_server(
        nursery, config, ledger, preauth_per_address_max=SLOWLORIS_CONNECTIONS + 1
    )
    frame = encode(Balance(), 1)
    begun = (frame[:1], frame[:11], frame[:-1])  # one byte, a header and more, all but one
    slow: list[WireClient] = []
    for i in range(SLOWLORIS_CONNECTIONS):
        client = await bank.client(hello=False)
        await client.send_raw(begun[i % len(begun)])
        slow.append(client)
    await settle()
    assert bank.server.connection_count == SLOWLORIS_CONNECTIONS
    await legit_session(bank)  # served normally while they hang
    mock_clock.jump(config.frame_timeout_s - 1)
    await settle()
    assert bank.server.connection_count == SLOWLORIS_CONNECTIONS  # not before the deadline
    mock_clock.jump(1)
    for client in slow:
        frames = await frames_until_closed(client)
        assert [type(f.message) for f in frames] == [Hello, Error]
        assert (frames[1].request_id, frames[1].message) == (0, Error(Status.FORMAT_ERROR))
        await client.aclose()
    await settle()
    assert bank.server.connection_count == 0
    await assert_unharmed(bank, ledger)


DEAF_RECEIVE_BUFFER_BYTES = 4096
DEAF_REQUESTS = 4000
"""History requests a deaf client pipelines: 15 bytes each ask for up to 676 bytes of
reply, far more (about 2.7 MB) than the socket buffers between us can hold."""


async def deaf_client(port: int) -> WireClient:
    """A client with a small receive buffer (set before connecting, so the window is small)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DEAF_RECEIVE_BUFFER_BYTES)
    await sock.connect(("127.0.0.1", port))
    return WireClient(trio.SocketStream(sock))


async def send_ignoring_breakage(client: WireClient, data: bytes, sent: trio.Event) -> None:
    """The deaf client's writer: it stops when the server hangs up on it."""
    with contextlib.suppress(trio.BrokenResourceError):
        await client.send_raw(data)
        sent.set()


async def test_a_client_that_never_reads_is_dropped_without_blocking_others(
    mock_clock: trio.testing.MockClock, bank: RunningServer, ledger: BatchLedger,
    config: ServerConfig,
):
    setup = await logged_in(bank)
    for _ in range(20):  # twenty entries make every HISTORY reply a big one
        assert (await setup.request(Deposit(txn_id(), 1_00))).status is Status.APPROVED
    await setup.aclose()
    await settle()

    deaf = await deaf_client(bank.port)
    await deaf.send_raw(encode(Login(DEMO_ACCOUNT, DEMO_PIN), 1))
    async with trio.open_nursery() as nursery:
        flood = b"".join(encode(History(20), i) for i in range(2, DEAF_REQUESTS + 2))
        sent = trio.Event()
        nursery.start_soon(send_ignoring_breakage, deaf, flood, sent)
        await settle()
        # Every request is in the server's buffers, so the server is not waiting for a
        # frame: it is stuck writing replies that the deaf client never reads.
        assert sent.is_set()
        assert bank.server.leases.held() == {DEMO_ACCOUNT}
        await legit_session(bank, OTHER_ACCOUNT, OTHER_PIN)  # others are served meanwhile
        mock_clock.jump(config.frame_timeout_s)  # the send deadline
        await settle()
        assert bank.server.leases.held() == frozenset()
        mock_clock.jump(CLOSE_LINGER_S)  # the server's bounded drain before closing
        await settle()
        assert bank.server.connection_count == 0
        nursery.cancel_scope.cancel()  # the writer, if still blocked
    await deaf.aclose()
    await assert_unharmed(bank, ledger)
