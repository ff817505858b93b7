"""``python -m bank.tools.commit_pages``: what one SQLite group commit writes, by b-tree.

The bank's SQLite COMMIT writes each page a batch dirtied into the WAL and fsyncs it
(``bank.store``); how many pages that is, and whose, decides much of what a COMMIT costs.
This opens a scratch store in a temporary directory, adds ``ACCOUNTS`` accounts, grows the
ledger by ``--grow`` batches of ``--batch`` postings (deposits and withdrawals spread over
the accounts, as the bench's sessions make them, each with its own random transaction id),
then runs ``--batches`` more with automatic checkpoints off and reads their frames back out
of the WAL file: each frame's page number, given to its table or index by SQLite's
``dbstat`` table. It prints pages per COMMIT by b-tree and the COMMIT's CPU time (its
median, in the calling thread), then one JSON line. Nothing of the bank is served; the
store is the bank's own (``bank.store.Store``) with its own statements and pragmas.

BENCHMARKS.md (issue 15, fourth pass) has what it measured and what changed because of it.
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bank.store
from bank.pins import KEY_BYTES
from bank.store import PostRequest, Store
from wire import AMOUNT_CENTS_MAX, EntryKind

ACCOUNTS = 100
"""Accounts posted to, one per bench session at ``--sessions 100``."""

OPENING_CENTS = 10**9
"""Each account's opening balance: withdrawals of ``AMOUNT_CENTS`` never run it dry."""

AMOUNT_CENTS = 100
"""Every posting's amount."""

GROW_CHECKPOINT_BATCHES = 50
"""While growing, the WAL is checkpointed (TRUNCATE) after this many batches, since the
measurement turns automatic checkpoints off for the whole store."""

WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24
"""SQLite's WAL format: a 32-byte file header, then frames of a 24-byte header (the page
number its first 4 bytes, big-endian) and one page."""

NEW_PAGE = "(new pages)"
"""Pages that no b-tree held before the measured batches: splits and growth."""


def _batch(store: Store, accounts: list[str], batch_no: int, size: int) -> float:
    """One batch of ``size`` postings through the store's loop-side steps; the COMMIT's
    CPU seconds."""
    requests = [
        PostRequest(
            accounts[(2 * j + batch_no) % len(accounts)], secrets.token_bytes(16),
            EntryKind.DEPOSIT if j % 2 else EntryKind.WITHDRAWAL, AMOUNT_CENTS,
            AMOUNT_CENTS_MAX,
        )
        for j in range(size)
    ]
    if not store.begin_batch_now():
        raise RuntimeError("the scratch database is locked by another connection")
    store.run_batch(requests, time.time_ns() // 1_000_000)
    started = time.process_time()
    store.commit_batch()
    return time.process_time() - started


def _wal_pages(wal: bytes) -> list[int]:
    """The page number of every frame in a WAL file's bytes."""
    if len(wal) < WAL_HEADER_BYTES:
        return []
    (page_bytes,) = struct.unpack_from(">I", wal, 8)
    frame_bytes = WAL_FRAME_HEADER_BYTES + page_bytes
    frames = (len(wal) - WAL_HEADER_BYTES) // frame_bytes
    return [struct.unpack_from(">I", wal, WAL_HEADER_BYTES + i * frame_bytes)[0]
            for i in range(frames)]


def measure(directory: Path, *, grow: int, batches: int, size: int) -> dict[str, Any]:
    """Pages per COMMIT by b-tree and the COMMIT's CPU, for a scratch store in
    ``directory`` (see the module docstring)."""
    db = directory / "pages.db"
    saved = bank.store.WAL_AUTOCHECKPOINT_PAGES
    bank.store.WAL_AUTOCHECKPOINT_PAGES = 0  # read at connect: this store never checkpoints
    try:
        store = Store(db, bytes(KEY_BYTES), seed_demo=False)
    finally:
        bank.store.WAL_AUTOCHECKPOINT_PAGES = saved
    side = sqlite3.connect(db, isolation_level=None)
    try:
        accounts = [f"BN-{n:05d}" for n in range(1, ACCOUNTS + 1)]
        for account in accounts:
            store.add_account(account, "4826", OPENING_CENTS)
        for n in range(grow):
            _batch(store, accounts, n, size)
            if n % GROW_CHECKPOINT_BATCHES == 0:
                side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        owner = dict(side.execute("SELECT pageno, name FROM dbstat"))
        cpu = [_batch(store, accounts, grow + n, size) for n in range(batches)]
        pages = _wal_pages((directory / "pages.db-wal").read_bytes())
    finally:
        side.close()
        store.close()
    by_tree = collections.Counter(owner.get(page, NEW_PAGE) for page in pages)
    return {
        "entries_before": grow * size, "batch_postings": size, "batches": batches,
        "pages_per_commit": round(len(pages) / batches, 1),
        "by_tree": {name: round(count / batches, 1) for name, count in by_tree.most_common()},
        "commit_cpu_ms_median": round(statistics.median(cpu) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bank.tools.commit_pages",
        description="Pages one SQLite group commit writes, by table and index, in a scratch"
        " store (a temporary directory, removed after).",
    )
    parser.add_argument("--grow", type=int, default=2000,
                        help="batches booked before measuring (%(default)s)")
    parser.add_argument("--batches", type=int, default=200,
                        help="batches measured (%(default)s)")
    parser.add_argument("--batch", type=int, default=50,
                        help="postings per batch (%(default)s)")
    args = parser.parse_args(argv)
    if args.grow < 0 or args.batches < 1 or args.batch < 1:
        parser.error("--grow must be 0 or more, --batches and --batch 1 or more")
    with tempfile.TemporaryDirectory(prefix="bank-pages-") as directory:
        result = measure(Path(directory), grow=args.grow, batches=args.batches,
                         size=args.batch)
    print(f"{result['pages_per_commit']} pages per COMMIT of {args.batch} postings after"
          f" {result['entries_before']} entries; COMMIT CPU median"
          f" {result['commit_cpu_ms_median']} ms")
    for name, pages in result["by_tree"].items():
        print(f"  {name:40} {pages:7.1f}")
    print(json.dumps({"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
                      **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
