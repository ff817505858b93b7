"""DeadlineSweeper: one task enforces the deadlines of many connections.

The connections here are stand-ins with the two members the sweeper uses; the server
tests (idle, login, frame and send timeouts, shutdown) run it with real connections.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from bank.server import SWEEP_INTERVAL_S, DeadlineSweeper


class Waiter:
    """A connection as the sweeper sees it: a deadline, and what expiry does."""

    def __init__(self, deadline: float = math.inf) -> None:
        self.deadline = deadline
        self.expired_at: list[float] = []

    def expire(self) -> None:
        self.expired_at.append(trio.current_time())


@pytest.fixture
async def sweeper(nursery: trio.Nursery) -> DeadlineSweeper:
    sweeper = DeadlineSweeper()
    nursery.start_soon(sweeper.run)
    await trio.testing.wait_all_tasks_blocked()
    return sweeper


async def settle() -> None:
    """Let the sweeper act on the clock's new time."""
    await trio.testing.wait_all_tasks_blocked()


async def test_a_deadline_is_enforced_when_it_passes_not_before(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    start = trio.current_time()
    waiter = Waiter(start + 30)
    sweeper.watch(waiter)
    mock_clock.jump(29.9)
    await settle()
    assert waiter.expired_at == []
    mock_clock.jump(0.1)
    await settle()
    assert waiter.expired_at == [start + 30]


async def test_a_deadline_moved_later_before_it_passed_is_not_enforced(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    start = trio.current_time()
    waiter = Waiter(start + 10)
    sweeper.watch(waiter)
    mock_clock.jump(9)
    await settle()
    waiter.deadline = start + 20  # as a connection does after each reply
    mock_clock.jump(1)
    await settle()
    assert waiter.expired_at == []
    mock_clock.jump(10)
    await settle()
    assert waiter.expired_at == [start + 20]


async def test_a_sooner_deadline_wakes_the_sweeper_early(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    start = trio.current_time()
    idle, sending = Waiter(start + 300), Waiter()
    sweeper.watch(idle)
    sweeper.watch(sending)
    mock_clock.jump(1)
    await settle()
    sending.deadline = trio.current_time() + 10  # a send begins: sooner than planned
    sweeper.hurry(sending.deadline)
    mock_clock.jump(10)
    await settle()
    assert sending.expired_at == [start + 11]
    assert idle.expired_at == []


async def test_a_forgotten_connection_is_never_expired(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    waiter = Waiter(trio.current_time() + 5)
    sweeper.watch(waiter)
    sweeper.forget(waiter)
    mock_clock.jump(6)
    await settle()
    assert waiter.expired_at == []


async def test_sweeps_are_at_least_the_interval_apart(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    start = trio.current_time()
    first, second = Waiter(start + 1), Waiter(start + 1 + SWEEP_INTERVAL_S / 10)
    sweeper.watch(first)
    sweeper.watch(second)
    mock_clock.jump(1)
    await settle()
    assert first.expired_at == [start + 1] and second.expired_at == []
    mock_clock.jump(SWEEP_INTERVAL_S / 2)  # past the second deadline, within the interval
    await settle()
    assert second.expired_at == []
    mock_clock.jump(SWEEP_INTERVAL_S / 2)
    await settle()
    assert second.expired_at == [start + 1 + SWEEP_INTERVAL_S]


async def test_many_deadlines_at_once_are_enforced_in_one_sweep(
    sweeper: DeadlineSweeper, mock_clock: trio.testing.MockClock
):
    start = trio.current_time()
    waiters = [Waiter(start + 60 + i / 1000) for i in range(100)]
    for waiter in waiters:
        sweeper.watch(waiter)
    mock_clock.jump(61)
    await settle()
    assert [w.expired_at for w in waiters] == [[start + 61]] * 100
