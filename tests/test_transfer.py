"""TRANSFER, CHANGE_PIN and FEATURES served by the real server over TCP (spec §3.16-3.21).

Covers: a transfer into an account another ATM holds, whose next BALANCE shows it; the
source-only receipt; replays across a reconnect; the limits and refusals; the transfer
lock that transfers to no account set (65 to a client that announced FREQUENCY_LIMIT, 61
to one that did not, a replay still answered, a new login not lifting it); the history an
old client (no FEATURES) is shown versus a new one; a PIN change that the next LOGIN
uses, a trivial PIN, a wrong current PIN counting toward the lock; and the log lines.
"""

from __future__ import annotations

import logging

import pytest

from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RunningServer,
    WireClient,
    logged_in,
    txn_id,
)
from wire import (
    ALL_FEATURES,
    Balance,
    BalanceReply,
    ChangePin,
    ChangePinReply,
    Deposit,
    DepositReply,
    EntryKind,
    Feature,
    Features,
    FeaturesReply,
    History,
    HistoryReply,
    Reply,
    Status,
    Transfer,
    TransferReply,
)

OTHER_BALANCE_CENTS = 45_72
WITHDRAWAL_CENTS_MAX = 2_000_00
"""Above the demo balance, so that the balance, not the limit, refuses a transfer of it."""


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, withdrawal_cents_max=WITHDRAWAL_CENTS_MAX)


async def test_a_transfer_reaches_an_account_another_atm_holds(bank: RunningServer):
    source = await logged_in(bank)
    destination = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)  # holds the lease
    reply = await source.request(Transfer(txn_id(), 24_32, OTHER_ACCOUNT.lower()))
    assert isinstance(reply, TransferReply) and reply.status is Status.APPROVED
    assert reply.balance_cents == DEMO_BALANCE_CENTS - 24_32  # the source's, only
    seen = await destination.request(Balance())
    assert isinstance(seen, BalanceReply)
    assert seen.balance_cents == OTHER_BALANCE_CENTS + 24_32


async def test_a_lost_transfer_reply_is_confirmed_by_its_id_on_a_new_connection(
    bank: RunningServer, ledger: BatchLedger
):
    txn = txn_id()
    first = await logged_in(bank)
    original = await first.request(Transfer(txn, 10_00, OTHER_ACCOUNT))
    await first.aclose()  # as if the reply had been lost with the connection
    again = await logged_in(bank)
    retried = await again.request(Transfer(txn, 10_00, OTHER_ACCOUNT))
    assert retried == original
    assert await ledger.balance(OTHER_ACCOUNT) == OTHER_BALANCE_CENTS + 10_00
    reused = await again.request(Transfer(txn, 10_01, OTHER_ACCOUNT))
    assert reused == TransferReply(Status.DUPLICATE_TRANSMISSION)


@pytest.mark.parametrize(
    ("amount_cents", "destination", "status"),
    [
        (1_00, DEMO_ACCOUNT, Status.SAME_ACCOUNT),
        (1_00, "QQ-00000", Status.INVALID_TO_ACCOUNT),
        (DEMO_BALANCE_CENTS + 1, OTHER_ACCOUNT, Status.INSUFFICIENT_FUNDS),
        (DEMO_BALANCE_CENTS + 1, "QQ-00000", Status.INSUFFICIENT_FUNDS),
    ],
)
async def test_refused_transfers_move_nothing(
    bank: RunningServer, ledger: BatchLedger, amount_cents: int, destination: str,
    status: Status,
):
    client = await logged_in(bank)
    reply = await client.request(Transfer(txn_id(), amount_cents, destination))
    assert reply == TransferReply(status)
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS
    assert await ledger.check_invariants() == []


TRIES = ServerConfig().destination_tries_max
"""Transfers to no account that lock (the ``ledger`` fixture opens with the defaults)."""


async def probe(client: WireClient, count: int, destination: str = "QQ-00000") -> list[Reply]:
    """``count`` one-cent transfers to ``destination``: a walk through account numbers."""
    return [await client.request(Transfer(txn_id(), 1, destination)) for _ in range(count)]


async def test_transfers_to_no_account_lock_an_old_clients_transfers_with_a_limit_refusal(
    bank: RunningServer, ledger: BatchLedger, caplog: pytest.LogCaptureFixture
):
    """A client that never announced FREQUENCY_LIMIT cannot decode its status: it is told
    EXCEEDS_WITHDRAWAL_LIMIT, a limit refusal it knows, which settles the transfer."""
    client = await logged_in(bank)
    booked = await client.request(Transfer(txn := txn_id(), 1_00, OTHER_ACCOUNT))
    answers = await probe(client, TRIES)
    assert answers == [TransferReply(Status.INVALID_TO_ACCOUNT)] * (TRIES - 1) + [
        TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)  # the locking miss: told the lock
    ]
    # Locked: a real destination too, before SAME_ACCOUNT; but a replay is still answered.
    for destination in (OTHER_ACCOUNT, DEMO_ACCOUNT, "QQ-00001"):
        assert await probe(client, 1, destination) == [
            TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)
        ]
    assert await client.request(Transfer(txn, 1_00, OTHER_ACCOUNT)) == booked
    assert isinstance(await client.request(Balance()), BalanceReply)  # the session goes on
    await client.aclose()
    again = await logged_in(bank)  # a new login does not lift it
    assert await probe(again, 1, OTHER_ACCOUNT) == [TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)]
    assert await ledger.balance(DEMO_ACCOUNT) == DEMO_BALANCE_CENTS - 1_00
    locks = [r for r in caplog.records if "transfers locked until" in r.getMessage()]
    assert len(locks) == 1 + 3 + 1 and {r.levelno for r in locks} == {logging.WARNING}
    assert locks[0].getMessage().endswith(" UTC")
    assert "AC-***45 TRANSFER $0.01 to QQ-***00 EXCEEDS_WITHDRAWAL_LIMIT" in locks[0].getMessage()
    for secret in (DEMO_ACCOUNT, OTHER_ACCOUNT, "QQ-00000"):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("announced", "locked"),
    [
        (ALL_FEATURES, Status.EXCEEDS_FREQUENCY_LIMIT),
        (Feature.TRANSFER | Feature.CHANGE_PIN, Status.EXCEEDS_WITHDRAWAL_LIMIT),
        (Feature.FREQUENCY_LIMIT, Status.EXCEEDS_FREQUENCY_LIMIT),
    ],
    ids=["FREQUENCY_LIMIT announced", "not announced", "only FREQUENCY_LIMIT"],
)
async def test_a_locked_transfer_is_told_in_the_status_its_client_announced(
    bank: RunningServer, ledger: BatchLedger, announced: Feature, locked: Status
):
    """Status 65 only to a client that said it decodes it (spec §3.16); the same lock, the
    same refusal, in a status every other client knows."""
    client = await logged_in(bank)
    reply = await client.request(Features(int(announced)))
    assert reply == FeaturesReply(Status.APPROVED, int(announced))
    answers = await probe(client, TRIES + 1)
    assert answers == [TransferReply(Status.INVALID_TO_ACCOUNT)] * (TRIES - 1) + [
        TransferReply(locked)
    ] * 2
    assert await probe(client, 1, OTHER_ACCOUNT) == [TransferReply(locked)]
    # Not fatal, not a failed login: the session goes on, and other money moves.
    deposited = await client.request(Deposit(txn_id(), 1_00))
    assert isinstance(deposited, DepositReply) and deposited.status is Status.APPROVED
    assert await ledger.balance(OTHER_ACCOUNT) == OTHER_BALANCE_CENTS
    if Feature.FREQUENCY_LIMIT in announced:  # the last FEATURES counts
        await client.request(Features(int(Feature.TRANSFER)))
        assert await probe(client, 1) == [TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)]


async def test_a_booked_transfer_does_not_reset_the_count_at_the_atm_either(
    bank: RunningServer,
):
    client = await logged_in(bank)
    for _ in range(TRIES - 1):
        assert await probe(client, 1) == [TransferReply(Status.INVALID_TO_ACCOUNT)]
        booked = await client.request(Transfer(txn_id(), 1, OTHER_ACCOUNT))
        assert isinstance(booked, TransferReply) and booked.status is Status.APPROVED
    assert await probe(client, 1) == [TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)]


async def test_the_withdrawal_limit_holds_for_transfers(bank: RunningServer):
    client = await logged_in(bank)
    over = await client.request(Transfer(txn_id(), WITHDRAWAL_CENTS_MAX + 1, OTHER_ACCOUNT))
    assert over == TransferReply(Status.EXCEEDS_WITHDRAWAL_LIMIT)


async def test_only_a_client_that_announced_transfers_sees_their_entry_kinds(
    bank: RunningServer,
):
    source = await logged_in(bank)
    await source.request(Transfer(txn_id(), 5_00, OTHER_ACCOUNT))
    old = await source.request(History(1))  # never sent FEATURES: an old client
    assert isinstance(old, HistoryReply)
    assert old.entries[0].kind is EntryKind.WITHDRAWAL
    answer = await source.request(Features(int(ALL_FEATURES) | 0x80))  # unknown bit ignored
    assert answer == FeaturesReply(Status.APPROVED, int(ALL_FEATURES))
    new = await source.request(History(1))
    assert isinstance(new, HistoryReply)
    assert new.entries[0].kind is EntryKind.TRANSFER_OUT
    # The same entry either way: only its kind is told in words the client knows.
    assert (new.entries[0][:2], new.entries[0][3:]) == (old.entries[0][:2], old.entries[0][3:])
    destination = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
    await destination.request(Features(int(Feature.TRANSFER)))
    incoming = await destination.request(History(1))
    assert isinstance(incoming, HistoryReply)
    assert incoming.entries[0].kind is EntryKind.TRANSFER_IN
    assert incoming.entries[0].balance_cents == OTHER_BALANCE_CENTS + 5_00


async def test_transfer_and_change_pin_are_served_whatever_the_client_announced(
    bank: RunningServer,
):
    """Spec §3.16: the announced bits decide what the server may send, never which
    requests it answers: without FEATURES, and after FEATURES 0, both are served."""
    silent = await logged_in(bank)  # never sends FEATURES
    moved = await silent.request(Transfer(txn_id(), 1_00, OTHER_ACCOUNT))
    assert isinstance(moved, TransferReply) and moved.status is Status.APPROVED
    assert moved.balance_cents == DEMO_BALANCE_CENTS - 1_00
    assert await silent.request(Features(0)) == FeaturesReply(Status.APPROVED, 0)
    again = await silent.request(Transfer(txn_id(), 1_00, OTHER_ACCOUNT))
    assert isinstance(again, TransferReply) and again.status is Status.APPROVED
    assert await silent.request(ChangePin(DEMO_PIN, "2580")) == ChangePinReply(Status.APPROVED)


async def test_features_before_login_are_kept_for_the_session(bank: RunningServer):
    client = await bank.client()
    assert await client.request(Features(int(Feature.CHANGE_PIN))) == FeaturesReply(
        Status.APPROVED, int(Feature.CHANGE_PIN)
    )
    assert await client.login() is Status.APPROVED
    await client.request(Transfer(txn_id(), 1_00, OTHER_ACCOUNT))
    history = await client.request(History(1))
    assert isinstance(history, HistoryReply)
    assert history.entries[0].kind is EntryKind.WITHDRAWAL  # TRANSFER was not announced


async def test_a_changed_pin_is_the_one_the_next_login_needs(bank: RunningServer):
    client = await logged_in(bank)
    assert await client.request(ChangePin(DEMO_PIN, "2580")) == ChangePinReply(Status.APPROVED)
    assert await client.request(Balance()) is not None  # the session goes on
    await client.aclose()
    again = await bank.client()
    assert await again.login(DEMO_ACCOUNT, DEMO_PIN) is Status.INCORRECT_PIN
    assert await again.login(DEMO_ACCOUNT, "2580") is Status.APPROVED


async def test_a_trivial_pin_is_refused_and_nothing_changes(bank: RunningServer):
    client = await logged_in(bank)
    for pin in ("0000", "1234", "4321", "7777"):
        refused = await client.request(ChangePin(DEMO_PIN, pin))
        assert refused == ChangePinReply(Status.PIN_NOT_ALLOWED)
    await client.aclose()
    assert await (await bank.client()).login() is Status.APPROVED


async def test_a_wrong_current_pin_counts_toward_the_lock(
    bank: RunningServer, config: ServerConfig
):
    client = await logged_in(bank)
    tries = config.pin_tries_max
    answers = [await client.request(ChangePin("0000", "2580")) for _ in range(tries)]
    assert answers == [ChangePinReply(Status.INCORRECT_PIN)] * (tries - 1) + [
        ChangePinReply(Status.PIN_TRIES_EXCEEDED)
    ]
    assert isinstance(await client.request(Balance()), BalanceReply)  # the session goes on
    await client.aclose()
    assert await (await bank.client()).login() is Status.PIN_TRIES_EXCEEDED


async def test_one_log_line_per_transfer_with_masked_accounts_and_no_balance_or_pin(
    bank: RunningServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    client = await logged_in(bank)
    txn = txn_id()
    await client.request(Transfer(txn, 24_32, OTHER_ACCOUNT))
    await client.request(ChangePin(DEMO_PIN, "2580"))
    lines = [r.getMessage() for r in caplog.records if "TRANSFER" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith(f"AC-***45 TRANSFER $24.32 to BC-***73 APPROVED txn {txn.hex()}"
                             f" entry 1")
    (pin_line,) = (r.getMessage() for r in caplog.records if "change PIN" in r.getMessage())
    assert pin_line.endswith("change PIN AC-***45 APPROVED")
    for secret in (DEMO_PIN, "2580", OTHER_ACCOUNT, DEMO_ACCOUNT, "1,000.00", "45.72"):
        assert secret not in caplog.text
