"""The server's small parts on their own: gap finding, the buffer budget, the outbox."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from protocol import Ack, Credit, Pong
from protocol.ranges import RangeSet
from proxy.server.budget import BufferBudget
from proxy.server.connection import Outbox
from proxy.server.metrics import ServerMetrics
from proxy.server.settings import MiB

QUANTUM = 256 * 1024


def missing_ranges(
    received: tuple[tuple[int, int], ...], total: int
) -> tuple[tuple[int, int], ...]:
    """The gaps an upload reports (``Upload.missing``): the one RangeSet, asked for them."""
    return tuple(RangeSet(received).missing(0, total))


def test_missing_ranges_examples() -> None:
    assert missing_ranges((), 10) == ((0, 10),)
    assert missing_ranges(((0, 10),), 10) == ()
    assert missing_ranges(((2, 4), (6, 8)), 10) == ((0, 2), (4, 6), (8, 10))
    assert missing_ranges(((0, 4), (4, 20)), 10) == ()
    assert missing_ranges(((5, 20),), 10) == ((0, 5),)
    assert missing_ranges(((12, 20),), 10) == ((0, 10),)
    assert missing_ranges((), 0) == ()


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=12),
    st.integers(0, 260),
)
def test_missing_ranges_are_exactly_the_uncovered_bytes(
    pieces: list[tuple[int, int]], total: int
) -> None:
    # Build sorted, disjoint, non-touching ranges, as the writer reports them.
    received: list[tuple[int, int]] = []
    for start, length in sorted(pieces):
        end = start + length
        if received and start <= received[-1][1]:
            received[-1] = (received[-1][0], max(received[-1][1], end))
        else:
            received.append((start, end))
    covered = {offset for start, end in received for offset in range(start, end)}

    gaps = missing_ranges(tuple(received), total)

    listed = [offset for start, end in gaps for offset in range(start, end)]
    assert listed == sorted(set(range(total)) - covered)
    assert all(start < end for start, end in gaps)


def test_budget_shrinks_windows_then_refuses_and_recovers() -> None:
    budget = BufferBudget(16 * MiB, ServerMetrics())

    windows = []
    while (window := budget.reserve(8 * MiB, 1 * MiB)) is not None:
        windows.append(window)

    assert windows[0] == 4 * MiB  # a quarter of the pool, not all 8 MiB of it
    assert windows == sorted(windows, reverse=True)
    assert all(window % QUANTUM == 0 and window >= MiB for window in windows)
    assert sum(windows) <= 16 * MiB
    assert budget.available < MiB
    budget.release(windows[0])
    assert budget.reserve(8 * MiB, 1 * MiB) is not None


async def test_outbox_keeps_replies_in_order_and_only_the_newest_credit() -> None:
    outbox = Outbox(capacity=4)
    outbox.offer_credit(Credit(0, 0, 10))
    await outbox.put(Ack(1, 0))
    await outbox.put(Pong(2, 7))
    outbox.offer_credit(Credit(0, 5, 15))
    outbox.close()
    outbox.put_nowait(Ack(3, 0))  # after close: dropped

    taken = [await outbox.get() for _ in range(4)]

    assert taken == [Ack(1, 0), Pong(2, 7), Credit(0, 5, 15), None]


async def test_outbox_put_waits_for_room() -> None:
    outbox = Outbox(capacity=1)
    await outbox.put(Ack(1, 0))
    order: list[str] = []

    async def producer() -> None:
        await outbox.put(Ack(2, 0))
        order.append("second queued")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await wait_all_tasks_blocked()
        order.append("first taken")
        assert await outbox.get() == Ack(1, 0)

    assert order == ["first taken", "second queued"]
    assert await outbox.get() == Ack(2, 0)
