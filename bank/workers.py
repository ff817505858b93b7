"""``python -m bank --workers N``: N server processes on one port, supervised by this one.

Each worker is a whole ``python -m bank`` of its own (its own event loop, database
connections and cluster leases) listening on the same address with SO_REUSEPORT, so the
kernel spreads new connections over them, and a crash takes down one worker's sessions,
not every ATM's. One ATM per account across them is the cluster leases' job, which is
why more than one worker needs PostgreSQL (``ServerConfig`` refuses it over SQLite).

The parent serves nothing itself. It binds the address first without listening (so that
``--port 0`` picks one port for all, and a restarted worker always finds it), prepares
the database once (migrations and demo seeding would otherwise race), starts the
workers and writes its ready file once every one of them serves. Then:

- a worker that exits on its own is restarted, at most RESTARTS_MAX times in any
  RESTART_WINDOW_S; past that (a worker that cannot stay up) the parent stops them all
  and exits 1, with a sentence;
- SIGTERM or SIGINT is passed on to every worker, which shut down gracefully as a single
  server does (a second signal hurries them, as it hurries one); the parent exits 0 when
  every worker did. A worker outliving its stop by STOP_BACKSTOP_S is killed;
- a worker whose parent dies (even by kill -9) sees its stdin, a pipe from the parent,
  end, and shuts down gracefully: no orphan keeps serving. Each worker runs in a session
  of its own, so a Ctrl-C at the terminal reaches the parent alone, which passes it on
  once (the terminal's own SIGINT to every worker would count as a second signal).

With ``--admin-port P``, worker k serves its own /metrics and /sessions on P + k.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import trio

from bank.config import ServerConfig
from bank.readiness import Address, read_ready_file, remove_ready_file, write_ready_file
from bank.server import reuse_port_sockets

log = logging.getLogger("bank.workers")

WORKER_ENV = "BANK_WORKER_INDEX"
"""Set by the parent in each worker's environment to its index (0..N-1): the worker binds
with SO_REUSEPORT and ends when its stdin (the parent's pipe) ends. Not a setting."""

RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0
"""A worker that dies is restarted unless RESTARTS_MAX restarts (of any worker) already
happened in the last RESTART_WINDOW_S: then something is wrong that restarting will not fix."""

WORKER_START_TIMEOUT_S = 30.0
"""From spawning a worker to its ready file."""

READY_POLL_S = 0.02
"""Between looks for a starting worker's ready file (another process's file)."""

STOP_BACKSTOP_S = 15.0
"""After a worker's shutdown grace period, how long it may take to exit before SIGKILL."""

EXIT_OK, EXIT_FAILURE = 0, 1


class WorkerFailed(Exception):
    """A worker could not be started, or kept dying: the sentence says which."""


def worker_index() -> int | None:
    """This process's index if a ``--workers`` parent started it, else None."""
    text = os.environ.get(WORKER_ENV)
    return int(text) if text is not None and text.isdigit() else None


async def exit_when_parent_ends(shutdown: Callable[[], None]) -> None:
    """In a worker: call ``shutdown`` once stdin, the parent's pipe, ends (the parent
    exited, or died: no orphan keeps serving)."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass  # the parent never writes; anything is ignored
    log.warning("the --workers parent is gone: shutting down")
    shutdown()


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(
        self, config: ServerConfig, argv: Sequence[str], port: int, workdir: Path
    ) -> None:
        self._config = config
        self._argv = list(argv)
        self._port = port
        self._workdir = workdir
        self._processes: dict[int, trio.Process] = {}
        self._restarts: deque[float] = deque()
        self.stopping = False
        self.failure: str | None = None
        self.statuses: dict[int, int] = {}
        """Each worker's last exit status, once stopping."""

    def command(self, index: int) -> list[str]:
        """A worker's command line: the parent's own, with the settings that differ
        (later flags win)."""
        extra = [
            "--workers", "1", "--port", str(self._port),
            "--ready-file", str(self._ready_path(index)),
        ]
        if self._config.admin_port is not None:
            extra += ["--admin-port", str(self._config.admin_port + index)]
        return [sys.executable, "-m", "bank", *self._argv, *extra]

    def _ready_path(self, index: int) -> Path:
        return self._workdir / f"worker-{index}.ready"

    async def run_slot(self, index: int, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep worker ``index`` running until stopping; ``started`` once it first serves."""
        first = True
        while not self.stopping:
            process = await self._spawn(index)
            try:
                await self._wait_ready(index, process)
            except WorkerFailed as failure:
                if self.stopping:  # a signal came while it started: not its failure
                    if first:
                        task_status.started()
                    return
                if first:
                    raise
                log.error("%s", failure)
            else:
                if first:
                    first = False
                    task_status.started()
                status = await process.wait()
                if self.stopping:
                    self.statuses[index] = status
                    return
                log.warning(
                    "worker %d (pid %d) exited with status %d: restarting it", index,
                    process.pid, status,
                )
            if not self._may_restart():
                raise WorkerFailed(
                    f"workers died {RESTARTS_MAX + 1} times within {RESTART_WINDOW_S:.0f} s:"
                    " stopping them all (see the log above for why)"
                )

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= RESTARTS_MAX:
            return False
        self._restarts.append(now)
        return True

    async def _spawn(self, index: int) -> trio.Process:
        remove_ready_file(self._ready_path(index))
        process = await trio.lowlevel.open_process(  # in a session of its own (below)
            self.command(index), stdin=subprocess.PIPE,
            env={**os.environ, WORKER_ENV: str(index)}, start_new_session=True,
        )
        self._processes[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)
        return process

    async def _wait_ready(self, index: int, process: trio.Process) -> None:
        """Until the worker's ready file names it; WorkerFailed if it exits first or
        takes longer than WORKER_START_TIMEOUT_S (it is then killed)."""
        path = self._ready_path(index)
        with trio.move_on_after(WORKER_START_TIMEOUT_S):
            while process.poll() is None:
                ready = read_ready_file(path)
                if ready is not None and ready.pid == process.pid:
                    return
                await trio.sleep(READY_POLL_S)
            raise WorkerFailed(
                f"worker {index} (pid {process.pid}) exited with status {process.returncode}"
                " before it served"
            )
        process.kill()
        await process.wait()
        raise WorkerFailed(f"worker {index} not serving {WORKER_START_TIMEOUT_S:.0f} s after start")

    def signal_all(self, signum: int) -> None:
        """Pass ``signum`` on to every worker still running; from then on nothing restarts."""
        self.stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    async def stop_all(self, signum: int = signal.SIGTERM) -> None:
        """Signal every worker, then kill the ones still running past the backstop."""
        self.signal_all(signum)
        backstop_s = self._config.shutdown_grace_s + STOP_BACKSTOP_S
        with trio.move_on_after(backstop_s) as scope:
            for process in list(self._processes.values()):
                await process.wait()
        if scope.cancelled_caught:
            for index, process in self._processes.items():
                if process.returncode is None:
                    log.error("worker %d (pid %d) still running: killed", index, process.pid)
                    process.kill()
            for process in self._processes.values():
                await process.wait()


async def supervise(
    config: ServerConfig, argv: Sequence[str], prepare: Callable[[], Awaitable[None]]
) -> int:
    """Run ``config.workers`` workers until a signal; the exit status. ``prepare`` opens
    (creating or migrating) the database once, before any worker starts."""
    try:
        sockets = await reuse_port_sockets(config.port, config.host)
    except OSError as error:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, error)
        return EXIT_FAILURE
    addresses: list[Address] = [
        (sock.getsockname()[0], sock.getsockname()[1]) for sock in sockets
    ]
    workdir = Path(tempfile.mkdtemp(prefix="bank-workers-"))
    supervisor = Supervisor(config, argv, addresses[0][1], workdir)
    try:
        await prepare()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            status = await _run(config, supervisor, signals, addresses)
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return status


async def _run(
    config: ServerConfig, supervisor: Supervisor, signals: AsyncIterator[int],
    addresses: list[Address],
) -> int:
    failure: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pass_signals_on, signals, supervisor)
            async with trio.open_nursery() as slots:
                for index in range(config.workers):
                    await slots.start(supervisor.run_slot, index)
                log.info(
                    "%d workers serving on port %d (SO_REUSEPORT)", config.workers,
                    addresses[0][1],
                )
                if config.ready_file is not None:
                    write_ready_file(config.ready_file, addresses)
            nursery.cancel_scope.cancel()
    except* WorkerFailed as group:
        failure = "; ".join(str(error) for error in group.exceptions)
    except* OSError as group:
        failure = "; ".join(f"cannot write the ready file: {e}" for e in group.exceptions)
    finally:
        if config.ready_file is not None:
            remove_ready_file(config.ready_file)
        with trio.CancelScope(shield=True):
            await supervisor.stop_all()
    if failure is not None:
        log.error("%s", failure)
        return EXIT_FAILURE
    bad = {index: status for index, status in supervisor.statuses.items() if status != 0}
    if bad:
        log.error("workers exited with a failure status: %s", bad)
        return EXIT_FAILURE
    log.info("all %d workers stopped", config.workers)
    return EXIT_OK


async def _pass_signals_on(signals: AsyncIterator[int], supervisor: Supervisor) -> None:
    """Every SIGTERM or SIGINT goes to every worker: the first begins their graceful
    shutdown, the second hurries it, as for one server."""
    async for signum in signals:
        log.info("%s received: passing it on to the workers", signal.Signals(signum).name)
        supervisor.signal_all(signum)
