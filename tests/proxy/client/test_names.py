"""Destinations and proxy addresses: what GCS accepts passes, what it refuses is refused early."""

from __future__ import annotations

import pytest

from proxy.client import parse_gs_url, proxy_addresses


@pytest.mark.parametrize(
    "url",
    [
        "gs://abc/o",
        "gs://a-b_c.d/dir/sub/object.tar.gz",
        "gs://" + "b" * 63 + "/o",
        "gs://" + ".".join(["b" * 63] * 3) + "." + "b" * 30 + "/o",  # 222 characters, dotted
        "gs://bkt/" + "n" * 1024,
        "gs://bkt/" + "\u00e9" * 512,  # 1024 bytes of UTF-8
        "gs://bkt/spaces and ümlauts/ok",
        "gs://bkt/.hidden",
        "gs://bkt/./x",  # only a whole name of '.' or '..' is refused
    ],
)
def test_names_gcs_accepts_pass(url: str) -> None:
    bucket, name = parse_gs_url(url)
    assert f"gs://{bucket}/{name}" == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://bkt/o", "expected gs://BUCKET/OBJECT"),
        ("gs://bkt", "expected gs://BUCKET/OBJECT"),
        ("gs://bkt/", "expected gs://BUCKET/OBJECT"),
        ("gs://b" + "b" * 63 + "/o", "3 to 63 characters"),
        ("gs://" + "b" * 64 + ".x/o", "1 to 63 characters between dots"),
        ("gs://bkt./o", "start and end with a letter or digit"),
        ("gs://a..b/o", "1 to 63 characters between dots"),
        ("gs://bkt/.well-known/acme-challenge/x", "acme-challenge"),
        ("gs://bkt/\udcff", "valid UTF-8"),
        ("gs://bkt/tab\there", "control characters"),
        ("gs://bkt/del\x7f", "control characters"),
    ],
)
def test_names_gcs_refuses_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_gs_url(url)
    assert caught.value.args[0].isprintable()  # one clean line, whatever the name holds


def test_proxy_addresses_in_every_form() -> None:
    assert proxy_addresses("a:1") == [("a", 1)]
    assert proxy_addresses(("a", 1)) == [("a", 1)]
    assert proxy_addresses("a:1, [::1]:2") == [("a", 1), ("::1", 2)]
    assert proxy_addresses(["a:1", ("b", 2)]) == [("a", 1), ("b", 2)]
    for bad in ("a", "a:1,", "a:0", "a:65536", ""):
        with pytest.raises(ValueError, match="HOST:PORT"):
            proxy_addresses(bad)
