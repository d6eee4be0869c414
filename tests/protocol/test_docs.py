"""docs/protocol.md and the code describe the same numbers and the same error table.

The spec's error table (section 7) is generated from `protocol.errors.ERROR_SPECS`, the table the
code reads: `python -m tests.protocol.test_docs` prints it, to paste into the spec.
"""

from __future__ import annotations

import re
from pathlib import Path

from protocol import ERROR_SPECS, ErrorCode, ErrorSpec, FrameType

SPEC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()

_ALL_REQUESTS = frozenset(t for t in FrameType if t.is_request)


def _answers(spec: ErrorSpec) -> str:
    if spec.answers == _ALL_REQUESTS:
        listed = "any request"
    else:
        listed = ", ".join(f"`{t.name}`" for t in sorted(spec.answers))
    if not spec.unsolicited:
        return listed
    return f"{listed}; unsolicited" if listed else "unsolicited only"


def _retryable(spec: ErrorSpec) -> str:
    if spec.retryable_per_reply:
        return "per reply"
    return "yes" if spec.retryable else "no"


def _since(spec: ErrorSpec) -> str:
    if spec.fallback is None:
        return str(spec.since)
    return f"{spec.since} (v1: `{spec.fallback.name}`)"


def error_table() -> str:
    """Section 7's table, as markdown, from the code's table."""
    lines = [
        "| code | name | scope | retryable | answers | since | meaning |",
        "|-----:|------|-------|-----------|---------|-------|---------|",
    ]
    for code in ErrorCode:
        spec = ERROR_SPECS[code]
        lines.append(
            f"| {code.value} | `{code.name}` | {spec.scope.value} | {_retryable(spec)}"
            f" | {_answers(spec)} | {_since(spec)} | {spec.meaning} |"
        )
    return "\n".join(lines)


def test_the_spec_error_table_is_the_code_table() -> None:
    assert error_table() in SPEC, "regenerate it: python -m tests.protocol.test_docs"


def test_every_code_has_a_row_and_fallbacks_are_version_1_codes() -> None:
    assert set(ERROR_SPECS) == set(ErrorCode)
    for code, spec in ERROR_SPECS.items():
        assert spec.code is code
        if spec.since > 1:
            assert spec.fallback is not None, code
            assert spec.fallback.spec.since == 1, code
            assert code.for_version(1) is spec.fallback
        assert code.for_version(spec.since) is code
        assert spec.answers or spec.unsolicited, f"{code.name} can never be sent"


def test_every_frame_type_is_documented_with_its_number() -> None:
    documented = {
        name: int(number, 0)
        for number, name in re.findall(r"^\| (0x[0-9A-F]{2}) \| `([A-Z_]+)` +\|", SPEC, re.M)
    }
    assert documented == {t.name: t.value for t in FrameType}


if __name__ == "__main__":
    print(error_table())
