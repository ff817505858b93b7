"""A throwaway PostgreSQL cluster for the cluster tests (to be replaced by the shared
fixture of the PostgreSQL backend once merged)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The conninfo of a fresh cluster on a Unix socket only, stopped after the session."""
    if not (PG_BIN / "initdb").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb) is not installed, and CI=true never skips")
        pytest.skip("PostgreSQL (initdb) is not installed")
    root = Path(tempfile.mkdtemp(prefix="bank-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
        check=True, capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
            f"-c listen_addresses='' -c unix_socket_directories={root} -c fsync=off"
            " -c max_connections=200", "start",
        ),
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={root}"
    finally:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
            check=False, capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
