"""PIN verification with a secret key, so a stolen database does not give away PINs.

A four-digit PIN has only 10,000 values: any hash of it, however slow, is searched
offline in moments once the salt and hash are known. Following ISO 9564 practice (the
issuer verifies PINs with a secret key), the stored value is an HMAC-SHA-256 keyed with
a 32-byte secret that lives in its own file, outside the database. Without the key the
database holds no usable information about a PIN; the per-account random salt keeps two
accounts with the same PIN from having the same stored value.

Nothing here logs, stores or formats a plaintext PIN; error messages never echo one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from wire import (
    ACCOUNT_BYTES,
    PIN_BYTES,
    canonical_account,
    check_pin,
)

KEY_BYTES = 32
"""The PIN key's size: a full SHA-256 block of secret is more than HMAC-SHA-256 needs."""

SALT_BYTES = 16
"""Per-account random salt stored next to the PIN's HMAC."""

PIN_HMAC_BYTES = hashlib.sha256().digest_size
"""Size of the stored PIN value (32 bytes)."""

_DOMAIN = b"atm-bank pin v1\x00"
"""Prefix of every HMAC message, so this key's outputs cannot be confused with another use."""


class KeyFileError(Exception):
    """The PIN key file exists but cannot be trusted (wrong size, readable by others)."""


def new_salt() -> bytes:
    """A fresh random salt for one account's PIN."""
    return secrets.token_bytes(SALT_BYTES)


def hash_pin(key: bytes, salt: bytes, account: str, pin: str) -> bytes:
    """HMAC-SHA-256(key, domain || salt || account || pin), 32 bytes.

    Salt, account and PIN all have fixed lengths, so their concatenation is unambiguous.
    Binding the account means a row's PIN value cannot be copied onto another account;
    its canonical form means the account typed in either case gives the same HMAC.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"PIN key must be {KEY_BYTES} bytes")
    if len(salt) != SALT_BYTES:
        raise ValueError(f"PIN salt must be {SALT_BYTES} bytes")
    account_bytes = canonical_account(account).encode("ascii")
    pin_bytes = check_pin(pin).encode("ascii")
    assert len(account_bytes) == ACCOUNT_BYTES and len(pin_bytes) == PIN_BYTES
    message = _DOMAIN + salt + account_bytes + pin_bytes
    return hmac.new(key, message, hashlib.sha256).digest()


def verify(key: bytes, salt: bytes, account: str, pin: str, expected: bytes) -> bool:
    """Whether ``pin`` matches the stored HMAC; constant-time in the comparison."""
    return hmac.compare_digest(hash_pin(key, salt, account, pin), expected)


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """The PIN key at ``path``, created if it does not exist (see ``open_key``)."""
    return open_key(path)[0]


def open_key(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """The PIN key at ``path``, created (32 random bytes, mode 0600) if it does not
    exist, and whether this call created it.

    Creation is atomic: the key is written and fsynced under a temporary name opened with
    O_CREAT|O_EXCL and mode 0600, then hard-linked to ``path``, which fails if another
    process got there first. So ``path`` never exists half-written, and two servers
    starting together end up with the same key (and only one says it created it). An
    existing file is refused if it is not a regular file of exactly 32 bytes or if group
    or others may read or write it.
    """
    path = Path(path)
    try:
        try:
            return _read_key(path), False
        except FileNotFoundError:
            pass
        created = _create_key(path)
        return _read_key(path), created
    except OSError as error:  # a symlink (O_NOFOLLOW), no permission, a directory...
        raise KeyFileError(f"{path}: cannot use the PIN key: {error.strerror}") from error


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        _check_key_file(path, info)
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: PIN key changed size while being read")
    return key


def _check_key_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: PIN key is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: PIN key is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    if info.st_size != KEY_BYTES:
        raise KeyFileError(
            f"{path}: PIN key must be {KEY_BYTES} bytes, found {info.st_size}; "
            "refusing to use or replace it"
        )


def _create_key(path: Path) -> bool:
    """Whether the key at ``path`` is the one this call wrote (not another process's)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            _write_all(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        # Fails if another process created the key first; _read_key then checks theirs.
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable, so a crash cannot lose a key already in use."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
