"""Connection exhaustion: connections that never log in cannot lock the ATMs out.

A flood of idle TCP connections (no account, no PIN needed) from one loopback address
and from ten; a server full of connections that have not logged in, where the oldest is
evicted for a newcomer; the per-address cap and its release at login; logged-in sessions
never evicted; the rate-limited warnings; and how IPv6 peers are counted.

The floods run on a frozen ``MockClock``: the honest ATM must be served before any
deadline could have freed a slot, which the unchanged clock proves (a hang would let the
clock autojump after ``HANG_GUARD_S`` real seconds, and the test fails instead of hanging).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.server import IPV6_PREFIX_BITS, WARNING_INTERVAL_S, OncePerInterval, address_key
from tests.helpers import (
    OTHER_ACCOUNT,
    OTHER_PIN,
    WireClient,
    frames_until_closed,
    legit_session,
    logged_in,
    settle,
    start_server,
)
from wire import Balance, Error, Hello, SessionExpired, Status

FLOOD_CONNECTIONS = 1_100
"""More idle connections than the default ``connections_max`` (1,000)."""

HANG_GUARD_S = 5.0
"""Real seconds everything may sit blocked before the frozen clock jumps (and fails)."""


async def idle_connection(port: int, source: str) -> trio.socket.SocketType:
    """A TCP connection from ``source`` (a loopback address) that will never send."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


def close_all(sockets: list[trio.socket.SocketType]) -> None:
    for sock in sockets:
        sock.close()


@pytest.fixture
def frozen_clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    mock_clock.autojump_threshold = HANG_GUARD_S
    return mock_clock


@pytest.mark.parametrize("addresses", [1, 10], ids=["one address", "ten addresses"])
async def test_a_flood_of_idle_connections_does_not_lock_an_atm_out(
    frozen_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger, addresses: int,
):
    bank = await start_server(nursery, config, ledger)  # the defaults: 1,000 and 16
    before = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)  # logged in before the flood
    sources = [f"127.0.0.{2 + i}" for i in range(addresses)]
    flood = [
        await idle_connection(bank.port, sources[i % addresses])
        for i in range(FLOOD_CONNECTIONS)
    ]
    await settle()
    assert bank.server.connection_count <= 1 + addresses * config.preauth_per_address_max
    started = trio.current_time()
    await legit_session(bank)  # from 127.0.0.1: log in, read, deposit, withdraw, log out
    assert (await before.request(Balance())).status is Status.APPROVED
    assert trio.current_time() == started  # no deadline had to free a slot
    close_all(flood)
    await before.aclose()


async def test_a_full_server_evicts_the_oldest_connection_not_logged_in(
    frozen_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger, caplog: pytest.LogCaptureFixture,
):
    """Many addresses, each under its cap, fill every slot; newcomers evict the oldest."""
    slots, sources = 40, [f"127.0.0.{2 + i}" for i in range(5)]
    bank = await start_server(nursery, config, ledger, connections_max=slots)
    before = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
    flood = [
        WireClient(trio.SocketStream(await idle_connection(bank.port, sources[i % 5])))
        for i in range(slots + 10)  # 10 more than fit: the 10 oldest idle ones are evicted
    ]
    await settle()
    started = trio.current_time()
    await legit_session(bank)  # evicts the 11th oldest, then logs in
    assert (await before.request(Balance())).status is Status.APPROVED
    assert trio.current_time() == started
    for evicted in flood[:11]:
        frames = await frames_until_closed(evicted)
        assert [(f.request_id, f.message) for f in frames[1:]] == [(0, SessionExpired())]
    for kept in flood[11:]:
        assert isinstance((await kept.receive()).message, Hello)
    # The evicted closed at once, without lingering; the honest ATM has logged out.
    assert bank.server.connection_count == slots - 1
    assert "evicting connections that have not logged in" in caplog.text
    for client in flood:
        await client.aclose()
    await before.aclose()


async def test_a_logged_in_session_is_never_evicted(
    frozen_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger,
):
    bank = await start_server(nursery, config, ledger, connections_max=2)
    first = await logged_in(bank)
    idle = await bank.client()
    newcomer = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)  # evicts ``idle``, not ``first``
    assert [f.message for f in await frames_until_closed(idle)] == [SessionExpired()]
    last = await WireClient.connect(bank.port)  # both slots hold logged-in sessions now
    assert [f.message for f in await frames_until_closed(last)] == [Error(Status.SERVER_BUSY)]
    for client in (first, newcomer):
        assert (await client.request(Balance())).status is Status.APPROVED
        await client.aclose()


async def test_the_per_address_cap_counts_only_connections_not_logged_in(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger,
    caplog: pytest.LogCaptureFixture,
):
    bank = await start_server(nursery, config, ledger, preauth_per_address_max=2)
    first = WireClient(trio.SocketStream(await idle_connection(bank.port, "127.0.0.2")))
    second = WireClient(trio.SocketStream(await idle_connection(bank.port, "127.0.0.2")))
    await first.hello()
    await second.hello()
    third = WireClient(trio.SocketStream(await idle_connection(bank.port, "127.0.0.2")))
    assert [f.message for f in await frames_until_closed(third)] == [Error(Status.SERVER_BUSY)]
    assert "refused connections from 127.0.0.2: 2 not logged in already" in caplog.text
    other = WireClient(trio.SocketStream(await idle_connection(bank.port, "127.0.0.3")))
    assert isinstance(await other.hello(), Hello)  # another address has its own count
    assert await first.login() is Status.APPROVED  # no longer counts against 127.0.0.2
    fourth = WireClient(trio.SocketStream(await idle_connection(bank.port, "127.0.0.2")))
    assert isinstance(await fourth.hello(), Hello)
    for client in (first, second, third, other, fourth):
        await client.aclose()


async def test_warnings_come_once_per_interval_with_a_count_of_the_rest(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
):
    warnings = OncePerInterval(WARNING_INTERVAL_S, keys_max=2)
    with caplog.at_level(logging.WARNING, logger="bank.server"):
        for _ in range(5):
            warnings.warn("127.0.0.2", "refused %s", "127.0.0.2")
        await trio.sleep(WARNING_INTERVAL_S)
        warnings.warn("127.0.0.2", "refused %s", "127.0.0.2")
    assert caplog.messages == [
        "refused 127.0.0.2",
        "refused 127.0.0.2 (and 4 times more since the last such warning)",
    ]


def test_warnings_remember_a_bounded_number_of_addresses(caplog: pytest.LogCaptureFixture):
    async def main() -> None:
        warnings = OncePerInterval(WARNING_INTERVAL_S, keys_max=2)
        for address in ("a", "b", "c", "a"):  # "a" was forgotten when "c" came
            warnings.warn(address, "refused %s", address)

    with caplog.at_level(logging.WARNING, logger="bank.server"):
        trio.run(main)
    assert caplog.messages == ["refused a", "refused b", "refused c", "refused a"]


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_peers_are_counted_by_ipv4_address_or_ipv6_slash_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_the_spec_states_the_admission_policy_the_server_applies() -> None:
    protocol = " ".join((Path(__file__).parent.parent / "spec" / "PROTOCOL.md").read_text(
        encoding="utf-8").split())
    assert f"an IPv6 peer is counted by its /{IPV6_PREFIX_BITS}" in protocol
    assert "a new connection evicts the oldest connection that has not logged in" in protocol
    assert "a logged-in session never is" in protocol
