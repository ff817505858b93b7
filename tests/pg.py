"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, one server on a
Unix socket in that dir and on 127.0.0.1 at a free port, fsync on (durability is what
the PostgreSQL store is for), stopped and deleted at the end of the session.

initdb refuses to run as root, so as root every PostgreSQL program runs as the
``postgres`` user (``runuser -u postgres --``) in a directory it owns. The programs are
found with ``pg_config --bindir`` or in Debian's ``/usr/lib/postgresql/*/bin``, which a
fresh Debian machine does not put on PATH. Without them the PostgreSQL tests skip,
except under ``CI=true``, where they fail: CI must run them (``.ci/run`` installs
Debian's ``postgresql`` when no initdb is found).

Each test gets a schema of its own in one database (``Cluster.new_database``), named in
the connection string's ``options`` as the search path: far cheaper than a database per
test, and the store under test never knows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bank.config import is_postgresql
from bank.pg_store import PgStore
from bank.store import Store

DATABASE = "bank"
START_TIMEOUT_S = 60
"""pg_ctl's wait for the server to start or stop (``-t``): a slow CI machine, not a hang."""


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: pg_config's bindir, else the newest of
    Debian's versioned directories, else wherever PATH has initdb."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found and (Path(found) / "initdb").exists():
            return Path(found)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Cluster:
    """One PostgreSQL server in ``directory``: ``start``, ``stop``, ``restart`` (the
    store's reconnection tests use them), and a fresh schema per test."""

    def __init__(self, bindir: Path, directory: Path) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory
        self.log = directory / "postgres.log"
        self.port = free_port()
        self._schemas = itertools.count(1)
        self.as_root = os.geteuid() == 0

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}"
            )

    def init(self) -> None:
        if self.as_root:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-instructions",
        )

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=on"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
            "-t", str(START_TIMEOUT_S), "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t",
                  str(START_TIMEOUT_S), "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def conninfo(self, dbname: str = DATABASE, **extra: str) -> str:
        """A libpq key=value string for the Unix socket (as user postgres)."""
        words = {"host": str(self.socket_dir), "port": str(self.port), "user": "postgres",
                 "dbname": dbname, **extra}
        return " ".join(f"{key}={_quoted(value)}" for key, value in words.items())

    def url(self, dbname: str = DATABASE) -> str:
        """The same database as a postgresql:// URL over TCP on 127.0.0.1."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> None:
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")

    def new_database(self) -> str:
        """A connection string to an empty schema of its own: a fresh bank database."""
        schema = f"test_{next(self._schemas)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.conninfo(options=f"-c search_path={schema}")


def _quoted(value: str) -> str:
    if value and all(ch not in value for ch in " '\\"):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def unavailable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None if they can."""
    if find_bindir() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses root"
    return None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The session's PostgreSQL server; skipped without PostgreSQL, failed under CI."""
    reason = unavailable_reason()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true and {reason}: the PostgreSQL tests must run in CI")
        pytest.skip(reason)
    bindir = find_bindir()
    assert bindir is not None
    directory = Path(tempfile.mkdtemp(prefix="bank-pg-"))
    cluster = Cluster(bindir, directory)
    try:
        cluster.init()
        cluster.start()
        try:
            cluster.create_database()
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_db(pg_cluster: Cluster) -> str:
    """A fresh, empty PostgreSQL bank database (a schema of its own) as a conninfo."""
    return pg_cluster.new_database()


# -- The same tests on either backend ------------------------------------------------------

BACKENDS = ["sqlite", "postgresql"]
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)
"""What either database raises for a write its constraints refuse."""


@pytest.fixture(params=BACKENDS)
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh bank database on each backend in turn: an SQLite path or a PostgreSQL
    conninfo (``bank.config.is_postgresql`` tells them apart, as the server does)."""
    if request.param == "postgresql":
        db: str = request.getfixturevalue("pg_db")
        return db
    return str(tmp_path / "bank.db")


def open_store(db: str, key: bytes, **options: Any) -> Store | PgStore:
    """The store for ``db``, as ``bank.batch_ledger.open_ledger`` would choose it."""
    return (PgStore if is_postgresql(db) else Store)(db, key, **options)


@contextmanager
def raw(db: str) -> Iterator[sqlite3.Connection | psycopg.Connection[tuple[Any, ...]]]:
    """A second connection in autocommit mode, as a hand edit or another tool would use."""
    if is_postgresql(db):
        with psycopg.connect(db, autocommit=True) as conn:
            yield conn
    else:
        with closing(sqlite3.connect(db, isolation_level=None)) as lite:
            yield lite
