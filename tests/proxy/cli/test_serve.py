"""``rup serve`` as a user runs it: a subprocess that serves, then stops cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import stat
from pathlib import Path

import pytest
import requests
import trio

from faultnet.gcs import GcsServer
from protocol import Complete, Completed, GoingAway
from proxy.cli.serve import (
    KeySource,
    configure,
    settings_from_args,
    startup_warnings,
    target_from_args,
    token_key_from_args,
)
from proxy.server.backend import Backend, TargetKind
from proxy.server.keys import key_from_text
from proxy.server.settings import MiB, ServerSettings, SettingsError
from tests.proxy.cli.commands import read_line, rup_process
from tests.proxy.conftest import RawClient
from tests.proxy.server.processes import RupProcess, running
from tests.proxy.server.test_uploads import send_range


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def test_flags_and_environment_become_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUP_AUTH_TOKEN", "first-secret,second-secret")
    monkeypatch.setenv("RUP_TOKEN_KEY", "a shared secret passphrase")
    args = _parse(
        "--listen", "0.0.0.0:9000",
        "--upload-buffer-mib", "8",
        "--total-buffer-mib", "64",
        "--allow-bucket", "b1",
        "--allow-prefix", "in/",
    )  # fmt: skip

    settings = settings_from_args(args)

    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.auth_tokens == ("first-secret", "second-secret")
    assert settings.token_key == key_from_text("a shared secret passphrase")
    assert settings.upload_buffer_limit == 8 * MiB
    assert settings.total_buffer_limit == 64 * MiB
    assert settings.allows("b1", "in/x")
    assert not settings.allows("b1", "out/x")
    assert "first-secret" not in repr(settings)


def test_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUP_AUTH_TOKEN", "from-env")
    settings = settings_from_args(_parse("--auth-token", "from-flag"))
    assert settings.auth_tokens == ("from-flag",)


def test_tls_needs_both_certificate_and_key(tmp_path: object) -> None:
    with pytest.raises(SettingsError, match="go together"):
        settings_from_args(_parse("--tls-cert", "cert.pem"))


def test_the_data_dir_keeps_one_key_and_one_gcs_secret_across_restarts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RUP_TOKEN_KEY", raising=False)
    monkeypatch.delenv("RUP_GCS_ACCESS_TOKEN", raising=False)
    data_dir = tmp_path / "data"
    args = _parse("--data-dir", str(data_dir))

    key, source = token_key_from_args(args)
    target, access = target_from_args(args)
    key_again, _ = token_key_from_args(args)
    target_again, _ = target_from_args(args)

    assert source is KeySource.DATA_DIR
    assert key == key_again
    assert len(key) == 32
    assert target.access_token
    assert target.access_token == target_again.access_token
    assert "gcs-access-token" in access
    assert not target.creates_buckets()
    for path in (data_dir, data_dir / "keys"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in (data_dir / "keys" / "token.key", data_dir / "keys" / "gcs-access-token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_given_key_wins_and_no_key_means_a_random_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUP_TOKEN_KEY", raising=False)
    first, source = token_key_from_args(_parse())
    second, _ = token_key_from_args(_parse())
    assert source is KeySource.EPHEMERAL
    assert first != second

    key, source = token_key_from_args(_parse("--token-key", "0123456789abcdef0123"))
    assert source is KeySource.GIVEN
    assert key == key_from_text("0123456789abcdef0123")


def test_the_in_memory_endpoint_gets_a_per_process_secret_unless_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUP_GCS_ACCESS_TOKEN", raising=False)
    target, _ = target_from_args(_parse("--embedded"))
    other, _ = target_from_args(_parse("--embedded"))
    assert target.access_token
    assert target.access_token != other.access_token
    assert target.creates_buckets()

    opened, access = target_from_args(_parse("--embedded", "--gcs-open"))
    assert opened.access_token is None
    assert "open" in access

    monkeypatch.setenv("RUP_GCS_ACCESS_TOKEN", "chosen-secret")
    chosen, _ = target_from_args(_parse("--embedded", "--gcs-listen", "127.0.0.1:9999"))
    assert chosen.access_token == "chosen-secret"
    assert chosen.listen == ("127.0.0.1", 9999)


def test_an_external_endpoint_gets_the_bearer_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUP_GCS_ACCESS_TOKEN", "endpoint-secret")
    target, _ = target_from_args(_parse("--gcs-endpoint", "http://127.0.0.1:1"))
    assert target.access_token == "endpoint-secret"
    with pytest.raises(SettingsError, match="embedded"):
        target_from_args(_parse("--gcs-endpoint", "http://127.0.0.1:1", "--gcs-open"))


def _warnings(
    settings: ServerSettings,
    kind: TargetKind,
    source: KeySource,
    gcs_open: bool,
    *,
    in_memory: bool = False,
) -> set[str]:
    backend = Backend(object(), kind, "http://127.0.0.1:1")
    warnings = startup_warnings(settings, backend, source, gcs_open, in_memory=in_memory)
    return {event for event, _ in warnings}


def test_startup_warns_about_what_is_exposed_or_lost() -> None:
    quiet = ServerSettings(host="127.0.0.1")
    assert not _warnings(quiet, TargetKind.EMBEDDED, KeySource.DATA_DIR, False)
    assert _warnings(quiet, TargetKind.EMBEDDED, KeySource.EPHEMERAL, False) == {
        "uploads-cannot-outlive-this-process"
    }
    for public in ("0.0.0.0", "::", "192.0.2.7", "proxy.example"):
        assert _warnings(
            ServerSettings(host=public), TargetKind.ENDPOINT, KeySource.GIVEN, False
        ) == {"no-auth-on-a-public-address"}
    guarded = ServerSettings(host="0.0.0.0", auth_tokens=("t",))
    assert not _warnings(guarded, TargetKind.ENDPOINT, KeySource.GIVEN, False)
    # A given key cannot save sessions the in-memory endpoint forgets on exit.
    assert _warnings(quiet, TargetKind.EMBEDDED, KeySource.GIVEN, False, in_memory=True) == {
        "uploads-cannot-outlive-this-process"
    }
    assert not _warnings(quiet, TargetKind.EMBEDDED, KeySource.GIVEN, False)
    assert not _warnings(quiet, TargetKind.ENDPOINT, KeySource.GIVEN, False)
    assert "gcs-endpoint-open" in _warnings(quiet, TargetKind.EMBEDDED, KeySource.DATA_DIR, True)


@pytest.mark.slow
async def test_serve_uploads_then_stops_on_sigterm(gcs_bucket: str, gcs_server: GcsServer) -> None:
    async with rup_process(
        "serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", gcs_server.url
    ) as (process, logs):
        line = await read_line(process)
        assert "listening on" in line, line
        host, _, port = line.split("listening on ", 1)[1].split()[0].rpartition(":")

        client = RawClient(await trio.open_tcp_stream(host, int(port)))
        await client.hello()
        await client.open(gcs_bucket, "served.bin")
        data = os.urandom(MiB)
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data)))
        assert (await client.reply(Completed)).size == len(data)

        process.send_signal(signal.SIGTERM)
        assert isinstance(await client.reply(GoingAway), GoingAway)
        await client.aclose()
        with trio.fail_after(30):
            code = await process.wait()

    text = logs.decode()
    assert code == 0, text
    assert "upload-completed" in text
    assert "uploads-cannot-outlive-this-process" in text  # no key, no data dir
    assert "upload_id=" not in text.replace("upload_id=[redacted]", "")


def test_the_embedded_endpoint_does_not_go_around_the_proxys_auth(tmp_path: Path) -> None:
    # A local user finds the embedded endpoint's port and tries it directly: every request
    # without the secret is refused, and the data dir is closed to other users.
    data_dir = tmp_path / "data"
    proxy = RupProcess(
        "proxy",
        ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--create-buckets"],
        tmp_path,
        env={"RUP_AUTH_TOKEN": "proxy-bearer-token"},
    )
    with running(proxy):
        proxy.start()
        url = proxy.wait_for(r"embedded GCS endpoint \S+").split()[-1]
        attempts = [
            requests.get(f"{url}/storage/v1/b", params={"project": "x"}, timeout=10),
            requests.post(f"{url}/storage/v1/b", json={"name": "mine"}, timeout=10),
            requests.post(
                f"{url}/upload/storage/v1/b/mine/o",
                params={"uploadType": "media", "name": "x"},
                data=b"sneaked in",
                timeout=10,
            ),
            requests.get(
                f"{url}/storage/v1/b/mine/o",
                headers={"Authorization": "Bearer proxy-bearer-token"},
                timeout=10,
            ),
        ]
        assert [response.status_code for response in attempts] == [401] * len(attempts)
        secret = (data_dir / "keys" / "gcs-access-token").read_text().strip()
        allowed = requests.get(
            f"{url}/storage/v1/b",
            params={"project": "x"},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=10,
        )
        assert allowed.status_code == 200
    for path in (data_dir, data_dir / "keys"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in (data_dir / "keys").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret not in proxy.stdout(all_runs=True) + proxy.stderr(all_runs=True)
