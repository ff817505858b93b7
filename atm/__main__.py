"""``python -m atm``: the ATM client's command line.

Only argument handling and process concerns live here (exit status, Ctrl-C, restoring
the terminal); the session itself is ``atm.session.run_atm``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from atm import text
from atm.connection import CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S, Connection
from atm.console import Console, TerminalConsole
from atm.errors import ExitCode
from atm.session import Connector, run_atm
from bank.tls import TlsError, check_in_date, check_purpose, client_context

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65432
PORT_MAX = 65535

DESCRIPTION = """\
A thin ATM: log in with an account number (AA-NNNNN) and a 4-digit PIN, then
  b  balance      d  deposit      w  withdraw      t  transfer to another account
  h  history      p  change PIN   x  exit (log out)
Amounts are dollars with at most two decimals: 20, 20.5, 20.50, $1,000.00.

Input may be piped: answers are read one per line in the order a person types them,
and the end of input logs out cleanly. A deposit or withdrawal whose reply is lost is
confirmed by reconnecting and resending it under the same transaction id, so it
happens once."""


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"port must be 1..{PORT_MAX}, not {port}")
    return port


def seconds(value: str) -> int:
    """An argparse type: a whole number of seconds, at least 1."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, not {count}")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m atm",
        description=DESCRIPTION,
        epilog=text.exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        help=f"bank server address (env ATM_HOST; default {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        help=f"bank server TCP port (env ATM_PORT; default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE",
        help="speak TLS, trusting only this CA for the bank's certificate, which must name"
        " --host (env ATM_TLS_CA; the bank's tls-init writes it as ca.pem)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="FILE",
        help="this terminal's certificate, for a bank that requires one (env ATM_TLS_CERT;"
        " the bank's tls-terminal issues it)",
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="FILE",
        help="the private key of --tls-cert (env ATM_TLS_KEY)",
    )
    parser.add_argument(
        "--reply-timeout-s",
        type=seconds,
        help=(f"seconds to wait for the bank's reply before reconnecting (env "
              f"ATM_REPLY_TIMEOUT_S; default {REPLY_TIMEOUT_S}); connecting may take "
              f"{CONNECT_TIMEOUT_S} s"),
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
    """Flags win over the ATM_ environment variables, which win over the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.host is None:
        args.host = environ.get("ATM_HOST", DEFAULT_HOST)
    if args.port is None:
        try:
            args.port = port_number(environ.get("ATM_PORT", str(DEFAULT_PORT)))
        except argparse.ArgumentTypeError as error:
            parser.error(f"ATM_PORT: {error}")
    if args.reply_timeout_s is None:
        try:
            args.reply_timeout_s = seconds(environ.get("ATM_REPLY_TIMEOUT_S", str(REPLY_TIMEOUT_S)))
        except argparse.ArgumentTypeError as error:
            parser.error(f"ATM_REPLY_TIMEOUT_S: {error}")
    for name in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, name) is None and f"ATM_{name.upper()}" in environ:
            setattr(args, name, Path(environ[f"ATM_{name.upper()}"]))
    if args.tls_ca is None and (args.tls_cert is not None or args.tls_key is not None):
        parser.error("--tls-cert and --tls-key need --tls-ca: the bank's CA, to check the bank")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS settings as a context; None for plaintext. Raises TlsError, naming the file."""
    if args.tls_ca is None:
        return None
    if args.tls_cert is not None:
        check_in_date(args.tls_cert)
        check_purpose(args.tls_cert, server=False)
    return client_context(args.tls_ca, cert=args.tls_cert, key=args.tls_key)


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a visit as Ctrl-C does: a supervisor stopping the ATM, or its terminal
closing. Their default action, instant death, left a hidden PIN prompt's terminal with
echo off for whoever typed next, and a deposit in flight without its transaction id."""


async def run_until_signalled(console: Console, connect: Connector) -> ExitCode | None:
    """``run_atm``'s exit status; None if an ``ENDING_SIGNALS`` signal cancelled it, which
    runs the session's cleanup (a transaction in flight is told, the connection closed)."""
    code: ExitCode | None = None
    with trio.open_signal_receiver(*ENDING_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def end_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(end_on_signal)
            code = await run_atm(console, connect)
            nursery.cancel_scope.cancel()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tls = tls_context(args)
    except TlsError as error:
        print(f"atm: {error}", file=sys.stderr)
        return ExitCode.USAGE
    console = TerminalConsole()
    connect = functools.partial(
        Connection.open, args.host, args.port, tls=tls, reply_timeout_s=args.reply_timeout_s
    )
    try:
        with console.terminal_restored():
            code = trio.run(run_until_signalled, console, connect)
        if code is not None:
            return code
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return output_closed()
    except BaseExceptionGroup as group:
        if group.subgroup(BrokenPipeError) is not None:
            return output_closed()
        if group.subgroup(KeyboardInterrupt) is None:
            raise
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        console.write("\n" + text.INTERRUPTED)
    return ExitCode.INTERRUPTED


def output_closed() -> ExitCode:
    """Standard output was closed (``python -m atm | head``): nothing more can be shown.

    The connection closed with the run, so the bank has ended the session. Python
    flushes standard output at exit; pointing it at /dev/null keeps that from failing.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return ExitCode.OUTPUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
