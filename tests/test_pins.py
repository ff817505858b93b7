"""PIN hashing and the PIN key file: HMAC with a secret key kept outside the database.

Covers the HMAC's inputs (salt, canonical account, PIN, key), constant-time verify, and
the key file's creation (0600, atomic, reused) and refusal of untrustworthy files.
"""

import os
import stat
from pathlib import Path

import pytest

from bank.pins import (
    KEY_BYTES,
    PIN_HMAC_BYTES,
    SALT_BYTES,
    KeyFileError,
    hash_pin,
    load_or_create_key,
    new_salt,
    verify,
)

KEY = bytes(range(KEY_BYTES))
SALT = bytes(range(SALT_BYTES))


def test_hash_is_hmac_sized_and_deterministic():
    first = hash_pin(KEY, SALT, "AC-12345", "1324")
    assert len(first) == PIN_HMAC_BYTES
    assert first == hash_pin(KEY, SALT, "AC-12345", "1324")


def test_account_case_does_not_matter():
    assert hash_pin(KEY, SALT, "ac-12345", "1324") == hash_pin(KEY, SALT, "AC-12345", "1324")


@pytest.mark.parametrize(
    ("key", "salt", "account", "pin"),
    [
        (bytes(KEY_BYTES), SALT, "AC-12345", "1324"),
        (KEY, bytes(SALT_BYTES), "AC-12345", "1324"),
        (KEY, SALT, "AC-12346", "1324"),
        (KEY, SALT, "AC-12345", "1325"),
    ],
)
def test_every_input_changes_the_hash(key: bytes, salt: bytes, account: str, pin: str):
    assert hash_pin(key, salt, account, pin) != hash_pin(KEY, SALT, "AC-12345", "1324")


def test_verify():
    stored = hash_pin(KEY, SALT, "AC-12345", "1324")
    assert verify(KEY, SALT, "ac-12345", "1324", stored)
    assert not verify(KEY, SALT, "AC-12345", "1325", stored)
    assert not verify(bytes(KEY_BYTES), SALT, "AC-12345", "1324", stored)


def test_salts_are_random():
    assert len(new_salt()) == SALT_BYTES
    assert new_salt() != new_salt()


@pytest.mark.parametrize(("account", "pin"), [("AC-1234", "1324"), ("AC-12345", "132")])
def test_a_malformed_account_or_pin_is_refused(account: str, pin: str):
    with pytest.raises(ValueError):
        hash_pin(KEY, SALT, account, pin)


def test_wrong_key_or_salt_size_is_refused():
    with pytest.raises(ValueError):
        hash_pin(b"short", SALT, "AC-12345", "1324")
    with pytest.raises(ValueError):
        hash_pin(KEY, b"short", "AC-12345", "1324")


def test_key_file_created_0600_and_reused(tmp_path: Path):
    path = tmp_path / "pin.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key
    assert load_or_create_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["pin.key"]  # no temporary left over


def test_key_files_differ_between_installations(tmp_path: Path):
    assert load_or_create_key(tmp_path / "a.key") != load_or_create_key(tmp_path / "b.key")


def test_key_file_readable_by_others_is_refused(tmp_path: Path):
    path = tmp_path / "pin.key"
    load_or_create_key(path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key(path)


@pytest.mark.parametrize("size", [0, KEY_BYTES - 1, KEY_BYTES + 1])
def test_key_file_of_wrong_size_is_refused_and_kept(tmp_path: Path, size: int):
    path = tmp_path / "pin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(KeyFileError, match=f"{KEY_BYTES} bytes"):
        load_or_create_key(path)
    assert path.read_bytes() == b"k" * size


def test_key_path_that_is_a_directory_is_refused(tmp_path: Path):
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(tmp_path)


def test_key_path_that_is_a_symlink_is_refused_with_a_key_file_error(tmp_path: Path):
    target = tmp_path / "real.key"
    load_or_create_key(target)
    link = tmp_path / "pin.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="cannot use the PIN key"):
        load_or_create_key(link)

