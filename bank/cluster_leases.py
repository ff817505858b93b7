"""Cluster-wide account leases: one ATM per account across every process on one PostgreSQL.

The in-process ``trio.Lock`` (``bank.leases.Leases``) stays the first level: two sessions
of one process never reach the database to race each other. Behind it, each account in
use has a row in ``leases``: its holder (the process's boot id, host and pid), its expiry
on the database's clock, and a fencing token (``fence``) raised by one on every
acquisition or takeover and never reset. Every money write of a session carries the fence
it was given (``Ledger.post(fence=...)``), and the storage books it only while that fence
is still the row's, held and unexpired, in the same transaction; so a holder that froze
or lost its network and was taken over can no longer move money.

Who may take a row that another process holds:

- nobody, while that process is alive and its lease unexpired: LOGIN is refused
  ACCOUNT_IN_USE, as within one process;
- anyone, at once, once that process is dead. Liveness is a session-level advisory lock
  that each process takes at start on one dedicated connection and holds for its life
  (``holder_lock`` names it); PostgreSQL drops it the moment that connection ends, which
  kill -9 does. A taker checks ``pg_locks`` in the same statement that takes the row;
- anyone, once the lease has expired: a frozen (SIGSTOP) or partitioned process still
  holds its advisory lock, so only the expiry (``lease_expiry_s`` after its last
  heartbeat) frees its leases;
- the ATM that holds the session's resumption token (RESUME, ``take_over``), at once,
  whatever the holder's state: the token stands for the LOGIN. Its hash (SHA-256 of the
  128 random bits; compared in constant time) and the TLS terminal it is bound to live
  in the lease row, so any process can check it.

A plain advisory lock as the lease itself was rejected (issue 14): a frozen holder keeps
it, it fences nothing, and PostgreSQL's lock table fills up with one per session.

Each process renews all of its leases with one UPDATE per heartbeat (``lease_expiry_s``
/ HEARTBEATS_PER_EXPIRY), on the same dedicated connection; the leases it expected to
renew and did not were taken over, and their sessions are told (``on_lost``), so a
superseded connection ends within a heartbeat even if it never writes. Releases (logout,
disconnect, idle timeout) are queued and written in batches by one task, so that
``end`` stays synchronous for the ``finally`` that calls it; a LOGOUT waits for its own
(``settle``). A release that fails (the database is down) is retried at each heartbeat;
meanwhile the row stays this process's, which only this process may take back.

Every psycopg call blocks, so each runs in ``trio.to_thread.run_sync`` behind a
``CapacityLimiter`` the size of its pool. The bank must reach PostgreSQL directly or
through a session-mode pooler: a transaction-mode pooler would hand the advisory lock's
connection to others.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import trio

from bank.config import ServerConfig
from bank.leases import Lease, Leases, _nothing
from bank.ledger import StorageError
from wire import mask_account

log = logging.getLogger("bank.leases")

T = TypeVar("T")

_DEFAULTS = ServerConfig()
"""The settings leases made without them (by a test or a tool) run with: the server's
own defaults, which ``ServerConfig`` alone defines."""

LEASE_LOCK_CLASS = 0x42414E4B
"""The first key of every process's liveness advisory lock ("BANK"), so that the bank's
locks never collide with another application's on the same database."""

LOCK_KEY_MAX = 2**31 - 1
"""A process's own key (the second) is drawn from 1..LOCK_KEY_MAX: a positive int4, which
``pg_locks.objid`` (an oid) shows as itself."""

HEARTBEATS_PER_EXPIRY = 3
"""Heartbeats per ``lease_expiry_s``: two may be lost (slow database, a pause of the
process) before a lease expires under a live holder."""

POOL_CONNECTIONS = 4
"""Connections for acquisitions, takeovers and releases (besides the liveness one)."""

CONNECT_TIMEOUT_S = 5
"""Connecting to PostgreSQL, before the attempt fails."""

LOCK_TIMEOUT_MS = 2000
"""Longest a lease statement waits for a row lock: a takeover waits for a fenced write in
progress (it holds the row FOR SHARE) to commit; past this the account counts as in use."""

STATEMENT_TIMEOUT_MS = 5000
"""Longest any lease statement runs, so a thread never hangs on a stuck server."""

IDLE_IN_TRANSACTION_TIMEOUT_MS = 5000
"""A process frozen inside a takeover's transaction would keep the row locked; the server
ends such a session after this."""

SETTLE_TIMEOUT_S = 5.0
"""Longest a LOGOUT waits for its lease's release to be written before replying anyway
(the release is then retried; the lease meanwhile expires)."""

RELEASES_PER_STATEMENT_MAX = 1000
"""Releases written by one UPDATE; more wait for the next."""

TOKEN_HASH_BYTES = 32
"""A resumption token is stored as its SHA-256."""

MIGRATION_SQL = """
ALTER TABLE leases ADD COLUMN IF NOT EXISTS holder_lock INTEGER
    CHECK (holder_lock IS NULL OR holder_lock > 0);
ALTER TABLE leases ADD COLUMN IF NOT EXISTS token_hash BYTEA
    CHECK (token_hash IS NULL OR length(token_hash) = 32);
ALTER TABLE leases ADD COLUMN IF NOT EXISTS token_terminal TEXT
    CHECK (token_terminal IS NULL OR length(token_terminal) <= 80);
"""
"""What cluster leases add to the ``leases`` table (a later PostgreSQL migration):
``holder_lock`` is the holder's liveness advisory lock key, ``token_hash`` and
``token_terminal`` the session's resumption token and the TLS terminal it is bound to."""

_HOLDER_DEAD = f"""
NOT EXISTS (
    SELECT 1 FROM pg_locks AS k
    WHERE k.locktype = 'advisory' AND k.granted
      AND k.classid = {LEASE_LOCK_CLASS}::oid AND k.objid = l.holder_lock::oid
      AND k.objsubid = 2
      AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""
"""True when the row's holder no longer holds its liveness lock: it is dead (or lost its
database connection, and with it any right to its leases)."""

ACQUIRE_SQL = f"""
INSERT INTO leases AS l (account, fence, holder, holder_host, holder_pid, holder_lock,
                         expires_at, token_hash, token_terminal)
VALUES (%(account)s, 1, %(boot)s, %(host)s, %(pid)s, %(lock)s,
        now() + make_interval(secs => %(expiry_s)s), %(token_hash)s, %(terminal)s)
ON CONFLICT (account) DO UPDATE SET
    fence = l.fence + 1, holder = EXCLUDED.holder, holder_host = EXCLUDED.holder_host,
    holder_pid = EXCLUDED.holder_pid, holder_lock = EXCLUDED.holder_lock,
    expires_at = EXCLUDED.expires_at, token_hash = EXCLUDED.token_hash,
    token_terminal = EXCLUDED.token_terminal
WHERE (l.holder IS NULL OR l.holder = EXCLUDED.holder OR l.expires_at <= now()
   OR {_HOLDER_DEAD})
  AND (%(succeeds)s::bigint IS NULL OR l.fence = %(succeeds)s::bigint)
RETURNING l.fence
"""
"""Take the account's lease if it is free, ours already (a release not yet written),
expired, or its holder is dead; no row comes back if another live process holds it.
With ``succeeds`` (a RESUME of this process's own session, at that session's fence),
only while the fence is still that session's: a row taken over since, by a RESUME or
a LOGIN elsewhere, is that other session's even once it was released, and the token
that found the old session in this process's registry was spent there."""

TAKE_OVER_LOOK_SQL = """
SELECT fence, holder, token_hash, token_terminal,
    expires_at + make_interval(secs => %(session_idle_s)s) > now()
FROM leases WHERE account = %(account)s
"""
"""The row a RESUME would take over, and whether its session may still be alive: no
session outlives its lease's expiry by more than the idle timeout (``take_over``)."""

TAKE_OVER_SELECT_SQL = TAKE_OVER_LOOK_SQL + "FOR UPDATE\n"
"""``TAKE_OVER_LOOK_SQL``, the row locked until the takeover's transaction ends."""

TAKE_OVER_UPDATE_SQL = """
UPDATE leases SET fence = fence + 1, holder = %(boot)s, holder_host = %(host)s,
    holder_pid = %(pid)s, holder_lock = %(lock)s,
    expires_at = now() + make_interval(secs => %(expiry_s)s),
    token_hash = %(token_hash)s, token_terminal = %(terminal)s
WHERE account = %(account)s AND fence = %(fence)s
RETURNING fence
"""

RENEW_SQL = """
UPDATE leases AS l SET expires_at = now() + make_interval(secs => %(expiry_s)s)
FROM unnest(%(accounts)s::text[], %(fences)s::bigint[]) AS h(account, fence)
WHERE l.account = h.account AND l.fence = h.fence AND l.holder = %(boot)s
RETURNING l.account, l.fence
"""
"""The heartbeat: one UPDATE renews every lease the process holds, at its fence (also
one that expired meanwhile but was not taken over), and says which it still holds."""

RELEASE_SQL = """
UPDATE leases AS l SET holder = NULL, holder_host = NULL, holder_pid = NULL,
    holder_lock = NULL, token_hash = NULL, token_terminal = NULL, expires_at = now()
FROM unnest(%(accounts)s::text[], %(fences)s::bigint[]) AS r(account, fence)
WHERE l.account = r.account AND l.fence = r.fence AND l.holder = %(boot)s
"""
"""Release leases at their fence: one that was taken over meanwhile is not touched."""


def token_hash(token: bytes) -> bytes:
    """What the lease row keeps of a resumption token: enough to check one, never to
    present one."""
    return hashlib.sha256(token).digest()


@dataclass(frozen=True, slots=True)
class Holder:
    """This process, as its lease rows name it."""

    boot_id: str
    host: str
    pid: int
    lock_key: int

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            boot_id=secrets.token_hex(16), host=socket.gethostname()[:255], pid=os.getpid(),
            lock_key=secrets.randbelow(LOCK_KEY_MAX) + 1,
        )

    def params(self) -> dict[str, Any]:
        return {"boot": self.boot_id, "host": self.host, "pid": self.pid, "lock": self.lock_key}


@dataclass(slots=True)
class _Held:
    fence: int
    on_lost: Callable[[], None]
    lost: bool = False


def connect(conninfo: str) -> psycopg.Connection[Any]:
    """One autocommit connection with the lease statements' bounds set."""
    connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    connection.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    connection.execute(
        f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    )
    return connection


class _Pool:
    """A few connections, each used by one worker thread at a time; a broken one is
    dropped and the next call connects afresh."""

    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._idle: list[psycopg.Connection[Any]] = []
        self._limiter = trio.CapacityLimiter(size)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        async with self._limiter:
            idle = self._idle.pop() if self._idle else None
            try:
                result, connection = await trio.to_thread.run_sync(
                    self._call, idle, function, args
                )
            except psycopg.Error as error:
                raise StorageError(f"lease: {type(error).__name__}: {error}") from error
            self._idle.append(connection)
            return result

    def _call(
        self, connection: psycopg.Connection[Any] | None, function: Callable[..., T],
        args: Sequence[object],
    ) -> tuple[T, psycopg.Connection[Any]]:
        """``function`` on ``connection``; an idle connection found dead (PostgreSQL
        restarted since it was last used) is replaced and the call made once more."""
        reused = connection is not None and not connection.closed
        if connection is None or connection.closed:
            connection = connect(self._conninfo)
        try:
            return function(connection, *args), connection
        except psycopg.OperationalError:
            connection.close()
            if not reused:
                raise
        except psycopg.Error:
            if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                connection.close()  # broken or mid-transaction: never reuse it
            raise
        connection = connect(self._conninfo)
        try:
            return function(connection, *args), connection
        except psycopg.Error:
            connection.close()
            raise

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class ClusterLeases(Leases):
    """Leases shared by every process on one PostgreSQL database.

    ``run`` must be running (in the server's nursery) before any lease is acquired: it
    takes the liveness lock, then renews leases and writes releases until cancelled.
    """

    def __init__(
        self, conninfo: str, *, expiry_s: int, session_idle_s: int = _DEFAULTS.idle_timeout_s,
        holder: Holder | None = None,
    ) -> None:
        super().__init__()
        self.holder = holder or Holder.this_process()
        self.expiry_s = expiry_s
        self.session_idle_s = session_idle_s
        """The sessions' idle timeout (``idle_timeout_s``): how long after its lease's
        expiry a dead or frozen holder's session could still have been alive, and so
        how long its token may still take it over (``take_over``)."""
        self.heartbeat_s = expiry_s / HEARTBEATS_PER_EXPIRY
        self.lost_count = 0
        """Leases found taken over by another process at a heartbeat."""
        self._conninfo = conninfo
        self._pool = _Pool(conninfo, POOL_CONNECTIONS)
        self._liveness: psycopg.Connection[Any] | None = None
        self._liveness_limiter = trio.CapacityLimiter(1)
        self._held: dict[str, _Held] = {}
        self._unreleased: list[Lease] = []
        # Unbounded on purpose: a session's end (synchronous, in a finally) must never
        # block or fail to queue its release. What is queued is bounded all the same: at
        # most one release per lease this process holds (so connections_max) and one event
        # per LOGOUT waiting for its release to be written.
        self._send, self._receive = trio.open_memory_channel[Lease | trio.Event](math.inf)
        self._running = False

    # -- What sessions call -----------------------------------------------------------------

    async def acquire(
        self,
        account: str,
        *,
        token: bytes | None = None,
        terminal: str | None = None,
        on_lost: Callable[[], None] = _nothing,
        succeeding: Lease | None = None,
    ) -> Lease | None:
        token_digest = None if token is None else token_hash(token)
        succeeds = None if succeeding is None else succeeding.fence
        return await self._lease_row(
            account, token_digest, terminal, on_lost, _acquire_row, succeeds=succeeds
        )

    async def take_over(
        self,
        account: str,
        *,
        token: bytes,
        new_token: bytes,
        terminal: str | None,
        on_lost: Callable[[], None] = _nothing,
    ) -> Lease | None:
        """A session another process holds, or held when it died or froze, if ``token``
        is its newest. Not once the row's lease expired more than ``session_idle_s``
        ago: nothing releases a dead process's rows, but each of its sessions would have
        ended within the idle timeout of its last request, which came before the last
        renewal; without this bound the token would open the session until the account's
        next LOGIN, however long that is (spec §10: a token lives for one session)."""
        if not self._running:
            raise StorageError("cluster leases are not running")
        # First a look at the row, outside the account's in-process lock and whether or
        # not a session here holds it: a guessed token then never holds the lock (which
        # would turn the customer's own LOGIN here away as ACCOUNT_IN_USE meanwhile), and
        # a guess costs the same one query for an account in use here as for any other,
        # so its speed does not tell which accounts are in use (spec §10).
        look = {"account": account, "boot": self.holder.boot_id, "terminal": terminal,
                "session_idle_s": self.session_idle_s}
        if not await self._pool.run(_token_opens_row, look, token):
            return None
        # The token opens the row: take it over, checked again in its own transaction. A
        # session of ours holding it is not another process's (try_acquire refuses).
        return await self._lease_row(
            account, token_hash(new_token), terminal, on_lost, _take_over_row, token
        )

    async def _lease_row(
        self,
        account: str,
        token_digest: bytes | None,
        terminal: str | None,
        on_lost: Callable[[], None],
        statement: Callable[..., int | None],
        *args: object,
        succeeds: int | None = None,
    ) -> Lease | None:
        """Behind the in-process lock, run ``statement`` (``_acquire_row`` or
        ``_take_over_row``) for ``account``'s row: the lease with its new fence, or None
        (and the local lock released again) when the row is another live process's."""
        if not self._running:
            raise StorageError("cluster leases are not running")
        if not self.try_acquire(account):
            return None
        params = {
            **self.holder.params(), "account": account, "expiry_s": self.expiry_s,
            "token_hash": token_digest, "terminal": terminal,
            "session_idle_s": self.session_idle_s, "succeeds": succeeds,
        }
        try:
            fence = await self._pool.run(statement, params, *args)
        except BaseException:
            self.release(account)
            raise
        if fence is None:
            self.release(account)
            return None
        self._held[account] = _Held(fence, on_lost)
        return Lease(account, fence)

    def end(self, lease: Lease) -> None:
        self.release(lease.account)
        held = self._held.get(lease.account)
        if held is not None and held.fence == lease.fence:
            del self._held[lease.account]
        if lease.fence is not None:
            self._send.send_nowait(lease)

    async def settle(self) -> None:
        done = trio.Event()
        self._send.send_nowait(done)
        with trio.move_on_after(SETTLE_TIMEOUT_S):
            await done.wait()

    def fences(self) -> dict[str, int]:
        """The fence of each lease this process holds, for operators and tests."""
        return {account: held.fence for account, held in self._held.items()}

    # -- The process's side -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the liveness lock (StorageError if the database cannot be reached), then
        heartbeat and write releases until cancelled; closes its connections at the end."""
        try:
            await self._connect_liveness()
            self._running = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_releases)
                task_status.started()
                while True:
                    await trio.sleep(self.heartbeat_s)
                    await self.heartbeat()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SETTLE_TIMEOUT_S):
                    await self._write_waiting_releases()
                await trio.to_thread.run_sync(self._close)

    async def heartbeat(self) -> None:
        """Renew every lease held, in one UPDATE, and tell the sessions whose lease was
        taken over. A database that cannot be reached is logged and tried again at the
        next heartbeat (the leases meanwhile run toward their expiry)."""
        for lease in self._unreleased:
            self._send.send_nowait(lease)
        self._unreleased.clear()
        snapshot = {account: held.fence for account, held in self._held.items()}
        try:
            renewed = await self._on_liveness(_renew_rows, self.holder, self.expiry_s, snapshot)
        except StorageError as error:
            log.warning("lease heartbeat failed (retried in %.1f s): %s", self.heartbeat_s, error)
            return
        for account, fence in snapshot.items():
            held = self._held.get(account)
            if (account, fence) in renewed or held is None or held.fence != fence or held.lost:
                continue
            held.lost = True
            self.lost_count += 1
            log.warning(
                "lease on %s (fence %d) was taken over by another process: its session ends",
                mask_account(account), fence,
            )
            held.on_lost()

    async def _connect_liveness(self) -> None:
        """The dedicated connection and its advisory lock; a key some live process holds
        already (one in two billion) is drawn again."""
        while True:
            try:
                taken = await self._on_liveness(_lock_liveness, self.holder.lock_key)
            except StorageError as error:
                raise StorageError(f"cannot take the cluster liveness lock: {error}") from None
            if taken:
                return
            self.holder = Holder(
                self.holder.boot_id, self.holder.host, self.holder.pid,
                secrets.randbelow(LOCK_KEY_MAX) + 1,
            )

    async def _on_liveness(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function`` on the liveness connection, reconnecting and taking the
        advisory lock again first if the connection was lost (a restarted PostgreSQL)."""
        def call() -> T:
            connection = self._liveness
            if connection is None or connection.closed:
                connection = connect(self._conninfo)
                if function is not _lock_liveness:
                    if not _lock_liveness(connection, self.holder.lock_key):
                        connection.close()
                        raise psycopg.OperationalError("liveness lock held by another process")
                    log.warning("cluster liveness lock taken again after a lost connection")
                self._liveness = connection
            try:
                return function(connection, *args)
            except psycopg.Error:
                connection.close()  # whatever broke, the next call starts afresh
                raise

        try:
            return await trio.to_thread.run_sync(call, limiter=self._liveness_limiter)
        except psycopg.OperationalError:
            pass  # the connection was lost (a restarted PostgreSQL): at once, a new one
        except psycopg.Error as error:
            raise StorageError(f"{type(error).__name__}: {error}") from error
        try:  # re-taking the liveness lock soon keeps others from taking our leases
            return await trio.to_thread.run_sync(call, limiter=self._liveness_limiter)
        except psycopg.Error as error:
            raise StorageError(f"{type(error).__name__}: {error}") from error

    async def _write_releases(self) -> None:
        """Write queued releases, as many as are waiting in one UPDATE; a failure keeps
        them for the next heartbeat."""
        async for first in self._receive:
            await self._write(self._take_waiting([first]))

    def _take_waiting(self, items: list[Lease | trio.Event]) -> list[Lease | trio.Event]:
        while len(items) < RELEASES_PER_STATEMENT_MAX:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return items

    async def _write_waiting_releases(self) -> None:
        """At the end (a graceful shutdown): the releases of the sessions that just
        closed, so that their ATMs may log in elsewhere at once."""
        self._unreleased, waiting = [], list(self._unreleased)
        while items := self._take_waiting(list(waiting)):
            waiting = []
            await self._write(items)

    async def _write(self, items: list[Lease | trio.Event]) -> None:
        leases = [item for item in items if isinstance(item, Lease)]
        if leases:
            try:
                await self._pool.run(_release_rows, self.holder.boot_id, leases)
            except StorageError as error:
                log.warning("%d lease releases failed (retried): %s", len(leases), error)
                self._unreleased += leases
        for item in items:
            if isinstance(item, trio.Event):
                item.set()

    def _close(self) -> None:
        self._pool.close()
        if self._liveness is not None:
            self._liveness.close()  # releases the advisory lock: our leases are free
            self._liveness = None


# -- The statements, each run in a worker thread on its own connection ----------------------


def _lock_liveness(connection: psycopg.Connection[Any], key: int) -> bool:
    row = connection.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (LEASE_LOCK_CLASS, key)
    ).fetchone()
    return bool(row and row[0])


def _acquire_row(connection: psycopg.Connection[Any], params: dict[str, Any]) -> int | None:
    try:
        row = connection.execute(ACQUIRE_SQL, params).fetchone()
    except psycopg.errors.LockNotAvailable:  # a write of the holder's in progress: in use
        return None
    return None if row is None else int(row[0])


def _take_over_row(
    connection: psycopg.Connection[Any], params: dict[str, Any], token: bytes
) -> int | None:
    """The session's lease from another process, if ``token`` opens it: the row is held
    (not released), by another process, with this token's hash, for this terminal. A
    token that opens nothing changes nothing (a wrong guess spends no one's token)."""
    try:
        return _take_over_checked(connection, params, token)
    except psycopg.errors.LockNotAvailable:  # the row stayed locked: nothing opened or spent
        return None


def _take_over_checked(
    connection: psycopg.Connection[Any], params: dict[str, Any], token: bytes
) -> int | None:
    with connection.transaction():
        row = connection.execute(TAKE_OVER_SELECT_SQL, params).fetchone()
        fence = _opened_fence(row, params, token)
        if fence is None:
            return None
        taken = connection.execute(TAKE_OVER_UPDATE_SQL, {**params, "fence": fence}).fetchone()
        return None if taken is None else int(taken[0])


def _token_opens_row(
    connection: psycopg.Connection[Any], params: dict[str, Any], token: bytes
) -> bool:
    """Whether ``token`` opens the account's row now (``_opened_fence``), read without
    locking anything: the takeover checks again in its own transaction."""
    row = connection.execute(TAKE_OVER_LOOK_SQL, params).fetchone()
    return _opened_fence(row, params, token) is not None


def _opened_fence(
    row: tuple[Any, ...] | None, params: dict[str, Any], token: bytes
) -> int | None:
    """The fence of the lease row ``row`` (``TAKE_OVER_LOOK_SQL``'s) if ``token`` opens
    it: held by another process, with this token's hash, for this terminal, and its
    session may still be alive; else None."""
    if row is None:
        return None
    fence, holder, stored_hash, terminal, session_may_live = row
    if holder is None or holder == params["boot"] or stored_hash is None:
        return None  # released, or ours (this process's registry resumes its own)
    if not session_may_live:
        return None  # its holder died or froze longer ago than any session idles
    if not hmac.compare_digest(bytes(stored_hash), token_hash(token)):
        return None
    if terminal != params["terminal"]:
        return None
    return int(fence)


def _renew_rows(
    connection: psycopg.Connection[Any], holder: Holder, expiry_s: int, held: dict[str, int]
) -> set[tuple[str, int]]:
    if not held:
        return set()
    rows = connection.execute(
        RENEW_SQL,
        {"expiry_s": expiry_s, "accounts": list(held), "fences": list(held.values()),
         "boot": holder.boot_id},
    ).fetchall()
    return {(str(account), int(fence)) for account, fence in rows}


def _release_rows(connection: psycopg.Connection[Any], boot_id: str, leases: list[Lease]) -> None:
    connection.execute(
        RELEASE_SQL,
        {"accounts": [lease.account for lease in leases],
         "fences": [lease.fence for lease in leases], "boot": boot_id},
    )
