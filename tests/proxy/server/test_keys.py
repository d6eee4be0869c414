"""Token keys: generated, stretched from a passphrase, kept in the data dir; secret files."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.server.keys import (
    MIN_PASSPHRASE_LENGTH,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SCRYPT_SALT,
    KeyMaterialError,
    generate_key_text,
    key_from_text,
    key_text,
    load_or_create_secret,
    private_directory,
)


def test_keygen_prints_a_fresh_32_byte_base64url_key_each_time() -> None:
    printed = [
        subprocess.run(
            [sys.executable, "-m", "proxy.cli", "keygen"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert printed[0] != printed[1]
    for text in printed:
        assert len(text) == 43
        assert "=" not in text
        assert "+" not in text
        assert "/" not in text
        assert key_from_text(text) == base64.urlsafe_b64decode(text + "=")


def test_a_key_is_used_as_it_is_in_every_spelling() -> None:
    raw = bytes(range(32))
    assert key_from_text(key_text(raw)) == raw
    assert key_from_text(key_text(raw) + "=") == raw
    assert key_from_text(base64.b64encode(raw).decode()) == raw
    assert key_from_text(raw.hex()) == raw
    assert key_from_text(f"  {key_text(raw)}\n") == raw
    assert key_from_text(generate_key_text()) != key_from_text(generate_key_text())


def test_a_passphrase_is_stretched_with_the_documented_scrypt_parameters() -> None:
    passphrase = "correct horse battery staple"
    expected = hashlib.scrypt(
        passphrase.encode(),
        salt=SCRYPT_SALT,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 << 20,
        dklen=32,
    )
    assert key_from_text(passphrase) == expected
    # The single SHA-256 of before is gone: a dictionary word costs scrypt now.
    assert key_from_text(passphrase) != hashlib.sha256(passphrase.encode()).digest()
    assert key_from_text(passphrase) != key_from_text(passphrase + "!")


@pytest.mark.parametrize("passphrase", ["hunter2", "x" * (MIN_PASSPHRASE_LENGTH - 1), ""])
def test_a_short_passphrase_is_refused_without_being_echoed(passphrase: str) -> None:
    with pytest.raises(KeyMaterialError, match="rup keygen") as info:
        key_from_text(passphrase)
    if passphrase:
        assert passphrase not in str(info.value)


def test_rup_serve_refuses_a_short_passphrase_with_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUP_TOKEN_KEY": "hunter2"},
    )
    assert result.returncode == 2, result.stderr
    assert "rup keygen" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_a_secret_is_made_once_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "token.key"
    made: list[str] = []

    def make() -> str:
        made.append(generate_key_text())
        return made[-1]

    first, created = load_or_create_secret(path, make)
    again, created_again = load_or_create_secret(path, make)

    assert (created, created_again) == (True, False)
    assert first == again == made[0]
    assert len(made) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["token.key"]  # no temporary left


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    path.write_text(generate_key_text())
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="other users"):
        load_or_create_secret(path, generate_key_text)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    path.touch(mode=0o600)
    with pytest.raises(KeyMaterialError, match="empty"):
        load_or_create_secret(path, generate_key_text)


def test_a_private_directory_is_tightened(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    private_directory(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
