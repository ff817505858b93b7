"""The ready file: how a server tells the process that started it that it serves, and where.

``python -m bank --ready-file PATH`` writes PATH once its sockets listen and its signal
handlers are installed, so that from then on a connection is served and SIGTERM is a
graceful shutdown. The file is one JSON object::

    {"pid": 4242, "addresses": [["127.0.0.1", 54321]]}

It is written to a temporary file in the same directory and renamed over PATH, so a
reader finds the whole file or none, never a half-written one. A launcher waits for it
instead of scraping a port out of the log. The server removes it when it exits; one that
is killed leaves it behind, so a launcher removes a stale one before it starts a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Ready:
    """A ready file's content: which process serves, on which (host, port) addresses."""

    pid: int
    addresses: tuple[Address, ...]


def listening_addresses(listeners: Iterable[trio.SocketListener]) -> list[Address]:
    """(host, port) of each listener; an IPv6 address drops its flow info and scope id."""
    addresses = []
    for listener in listeners:
        host, port, *_ = listener.socket.getsockname()
        addresses.append((host, port))
    return addresses


def write_ready_file(path: Path, addresses: Sequence[Address]) -> None:
    """Atomically write this process's ready file; OSError if the directory is unusable."""
    text = json.dumps({"pid": os.getpid(), "addresses": [list(a) for a in addresses]})
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        os.replace(temporary, path)
    except BaseException:
        remove_ready_file(Path(temporary))
        raise


def read_ready_file(path: Path) -> Ready | None:
    """The file's content, or None while it does not exist; ValueError if it is malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = None
    match content:
        case {"pid": int(pid), "addresses": list(addresses)} if all(
            _is_address(address) for address in addresses
        ):
            return Ready(pid, tuple((host, port) for host, port in addresses))
    raise ValueError(f"{path} is not a ready file")


def remove_ready_file(path: Path) -> None:
    """Best effort: a file left behind is stale, and the next launcher removes it."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _is_address(value: object) -> bool:
    match value:
        case [str(), int()]:
            return True
    return False
