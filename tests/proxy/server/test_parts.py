"""The server's small parts on their own: gap finding, the buffer budget, the outbox."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from protocol import Ack, Credit, Pong
from protocol.ranges import RangeSet
from proxy.server.budget import BufferBudget, UploadWindow, window_cost
from proxy.server.connection import Outbox
from proxy.server.metrics import ServerMetrics
from proxy.server.settings import MiB
from reliablewriter import WriterSettings

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


def test_budget_gives_each_client_a_share_then_refuses_and_recovers() -> None:
    budget = BufferBudget(16 * MiB, 8 * MiB, ServerMetrics())

    mine = [budget.reserve("greedy", MiB) for _ in range(8)]
    assert all(reservation is not None for reservation in mine)
    assert budget.reserve("greedy", 1) is None  # its share is spent...
    other = budget.reserve("neighbour", 8 * MiB)  # ...while another client still gets its own
    assert other is not None
    assert budget.available == 0
    assert budget.reserve("third", 1) is None

    other.release()
    other.release()  # idempotent
    assert budget.available == 8 * MiB
    assert budget.reserve("greedy", 1) is None
    assert budget.reserve("third", MiB) is not None


def test_a_window_starts_small_grows_as_data_arrives_and_is_paid_for() -> None:
    template = WriterSettings(min_chunk_size=QUANTUM, max_chunk_size=MiB, buffer_limit=4 * MiB)
    budget = BufferBudget(64 * MiB, 64 * MiB, ServerMetrics())
    reservation = budget.reserve("c", 0)
    assert reservation is not None
    window = UploadWindow(reservation, template, initial=MiB, largest=4 * MiB)

    assert window.size == MiB
    assert budget.reserved == window_cost(template, MiB) > MiB  # the pieces' overhead too
    assert not window.grow_for(MiB // 4)  # not half its size arrived yet
    assert window.grow_for(MiB // 4)
    assert window.size == 2 * MiB
    assert budget.reserved == window_cost(template, 2 * MiB)
    assert window.end(0) == 2 * MiB


async def test_a_window_nobody_uses_goes_back_and_its_end_never_drops() -> None:
    template = WriterSettings(min_chunk_size=QUANTUM, max_chunk_size=MiB, buffer_limit=4 * MiB)
    budget = BufferBudget(64 * MiB, 64 * MiB, ServerMetrics())
    reservation = budget.reserve("c", 0)
    assert reservation is not None
    window = UploadWindow(reservation, template, initial=MiB, largest=4 * MiB)
    window.grow_for(MiB)
    announced = window.end(0)

    window.give_back(cost_now=1000)
    assert budget.reserved == 1000
    assert not window.grow_for(4 * MiB)  # nobody to grow for

    await window.take_back(committed=QUANTUM, patience=0)
    assert window.end(QUANTUM) >= announced
    assert budget.reserved >= window_cost(template, announced - QUANTUM)


async def test_outbox_keeps_replies_in_order_and_only_the_newest_credit() -> None:
    outbox = Outbox(capacity=4)
    outbox.offer_credit(Credit(0, 0, 10))
    await outbox.put(Ack(1, 0))
    await outbox.put(Pong(2, 7))
    outbox.offer_credit(Credit(0, 5, 15))
    outbox.close()
    outbox.put_nowait(Ack(3, 0))  # after close: dropped

    # everything queued at once, in one batch (one send), the Credit last; then nothing
    taken = [await outbox.get() for _ in range(2)]

    assert taken == [[Ack(1, 0), Pong(2, 7), Credit(0, 5, 15)], []]


async def test_outbox_hands_a_lone_credit_over_and_waits_for_the_next_reply() -> None:
    outbox = Outbox(capacity=4)
    outbox.offer_credit(Credit(0, 0, 10))
    assert await outbox.get() == [Credit(0, 0, 10)]

    async def reply_later() -> None:
        await wait_all_tasks_blocked()
        await outbox.put(Ack(1, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply_later)
        assert await outbox.get() == [Ack(1, 0)]


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
        assert await outbox.get() == [Ack(1, 0)]

    assert order == ["first taken", "second queued"]
    assert await outbox.get() == [Ack(2, 0)]
