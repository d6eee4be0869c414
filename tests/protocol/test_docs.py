"""docs/protocol.md and the code describe the same numbers."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import ErrorCode
from protocol._spec import FrameType

SPEC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _table_rows(pattern: str) -> dict[str, int]:
    return {name: int(number, 0) for number, name in re.findall(pattern, SPEC, re.MULTILINE)}


def test_every_error_code_is_documented_with_its_number_and_retryability() -> None:
    rows = re.findall(r"^\| (\d+) +\| `([A-Z_]+)` +\| (yes|no|per reply) +\|", SPEC, re.MULTILINE)
    assert {name: int(number) for number, name, _ in rows} == {c.name: c.value for c in ErrorCode}
    for _, name, retryable in rows:
        if retryable != "per reply":
            assert ErrorCode[name].retryable == (retryable == "yes"), name


def test_every_frame_type_is_documented_with_its_number() -> None:
    documented = _table_rows(r"^\| (0x[0-9A-F]{2}) \| `([A-Z_]+)` +\|")
    assert documented == {t.name: t.value for t in FrameType}
