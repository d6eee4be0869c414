"""GCS's naming and metadata rules, the same in memory and on disk, over real HTTP."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from faultnet.gcs import GcsServer

LONGEST_NAME = "é" * 512  # 1,024 bytes of UTF-8
ODD_BUT_VALID = ["a\x1b[31mred", "tab\there", "../../escape", "dir/./x", "a" * 300, LONGEST_NAME]
REFUSED_NAMES = [".", "..", "é" * 512 + "x", "line\nfeed", "carriage\rreturn"]


def _media_upload(server: GcsServer, name: str, **headers: str) -> requests.Response:
    return requests.post(
        f"{server.url}/upload/storage/v1/b/bkt/o",
        params={"uploadType": "media", "name": name},
        data=b"data",
        headers=headers,
        timeout=30,
    )


def _start_session(server: GcsServer, resource: dict[str, object], **headers: str) -> int:
    response = requests.post(
        f"{server.url}/upload/storage/v1/b/bkt/o",
        params={"uploadType": "resumable"},
        data=json.dumps(resource),
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )
    return response.status_code


@pytest.mark.parametrize("name", ODD_BUT_VALID)
def test_names_gcs_accepts_are_stored_and_read_back(server: GcsServer, name: str) -> None:
    created = _media_upload(server, name)
    assert created.status_code == 200, created.text
    assert created.json()["name"] == name
    url = f"{server.url}/storage/v1/b/bkt/o/{quote(name, safe='')}"
    assert requests.get(url, params={"alt": "media"}, timeout=30).content == b"data"
    listed = requests.get(f"{server.url}/storage/v1/b/bkt/o", timeout=30).json()
    assert [item["name"] for item in listed["items"]] == [name]


@pytest.mark.parametrize("name", [*REFUSED_NAMES, ".well-known/acme-challenge/token"])
def test_names_gcs_refuses_are_400(server: GcsServer, name: str) -> None:
    assert _media_upload(server, name).status_code == 400
    assert _start_session(server, {"name": name}) == 400
    # Dots percent-encoded: HTTP clients collapse literal dot segments before sending.
    url = f"{server.url}/storage/v1/b/bkt/o/{quote(name, safe='').replace('.', '%2E')}"
    assert requests.get(url, timeout=30).status_code == 400
    assert server.store.list_objects("bkt") == []


def test_a_name_that_is_not_utf8_is_400(server: GcsServer) -> None:
    response = requests.post(
        f"{server.url}/upload/storage/v1/b/bkt/o?uploadType=media&name=bad%FFname",
        data=b"data",
        timeout=30,
    )
    assert response.status_code == 400
    assert server.store.list_objects("bkt") == []


@pytest.mark.parametrize(
    "bucket",
    ["abc", "a-b_c.d", "0ab", "a" * 63, ".".join(["a" * 63] * 3) + ".abc"],
)
def test_bucket_names_gcs_accepts(server: GcsServer, bucket: str) -> None:
    created = requests.post(f"{server.url}/storage/v1/b", json={"name": bucket}, timeout=30)
    assert created.status_code == 200, created.text
    assert requests.get(f"{server.url}/storage/v1/b/{bucket}", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "bucket",
    [
        "",
        "ab",
        ".",
        "..",
        "Upper",
        "-ab",
        "ab-",
        "a..b",
        "a b",
        "a/b",
        "a" * 64,
        "a" * 64 + ".com",
        "goog-bucket",
        "my-google-bucket",
        "192.168.0.1",
        ".".join(["a" * 63] * 4),  # 255 characters
    ],
)
def test_bucket_names_gcs_refuses_are_400(server: GcsServer, bucket: str) -> None:
    created = requests.post(f"{server.url}/storage/v1/b", json={"name": bucket}, timeout=30)
    assert created.status_code == 400
    assert [b.name for b in server.store.list_buckets()] == ["bkt"]


@pytest.mark.parametrize("bucket", [".", ".."])
def test_dot_buckets_in_a_path_are_400_not_500(server: GcsServer, bucket: str) -> None:
    """Sent raw: HTTP clients would collapse the dot segments before sending."""
    for path in (f"/storage/v1/b/{bucket}", f"/storage/v1/b/{bucket}/o/x"):
        request = f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
        with socket.create_connection(server.address, timeout=30) as sock:
            sock.sendall(request)
            status_line = sock.makefile("rb").readline()
        assert status_line.split(b" ")[1] == b"400"


def test_custom_metadata_is_limited_to_8_kib_like_gcs(server: GcsServer) -> None:
    at_limit = {"k": "v" * 4095, "key2": "w" * 4092}  # 8,192 bytes, keys included
    assert _start_session(server, {"name": "ok", "metadata": at_limit}) == 200
    over = {**at_limit, "x": ""}
    assert _start_session(server, {"name": "over", "metadata": over}) == 400
    one_value_too_long = {"k": "v" * 4097}
    assert _start_session(server, {"name": "long", "metadata": one_value_too_long}) == 400
    assert [s.name for s in server.store.sessions()] == ["ok"]


def test_content_type_length_is_capped(server: GcsServer) -> None:
    assert (
        _start_session(server, {"name": "a"}, **{"X-Upload-Content-Type": "t/" + "x" * 1022}) == 200
    )
    assert (
        _start_session(server, {"name": "b"}, **{"X-Upload-Content-Type": "t/" + "x" * 1023}) == 400
    )
    assert _media_upload(server, "c", **{"Content-Type": "t/" + "x" * 2000}).status_code == 400


def test_names_never_reach_the_file_system(tmp_path: Path) -> None:
    """Every file under the data dir is named by a hash; the names live in metadata."""
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        for name in ODD_BUT_VALID:
            assert _media_upload(server, name).status_code == 200
    with GcsServer(data_dir=tmp_path) as server:  # and come back after a restart
        assert sorted(i.name for i in server.store.list_objects("bkt")) == sorted(ODD_BUT_VALID)
        assert server.store.get_object("bkt", LONGEST_NAME)[0] == b"data"
    hashed = re.compile(r"[0-9a-f]{32}(\.json|\.[0-9]+)?|bucket\.json")
    files = [path for path in tmp_path.rglob("*") if path.parent.name != "tmp"]
    names = [path.name for path in files if path.name not in ("buckets", "sessions", "tmp")]
    assert names
    assert all(hashed.fullmatch(name) for name in names), names
    assert all(path.resolve().is_relative_to(tmp_path.resolve()) for path in files)
