"""The server's settings: one dataclass from which flags, env vars and --help are made.

Every field is a command-line flag (``--idle-timeout-s``) and an environment variable
(``BANK_IDLE_TIMEOUT_S``); the flag wins over the variable, the variable over the default.
Limits carry their unit as the last word of their name.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bank.limits import LOCKOUT_MS_MAX
from wire import (
    AMOUNT_CENTS_MAX,
    HISTORY_ENTRIES_MAX,
    PAYLOAD_BYTES_MAX,
    SECONDS_MAX,
    Hello,
)

ENV_PREFIX = "BANK_"
WORKERS_MAX = 64
"""Most server processes ``--workers`` starts: far past the cores of one machine."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

PIN_LOCKOUT_S_MAX = LOCKOUT_MS_MAX // 1000
"""Longest ``pin_lockout_s``: one year (31,536,000 seconds), the storage's LOCKOUT_MS_MAX.

A lock's end (now plus the lockout) is a 64-bit database integer, so an unbounded
setting could overflow it and stop wrong PINs being counted at all; a year is far from
that, and longer than any timed lock is useful (past it, ``unlock`` is the tool)."""

DESTINATION_LOCKOUT_S_MAX = LOCKOUT_MS_MAX // 1000
"""Longest ``destination_lockout_s``: one year, for ``PIN_LOCKOUT_S_MAX``'s reasons."""


def _setting(default: object, help_text: str, kind: type | None = None, *,
             operator_help: str | None = None) -> Any:
    """A field with its --help text; ``kind`` parses the flag when the default is None.
    ``operator_help`` replaces the text in an operator command's --help, where the server's
    words would be wrong (operator commands create neither database nor key)."""
    return field(default=default, metadata={
        "help": help_text, "kind": kind or type(default),
        "operator_help": operator_help or help_text,
    })


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _setting(65432, "TCP port to listen on (0 picks a free one)")
    db: str = _setting(
        "bank.db", "the database: an SQLite file (created and seeded if missing), or a"
        " PostgreSQL postgresql:// URL or libpq key=value string (schema created and"
        " migrated on start)",
        operator_help="the bank's database, which the server made on its first start (never"
        " created here): an SQLite file, or a PostgreSQL postgresql:// URL or libpq"
        " key=value string",
    )
    key_file: Path = _setting(
        Path("bank.key"), "secret PIN key file; the server creates it (mode 0600) if missing",
        operator_help="the bank's secret PIN key file, which the server made on its first"
        " start (never created here)",
    )
    log_level: str = _setting("INFO", "operator log level: DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting(
        "text", "operator log format: text, or json (one object per line: time, level,"
        " logger, message) for a log shipper"
    )
    connections_max: int = _setting(
        1000, "connections served at once; when full, a new one evicts the oldest that has"
        " not logged in, or if every one has, gets SERVER_BUSY and is closed"
    )
    preauth_per_address_max: int = _setting(
        16, "connections one address (IPv6: one /64) may hold before logging in; beyond it"
        " SERVER_BUSY"
    )
    frame_timeout_s: int = _setting(
        10, "seconds a frame may take from its first byte to its last (and a reply to send)"
    )
    login_timeout_s: int = _setting(30, "seconds a connection may wait before logging in")
    idle_timeout_s: int = _setting(
        120, "seconds a logged-in session may stay silent before SESSION_EXPIRED"
    )
    shutdown_grace_s: int = _setting(
        10, "seconds connections get to finish after SHUTDOWN on SIGINT or SIGTERM"
    )
    login_attempts_max: int = _setting(3, "failed logins one connection may make before close")
    pin_tries_max: int = _setting(
        3, "wrong PINs in a row, each within the lockout period of the last, that lock an account"
    )
    pin_lockout_s: int = _setting(
        900, "seconds an account stays locked unless unlocked sooner, and a wrong PIN is remembered"
        f" (0: no locking; at most {PIN_LOCKOUT_S_MAX}, one year)"
    )
    destination_tries_max: int = _setting(
        5, "transfers to no account (INVALID_TO_ACCOUNT), each within the destination lockout"
        " period of the last, that lock the source account's transfers"
    )
    destination_lockout_s: int = _setting(
        900, "seconds an account's transfers stay locked unless unlocked sooner, and a"
        f" transfer to no account is remembered (0: no locking; at most"
        f" {DESTINATION_LOCKOUT_S_MAX}, one year)"
    )
    amount_cents_max: int = _setting(
        AMOUNT_CENTS_MAX, "largest deposit or withdrawal in one transaction, in cents"
    )
    withdrawal_cents_max: int = _setting(
        100_000, "largest withdrawal in one transaction, in cents (EXCEEDS_WITHDRAWAL_LIMIT)"
    )
    tls_cert: Path | None = _setting(
        None, "serve the protocol inside TLS with this certificate chain (PEM; with"
        " --tls-key); `python -m bank tls-init` makes one", kind=Path,
    )
    tls_key: Path | None = _setting(None, "the private key of --tls-cert (PEM)", kind=Path)
    tls_client_ca: Path | None = _setting(
        None, "require every ATM to present a terminal certificate signed by this CA"
        " (mutual TLS); `python -m bank tls-terminal` issues them", kind=Path,
    )
    tls12: bool = _setting(False, "accept TLS 1.2 as well as TLS 1.3 (1.3 only by default)")
    demo_accounts: bool | None = _setting(
        None, "seed a new database with the course's demo accounts, whose PINs are public"
        " (None, the default: only when --host is loopback)", kind=bool,
    )
    insecure_plaintext: bool = _setting(
        False, "serve without TLS on an address that is not loopback: PINs then cross the"
        " network in clear, so only on a network you trust"
    )
    ready_file: Path | None = _setting(
        None, "once listening, write the pid and the addresses served to this JSON file"
        " (atomically), for a launcher to wait on; removed on exit", kind=Path,
    )
    admin_port: int | None = _setting(
        None, "serve /metrics (Prometheus) and /sessions (JSON) over HTTP on this port of"
        " 127.0.0.1 only (off by default; 1..65535); with --workers N, worker k (0..N-1)"
        " serves its own on this port plus k", kind=int,
    )
    workers: int = _setting(
        1, "server processes sharing the port (SO_REUSEPORT), supervised by this one: a"
        " worker that dies is restarted; more than 1 needs a PostgreSQL --db"
    )
    lease_expiry_s: int = _setting(
        10, "PostgreSQL only: seconds an account's cluster lease outlives its process's"
        " last heartbeat (a third of it apart); a frozen or cut-off server's sessions can"
        " be taken over after this, a dead one's at once"
    )

    def __post_init__(self) -> None:
        if is_postgresql(self.db):
            check_connection_string(self.db)
        for name in ("frame_timeout_s", "login_timeout_s", "idle_timeout_s"):
            if not 1 <= getattr(self, name) <= SECONDS_MAX:
                raise ValueError(f"{name} must be 1..{SECONDS_MAX} seconds")
        if not 0 <= self.shutdown_grace_s <= SECONDS_MAX:
            raise ValueError(f"shutdown_grace_s must be 0..{SECONDS_MAX} seconds")
        if not 1 <= self.amount_cents_max <= AMOUNT_CENTS_MAX:
            raise ValueError(f"amount_cents_max must be 1..{AMOUNT_CENTS_MAX} cents")
        if not 1 <= self.withdrawal_cents_max <= self.amount_cents_max:
            raise ValueError(
                "withdrawal_cents_max must be at least 1 cent and at most amount_cents_max"
            )
        for name in (
            "connections_max", "preauth_per_address_max", "login_attempts_max", "pin_tries_max",
            "destination_tries_max",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.pin_lockout_s <= PIN_LOCKOUT_S_MAX:
            raise ValueError(f"pin_lockout_s must be 0..{PIN_LOCKOUT_S_MAX} seconds (one year)")
        if not 0 <= self.destination_lockout_s <= DESTINATION_LOCKOUT_S_MAX:
            raise ValueError(
                f"destination_lockout_s must be 0..{DESTINATION_LOCKOUT_S_MAX} seconds (one year)"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if self.admin_port is not None and not 1 <= self.admin_port <= 65535:
            raise ValueError("admin_port must be 1..65535")
        self._check_cluster()
        self._check_tls()

    def _check_cluster(self) -> None:
        if not 1 <= self.workers <= WORKERS_MAX:
            raise ValueError(f"workers must be 1..{WORKERS_MAX}")
        if self.workers > 1 and not self.uses_postgresql:
            raise ValueError(
                "workers above 1 needs a PostgreSQL db (a postgresql:// URL): SQLite serves"
                " one process, whose in-process lock is the whole account lease"
            )
        if self.admin_port is not None and self.admin_port + self.workers - 1 > 65535:
            raise ValueError("admin_port plus workers - 1 must be at most 65535")
        if not 1 <= self.lease_expiry_s <= SECONDS_MAX:
            raise ValueError(f"lease_expiry_s must be 1..{SECONDS_MAX} seconds")

    @property
    def uses_postgresql(self) -> bool:
        """Whether ``db`` names a PostgreSQL database rather than an SQLite file."""
        return is_postgresql(self.db)

    def _check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_cert is None and (self.tls_client_ca is not None or self.tls12):
            raise ValueError("tls_client_ca and tls12 need tls_cert and tls_key")
        if self.tls_cert is None and not self.insecure_plaintext and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve plaintext on {self.host}, which is not loopback: PINs"
                " would cross the network in clear. Give tls_cert and tls_key (python -m bank"
                " tls-init makes them; see the README's TLS section), or insecure_plaintext"
                " on a network you trust"
            )

    @property
    def seeds_demo_accounts(self) -> bool:
        """Whether a new database gets the demo accounts: as ``demo_accounts`` says, and
        if it says nothing, only on loopback (an address others can reach is no place for
        accounts whose PINs are public)."""
        if self.demo_accounts is None:
            return is_loopback(self.host)
        return self.demo_accounts

    def hello(self) -> Hello:
        """The greeting that announces these settings' limits to every ATM."""
        return Hello(
            payload_bytes_max=PAYLOAD_BYTES_MAX,
            history_entries_max=HISTORY_ENTRIES_MAX,
            amount_cents_max=self.amount_cents_max,
            frame_timeout_s=self.frame_timeout_s,
            login_timeout_s=self.login_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
        )


POSTGRESQL_URL_SCHEMES = ("postgresql://", "postgres://")
_LIBPQ_KEYWORD = re.compile(
    r"\s*(host|hostaddr|port|dbname|user|password|passfile|service|sslmode|options"
    r"|application_name|connect_timeout|target_session_attrs)\s*="
)
"""A libpq key=value string starts with one of its keywords, ``host=`` or ``dbname=``
say; no file name an operator would give does."""


def is_postgresql(db: str | os.PathLike[str]) -> bool:
    """Whether ``--db`` names a PostgreSQL database (a ``postgresql://`` URL or a libpq
    key=value string) rather than an SQLite file: the one place that decides."""
    text = os.fspath(db)
    return text.startswith(POSTGRESQL_URL_SCHEMES) or _LIBPQ_KEYWORD.match(text) is not None


_URL_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:@/?#]*:)[^@/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)")
REDACTED = "***"


def redact_db(db: str | os.PathLike[str]) -> str:
    """``--db`` as it may be logged, printed or put in an error: a password in a
    PostgreSQL URL (``user:secret@``, ``?password=``) or key=value string
    (``password=secret``) becomes ``***``; a file name is itself."""
    text = os.fspath(db)
    if not is_postgresql(text):
        return text
    if not is_readable_connection_string(text):  # where its password ends is anyone's guess
        return UNREADABLE_DB
    if text.startswith(POSTGRESQL_URL_SCHEMES):
        text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)
        return _QUERY_PASSWORD.sub(rf"\g<1>{REDACTED}", text)
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{REDACTED}", text)


_UNREADABLE_BECAUSE = (
    ("unterminated quoted string", "a quoted value is not closed"),
    ('missing "=" after', "a word in it is not followed by ="),
    ("invalid connection option", "it names a setting libpq does not know"),
    ("unexpected spaces", "a URL may not hold a space: write it as %20"),
    ("missing key/value separator", "a URL query parameter has no ="),
    ("IPv6 host address", "an IPv6 address in it lacks its closing ]"),
)
"""libpq's complaints about a connection string it cannot parse, in our words. libpq's
own quote the text around the fault (``missing "=" after "def"``), which may be part of a
password that the redaction, parsing the same broken string, could not find."""


UNREADABLE_DB = "(a PostgreSQL connection string libpq cannot read, not shown)"


def is_readable_connection_string(db: str) -> bool:
    try:
        check_connection_string(db)
    except ValueError:
        return False
    return True


def check_connection_string(db: str) -> None:
    """A ValueError in one plain sentence, echoing nothing of ``db``, if libpq cannot
    parse it (so before anything connects, or logs ``db``)."""
    try:
        conninfo_to_dict(db)
    except psycopg.Error as error:
        complaint = str(error)
        reason = next(
            (ours for theirs, ours in _UNREADABLE_BECAUSE if theirs in complaint),
            "libpq cannot parse it",
        )
        raise ValueError(
            f"db is not a PostgreSQL connection string libpq can read ({reason}); it is"
            " not repeated here, since it may hold a password"
        ) from None


def hide_password(text: str, db: str | os.PathLike[str]) -> str:
    """``text`` (an error message, say) with ``--db`` redacted in it, and with the
    password itself as ``***`` should a driver ever quote it, raw or URL-decoded."""
    target = os.fspath(db)
    if not is_postgresql(target):
        return text
    text = text.replace(target, redact_db(target))
    if target.startswith(POSTGRESQL_URL_SCHEMES):
        found = [m.group(0)[len(m.group(1)):-1] for m in _URL_PASSWORD.finditer(target)]
        found += [target[m.end(1):m.end()] for m in _QUERY_PASSWORD.finditer(target)]
    else:
        found = [m.group(2) for m in _KEYWORD_PASSWORD.finditer(target)]
    for password in found:
        for spelling in {password, password.strip("'"), urllib.parse.unquote(password)}:
            if spelling:
                text = text.replace(spelling, REDACTED)
    return text


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): only there may the
    server listen without TLS by default. A host name other than localhost may resolve
    anywhere, so it counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_bool(text: str) -> bool:
    """An environment variable's truth: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a yes or no: {text!r}")


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``log_level`` is ``--log-level``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, *,
                  operator: bool = False) -> None:
    """Add a flag per setting (or the named ones). A flag not given leaves no attribute
    (``argparse.SUPPRESS``), so a flag given before a subcommand is not undone by the
    subcommand's own copy of it; ``from_arguments`` fills in the env var, then default.
    ``operator``: for an operator command, with its own words where they differ."""
    defaults = _defaults(parser)
    for f in fields(ServerConfig):
        if names is not None and f.name not in names:
            continue
        kind = f.metadata["kind"]
        env = ENV_PREFIX + f.name.upper()
        now = redact_db(defaults[f.name]) if f.name == "db" else defaults[f.name]
        words = f.metadata["operator_help" if operator else "help"]
        help_text = f"{words} (env {env}; now {now})".replace("%", "%%")
        if kind is bool:  # a switch: --tls12, or --no-tls12 over the env var
            parser.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        else:
            parser.add_argument(
                flag(f.name), type=kind, default=argparse.SUPPRESS, help=help_text
            )


def given(args: argparse.Namespace) -> set[str]:
    """The settings given as flags, by field name."""
    return {f.name for f in fields(ServerConfig)} & set(vars(args))


def from_arguments(args: argparse.Namespace) -> ServerConfig:
    """The settings: each flag given, else its env var, else its default."""
    defaults = env_defaults()
    return ServerConfig(**{**defaults, **{name: getattr(args, name) for name in given(args)}})


def env_defaults() -> dict[str, Any]:
    """Each setting's env var if set, else its default; ValueError names a bad env var."""
    defaults: dict[str, Any] = {}
    for f in fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        kind = f.metadata["kind"]
        parse = _parse_bool if kind is bool else kind
        try:
            defaults[f.name] = parse(os.environ[env]) if env in os.environ else f.default
        except ValueError:
            raise ValueError(f"{env}={os.environ[env]!r} is not a valid {kind.__name__}") from None
    return defaults


def _defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return env_defaults()
    except ValueError as error:
        parser.error(str(error))
