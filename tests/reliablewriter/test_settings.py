"""RetryPolicy and WriterSettings: immutable, validated, deterministic with a seeded RNG."""

from __future__ import annotations

import dataclasses
import random

import pytest

from reliablewriter import CHUNK_QUANTUM, ChecksumMode, RetryPolicy, WriterSettings


def test_delays_use_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(initial_delay=1.0, multiplier=2.0, max_delay=5.0)
    rng = random.Random(7)
    caps = [1.0, 2.0, 4.0, 5.0, 5.0]
    for attempt, cap in enumerate(caps, start=1):
        samples = [policy.next_delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= delay <= cap for delay in samples)
        assert max(samples) > cap * 0.9  # full jitter reaches up to the cap ...
        assert min(samples) < cap * 0.1  # ... and down to nearly zero


def test_the_same_seed_gives_the_same_delays() -> None:
    policy = RetryPolicy()
    first = [policy.next_delay(n, random.Random(3)) for n in range(1, 6)]
    second = [policy.next_delay(n, random.Random(3)) for n in range(1, 6)]
    assert first == second


def test_gives_up_by_attempts_or_by_time_since_progress() -> None:
    policy = RetryPolicy(max_attempts=3, deadline=10.0)
    assert not policy.gives_up(2, 9.9)
    assert policy.gives_up(3, 0.0)
    assert policy.gives_up(1, 10.0)


def test_by_default_time_alone_decides_as_google_cloud_storage_does() -> None:
    policy = RetryPolicy()
    assert not policy.gives_up(10_000, 119.9)  # a refused connection fails fast, many times
    assert policy.gives_up(1, 120.0)


def test_policy_and_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        WriterSettings().buffer_limit = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"min_chunk_size": CHUNK_QUANTUM + 1},
        {"max_chunk_size": 0},
        {"min_chunk_size": 4 * CHUNK_QUANTUM, "max_chunk_size": 2 * CHUNK_QUANTUM},
        {"buffer_limit": CHUNK_QUANTUM},
        {"progress_timeout": 0},
    ],
)
def test_settings_refuse_chunks_the_protocol_or_the_buffer_cannot_take(
    changes: dict[str, int],
) -> None:
    with pytest.raises(ValueError, match="must"):
        dataclasses.replace(WriterSettings(), **changes)  # type: ignore[arg-type]


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="attempt counts from 1"):
        RetryPolicy().next_delay(0)


def test_checksum_modes() -> None:
    assert ChecksumMode.BOTH.crc32c
    assert ChecksumMode.BOTH.md5
    assert not ChecksumMode.NONE.crc32c
    assert not ChecksumMode.NONE.md5
