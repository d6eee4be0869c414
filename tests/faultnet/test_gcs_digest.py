"""RunningDigest hashes blocks in order, beside the caller."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c
import pytest

from faultnet.gcs.digest import RunningDigest


@pytest.mark.parametrize("md5", [True, False])
def test_digest_of_blocks_plus_tail_matches_hashing_the_whole(md5: bool) -> None:
    blocks = [bytes([i]) * (1000 * i + 1) for i in range(20)] + [bytes(range(256)) * 12289]
    digest = RunningDigest(md5=md5)
    for block in blocks:
        digest.update(memoryview(bytearray(block)))
    whole = b"".join(blocks) + b"tail"

    crc32c, md5_hash = digest.digests_with(memoryview(b"tail"))

    assert crc32c == base64.b64encode(google_crc32c.value(whole).to_bytes(4, "big")).decode()
    expected_md5 = base64.b64encode(hashlib.md5(whole).digest()).decode() if md5 else None
    assert md5_hash == expected_md5
    # The tail is not kept: asking again with another tail starts from the blocks.
    assert (
        digest.digests_with(b"")[0]
        == base64.b64encode(google_crc32c.value(b"".join(blocks)).to_bytes(4, "big")).decode()
    )


def test_empty_digest() -> None:
    assert RunningDigest().digests_with(b"") == ("AAAAAA==", "1B2M2Y8AsgTpgAmY7PhCfg==")
