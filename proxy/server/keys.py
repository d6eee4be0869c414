"""Secrets the proxy keeps: the upload-token key, and files that hold secrets.

The token key seals every upload token (see :mod:`proxy.server.tokens`), so whoever holds
it can forge tokens, and every proxy instance that should resume another's uploads needs
the same one. It comes from one of three places, in this order:

1. ``--token-key`` / ``RUP_TOKEN_KEY``: a key printed by ``rup keygen`` (32 random bytes,
   base64url; 64 hex digits work too), or a passphrase of at least
   :data:`MIN_PASSPHRASE_LENGTH` characters, stretched with scrypt.
2. ``--data-dir D``: the key in ``D/keys/token.key``, created (mode 0600, directory 0700)
   the first time and reused after, so a restarted proxy opens its own tokens.
3. Neither: a random key for this process only. Its uploads cannot outlive it.

Why scrypt with a fixed salt: every instance given the same passphrase must derive the
same key, so the salt cannot be random; scrypt's cost (about 0.1 s and 32 MiB per guess)
is what stops an offline dictionary search from one issued token, which took 0.8 s
against the single SHA-256 rup used before. The parameters are part of the key format:
changing them changes every derived key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "KEY_SIZE",
    "MIN_PASSPHRASE_LENGTH",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "SCRYPT_SALT",
    "KeyMaterialError",
    "generate_key_text",
    "key_from_text",
    "key_text",
    "load_or_create_secret",
    "private_directory",
]

#: AES-256-GCM
KEY_SIZE = 32
#: shorter passphrases are refused: scrypt slows a dictionary search, it cannot stop one
MIN_PASSPHRASE_LENGTH = 16
#: fixed on purpose (instances sharing a passphrase must agree); documented in docs/security.md
SCRYPT_SALT = b"rup upload-token key v2"
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
#: scrypt needs 128 * N * r bytes; OpenSSL's default cap (32 MiB) is exactly that, so allow more
_SCRYPT_MAXMEM = 64 * 1024 * 1024

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
#: 32 bytes in base64 (either alphabet), with or without its one '=' of padding
_BASE64_KEY = re.compile(r"[A-Za-z0-9_\-+/]{43}=?")

_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600


class KeyMaterialError(ValueError):
    """A key or passphrase that must not be used, or a key file that cannot be trusted.

    The message says why; it never contains the key or the passphrase.
    """


def generate_key_text() -> str:
    """A new random key in the form ``rup keygen`` prints (base64url, no padding)."""
    return key_text(secrets.token_bytes(KEY_SIZE))


def key_text(key: bytes) -> str:
    """``key`` as ``--token-key`` accepts it."""
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")


def key_from_text(text: str) -> bytes:
    """The 32-byte key that ``--token-key`` / ``RUP_TOKEN_KEY`` text stands for.

    A key printed by ``rup keygen`` (or 64 hex digits) is used as it is. Any other text is a
    passphrase: refused when shorter than :data:`MIN_PASSPHRASE_LENGTH` characters, else
    stretched with scrypt, so instances given the same passphrase derive the same key.
    """
    stripped = text.strip()
    if _HEX_KEY.fullmatch(stripped):
        return bytes.fromhex(stripped)
    if _BASE64_KEY.fullmatch(stripped):
        normalized = stripped.rstrip("=").replace("+", "-").replace("/", "_")
        with contextlib.suppress(binascii.Error, ValueError):
            key = base64.urlsafe_b64decode(normalized + "=")
            if len(key) == KEY_SIZE:
                return key
    if len(stripped) < MIN_PASSPHRASE_LENGTH:
        raise KeyMaterialError(
            f"the token key is neither a key from 'rup keygen' nor a passphrase of at least "
            f"{MIN_PASSPHRASE_LENGTH} characters (it has {len(stripped)}); "
            "run 'rup keygen' for a key"
        )
    return hashlib.scrypt(
        stripped.encode("utf-8"),
        salt=SCRYPT_SALT,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=KEY_SIZE,
    )


def private_directory(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (created 0700 if missing).

    An existing directory that others can enter is tightened to 0700: everything rup keeps
    under it (keys, session files) is secret.
    """
    path.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & ~0o077)
    return path


def load_or_create_secret(path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """The secret text in ``path``, creating it with ``make()`` if the file does not exist.

    Returns the text and whether it was created now. The file is written 0600 in a 0700
    directory and published with a rename, so a crash leaves it whole or absent, and two
    processes starting at once agree on one secret (the second one's link fails, and it
    reads the first one's). A file that others could read, or an empty one, is refused:
    the secret may have leaked, or been replaced.
    """
    private_directory(path.parent)
    try:
        return _read_secret(path), False
    except FileNotFoundError:
        pass
    text = make()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)  # fails if another process published one meanwhile
        except FileExistsError:
            return _read_secret(path), False
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path.parent)
    return text, True


def _read_secret(path: Path) -> str:
    with open(path, encoding="ascii") as file:
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise KeyMaterialError(
                f"{path} can be read by other users (mode {mode:04o}); "
                "the secret in it may have leaked: chmod 600 it, or replace it"
            )
        try:
            text = file.read().strip()
        except UnicodeDecodeError:
            text = ""
    if not text:
        raise KeyMaterialError(
            f"{path} is empty or unreadable; remove it to have a new secret made"
        )
    return text


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
