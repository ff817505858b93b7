"""One serving bank per SQLite file: an exclusive lock on a sidecar file beside it.

Why: a serving bank keeps state that is true only if it is the file's one server. Its
leases (``bank.leases``) are in-process, so two servers on one file would each grant
the same account's lease to a different ATM; and its balance cache
(``bank.batch_ledger.BatchLedger``, ``sole_writer``) answers a BALANCE without reading
the file, which is exact only while no other process moves money in it. So the serving
bank (``python -m bank`` with no subcommand) takes this lock before it opens the
database and holds it until it has closed it; a second server on the same file is
refused with one sentence naming the file (``DatabaseInUse``, exit status 1).

Why ``flock`` on a sidecar (``<db>.lock``, created 0600 and left in place) and not a lock
on the database file itself: POSIX (``fcntl``) locks belong to a process and a file, and
closing *any* descriptor of that file drops every one of them the process holds; SQLite
holds its own POSIX locks on the database and opens and closes descriptors of it, so
either would undo the other. A ``flock`` on a file nobody else opens is independent of
all that, held by the open file description, and released by the kernel however the
process ends (``kill -9`` included), so a crashed server never leaves a stale lock and
the file needs no removing. Removing it would be wrong, too: a server still holding the
old file's lock and a new one locking a new file of the same name would both serve.
The database's path is resolved first (symlinks, a relative ``--db``), as SQLite
resolves it for its WAL, so two names for one file share one lock; a hard link is the
one way around it, and nobody makes one to a live database by accident.

Operator commands (``add-account``, ``import``, ``reset-pin``, ``unlock``, ``accounts``,
``statement``, ``txn``) take no lock and keep working while a server runs: SQLite's own
locking keeps them safe, and none of them changes an existing account's balance (they
add accounts, touch PINs, or read), which is what the cache relies on.

PostgreSQL has no such lock: any number of bank processes share it by design (leases in
the database, fenced), so nothing there may assume it is the only writer.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bank.config import is_postgresql
from bank.store import StoreError

__all__ = ["LOCK_FILE_MODE", "LOCK_SUFFIX", "DatabaseInUse", "DatabaseLock", "lock_path"]

LOCK_SUFFIX = ".lock"
"""Added to the database's resolved path to name its lock file: ``bank.db.lock``."""

LOCK_FILE_MODE = 0o600
"""The lock file's mode when it is created: it holds nothing, but only the bank's own
user has any business opening it (a stranger holding it would stop the bank)."""


class DatabaseInUse(StoreError):
    """Another process serves this SQLite file, or its lock file cannot be used: an
    operator's mistake to be told in one sentence, never a traceback."""


def lock_path(db: str | os.PathLike[str]) -> Path:
    """The lock file of the SQLite database ``db``: beside the file it resolves to."""
    return Path(os.path.realpath(db) + LOCK_SUFFIX)


class DatabaseLock:
    """The serving bank's hold on its SQLite file; nothing for PostgreSQL.

    ``acquire`` takes it without waiting (a second server is refused at once, not queued
    behind the first); ``release`` lets go and may be called any number of times, also
    when ``acquire`` failed or was never called.
    """

    def __init__(self, db: str | os.PathLike[str]) -> None:
        self._db = os.fspath(db)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the file's lock: it is then the file's only writer
        of balances (operator commands change none), so a balance cache is exact."""
        return self._fd is not None

    def acquire(self) -> None:
        """Lock an SQLite database for this process (a no-op for PostgreSQL, which has no
        only writer); ``DatabaseInUse`` if another process holds it or the lock file
        cannot be opened (a missing directory, no permission, a symlink in its place)."""
        if self._fd is not None or is_postgresql(self._db):
            return
        if Path(self._db).is_dir():  # no database (--db ""): the store says so itself
            return
        path = lock_path(self._db)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, LOCK_FILE_MODE)
        except OSError as error:
            raise DatabaseInUse(
                f"cannot open {path}, the lock file of the database {self._db}:"
                f" {error.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUse(
                f"another bank server is serving the database {self._db} (it holds {path}):"
                " stop it first, or serve another file"
            ) from None
        except OSError as error:
            os.close(fd)
            raise DatabaseInUse(f"cannot lock {path} for the database {self._db}:"
                                f" {error.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        """Let the next server have the file (closing the descriptor drops the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
