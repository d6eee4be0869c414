"""The three programs that open docs/reliablewriter.md run, as written, against the strict
endpoint: each in a fresh interpreter, with STORAGE_EMULATOR_HOST pointing there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliablewriter.md"
#: the first line of each example names its world, then the object it writes and holds
EXAMPLES = {
    "trio": ("from-trio.txt", b"hello trio\n"),
    "asyncio": ("from-asyncio.txt", b"hello asyncio\n"),
    "synchronous": ("from-open-blob.txt", b"hello open_blob\n"),
}


def _examples() -> dict[str, str]:
    """The python blocks of the "Start here" section, keyed by their first comment."""
    text = DOC.read_text()
    section = text[text.index("## Start here") :]
    section = section[: section.index("\n## ", 1)]
    found: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        first_line = block.splitlines()[0]
        found[first_line.removeprefix("# ").strip()] = block
    return found


def test_the_doc_opens_with_the_three_examples() -> None:
    text = DOC.read_text()
    assert text.index("## Start here") < text.index("## Using it")
    assert list(_examples()) == list(EXAMPLES)


@pytest.mark.parametrize("world", list(EXAMPLES))
def test_the_example_runs_against_the_strict_endpoint(world: str, tmp_path: Path) -> None:
    name, expected = EXAMPLES[world]
    code = _examples()[world]
    with GcsServer() as server:
        server.store.create_bucket("my-bucket")
        env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url, GOOGLE_CLOUD_PROJECT="docs")
        ran = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split()[0] == str(len(expected))  # each prints the size first
        stored = anonymous_client(server.url).bucket("my-bucket").blob(name).download_as_bytes()
    assert stored == expected
