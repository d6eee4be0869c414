"""Instruction strings parse to exactly the faults they name."""

from __future__ import annotations

import pytest

from faultnet.gcs.retry_test import (
    BrokenFinalResponse,
    BrokenStream,
    FailAfterBytes,
    Instruction,
    RangeRegression,
    ResetConnection,
    ReturnStatus,
    ShortRange,
    StallAfterBytes,
    parse_instruction,
)


@pytest.mark.parametrize(
    ("text", "instruction"),
    [
        ("return-503", ReturnStatus(503)),
        ("return-410", ReturnStatus(410)),
        ("return-reset-connection", ResetConnection()),
        ("return-broken-stream", BrokenStream(4)),
        ("return-broken-stream-after-3K", BrokenStream(3 * 1024)),
        ("return-503-after-256K", FailAfterBytes(503, 256 * 1024)),
        ("stall-for-10s-after-128K", StallAfterBytes(10.0, 128 * 1024)),
        ("return-broken-stream-final-chunk-after-7B", BrokenFinalResponse(7)),
        ("return-broken-stream-final-chunk-after-2K", BrokenFinalResponse(2048)),
        ("return-308-short-range-64K", ShortRange(64 * 1024)),
        ("return-range-regression", RangeRegression()),
    ],
)
def test_instruction_strings(text: str, instruction: Instruction) -> None:
    assert parse_instruction(text) == instruction


@pytest.mark.parametrize(
    "text",
    [
        "return-5xx",
        "return-503-after-256",
        "stall-for-1m-after-1K",
        "return-broken",
        "",
        " return-503",
    ],
)
def test_unknown_instructions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown fault instruction"):
        parse_instruction(text)
