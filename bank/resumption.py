"""Session resumption: an ATM that lost its connection takes over its own session.

At an approved LOGIN (or RESUME) the server draws a random 128-bit token for the session
and sends it (SESSION_TOKEN). An ATM that reconnects presents the account and the token
(RESUME): the session's old connection is superseded (closed, its lease released) and
the new connection carries the session on, with a fresh token, at once, where a second
LOGIN would be refused ACCOUNT_IN_USE until the bank noticed the old connection was dead
(up to the idle timeout, after a silent cut). One ATM per account is unchanged: only the
holder of the session's token can take it over, and the token dies with the session
(logout, idle timeout, the connection's end).

Tokens are compared in constant time and never logged. Under TLS a token is bound to
the terminal certificate that opened its session: from another terminal it opens
nothing. This registry holds the sessions of this process. Over PostgreSQL the token's
hash also goes into the session's lease row (``bank.cluster_leases``), so that another
process can resume a session this one holds, or held when it died
(``Leases.take_over``). spec/PROTOCOL.md section 6 says
what a client may assume and section 10 what a stolen token is worth.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol

from bank.leases import Lease
from wire import SESSION_TOKEN_BYTES


class Resumable(Protocol):
    """What the registry needs of a session: whose it is, and a way to end it for its
    successor."""

    terminal: str | None
    """The TLS terminal certificate's identity the session was opened with, if any."""
    lease: Lease | None
    """The session's lease while it holds one: what its successor takes the account's
    lease back after (``Leases.acquire(succeeding=...)``)."""

    def supersede(self) -> None:
        """End this session's connection now (or as soon as its request in hand is
        answered); its lease is released when it has ended."""
        ...

    async def wait_released(self) -> None:
        """Return once the session has released its lease."""
        ...


def new_token() -> bytes:
    """A fresh session token: 128 bits from a cryptographically secure source."""
    return secrets.token_bytes(SESSION_TOKEN_BYTES)


class SessionRegistry:
    """The resumable sessions of this server: at most one per account, with its token."""

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[bytes, Resumable]] = {}

    def register(self, account: str, session: Resumable, token: bytes | None = None) -> bytes:
        """``session`` now holds ``account``'s lease: the token that resumes it, new
        unless given (a cluster lease stores its hash before the session holds it)."""
        if token is None:
            token = new_token()
        self._sessions[account] = (token, session)
        return token

    def forget(self, account: str, session: Resumable) -> None:
        """``session`` has ended: its token resumes nothing any more."""
        entry = self._sessions.get(account)
        if entry is not None and entry[1] is session:
            del self._sessions[account]

    def claim(self, account: str, token: bytes, terminal: str | None) -> Resumable | None:
        """The session ``token`` resumes, if it is ``account``'s live one and, under TLS,
        was opened by the same ``terminal``; else None.

        A token that matches is forgotten (it is single-use: the successor gets a new
        one); tokens are compared in constant time. A token presented by another
        terminal opens nothing and is not spent: a stolen token is no use from another
        certificate, and its owner can still resume."""
        entry = self._sessions.get(account)
        if entry is None or not hmac.compare_digest(entry[0], token):
            return None
        if entry[1].terminal != terminal:
            return None
        del self._sessions[account]
        return entry[1]

    def __len__(self) -> int:
        return len(self._sessions)
