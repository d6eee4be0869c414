"""Upload tokens: sealed, authenticated, expiring; and the key derivation of --token-key."""

from __future__ import annotations

import os

import pytest

from proxy.server.keys import key_from_text
from proxy.server.tokens import BadTokenError, TokenCodec, UploadTicket

SESSION_REF = "s3cr3t-upload-id"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _ticket(codec: TokenCodec) -> UploadTicket:
    return codec.issue(
        upload_id="u1",
        bucket="bkt",
        name="dir/object.bin",
        session_ref=SESSION_REF,
        content_type="text/plain",
        metadata=(("k", "v"),),
        expected_size=1234,
        if_generation_match=0,
    )


def test_seal_then_open_round_trips_every_field() -> None:
    clock = FakeClock()
    codec = TokenCodec(os.urandom(32), lifetime=60.0, clock=clock)
    ticket = _ticket(codec)

    opened = codec.open(codec.seal(ticket))

    assert opened == ticket
    assert opened.session_ref == SESSION_REF
    assert opened.expires_at == clock.now + 60.0


def test_token_hides_the_session_reference() -> None:
    codec = TokenCodec(os.urandom(32), lifetime=60.0)
    token = codec.seal(_ticket(codec))

    assert b"s3cr3t" not in token
    assert b"bkt" not in token
    assert "s3cr3t" not in repr(_ticket(codec))


def test_every_flipped_bit_is_refused() -> None:
    codec = TokenCodec(os.urandom(32), lifetime=60.0)
    token = codec.seal(_ticket(codec))

    for index in range(len(token)):
        tampered = bytearray(token)
        tampered[index] ^= 0x01
        with pytest.raises(BadTokenError):
            codec.open(bytes(tampered))


@pytest.mark.parametrize("cut", [0, 1, 13, 28, -1])
def test_truncated_token_is_refused(cut: int) -> None:
    codec = TokenCodec(os.urandom(32), lifetime=60.0)
    token = codec.seal(_ticket(codec))

    with pytest.raises(BadTokenError):
        codec.open(token[:cut])


def test_token_from_another_key_is_refused() -> None:
    ours = TokenCodec(os.urandom(32), lifetime=60.0)
    theirs = TokenCodec(os.urandom(32), lifetime=60.0)

    with pytest.raises(
        BadTokenError, match="cannot resume that upload: it restarted with another key"
    ):
        ours.open(theirs.seal(_ticket(theirs)))


def test_instances_sharing_a_key_open_each_others_tokens() -> None:
    key = key_from_text("correct horse battery staple")
    first = TokenCodec(key, lifetime=60.0)
    second = TokenCodec(key_from_text("correct horse battery staple"), lifetime=60.0)

    assert second.open(first.seal(_ticket(first))).upload_id == "u1"


def test_expired_token_is_refused_with_its_upload_named() -> None:
    clock = FakeClock()
    codec = TokenCodec(os.urandom(32), lifetime=60.0, clock=clock)
    token = codec.seal(_ticket(codec))
    clock.now += 60.0

    with pytest.raises(BadTokenError, match="upload u1: its token has expired") as info:
        codec.open(token)
    assert "s3cr3t" not in str(info.value)


def test_a_token_of_another_format_is_not_resumable_and_says_so() -> None:
    codec = TokenCodec(os.urandom(32), lifetime=60.0)
    token = bytearray(codec.seal(_ticket(codec)))
    token[0] = 1  # the format that carried a session URL

    with pytest.raises(BadTokenError, match="cannot resume that upload: its token has format 1"):
        codec.open(bytes(token))


def test_a_token_carries_no_url() -> None:
    codec = TokenCodec(os.urandom(32), lifetime=60.0)
    document = _ticket(codec).to_json()

    assert not any("://" in str(value) for value in document.values())
