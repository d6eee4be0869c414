"""On-disk mode: objects appear atomically and survive a restart, and so do sessions."""

from __future__ import annotations

from pathlib import Path

import requests

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import start_resumable_upload

Q = UPLOAD_QUANTUM


def _pattern(size: int) -> bytes:
    return bytes((i * 17 + 3) % 256 for i in range(size))


def _put(uri: str, content_range: str, body: bytes = b"") -> requests.Response:
    return requests.put(uri, data=body, headers={"Content-Range": content_range}, timeout=30)


def _object_files(data_dir: Path) -> list[str]:
    """The names of every object data or metadata file (not bucket records)."""
    return sorted(
        path.name for path in (data_dir / "buckets").glob("*/*") if path.name != "bucket.json"
    )


def _part_files(data_dir: Path) -> list[Path]:
    return list((data_dir / "sessions").glob("*.part"))


def _on(server: GcsServer, session_uri: str) -> str:
    """The same session URI on ``server`` (a restarted server has a new port)."""
    return server.url + "/" + session_uri.split("/", 3)[3]


def test_objects_survive_a_restart(tmp_path: Path) -> None:
    payload = _pattern(Q + 99)
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "dir/big")
        created = _put(uri, f"bytes 0-{len(payload) - 1}/{len(payload)}", payload).json()
        server.store.insert_object("bkt", "small", b"tiny", metadata={"k": "v"})

    with GcsServer(data_dir=tmp_path) as server:
        assert [b.name for b in server.store.list_buckets()] == ["bkt"]
        data, resource = server.store.get_object("bkt", "dir/big")
        assert data == payload
        assert {k: resource[k] for k in ("generation", "crc32c", "md5Hash", "size")} == {
            k: created[k] for k in ("generation", "crc32c", "md5Hash", "size")
        }
        assert server.store.get_object("bkt", "small")[1]["metadata"] == {"k": "v"}
        # A new generation after the restart is still newer than the old ones.
        newer = server.store.insert_object("bkt", "small", b"newer")
        assert newer.generation > int(created["generation"])


def test_a_session_continues_after_a_restart(tmp_path: Path) -> None:
    payload = _pattern(3 * Q + 1)
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "obj")
        assert _put(uri, f"bytes 0-{2 * Q - 1}/*", payload[: 2 * Q]).status_code == 308

    with GcsServer(data_dir=tmp_path) as server:
        status = _put(_on(server, uri), "bytes */*")
        assert (status.status_code, status.headers["Range"]) == (308, f"bytes=0-{2 * Q - 1}")
        rest = _put(_on(server, uri), f"bytes {2 * Q}-{3 * Q}/{3 * Q + 1}", payload[2 * Q :])
        assert rest.status_code == 200
        assert server.store.get_object("bkt", "obj")[0] == payload
    assert _part_files(tmp_path) == []


def test_objects_appear_only_when_complete(tmp_path: Path) -> None:
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "obj")
        assert _put(uri, f"bytes 0-{Q - 1}/*", _pattern(Q)).status_code == 308
        assert server.store.list_objects("bkt") == []
        assert _object_files(tmp_path) == []

    # What a crash in the middle of writing an object leaves behind is never an object.
    (tmp_path / "tmp" / "half-written").write_bytes(b"partial")
    with GcsServer(data_dir=tmp_path) as server:
        assert server.store.list_objects("bkt") == []
        assert list((tmp_path / "tmp").iterdir()) == []


def test_replace_and_delete_on_disk(tmp_path: Path) -> None:
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        first = server.store.insert_object("bkt", "obj", b"first")
        server.store.insert_object("bkt", "obj", b"second, longer")
        url = f"{server.url}/storage/v1/b/bkt/o/obj"
        assert requests.get(url, params={"alt": "media"}, timeout=30).content == b"second, longer"
        old = requests.get(
            url, params={"alt": "media", "generation": str(first.generation)}, timeout=30
        )
        assert old.status_code == 404
        assert requests.delete(url, timeout=30).status_code == 204
        assert _object_files(tmp_path) == []
        assert requests.get(url, timeout=30).status_code == 404


def test_a_bucket_directory_without_its_record_is_no_bucket(tmp_path: Path) -> None:
    """What a kill between creating a bucket's directory and its record leaves behind."""
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("kept")
    (tmp_path / "buckets" / ("f" * 32)).mkdir()
    with GcsServer(data_dir=tmp_path) as server:
        assert [bucket.name for bucket in server.store.list_buckets()] == ["kept"]
    assert len(list((tmp_path / "buckets").iterdir())) == 1
