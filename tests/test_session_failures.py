"""What a session does when its ledger fails, and how refused logins add up.

Covers spec/PROTOCOL.md §8's server-side failures over loopback TCP: a storage failure
(``StorageError``) on LOGIN, BALANCE, DEPOSIT, WITHDRAW or HISTORY is answered
ISSUER_UNAVAILABLE and the session goes on, still holding its lease, so the same
connection retries (a deposit retried with its transaction id moves the money once,
whether the failure came before or after the write); an unexpected error inside the
ledger (a bug) is answered SYSTEM_MALFUNCTION, then the connection closes and the lease
is released (§4, §5). And §5's rule that every refused LOGIN, ACCOUNT_IN_USE included,
counts toward ``login_attempts_max``.

Failures come from ``FaultyLedger``, which wraps the real SQLite ledger and makes one
chosen call raise, once. Waiting is on replies and closes only; nothing sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.ledger import StorageError
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_BALANCE_CENTS,
    DEMO_PIN,
    FaultyLedger,
    RunningServer,
    WireClient,
    logged_in,
    start_server,
    txn_id,
)
from wire import (
    Balance,
    BalanceReply,
    Deposit,
    DepositReply,
    EntryKind,
    History,
    HistoryReply,
    Logout,
    LogoutReply,
    Ping,
    PingReply,
    Reply,
    Request,
    Status,
    Withdraw,
    WithdrawReply,
    encode,
)


@pytest.fixture
def faulty(ledger: BatchLedger) -> FaultyLedger:
    return FaultyLedger(ledger)


async def start_bank(
    nursery: trio.Nursery, config: ServerConfig, faulty: FaultyLedger, **overrides: object
) -> RunningServer:
    """``start_server`` over the faulty ledger (a ``Ledger``, which is what the server takes)."""
    return await start_server(nursery, config, faulty, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def bank(nursery: trio.Nursery, config: ServerConfig, faulty: FaultyLedger) -> RunningServer:
    return await start_bank(nursery, config, faulty)


async def assert_lease_held(bank: RunningServer) -> None:
    """DEMO_ACCOUNT is leased: the lease table says so and a second ATM is refused."""
    assert bank.server.leases.held() == {DEMO_ACCOUNT}
    second = await bank.client()
    assert await second.login() is Status.ACCOUNT_IN_USE
    await second.aclose()


async def assert_closed_without_answering(client: WireClient) -> None:
    """The server closed the connection: a PING sent now gets no reply, only EOF (or a
    reset, had the server already finished closing). A server still serving answers it,
    so this fails at once instead of waiting for a close that never comes."""
    try:
        await client.send_raw(encode(Ping(), 99))  # the engine would refuse: it is closed
        assert await client.closed()
    except trio.BrokenResourceError:
        pass  # reset: closed all the same


# -- Storage failures: ISSUER_UNAVAILABLE, and the session goes on ------------------------


STORAGE_FAILURES: dict[str, tuple[str, Callable[[], Request], type[Reply]]] = {
    "balance": ("balance", Balance, BalanceReply),
    "deposit": ("post", lambda: Deposit(txn_id(), 10_00), DepositReply),
    "withdraw": ("post", lambda: Withdraw(txn_id(), 10_00), WithdrawReply),
    "history": ("history", lambda: History(5), HistoryReply),
}
"""Request kind: the ledger method that fails, the request, the reply it gets."""


@pytest.mark.parametrize("case", sorted(STORAGE_FAILURES))
async def test_a_storage_failure_is_issuer_unavailable_and_the_session_goes_on(
    bank: RunningServer, faulty: FaultyLedger, case: str
):
    method, make_request, reply_type = STORAGE_FAILURES[case]
    client = await logged_in(bank)
    request = make_request()
    faulty.fail_next(method, StorageError("disk I/O error"))
    assert await client.request(request) == reply_type(Status.ISSUER_UNAVAILABLE)
    assert faulty.faults == {}  # the fault was hit

    await assert_lease_held(bank)  # the session kept its account
    retried = await client.request(request)
    assert retried.status is Status.APPROVED
    assert await client.request(Balance()) == BalanceReply(
        Status.APPROVED,
        DEMO_BALANCE_CENTS + {"deposit": 10_00, "withdraw": -10_00}.get(case, 0),
    )
    assert await client.request(Logout()) == LogoutReply(Status.APPROVED)
    assert await client.closed()
    assert bank.server.leases.held() == frozenset()


@pytest.mark.parametrize("after_work", [False, True], ids=["before-write", "after-write"])
async def test_a_deposit_retried_after_a_storage_failure_moves_the_money_once(
    bank: RunningServer, faulty: FaultyLedger, ledger: BatchLedger, after_work: bool
):
    client = await logged_in(bank)
    deposit = Deposit(txn_id(), 25_00)
    faulty.fail_next("post", StorageError("database is locked"), after_work=after_work)
    assert await client.request(deposit) == DepositReply(Status.ISSUER_UNAVAILABLE)
    assert faulty.faults == {}

    retried = await client.request(deposit)  # same connection, same transaction id
    assert isinstance(retried, DepositReply) and retried.status is Status.APPROVED
    assert retried.balance_cents == DEMO_BALANCE_CENTS + 25_00
    again = await client.request(deposit)
    assert again == retried  # a replay: the original entry, nothing new booked
    assert await client.request(Balance()) == BalanceReply(
        Status.APPROVED, DEMO_BALANCE_CENTS + 25_00
    )
    history = await client.request(History(20))
    assert isinstance(history, HistoryReply)
    assert [(e.entry_id, e.kind, e.amount_cents) for e in history.entries] == [
        (retried.entry_id, EntryKind.DEPOSIT, 25_00)
    ]
    await client.aclose()
    assert await ledger.check_invariants() == []


async def test_a_storage_failure_on_login_is_issuer_unavailable_and_not_a_refused_login(
    nursery: trio.Nursery, config: ServerConfig, faulty: FaultyLedger
):
    # With one refused LOGIN allowed, counting the failure as one would close at once.
    bank = await start_bank(nursery, config, faulty, login_attempts_max=1)
    client = await bank.client()
    faulty.fail_next("verify_pin", StorageError("disk I/O error"))
    assert await client.login() is Status.ISSUER_UNAVAILABLE
    assert faulty.faults == {}
    assert bank.server.leases.held() == frozenset()  # nothing leased on a failed check
    assert await client.request(Ping()) == PingReply(Status.APPROVED)  # still open
    assert await client.login() is Status.APPROVED  # the retry logs in
    await assert_lease_held(bank)
    await client.aclose()


# -- Bugs: SYSTEM_MALFUNCTION, then the connection closes and the lease is released -------


async def test_an_internal_error_is_system_malfunction_and_ends_the_session(
    bank: RunningServer, faulty: FaultyLedger
):
    client = await logged_in(bank)
    faulty.fail_next("balance", KeyError("a bug"))
    assert await client.request(Balance()) == BalanceReply(Status.SYSTEM_MALFUNCTION)
    assert faulty.faults == {}
    assert bank.server.leases.held() == frozenset()  # released with the answer
    await assert_closed_without_answering(client)
    await client.aclose()
    other = await bank.client()
    assert await other.login() is Status.APPROVED  # another ATM gets the account at once
    assert await other.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    await other.aclose()


async def test_an_internal_error_during_login_is_system_malfunction_and_closes(
    bank: RunningServer, faulty: FaultyLedger
):
    client = await bank.client()
    faulty.fail_next("verify_pin", RuntimeError("a bug"))
    assert await client.login() is Status.SYSTEM_MALFUNCTION
    assert faulty.faults == {}
    await assert_closed_without_answering(client)
    await client.aclose()
    assert bank.server.leases.held() == frozenset()


# -- Refused logins: ACCOUNT_IN_USE counts toward login_attempts_max ---------------------

WRONG_PIN = "0000"

LOGIN_ATTEMPTS_MAX = 4
"""Not the default 3, so the limit is seen to come from the setting."""


@pytest.mark.parametrize(
    "pins",
    [
        [DEMO_PIN] * LOGIN_ATTEMPTS_MAX,
        [WRONG_PIN] + [DEMO_PIN] * (LOGIN_ATTEMPTS_MAX - 1),
        [DEMO_PIN, WRONG_PIN] + [DEMO_PIN] * (LOGIN_ATTEMPTS_MAX - 2),
    ],
    ids=["in-use-only", "wrong-pin-first", "mixed"],
)
async def test_account_in_use_counts_toward_the_login_limit(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pins: list[str]
):
    """§5: after ``login_attempts_max`` refused LOGINs on one connection (INCORRECT_PIN,
    PIN_TRIES_EXCEEDED or ACCOUNT_IN_USE alike) the server sends that reply and closes."""
    bank = await start_server(nursery, config, ledger, login_attempts_max=LOGIN_ATTEMPTS_MAX)
    holder = await logged_in(bank)
    contender = await bank.client()
    expected = {DEMO_PIN: Status.ACCOUNT_IN_USE, WRONG_PIN: Status.INCORRECT_PIN}
    for pin in pins[:-1]:
        assert await contender.login(DEMO_ACCOUNT, pin) is expected[pin]
    assert await contender.request(Ping()) == PingReply(Status.APPROVED)  # still open
    assert await contender.login(DEMO_ACCOUNT, pins[-1]) is Status.ACCOUNT_IN_USE  # the last
    await assert_closed_without_answering(contender)
    await contender.aclose()

    # The holder is untouched: still served, still holding the account.
    assert await holder.request(Balance()) == BalanceReply(Status.APPROVED, DEMO_BALANCE_CENTS)
    assert bank.server.leases.held() == {DEMO_ACCOUNT}
    await holder.aclose()


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_a_storage_failure_is_one_log_line_with_its_stack_only_at_debug(
    bank: RunningServer, faulty: FaultyLedger, caplog: pytest.LogCaptureFixture, level: int
):
    """In an outage every request fails alike: one ERROR line each, saying why."""
    caplog.set_level(level, logger="bank")
    client = await logged_in(bank)
    faulty.fail_next("balance", StorageError("OperationalError: connection refused"))
    assert await client.request(Balance()) == BalanceReply(Status.ISSUER_UNAVAILABLE)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().endswith(
        ": storage unavailable during BALANCE: OperationalError: connection refused"
    )
    assert bool(record.exc_info) == (level == logging.DEBUG)
