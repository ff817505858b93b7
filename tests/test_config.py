"""ServerConfig's limits: the PIN lockout is bounded so a lock's end always fits SQLite;
plaintext is refused off loopback; TLS settings come as a whole; switches parse."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

import pytest

from bank.__main__ import build_parser, main
from bank.config import (
    DESTINATION_LOCKOUT_S_MAX,
    PIN_LOCKOUT_S_MAX,
    ServerConfig,
    add_arguments,
    from_arguments,
    hide_password,
    is_postgresql,
    redact_db,
)
from bank.limits import LOCKOUT_MS_MAX


def test_the_lockout_limit_is_one_year_and_the_stores_own():
    assert PIN_LOCKOUT_S_MAX == 365 * 24 * 60 * 60
    assert PIN_LOCKOUT_S_MAX * 1000 == LOCKOUT_MS_MAX


@pytest.mark.parametrize("seconds", [0, 900, PIN_LOCKOUT_S_MAX])
def test_a_lockout_up_to_the_limit_is_accepted(seconds: int):
    assert ServerConfig(pin_lockout_s=seconds).pin_lockout_s == seconds


@pytest.mark.parametrize("seconds", [-1, PIN_LOCKOUT_S_MAX + 1, 2**63])
def test_a_lockout_past_the_limit_is_refused(seconds: int):
    with pytest.raises(ValueError, match=rf"pin_lockout_s must be 0\.\.{PIN_LOCKOUT_S_MAX} "):
        ServerConfig(pin_lockout_s=seconds)


def test_the_flag_and_the_env_var_are_held_to_the_limit(monkeypatch: pytest.MonkeyPatch):
    # Through the parser, not main(): were the check lost, main() would start serving.
    past_the_limit = str(PIN_LOCKOUT_S_MAX + 1)
    with pytest.raises(ValueError, match="pin_lockout_s"):
        from_arguments(build_parser().parse_args(["--pin-lockout-s", past_the_limit]))
    monkeypatch.setenv("BANK_PIN_LOCKOUT_S", past_the_limit)
    with pytest.raises(ValueError, match="pin_lockout_s"):
        from_arguments(build_parser().parse_args([]))


def test_the_transfer_lock_settings_are_bounded_as_the_pin_lock_settings_are(
    monkeypatch: pytest.MonkeyPatch,
):
    defaults = ServerConfig()
    assert (defaults.destination_tries_max, defaults.destination_lockout_s) == (5, 900)
    assert DESTINATION_LOCKOUT_S_MAX == PIN_LOCKOUT_S_MAX
    for seconds in (0, DESTINATION_LOCKOUT_S_MAX):
        assert ServerConfig(destination_lockout_s=seconds).destination_lockout_s == seconds
    for seconds in (-1, DESTINATION_LOCKOUT_S_MAX + 1):
        limit = rf"destination_lockout_s must be 0\.\.{DESTINATION_LOCKOUT_S_MAX} "
        with pytest.raises(ValueError, match=limit):
            ServerConfig(destination_lockout_s=seconds)
    with pytest.raises(ValueError, match="destination_tries_max must be at least 1"):
        ServerConfig(destination_tries_max=0)
    parsed = build_parser().parse_args(["--destination-tries-max", "2"])
    assert from_arguments(parsed).destination_tries_max == 2
    monkeypatch.setenv("BANK_DESTINATION_LOCKOUT_S", str(DESTINATION_LOCKOUT_S_MAX + 1))
    with pytest.raises(ValueError, match="destination_lockout_s"):
        from_arguments(build_parser().parse_args([]))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "bank.example"])
def test_plaintext_off_loopback_is_refused_unless_asked_for(host: str) -> None:
    with pytest.raises(ValueError, match="refusing to serve plaintext"):
        ServerConfig(host=host)
    assert ServerConfig(host=host, insecure_plaintext=True).host == host
    tls = ServerConfig(host=host, tls_cert=Path("server.pem"), tls_key=Path("server.key"))
    assert tls.tls_cert == Path("server.pem")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_plaintext_on_loopback_is_the_default(host: str) -> None:
    assert not ServerConfig(host=host).insecure_plaintext


@pytest.mark.parametrize(
    "settings",
    [
        {"tls_cert": Path("server.pem")},
        {"tls_key": Path("server.key")},
        {"tls_client_ca": Path("ca.pem")},
        {"tls12": True},
    ],
)
def test_tls_settings_that_cannot_work_alone_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="tls"):
        ServerConfig(**settings)  # type: ignore[arg-type]


def test_switches_take_flags_and_yes_or_no_env_vars() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ["tls12", "insecure_plaintext"])
    assert parser.parse_args(["--tls12"]).tls12 is True
    assert from_arguments(parser.parse_args([])).insecure_plaintext is False
    with mock.patch.dict(os.environ, {"BANK_INSECURE_PLAINTEXT": "yes"}):
        assert from_arguments(parser.parse_args([])).insecure_plaintext is True
        plain = from_arguments(parser.parse_args(["--no-insecure-plaintext"]))
        assert plain.insecure_plaintext is False


# -- --db: an SQLite file or PostgreSQL, and a password never shown -------------------------

@pytest.mark.parametrize(
    ("db", "postgresql"),
    [
        ("bank.db", False),
        ("/var/lib/bank/bank.db", False),
        ("weird=name.db", False),
        ("postgresql://bank@db.example/bank", True),
        ("postgres://bank@db.example/bank", True),
        ("host=/run/postgresql dbname=bank", True),
        ("dbname=bank", True),
    ],
)
def test_one_function_tells_a_file_from_postgresql(db: str, postgresql: bool):
    assert is_postgresql(db) is postgresql
    assert is_postgresql(Path(db)) is postgresql or "://" in db  # a Path mangles a URL


@pytest.mark.parametrize(
    ("db", "shown", "password"),
    [
        ("postgresql://bank:s3cret@db.example:5432/bank",
         "postgresql://bank:***@db.example:5432/bank", "s3cret"),
        ("postgresql://bank:s3%40cret@db.example/bank",
         "postgresql://bank:***@db.example/bank", "s3@cret"),
        ("postgresql://bank@db.example/bank?password=s3cret&sslmode=require",
         "postgresql://bank@db.example/bank?password=***&sslmode=require", "s3cret"),
        ("host=db.example password=s3cret dbname=bank",
         "host=db.example password=*** dbname=bank", "s3cret"),
        ("host=db.example password = 's3 cret' dbname=bank",
         "host=db.example password = *** dbname=bank", "s3 cret"),
        ("postgresql://bank@db.example/bank", "postgresql://bank@db.example/bank", None),
        ("bank.db", "bank.db", None),
    ],
)
def test_a_password_in_db_is_redacted(db: str, shown: str, password: str | None):
    assert redact_db(db) == shown
    if password is not None:  # and should a driver quote it, raw or decoded, it goes too
        message = hide_password(f"cannot reach {db}: password {password!r} refused", db)
        assert password not in message and shown in message


def test_help_never_shows_the_password_of_bank_db(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("BANK_DB", "postgresql://bank:s3cret@db.example/bank")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "s3cret" not in out and "bank:***@db.example" in " ".join(out.split())
    assert from_arguments(build_parser().parse_args([])).db.endswith("s3cret@db.example/bank")


MALFORMED_WITH_PASSWORDS = [
    # (connection string, the password its writer meant, as it is spelled in it)
    ("host=db.example password='s3cr etXQ dbname=bank", "s3cr etXQ"),  # quote not closed
    ("host=db.example password=hunter zebra42 dbname=bank", "hunter zebra42"),  # no quotes
    ("host=db.example password=hunter zebra42=1", "hunter zebra42"),
    ("host=db.example password='a\\'b\\'c", "a'b'c"),
    ("host=db.example PASSWORD=Upp3rCase! port", "Upp3rCase!"),
    ("host=db.example passwd=typ0dw0rd", "typ0dw0rd"),
    ("postgresql://bank:spa ced42@db.example/bank", "spa ced42"),
    ("postgresql://bank:s3cret77@[::1/bank", "s3cret77"),
    ("postgresql://bank@db.example/bank?pass word=sec77ret", "sec77ret"),
    ("postgresql://bank@db.example/bank?sslmode=require&password", "password"),
]


def fragments(password: str) -> set[str]:
    """Every run of 4 or more of the password's characters: none may be shown."""
    return {password[i:j] for i in range(len(password)) for j in range(i + 4, len(password) + 1)}


@pytest.mark.parametrize(("db", "password"), MALFORMED_WITH_PASSWORDS)
@pytest.mark.parametrize("command", [["accounts"], ["unlock", "AC-12345"], []])
def test_a_malformed_connection_string_is_a_plain_sentence_showing_none_of_it(
    db: str, password: str, command: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv("BANK_DB", raising=False)
    assert main([*command, "--db", db]) == 2  # a bad command line: nothing was tried
    err = capsys.readouterr().err
    assert err.startswith("bank: --db is not a PostgreSQL connection string libpq can read (")
    assert err.endswith("; it is not repeated here, since it may hold a password\n")
    assert err.count("\n") == 1
    if password != "password":
        shown = [fragment for fragment in fragments(password) if fragment in err]
        assert shown == []
    assert "db.example" not in err and "bank@" not in err  # none of the string at all


@pytest.mark.parametrize(("db", "password"), MALFORMED_WITH_PASSWORDS)
def test_a_malformed_connection_string_is_never_echoed_by_redact_db(db: str, password: str):
    shown = redact_db(db)
    assert [fragment for fragment in fragments(password) if fragment in shown] == [] or (
        password == "password"
    )
    assert "db.example" not in shown

