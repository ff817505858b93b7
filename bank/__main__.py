"""``python -m bank``: serve ATMs, or manage accounts as an operator.

With no subcommand the server runs until SIGINT or SIGTERM, then shuts down gracefully.
Operator subcommands work on the database directly (stop the server first or not:
SQLite's locking, or PostgreSQL's, keeps both safe) and never print or take a PIN on the
command line. ``--db`` is an SQLite file or a PostgreSQL URL (``bank.config.is_postgresql``);
a password in it is never printed or logged.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import logging
import re
import signal
import sqlite3
import ssl
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import psycopg
import trio

from bank import config as settings
from bank.accounts_file import AccountsFileError, read_accounts
from bank.batch_ledger import BatchLedger, Opened, one_line, open_ledger, wall_clock_ms
from bank.config import ServerConfig, hide_password, is_postgresql, redact_db
from bank.db_lock import DatabaseLock
from bank.ledger import StorageError
from bank.pg_store import PgStore
from bank.pins import KeyFileError, load_or_create_key
from bank.readiness import listening_addresses, remove_ready_file, write_ready_file
from bank.server import BankServer, bind, open_files_needed, raise_open_files_limit
from bank.store import (
    AccountExists,
    BookEntry,
    Forgotten,
    SchemaError,
    Store,
    StoreError,
    UnknownAccount,
    read_accounts_summary,
    read_entries_by_txn_id,
    read_statement,
)
from bank.tls import (
    TlsError,
    check_in_date,
    check_purpose,
    init_ca_and_server,
    issue_terminal,
    server_context,
)
from bank.workers import exit_when_parent_ends, supervise, worker_index
from wire import (
    BALANCE_CENTS_MAX,
    TXN_ID_BYTES,
    EntryKind,
    canonical_account,
    check_pin,
    format_cents,
    is_trivial_pin,
    mask_account,
)

log = logging.getLogger("bank")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) before the server serves, or at an operator command's prompt: the
shell's convention, 128 + SIGINT."""
OPERATOR_SETTINGS = ["db", "key_file", "log_level"]
"""The settings an operator command takes, before or after its name; given in both
places, the one after the name wins."""
READER_SETTINGS = ["db", "log_level"]
"""The settings of the commands that only read the books: no PIN key."""
EXIT_NOT_BOOKED = 3
"""``txn``'s status for a transaction that moved no money, so that scripts can tell."""
STATEMENT_LIMIT_DEFAULT = 20
STATEMENT_LIMIT_MAX = 1_000
"""How many entries ``statement`` shows by default, and at most."""
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unused = settings.given(args) - set(args.settings)
    if unused:
        flags = ", ".join(sorted(settings.flag(name) for name in unused))
        parser.error(f"{args.command} does not take {flags}")
    try:
        config = settings.from_arguments(args)
    except ValueError as error:
        print(f"bank: {flag_names(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(),
        handlers=[log_handler(config.log_format, sys.stderr, worker=worker_index())],
    )
    args.argv = sys.argv[1:] if argv is None else argv
    command: Callable[[ServerConfig, argparse.Namespace], int] = args.run
    try:
        return command(config, args)
    except KeyboardInterrupt:
        # Serving, the server turns SIGINT into a graceful shutdown; before that (opening
        # the database) and at a PIN prompt it is the operator giving up: a sentence, not
        # a traceback. A database write it cut short was rolled back by the database.
        if sys.stderr.isatty():
            print(file=sys.stderr)  # a ^C at a prompt leaves the cursor on its line
        print("bank: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PinNotAllowed as error:
        print(f"bank: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UnknownAccount, AccountExists) as error:
        print(f"bank: {in_full(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except (
        StoreError, StorageError, KeyFileError, AccountsFileError, SchemaError, TlsError
    ) as error:
        print(f"bank: {hide_password(str(error), config.db)}", file=sys.stderr)
        return EXIT_FAILURE
    except (sqlite3.Error, psycopg.Error) as error:  # not a database, locked, unreachable...
        message = hide_password(one_line(error), config.db)
        print(f"bank: cannot use the database {redact_db(config.db)}: {message}",
              file=sys.stderr)
        return EXIT_FAILURE


def in_full(error: UnknownAccount | AccountExists) -> str:
    """The store's refusal as the operator's terminal says it: with the account in full.

    The store masks the account in the exception's own text, since the server may log
    it; an operator command's output is no log, and echoes the number its operator
    typed (or owns, in the file being imported)."""
    if isinstance(error, UnknownAccount):
        return f"no account {error.account}"
    return f"account {error.account} exists already"


def flag_names(message: str) -> str:
    """A settings error as the command line spells it: ``--log-level``, not ``log_level``."""
    names = "|".join(f.name for f in fields(ServerConfig))
    return re.sub(rf"(?<![\w-])({names})(?![\w-])", lambda m: settings.flag(m[1]), message)


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (time, level, logger, message; a traceback as
    exception; the worker's index under --workers), for log shippers: a message's own
    newlines stay inside its string."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if self.worker is not None:
            entry["worker"] = self.worker
        return json.dumps(entry, ensure_ascii=False)


def log_handler(log_format: str, stream: TextIO, *, worker: int | None = None) -> logging.Handler:
    """The operator log's handler on ``stream``, in ``log_format`` (text or json); a
    worker of ``--workers`` names itself in each line."""
    handler = logging.StreamHandler(stream)
    text_format = TEXT_LOG_FORMAT if worker is None else TEXT_LOG_FORMAT.replace(
        "%(name)s", f"worker-{worker} %(name)s"
    )
    handler.setFormatter(
        JsonLogFormatter(worker) if log_format == "json" else logging.Formatter(text_format)
    )
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bank",
        description="The bank server: serves ATMs over TCP until SIGINT or SIGTERM. "
        "Subcommands manage accounts in the same database.",
        epilog="Every flag can also be set by its environment variable; a flag wins. "
        "Run 'python -m bank COMMAND --help' for an operator command's flags.",
    )
    settings.add_arguments(parser)
    every_setting = [f.name for f in fields(ServerConfig)]
    parser.set_defaults(run=serve, command="serving", settings=every_setting)
    commands = parser.add_subparsers(title="operator commands", metavar="COMMAND")

    def command(
        name: str, run: Callable[..., int], help_text: str, names: list[str] = OPERATOR_SETTINGS
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        settings.add_arguments(sub, names, operator=True)
        sub.set_defaults(run=run, command=name, settings=names)
        return sub

    add = command(
        "add-account", add_account,
        "add an account; the PIN is asked for, and one a customer could not choose (four"
        " equal digits, or four in a row such as 1234) is refused with exit status 2",
    )
    add.add_argument("account", type=account_argument, help="account number, AA-NNNNN")
    add.add_argument(
        "--balance-cents", default="0", metavar="CENTS",
        help="opening balance in cents, e.g. 2500 for $25.00 (every money flag takes"
        " cents, as its name says)",
    )
    reset = command(
        "reset-pin", reset_pin,
        "set a new PIN for an account (asked for); one a customer could not choose (four"
        " equal digits, or four in a row such as 1234) is refused with exit status 2",
    )
    reset.add_argument("account", type=account_argument, help="account number, AA-NNNNN")
    unlock = command(
        "unlock", unlock_account,
        "unlock an account locked by wrong PINs, or whose transfers are locked by transfers"
        " to no account",
    )
    unlock.add_argument("account", type=account_argument, help="account number, AA-NNNNN")
    load = command(
        "import", import_accounts,
        "add accounts from a course accounts.txt file; PINs a customer could not choose"
        " (four equal digits, or four in a row) are kept, with a WARNING naming their"
        " accounts, to give them new ones with reset-pin",
    )
    load.add_argument("path", help="file of 'account, pin, balance' lines; # comments")
    command(
        "accounts", list_accounts, "list every account: balance and wrong-PIN lock (read-only)",
        READER_SETTINGS,
    )
    statement = command(
        "statement", show_statement, "an account's entries, newest first (read-only)",
        READER_SETTINGS,
    )
    statement.add_argument("account", type=account_argument, help="account number, AA-NNNNN")
    statement.add_argument(
        "--limit", type=statement_limit, default=STATEMENT_LIMIT_DEFAULT, metavar="N",
        help=f"show the N newest entries, 1..{STATEMENT_LIMIT_MAX}"
        f" (default {STATEMENT_LIMIT_DEFAULT})",
    )
    txn = command(
        "txn", show_txn, "what a transaction booked, if anything (read-only); exit status"
        f" {EXIT_NOT_BOOKED} if it moved no money", READER_SETTINGS,
    )
    txn.add_argument("txn_id", type=txn_id_argument, help=f"transaction id: {TXN_ID_FORM}")
    init = commands.add_parser(
        "tls-init", help="create a private CA and the server's certificate",
        description="Create DIR (mode 0700) with a private CA (ca.pem, ca.key) and a server"
        " certificate (server.pem, server.key) for every --host given: the names and IP"
        " addresses ATMs will connect to. Private keys are written 0600; nothing is ever"
        " overwritten.",
    )
    init.add_argument("directory", type=Path, help="where the files go, e.g. tls")
    init.add_argument(
        "--host", action="append", required=True, dest="hosts", metavar="NAME",
        help="a DNS name or IP address of the server (repeat for each)",
    )
    init.set_defaults(run=tls_init, command="tls-init", settings=[])
    terminal = commands.add_parser(
        "tls-terminal", help="issue a terminal certificate for one ATM",
        description="Issue DIR/terminal-NAME.pem and .key, signed by the CA that tls-init"
        " made in DIR, for the ATM called NAME; give the pair to that ATM (--tls-cert,"
        " --tls-key) and serve with --tls-client-ca DIR/ca.pem to require one.",
    )
    terminal.add_argument("directory", type=Path, help="the directory tls-init made")
    terminal.add_argument("name", help="the terminal's name: letters, digits, - _ .")
    terminal.set_defaults(run=tls_terminal, command="tls-terminal", settings=[])
    return parser


def account_argument(text: str) -> str:
    try:
        return canonical_account(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an account number like AC-12345"
        ) from None


TXN_ID_FORM = f"{2 * TXN_ID_BYTES} hexadecimal digits"


def txn_id_argument(text: str) -> bytes:
    if re.fullmatch(rf"[0-9a-fA-F]{{{2 * TXN_ID_BYTES}}}", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a transaction id: {TXN_ID_FORM}")
    return bytes.fromhex(text)


def statement_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= STATEMENT_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number 1..{STATEMENT_LIMIT_MAX}")
    return limit


# -- Serving ---------------------------------------------------------------------------


class CannotServe(Exception):
    """The configured address cannot be bound (in use, not ours, no permission), or the
    ready file cannot be written."""


def serve(config: ServerConfig, args: argparse.Namespace) -> int:
    if config.workers > 1:
        return trio.run(supervise, config, args.argv, functools.partial(prepare_database, config))
    needed = open_files_needed(config.connections_max)
    allowed = raise_open_files_limit(needed)
    if allowed < needed:
        print(
            f"bank: --connections-max {config.connections_max} needs up to {needed} open "
            f"files, but this process may open {allowed}: lower --connections-max or raise "
            "the limit (ulimit -n)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        trio.run(run_server, config)
    except CannotServe as error:
        print(f"bank: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, if it serves TLS; raises ``TlsError`` naming the file."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    check_in_date(config.tls_cert)
    check_purpose(config.tls_cert, server=True)
    warn_if_key_shared(config.tls_key)
    return server_context(
        config.tls_cert, config.tls_key, client_ca=config.tls_client_ca, tls12=config.tls12
    )


def warn_if_key_shared(key: Path) -> None:
    """A TLS key others can read is warned of, not refused as the PIN key is: a group
    such as Debian's ssl-cert may be meant to read it (mode 0640), and only the operator
    knows. An unreadable file is left for server_context to name."""
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "the TLS private key %s is accessible by group or others (mode %04o): anyone"
            " who can read it can pose as this bank; run: chmod 600 %s", key, mode, key,
        )


def log_security(config: ServerConfig) -> None:
    if config.tls_cert is not None:
        log.info(
            "serving TLS %s; terminal certificates %s",
            "1.2 and 1.3" if config.tls12 else "1.3",
            f"required (CA {config.tls_client_ca})" if config.tls_client_ca else "not required",
        )
    elif config.insecure_plaintext:
        log.warning(
            "serving PLAINTEXT on %s (--insecure-plaintext): PINs cross the network in"
            " clear", config.host,
        )


def log_opened(config: ServerConfig, opened: Opened) -> None:
    """Say what start-up did to the database and the PIN key."""
    if opened.db_created:
        log.info("database created: %s", redact_db(config.db))
        if opened.seeded:
            log.info(
                "demo accounts seeded: %s (their PINs are in the README: not for real money)",
                ", ".join(mask_account(account) for account in opened.seeded),
            )
        elif config.demo_accounts is False:
            log.info("no demo accounts seeded (--no-demo-accounts)")
        else:
            log.info(
                "no demo accounts seeded: %s is not loopback (add accounts with"
                " add-account or import; --demo-accounts seeds them anyway)", config.host,
            )
    else:
        log.info("database opened: %s", redact_db(config.db))
    log.info("PIN key file %s: %s", "created" if opened.key_created else "loaded", config.key_file)


async def run_server(config: ServerConfig) -> None:
    """Serve until a signal, then shut down gracefully and close the database.

    A SIGTERM while starting up is remembered (``_remembering_sigterm``) until start-up
    is done, then ends it as serving would: said in the log, the database closed, exit
    status 0. Python's default for it, instant death, said nothing and could cut a
    database's creation short. Each start-up step is bounded (PostgreSQL's connect by
    ``bank.pg_store.CONNECT_TIMEOUT_S``), so the wait is short; SIGINT stays
    KeyboardInterrupt (status 130, ``main``)."""
    with _remembering_sigterm() as sigterm_received:
        await _start_and_serve(config, sigterm_received)


@contextlib.contextmanager
def _remembering_sigterm() -> Iterator[list[int]]:
    """While the body runs, a SIGTERM only lands in the list yielded. Trio's receiver
    takes the signal over while it is open, and gives it back to this on closing, so a
    SIGTERM after serving (while the database closes) is ignored too."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _start_and_serve(config: ServerConfig, sigterm_received: list[int]) -> None:
    tls = tls_context(config)  # before the database: a bad certificate creates nothing
    log_security(config)
    worker = worker_index()
    try:  # before the database too, so that a port in use creates nothing either
        listeners, admin_listeners = await bind(config, reuse_port=worker is not None)
    except OSError as error:
        # The OS's words, without Python's "[Errno 98]" in front of them.
        words = error.strerror or str(error)
        raise CannotServe(f"cannot serve on {config.host}:{config.port}: {words}") from None
    lock = DatabaseLock(config.db)  # this process alone serves an SQLite file (bank.db_lock)
    try:
        lock.acquire()
        ledger = await open_configured_ledger(config, sole_writer=lock.held)
    except BaseException:
        lock.release()
        for listener in [*listeners, *admin_listeners]:
            listener.socket.close()
        raise
    log_opened(config, ledger.opened)
    ignored: dict[int, Any] = {}
    try:
        # Once the receiver below closes, serving is over and the database closes next:
        # a signal then (or one left pending in the receiver) is ignored, not our death
        # (SIGTERM goes back to _remembering_sigterm's handler, which ignores it).
        ignored = _ignore_signals((signal.SIGINT,))
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            if sigterm_received:  # checked once the receiver has the signal: none lost
                log.info("SIGTERM received while starting up: stopping before serving")
                for listener in [*listeners, *admin_listeners]:
                    listener.socket.close()
                return
            server = BankServer(config, ledger, tls=tls)
            server.adopt_admin_listeners(admin_listeners)
            with announced(config.ready_file, listeners):
                await _serve_until_done(server, listeners, signals)
    finally:
        with trio.CancelScope(shield=True):
            await ledger.aclose()
        lock.release()
        log.info("database closed")
        for signum, handler in ignored.items():
            signal.signal(signum, handler)


async def _serve_until_done(
    server: BankServer, listeners: list[trio.SocketListener], signals: AsyncIterator[int]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_shutdown_on_signal, signals, server)
        if worker_index() is not None:
            nursery.start_soon(exit_when_parent_ends, server.shutdown)
        await server.serve(listeners)
        nursery.cancel_scope.cancel()


async def open_configured_ledger(
    config: ServerConfig, *, sole_writer: bool = False
) -> BatchLedger:
    """The ledger on the configured database, with the configured PIN rules and seeding;
    ``sole_writer`` only for the serving bank that holds its SQLite file's lock."""
    return await open_ledger(
        config.db,
        config.key_file,
        pin_tries_max=config.pin_tries_max,
        lockout_s=config.pin_lockout_s,
        destination_tries_max=config.destination_tries_max,
        destination_lockout_s=config.destination_lockout_s,
        seed_demo=config.seeds_demo_accounts,
        sole_writer=sole_writer,
    )


async def prepare_database(config: ServerConfig) -> None:
    """Under --workers, the parent creates or migrates (and seeds) the database once,
    before any worker opens it, and says what it did."""
    ledger = await open_configured_ledger(config)
    log_opened(config, ledger.opened)
    await ledger.aclose()


def _ignore_signals(signums: tuple[signal.Signals, ...]) -> dict[int, Any]:
    """Ignore ``signums``; return their handlers before, to restore."""
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}


@contextlib.contextmanager
def announced(ready_file: Path | None, listeners: list[trio.SocketListener]) -> Iterator[None]:
    """The ready file, if one is configured, exists for the body's duration.

    Entered after the signal receiver, so whoever reads the file may SIGTERM at once and
    get a graceful shutdown rather than Python's default death. If the file cannot be
    written the listeners are closed here, since the server never gets to serve them.
    """
    if ready_file is None:
        yield
        return
    try:
        write_ready_file(ready_file, listening_addresses(listeners))
    except OSError as error:
        for listener in listeners:
            listener.socket.close()
        raise CannotServe(f"cannot write the ready file {ready_file}: {error}") from None
    try:
        yield
    finally:
        remove_ready_file(ready_file)


async def _shutdown_on_signal(signals: AsyncIterator[int], server: BankServer) -> None:
    """The first signal begins a graceful shutdown; the second ends its grace period at
    once (the connections still open are closed, the database still closes cleanly)."""
    received = 0
    async for signum in signals:
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            log.info("%s received", name)
            server.shutdown()
        elif received == 2:
            log.warning(
                "%s received again: ending the grace period now (connections still"
                " open: %d)", name, server.connection_count,
            )
            server.hurry()
        else:
            log.info("%s received: already closing", name)


# -- Operator commands -------------------------------------------------------------------


def open_store(config: ServerConfig) -> Store | PgStore:
    """The server's database and PIN key, which must exist: an operator command creates
    neither, so that a mistyped path is an error rather than a new, empty bank (in
    PostgreSQL, a database without the bank's schema is refused likewise)."""
    require_database(config)
    if not config.key_file.exists():
        raise StoreError(
            f"there is no PIN key {config.key_file}: check --key-file (only the server"
            " creates one, when it first starts)"
        )
    key = load_or_create_key(config.key_file)
    if is_postgresql(config.db):
        return PgStore(config.db, key, create=False)
    return Store(config.db, key, create=False)


def require_database(config: ServerConfig) -> str:
    """The database a reading command reads, which must exist (see ``open_store``);
    whether a PostgreSQL one does, connecting tells."""
    if not is_postgresql(config.db) and not Path(config.db).exists():
        raise StoreError(
            f"there is no database {config.db}: check --db (only the server creates one,"
            " when it first starts)"
        )
    return config.db


def utc_time(time_ms: int) -> str:
    return f"{datetime.fromtimestamp(time_ms / 1000, UTC):%Y-%m-%d %H:%M:%S}"


def print_table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], *, right: frozenset[int] = frozenset()
) -> None:
    """Columns padded to their widest cell; the columns numbered in ``right`` (money,
    ids) aligned right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = (
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())


def list_accounts(config: ServerConfig, _args: argparse.Namespace) -> int:
    now_ms = wall_clock_ms()
    summaries = read_accounts_summary(require_database(config))

    def in_force(until_ms: int | None) -> str:
        return utc_time(until_ms) if until_ms is not None and until_ms > now_ms else "-"

    print_table(
        ("account", "balance", "locked until (UTC)", "transfers locked until (UTC)"),
        [
            (
                summary.account,
                format_cents(summary.balance_cents),
                in_force(summary.locked_until_ms),
                in_force(summary.transfers_locked_until_ms),
            )
            for summary in summaries
        ],
        right=frozenset({1}),
    )
    return EXIT_OK


def statement_kind(entry: BookEntry) -> str:
    """``deposit``, ``withdrawal``, ``transfer_out to WF-14351``, ``transfer_in from ...``."""
    if entry.counterparty is None:
        return entry.kind.name.lower()
    direction = "to" if entry.kind is EntryKind.TRANSFER_OUT else "from"
    return f"{entry.kind.name.lower()} {direction} {entry.counterparty}"


def show_statement(config: ServerConfig, args: argparse.Namespace) -> int:
    entries = read_statement(require_database(config), args.account, args.limit)
    if not entries:
        print(f"{args.account} has no entries")
        return EXIT_OK
    print_table(
        ("entry", "time (UTC)", "kind", "amount", "balance after", "txn id", "terminal"),
        [
            (
                str(entry.entry_id),
                utc_time(entry.time_ms),
                statement_kind(entry),
                format_cents(entry.amount_cents),
                format_cents(entry.balance_cents),
                entry.txn_id.hex(),
                entry.terminal or "-",
            )
            for entry in entries
        ],
        right=frozenset({0, 3, 4}),
    )
    return EXIT_OK


def show_txn(config: ServerConfig, args: argparse.Namespace) -> int:
    entries = read_entries_by_txn_id(require_database(config), args.txn_id)
    if not entries:
        print(f"not booked: transaction {args.txn_id.hex()} moved no money")
        return EXIT_NOT_BOOKED
    entry = entries[0]
    if entry.counterparty is None:
        print(
            f"booked: transaction {entry.txn_id.hex()}, {entry.kind.name.lower()} of"
            f" {format_cents(entry.amount_cents)}, account {entry.account}, at"
            f" {utc_time(entry.time_ms)} UTC, entry {entry.entry_id}, balance after"
            f" {format_cents(entry.balance_cents)}, terminal {entry.terminal or '-'}"
        )
        return EXIT_OK
    print(
        f"booked: transaction {entry.txn_id.hex()}, transfer of"
        f" {format_cents(entry.amount_cents)} from {entry.account} to {entry.counterparty},"
        f" at {utc_time(entry.time_ms)} UTC, terminal {entry.terminal or '-'}"
    )
    for leg in entries:  # the source's leg, then the destination's
        print(
            f"  {leg.kind.name.lower()}: account {leg.account}, entry {leg.entry_id},"
            f" balance after {format_cents(leg.balance_cents)}"
        )
    return EXIT_OK


PIN_RULE = (
    "a PIN of four equal digits (such as 7777) or four digits in a row (such as 1234 or"
    " 9876) is too easy to guess"
)
"""The customer's rule (``wire.TRIVIAL_PINS``, what CHANGE_PIN refuses) in words."""
WEAK_PINS_LISTED_MAX = 20
"""Accounts named in import's warning about PINs too easy to guess; the rest counted."""


class PinNotAllowed(Exception):
    """The operator chose a PIN the customer could not have (``wire.TRIVIAL_PINS``):
    refused with exit status 2, like a bad command line. An operator choosing a PIN has
    no reason to choose a weak one, and the customer would otherwise keep it."""


def read_new_pin() -> str:
    """A PIN from the terminal (hidden, asked twice) or one line of piped input, held to
    the rule a customer's PIN change is held to (``PinNotAllowed``)."""
    if sys.stdin.isatty():
        try:
            pin = getpass.getpass("New PIN (4 digits): ")
            repeated = getpass.getpass("Repeat the PIN: ")
        except EOFError:  # Ctrl-D at the prompt: the operator gave up
            raise StoreError("no PIN given (input ended); nothing changed") from None
        if repeated != pin:
            raise StoreError("the two PINs differ")
    else:
        pin = sys.stdin.readline().strip()
    try:
        check_pin(pin)
    except ValueError:
        raise StoreError("a PIN is exactly four digits") from None
    if is_trivial_pin(pin):
        raise PinNotAllowed(f"{PIN_RULE}, and a customer could not choose it; nothing changed")
    return pin


def cents_argument(text: str) -> int:
    """A money flag's value: whole cents, as every money flag's name says (``_cents``);
    a plain sentence, not a traceback, for anything else."""
    if not text.strip().isdigit():
        raise StoreError(
            f"--balance-cents takes whole cents, e.g. 2500 for $25.00, not {text!r}"
        )
    return int(text)


def add_account(config: ServerConfig, args: argparse.Namespace) -> int:
    opening_cents = cents_argument(args.balance_cents)
    if opening_cents > BALANCE_CENTS_MAX:  # refused before the PIN is asked for
        raise StoreError(f"an opening balance is at most {format_cents(BALANCE_CENTS_MAX)}")
    pin = read_new_pin()
    with open_store(config) as store:
        store.add_account(args.account, pin, opening_cents)
    print(f"added {args.account} with {format_cents(opening_cents)}")
    return EXIT_OK


def reset_pin(config: ServerConfig, args: argparse.Namespace) -> int:
    pin = read_new_pin()
    with open_store(config) as store:
        store.reset_pin(args.account, pin)
    print(f"PIN reset for {args.account}")
    return EXIT_OK


def unlock_account(config: ServerConfig, args: argparse.Namespace) -> int:
    with open_store(config) as store:
        forgotten = store.unlock(args.account)
    print(unlocked(args.account, forgotten, now=datetime.now().astimezone()))
    return EXIT_OK


def unlocked(account: str, forgotten: Forgotten, *, now: datetime) -> str:
    """What ``unlock`` did, in a sentence: lifted a lock (the PIN's, the transfers', or
    both), or only forgot wrong PINs or transfers to no account, or nothing."""
    pins = _pin_clause(forgotten, now)
    transfers = _transfers_clause(forgotten, now)
    if transfers is None:
        if pins is None:
            return f"{account} was not locked and had no wrong PINs; nothing changed"
        return f"{account} {pins}"
    return f"{account} {pins or 'had no wrong PINs'}; {transfers}"


def _pin_clause(forgotten: Forgotten, now: datetime) -> str | None:
    """What ``unlock`` did to the wrong PINs, or None if there were none."""
    until = _in_force(forgotten.locked_until_ms, now)
    if until is not None:
        return f"was locked until {until}; unlocked"
    match forgotten.failures:
        case 0:
            return None
        case 1:
            return "was not locked; its 1 wrong PIN is forgotten"
        case failures:
            return f"was not locked; its {failures} wrong PINs are forgotten"


def _transfers_clause(forgotten: Forgotten, now: datetime) -> str | None:
    """What ``unlock`` did to the transfers to no account, or None if there were none."""
    until = _in_force(forgotten.transfers_locked_until_ms, now)
    if until is not None:
        return f"its transfers were locked until {until}; unlocked"
    match forgotten.destination_misses:
        case 0:
            return None
        case 1:
            return "its 1 transfer to no account is forgotten"
        case misses:
            return f"its {misses} transfers to no account are forgotten"


def _in_force(until_ms: int | None, now: datetime) -> str | None:
    """A lock's end as the operator reads it, if it is still to come."""
    if until_ms is None:
        return None
    until = datetime.fromtimestamp(until_ms / 1000, now.tzinfo)
    return f"{until:%Y-%m-%d %H:%M:%S %Z}" if until > now else None


def import_accounts(config: ServerConfig, args: argparse.Namespace) -> int:
    records = read_accounts(args.path)  # every line checked before the store is opened
    with open_store(config) as store:
        try:
            count = store.add_accounts(records)
        except AccountExists as error:
            raise StoreError(
                f"{in_full(error)}: nothing was imported from {args.path}"
            ) from None
    print(f"imported {count} accounts from {args.path}")
    weak = [record.account for record in records if is_trivial_pin(record.pin)]
    if weak:
        print(f"bank: WARNING: {weak_pins(weak)}", file=sys.stderr)
    return EXIT_OK


def weak_pins(accounts: list[str]) -> str:
    """import's warning: the migrated PINs a customer could not have chosen are kept
    (their customers know them), but the operator is told which, to reset them."""
    listed = ", ".join(accounts[:WEAK_PINS_LISTED_MAX])
    if len(accounts) > WEAK_PINS_LISTED_MAX:
        listed += f" and {len(accounts) - WEAK_PINS_LISTED_MAX} more"
    one = len(accounts) == 1
    return (
        f"{len(accounts)} imported {'account has' if one else 'accounts have'} a PIN too"
        " easy to guess, which a customer could not choose (four equal digits, or four"
        f" digits in a row): {listed}; give {'it a new one' if one else 'them new ones'}"
        " with reset-pin"
    )



# -- TLS certificates ------------------------------------------------------------------


def tls_init(_config: ServerConfig, args: argparse.Namespace) -> int:
    files = init_ca_and_server(args.directory, args.hosts)
    print(f"created the CA ({files.ca}) and the server's certificate ({files.cert}, key"
          f" {files.key}) for {', '.join(args.hosts)}")
    print(f"serve with: --tls-cert {files.cert} --tls-key {files.key}")
    print(f"give ATMs the CA: --tls-ca {files.ca}; keep {args.directory / 'ca.key'} offline")
    return EXIT_OK


def tls_terminal(_config: ServerConfig, args: argparse.Namespace) -> int:
    files = issue_terminal(args.directory, args.name)
    print(f"issued {files.cert} (key {files.key}) for terminal {args.name}")
    print(f"on that ATM: --tls-ca {files.ca} --tls-cert {files.cert} --tls-key {files.key}")
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
