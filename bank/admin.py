"""The admin endpoint: a running server's numbers over HTTP/1.1, on loopback only.

``--admin-port`` serves, from the bank's own Trio process, ``GET /metrics`` in the
Prometheus text exposition format 0.0.4 and ``GET /sessions`` as JSON (each
connection's masked account, peer, times and terminal). HTTP is ``h11`` (sans-IO, as
``wire``): one task per admin connection, one request per connection, every read
bounded in bytes and time, and at most ``ADMIN_CONNECTIONS_MAX`` at once. It listens on
127.0.0.1 alone and has no authentication: whoever can reach it is already on the host;
and it answers only requests that name a loopback host, so that a web page cannot make a
browser on that host read it for the page (DNS rebinding).

``Metrics`` is what the serving path updates: a dict increment and a histogram observe
per request, a counter per refusal, and per SQLite group commit its size and duration.
Gauges (connections, sessions, leases) are counted when scraped, not kept.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import h11
import trio

from bank.batch_ledger import BatchLedger
from bank.ledger import Ledger
from wire import Opcode, Status, mask_account

if TYPE_CHECKING:
    from bank.server import BankServer

log = logging.getLogger("bank.admin")

ADMIN_HOST = "127.0.0.1"
"""The only address the admin endpoint listens on: it has no authentication."""

ADMIN_HOST_NAMES = frozenset({b"127.0.0.1", b"localhost", b"::1"})
"""The only host names a request's Host header may give (any port): loopback's. A
browser on the bank's host sends its page's own name there, so a page whose name an
attacker re-pointed at 127.0.0.1 (DNS rebinding) is refused, not read the sessions."""

ADMIN_REQUEST_BYTES_MAX = 8192
"""Bytes a request's line and headers may take; beyond it 431 and close. Nothing past
the headers is read, but up to ``ADMIN_DRAIN_BYTES_MAX`` more discarded at close."""

ADMIN_HEADERS_MAX = 32
"""Header fields one request may carry; beyond it 431 and close."""

ADMIN_READ_TIMEOUT_S = 5.0
"""Seconds a client has from connecting to the end of its request's headers."""

ADMIN_SEND_TIMEOUT_S = 5.0
"""Seconds a client has to take the whole response (and for the closing handshake)."""

ADMIN_CONNECTIONS_MAX = 8
"""Admin connections served at once; beyond it a new one is closed without a word."""

ADMIN_RECEIVE_BYTES = 4096
"""Bytes asked of the socket per read."""

ADMIN_DRAIN_BYTES_MAX = 65536
"""Bytes of an unread request body discarded before closing, so that the client gets
the response rather than a reset; past it the socket is closed anyway."""

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of the request latency histogram's buckets."""

BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
"""Upper bounds (requests) of the group commit batch size histogram's buckets."""

COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds (seconds) of the group commit duration histogram's buckets."""

REFUSAL_REASONS = ("busy", "per_address_cap", "evicted", "tls_handshake_failed")
"""The ``reason`` label of ``bank_refusals_total``: every one is always exposed."""


class Histogram:
    """Prometheus histogram: counts per bucket (cumulated when rendered), sum, count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf's own
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Metrics:
    """What ``BankServer`` counts as it serves; ``render_metrics`` writes it out."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.requests: dict[tuple[Opcode, Status], int] = {}
        """Requests answered, by (opcode, status): the members themselves, whose names
        are looked up when rendered, not on every request (0.2 us each)."""
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.refusals: Counter[str] = Counter()
        """Connections refused or evicted, by a reason of REFUSAL_REASONS."""
        self.fenced_writes = 0
        """Money writes refused by their session's cluster lease fence (nothing moved)."""
        self.batch_sizes: Histogram | None = None
        self.commit_seconds: Histogram | None = None
        # The batch ledger (SQLite or PostgreSQL) reports each group commit; another does not.
        if isinstance(ledger, BatchLedger):
            self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
            self.commit_seconds = Histogram(COMMIT_BUCKETS_S)
            ledger.on_commit = self.observe_commit

    def observe_request(self, opcode: Opcode, status: Status, seconds: float) -> None:
        """One request answered in ``seconds``: on every request, so a plain dict (a
        Counter's item is slower to update)."""
        key = (opcode, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.observe(seconds)

    def observe_commit(self, requests: int, seconds: float) -> None:
        if self.batch_sizes is not None and self.commit_seconds is not None:
            self.batch_sizes.observe(requests)
            self.commit_seconds.observe(seconds)


# -- Rendering ---------------------------------------------------------------------------


def render_metrics(server: BankServer) -> str:
    """The Prometheus text exposition format 0.0.4 of ``server``'s state and counts."""
    metrics = server.metrics
    connections = server.connections()
    lines: list[str] = []
    _family(
        lines, "bank_connections_open", "gauge",
        "ATM connections being served, evicted ones still closing included.",
        [("", len(connections))],
    )
    _family(
        lines, "bank_sessions_logged_in", "gauge", "ATM connections logged in to an account.",
        [("", sum(1 for c in connections if c.logged_in))],
    )
    _family(
        lines, "bank_leases_held", "gauge", "Accounts leased to a session (one ATM each).",
        [("", len(server.leases.held()))],
    )
    _family(
        lines, "bank_requests_total", "counter",
        "Requests answered, by opcode and reply status (refusals by the state table too).",
        [
            (_labels(opcode=opcode, status=status), count)
            for (opcode, status), count in sorted(
                ((op.name, st.name), n) for (op, st), n in metrics.requests.items()
            )
        ],
    )
    _histogram(
        lines, "bank_request_duration_seconds",
        "Seconds from a whole request frame to its reply written to the socket.",
        metrics.latency,
    )
    _family(
        lines, "bank_refusals_total", "counter",
        "Connections refused (busy: every slot taken; per_address_cap: too many not"
        " logged in from one address), evicted, or whose TLS handshake failed.",
        [(_labels(reason=reason), metrics.refusals[reason]) for reason in REFUSAL_REASONS],
    )
    _family(
        lines, "bank_fenced_writes_total", "counter",
        "Money writes and PIN changes refused because another process had taken the"
        " session's lease over (nothing done; the session ended).",
        [("", metrics.fenced_writes)],
    )
    if metrics.batch_sizes is not None and metrics.commit_seconds is not None:
        _histogram(
            lines, "bank_ledger_batch_requests",
            "Requests run in one SQLite group commit (one transaction, one thread hop).",
            metrics.batch_sizes,
        )
        _histogram(
            lines, "bank_ledger_commit_duration_seconds",
            "Seconds one group commit took, from its first statement to its outcome,"
            " the fsync included.",
            metrics.commit_seconds,
        )
    return "".join(line + "\n" for line in lines)


def _family(
    lines: list[str], name: str, kind: str, help_text: str,
    samples: Iterable[tuple[str, float]],
) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)


def _histogram(lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
        cumulative += count
        lines.append(f"{name}_bucket{_labels(le=_number(bound))} {cumulative}")
    lines.append(f"{name}_sum {_number(histogram.sum)}")
    lines.append(f"{name}_count {cumulative}")


def _labels(**labels: str) -> str:
    inner = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value (seconds or a count; never money) as the exposition format writes it."""
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else repr(float(value))
    return repr(value)


def render_sessions(server: BankServer) -> str:
    """Every connection as JSON: masked account, peer, since when, last request, terminal."""
    now_wall, now_perf = time.time(), time.perf_counter()

    def wall(perf: float | None) -> str | None:
        if perf is None:
            return None
        moment = datetime.fromtimestamp(now_wall - (now_perf - perf), tz=UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    connections = [
        {
            "account": (
                mask_account(c.session.account) if c.session.account is not None else None
            ),
            "peer": c.peer,
            "connected_since": wall(c.connected_perf),
            "last_request_at": wall(c.last_request_perf),
            "terminal": c.session.terminal,
        }
        for c in sorted(server.connections(), key=lambda c: c.connected_perf)
    ]
    return json.dumps({"connections": connections}, indent=1) + "\n"


# -- HTTP --------------------------------------------------------------------------------


async def open_admin_listeners(port: int) -> list[trio.SocketListener]:
    """Bind ``port`` on 127.0.0.1; raises OSError (e.g. the port is in use)."""
    return await trio.open_tcp_listeners(port, host=ADMIN_HOST)


async def serve_admin(
    server: BankServer,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve admin connections on ``listeners`` until cancelled."""
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        log.info("admin endpoint on http://%s:%d/metrics and /sessions", host, port)
    limiter = trio.CapacityLimiter(ADMIN_CONNECTIONS_MAX)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _serve_one(server, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            log.debug("admin connection lost: %s", error)
        except Exception:  # a bug here must not end the bank's service
            log.exception("admin: unexpected error")
        finally:
            limiter.release()
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


async def _serve_one(server: BankServer, stream: trio.SocketStream) -> None:
    """Read one request (bounded), answer it, close."""
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=ADMIN_REQUEST_BYTES_MAX)
    with trio.move_on_after(ADMIN_READ_TIMEOUT_S) as reading:
        status, content_type, body = await _read_and_answer(server, stream, http)
    if reading.cancelled_caught:
        log.debug("admin: request not complete in %s s: closed", ADMIN_READ_TIMEOUT_S)
        return
    if http.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
        return
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
    ]
    if status == 405:
        headers.append(("Allow", "GET"))
    with trio.move_on_after(ADMIN_SEND_TIMEOUT_S):
        events = (
            h11.Response(status_code=status, headers=headers), h11.Data(data=body),
            h11.EndOfMessage(),
        )
        await stream.send_all(b"".join(http.send(event) or b"" for event in events))
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_eof()
            await _drain(stream)


async def _read_and_answer(
    server: BankServer, stream: trio.SocketStream, http: h11.Connection
) -> tuple[int, str, bytes]:
    """The status, content type and body that answer the client's request."""
    received = 0
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as error:
            return _error(error.error_status_hint, str(error))
        if isinstance(event, h11.Request):
            return _answer(server, event)
        if event is h11.NEED_DATA:
            if received > ADMIN_REQUEST_BYTES_MAX:
                return _error(431, f"request head over {ADMIN_REQUEST_BYTES_MAX} bytes")
            # Never past the limit's first byte: a head over it is never complete.
            data = await stream.receive_some(
                min(ADMIN_RECEIVE_BYTES, ADMIN_REQUEST_BYTES_MAX + 1 - received)
            )
            received += len(data)
            http.receive_data(data)  # b"" is the end of the client's data
        else:  # ConnectionClosed, or PAUSED which a first request never sees
            return _error(400, "no request")


def _answer(server: BankServer, request: h11.Request) -> tuple[int, str, bytes]:
    if len(request.headers) > ADMIN_HEADERS_MAX:
        return _error(431, f"more than {ADMIN_HEADERS_MAX} header fields")
    host = next((value for name, value in request.headers if name == b"host"), b"")
    if _host_name(host) not in ADMIN_HOST_NAMES:
        return _error(421, "not this host: ask for 127.0.0.1 or localhost")
    path = request.target.split(b"?", 1)[0]
    if path not in _PAGES:
        return _error(404, "not found: try /metrics or /sessions")
    if request.method != b"GET":
        return _error(405, "only GET")
    content_type, render = _PAGES[path]
    return 200, content_type, render(server).encode()


def _host_name(host: bytes) -> bytes:
    """A Host header's name, without its port or an IPv6 address's brackets, in lower
    case: ``[::1]:9100`` -> ``::1``, ``LocalHost`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[1:].partition(b"]")[0]
    return host.rpartition(b":")[0] if b":" in host else host


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (message + "\n").encode()


async def _drain(stream: trio.SocketStream) -> None:
    """Discard what the client still sends (bounded), until it closes."""
    drained = 0
    while drained <= ADMIN_DRAIN_BYTES_MAX:
        data = await stream.receive_some(ADMIN_RECEIVE_BYTES)
        if not data:
            return
        drained += len(data)


_PAGES = {
    b"/metrics": ("text/plain; version=0.0.4; charset=utf-8", render_metrics),
    b"/sessions": ("application/json", render_sessions),
}
