"""Why an ATM session ended, as typed exceptions, and the exit status each one means.

A session never ends in a traceback: every way the network or the bank can end it is one
of these classes, the session prints its sentence (``atm.text``) and the process exits
with ``exit_code``, so a script driving the ATM can tell a refused login from a crash.
"""

from __future__ import annotations

from enum import IntEnum

from wire import Status


class ExitCode(IntEnum):
    """Process exit status; ``--help`` prints this table from ``atm.text.EXIT_CODE_MEANINGS``."""

    OK = 0
    CONNECTION_LOST = 1
    USAGE = 2  # argparse's own code for a bad command line.
    LOGIN_REFUSED = 3
    ACCOUNT_LOCKED = 4
    ACCOUNT_IN_USE = 5
    SERVER_UNAVAILABLE = 6
    SESSION_EXPIRED = 7
    INCOMPATIBLE_VERSION = 8
    UNCONFIRMED_TRANSACTION = 9
    TLS_FAILED = 10
    INTERRUPTED = 130  # The shell's convention for Ctrl-C (128 + SIGINT).
    OUTPUT_CLOSED = 141  # The shell's convention for a closed pipe (128 + SIGPIPE).


class SessionEnded(Exception):
    """Base: the session cannot go on. ``exit_code`` is what the process returns."""

    exit_code: ExitCode = ExitCode.CONNECTION_LOST


class ConnectionLost(SessionEnded):
    """The TCP connection closed, broke, timed out, or carried bytes we cannot decode.

    ``reason`` is a short phrase in the customer's words for the sentence they read
    ("the bank closed the connection", "no reply within 15 seconds"); ``detail`` the
    protocol engine's words for what went wrong, for whoever debugs it (in ``str()``,
    never on the customer's screen).
    """

    exit_code = ExitCode.CONNECTION_LOST

    def __init__(self, reason: str, *, status: Status | None = None,
                 detail: str | None = None) -> None:
        super().__init__(reason if detail is None else f"{reason} ({detail})")
        self.reason = reason
        self.status = status
        self.detail = detail


class ConnectFailed(ConnectionLost):
    """The bank could not be reached at all (refused, unreachable, or no HELLO)."""


class ReplyTimeout(ConnectionLost):
    """A reply did not arrive in time. The connection is abandoned: a late reply would
    otherwise arrive while we wait for the next one, and the request's fate is unknown."""


class ServerBusy(SessionEnded):
    """The bank answered the connection with ERROR(SERVER_BUSY) instead of HELLO."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class IncompatibleVersion(SessionEnded):
    """The bank speaks a protocol version this ATM does not (the decoder refused it)."""

    exit_code = ExitCode.INCOMPATIBLE_VERSION


class TlsFailed(SessionEnded):
    """The secure channel could not be set up: a certificate problem on either side, or
    no TLS at the other end. ``kind`` is ``bank.tls.TlsFailure``'s word, ``reason`` a
    plain sentence. Not a lost connection: trying again would meet the same problem."""

    exit_code = ExitCode.TLS_FAILED

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class ServerShutdown(SessionEnded):
    """The bank sent SHUTDOWN: it is stopping and closes the connection in ``grace_s``."""

    exit_code = ExitCode.SERVER_UNAVAILABLE

    def __init__(self, grace_s: int) -> None:
        super().__init__(f"server shutting down in {grace_s} s")
        self.grace_s = grace_s


class SessionExpired(SessionEnded):
    """The bank sent SESSION_EXPIRED: the session sat idle past the bank's idle timeout."""

    exit_code = ExitCode.SESSION_EXPIRED


class LoginRefused(SessionEnded):
    """The bank refused the login for good (not a typo the customer may retry)."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.name)
        self.status = status
        self.exit_code = _LOGIN_EXIT_CODE.get(status, ExitCode.LOGIN_REFUSED)


_LOGIN_EXIT_CODE: dict[Status, ExitCode] = {
    Status.PIN_TRIES_EXCEEDED: ExitCode.ACCOUNT_LOCKED,
    Status.ACCOUNT_IN_USE: ExitCode.ACCOUNT_IN_USE,
    Status.SERVER_BUSY: ExitCode.SERVER_UNAVAILABLE,
    Status.ISSUER_UNAVAILABLE: ExitCode.SERVER_UNAVAILABLE,
}


class TransactionUnconfirmed(SessionEnded):
    """A deposit or withdrawal got no reply and every retry to confirm it failed.

    It happened at most once (the retries reuse its transaction id) but we cannot tell
    the customer whether it happened; ``txn_id`` is what the bank can look it up by.
    """

    exit_code = ExitCode.UNCONFIRMED_TRANSACTION

    def __init__(self, *, kind: str, amount_cents: int, txn_id: bytes) -> None:
        super().__init__(f"{kind} of {amount_cents} cents unconfirmed")
        self.kind = kind
        self.amount_cents = amount_cents
        self.txn_id = txn_id
