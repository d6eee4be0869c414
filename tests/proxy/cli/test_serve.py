"""``rup serve`` as a user runs it: a subprocess that serves, then stops cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest
import trio

from faultnet.gcs import GcsServer
from protocol import Complete, Completed, GoingAway
from proxy.cli.serve import configure, settings_from_args
from proxy.server.settings import MiB
from proxy.server.tokens import key_from_text
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def test_flags_and_environment_become_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUP_AUTH_TOKEN", "one,two")
    monkeypatch.setenv("RUP_TOKEN_KEY", "shared secret")
    args = _parse(
        "--listen", "0.0.0.0:9000",
        "--upload-buffer-mib", "8",
        "--total-buffer-mib", "64",
        "--allow-bucket", "b1",
        "--allow-prefix", "in/",
    )  # fmt: skip

    settings = settings_from_args(args)

    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.auth_tokens == ("one", "two")
    assert settings.token_key == key_from_text("shared secret")
    assert settings.upload_buffer_limit == 8 * MiB
    assert settings.total_buffer_limit == 64 * MiB
    assert settings.allows("b1", "in/x")
    assert not settings.allows("b1", "out/x")
    assert "one" not in repr(settings)


def test_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUP_AUTH_TOKEN", "from-env")
    settings = settings_from_args(_parse("--auth-token", "from-flag"))
    assert settings.auth_tokens == ("from-flag",)


def test_tls_needs_both_certificate_and_key(tmp_path: object) -> None:
    from proxy.server.settings import SettingsError

    with pytest.raises(SettingsError, match="go together"):
        settings_from_args(_parse("--tls-cert", "cert.pem"))


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            line += chunk
    return line.decode()


async def _read_all(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk


@pytest.mark.slow
async def test_serve_uploads_then_stops_on_sigterm(gcs_bucket: str, gcs_server: GcsServer) -> None:
    command = [sys.executable, "-m", "proxy.cli", "serve", "--listen", "127.0.0.1:0"]
    process = await trio.lowlevel.open_process(
        [*command, "--gcs-endpoint", gcs_server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    logs = bytearray()
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, process.stderr, logs)
            line = await _read_line(process.stdout)
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
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()

    text = logs.decode()
    assert code == 0, text
    assert "upload-completed" in text
    assert "upload_id=" not in text.replace("upload_id=[redacted]", "")
