"""The admin endpoint (bank.admin): /metrics and /sessions scraped by a real HTTP client
from the in-process server, as it serves; and its limits against hostile clients."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
import trio

from atm.connection import Connection as Atm
from bank.admin import (
    ADMIN_CONNECTIONS_MAX,
    ADMIN_HEADERS_MAX,
    ADMIN_READ_TIMEOUT_S,
    ADMIN_REQUEST_BYTES_MAX,
    serve_admin,
)
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.server import BankServer
from bank.tls import client_context, init_ca_and_server, issue_terminal, server_context
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_PIN,
    OTHER_ACCOUNT,
    OTHER_PIN,
    RunningServer,
    WireClient,
    frames_until_closed,
    legit_session,
    logged_in,
    settle,
    start_server,
)
from wire import Balance, Login, LoginReply, Ping, Status, mask_account

HTTP_TIMEOUT_S = 10
"""Guard on the test's HTTP client against a hung test; far above any honest wait."""

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\.)*\",?)*\})?"
    r" (?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
)
COMMENT = re.compile(r"^# (?:HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]*"
                     r" (?:counter|gauge|histogram|summary|untyped))$")

Samples = dict[tuple[str, str], float]


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, labels) and types by family; fails on any line out of format."""
    assert text.endswith("\n")
    samples: Samples = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            assert COMMENT.match(line), line
            _, word, name, rest = line.split(" ", 3)
            if word == "TYPE":
                assert name in helped and name not in types, f"HELP then one TYPE: {line}"
                types[name] = rest
            else:
                helped.add(name)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        key = (match["name"], match["labels"] or "")
        assert key not in samples, f"sample repeated: {line}"
        samples[key] = float(match["value"])
        family = re.sub(r"_(bucket|sum|count)$", "", match["name"])
        assert match["name"] in types or types.get(family) == "histogram", line
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            check_histogram(samples, name)
    return samples, types


def check_histogram(samples: Samples, name: str) -> None:
    buckets = [
        (float(labels.split('"')[1].replace("+Inf", "inf")), value)
        for (sample, labels), value in samples.items() if sample == f"{name}_bucket"
    ]
    assert buckets and buckets[-1][0] == float("inf"), name
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative"
    assert samples[f"{name}_count", ""] == buckets[-1][1]
    assert samples[f"{name}_sum", ""] >= 0


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """Status, content type and body; an error status is returned, not raised."""
    data = b"x" if method == "POST" else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(http_get, port, path, method)


async def scrape(port: int) -> Samples:
    status, content_type, body = await get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return parse_exposition(body)[0]


@pytest.fixture
async def admin(nursery: trio.Nursery, bank: RunningServer) -> AsyncIterator[int]:
    """The admin endpoint of ``bank`` on a free loopback port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_admin, bank.server, listeners)
    yield listeners[0].socket.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_metrics_parse_and_move_during_load(bank: RunningServer, admin: int) -> None:
    before = await scrape(admin)
    assert before["bank_connections_open", ""] == 0
    assert before["bank_refusals_total", '{reason="busy"}'] == 0
    busy = trio.Event()
    clients_ready = trio.Semaphore(0)

    async def pinging() -> None:
        client = await logged_in(bank, OTHER_ACCOUNT, OTHER_PIN)
        clients_ready.release()
        while not busy.is_set():
            assert (await client.request(Ping())).status is Status.APPROVED
        await client.aclose()

    async def visits() -> None:  # one account, one ATM at a time
        for _ in range(3):
            await legit_session(bank)

    async with trio.open_nursery() as load:
        load.start_soon(pinging)
        load.start_soon(visits)
        await clients_ready.acquire()
        during = await scrape(admin)  # mid-load: the pinging session is logged in
        assert during["bank_sessions_logged_in", ""] >= 1
        assert during["bank_leases_held", ""] >= 1
        assert during["bank_connections_open", ""] >= 1
        await trio.sleep(0.05)
        busy.set()
    after = await scrape(admin)
    requests = {labels: value for (name, labels), value in after.items()
                if name == "bank_requests_total"}
    assert requests['{opcode="LOGIN",status="APPROVED"}'] == 4
    assert requests['{opcode="DEPOSIT",status="APPROVED"}'] == 3
    assert requests['{opcode="LOGOUT",status="APPROVED"}'] == 3
    assert requests['{opcode="PING",status="APPROVED"}'] >= 1
    assert after["bank_request_duration_seconds_count", ""] == sum(requests.values())
    assert after["bank_ledger_batch_requests_count", ""] >= 6  # logins and posts, batched
    assert after["bank_ledger_batch_requests_sum", ""] >= after[
        "bank_ledger_batch_requests_count", ""]
    assert after["bank_ledger_commit_duration_seconds_count", ""] == after[
        "bank_ledger_batch_requests_count", ""]


async def test_exposition_names_and_types(bank: RunningServer, admin: int) -> None:
    client = await logged_in(bank)
    await client.request(Balance())
    _, _, body = await get(admin, "/metrics")
    _, types = parse_exposition(body)
    assert types == {
        "bank_connections_open": "gauge",
        "bank_sessions_logged_in": "gauge",
        "bank_leases_held": "gauge",
        "bank_requests_total": "counter",
        "bank_request_duration_seconds": "histogram",
        "bank_refusals_total": "counter",
        "bank_fenced_writes_total": "counter",
        "bank_ledger_batch_requests": "histogram",
        "bank_ledger_commit_duration_seconds": "histogram",
    }
    assert DEMO_ACCOUNT not in body and "1324" not in body


async def test_refusals_are_counted_by_reason(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
) -> None:
    bank = await start_server(nursery, config, ledger, preauth_per_address_max=1)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_admin, bank.server, listeners)
    port = listeners[0].socket.getsockname()[1]
    first = await bank.client()
    refused = await bank.client(hello=False)
    frame = await refused.receive()
    assert frame is not None and frame.message.status is Status.SERVER_BUSY
    samples = await scrape(port)
    assert samples["bank_refusals_total", '{reason="per_address_cap"}'] == 1
    assert samples["bank_refusals_total", '{reason="busy"}'] == 0
    await first.aclose()
    await refused.aclose()


async def admin_of(nursery: trio.Nursery, bank: RunningServer) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_admin, bank.server, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_evictions_are_counted(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
) -> None:
    bank = await start_server(nursery, config, ledger, connections_max=1)
    port = await admin_of(nursery, bank)
    idle = await bank.client()
    newcomer = await bank.client()  # takes the idle one's slot
    assert len(await frames_until_closed(idle)) == 1  # SESSION_EXPIRED, then closed
    await settle()
    samples = await scrape(port)
    assert samples["bank_refusals_total", '{reason="evicted"}'] == 1
    await idle.aclose()
    await newcomer.aclose()


async def test_tls_terminal_and_failed_handshakes(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path
) -> None:
    pki = init_ca_and_server(tmp_path / "tls", ["127.0.0.1"])
    terminal = issue_terminal(tmp_path / "tls", "atm-0042")
    context = server_context(pki.cert, pki.key, client_ca=pki.ca)
    bank = await start_server(nursery, config, ledger, tls=context)
    port = await admin_of(nursery, bank)
    plain = await WireClient.connect(bank.port)  # no TLS at the TLS port
    await plain.send_raw(b"AT\x01\x01" + bytes(20))
    assert await plain.closed()
    await plain.aclose()
    atm = await Atm.open(
        "127.0.0.1", bank.port, tls=client_context(pki.ca, cert=terminal.cert, key=terminal.key)
    )
    login = await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)
    assert login.status is Status.APPROVED
    await settle()
    samples = await scrape(port)
    assert samples["bank_refusals_total", '{reason="tls_handshake_failed"}'] == 1
    _, _, body = await get(port, "/sessions")
    [entry] = json.loads(body)["connections"]
    assert entry["terminal"] == "CN=atm-0042"
    assert entry["account"] == mask_account(DEMO_ACCOUNT)
    await atm.aclose()


async def test_admin_port_in_use_is_named(
    config: ServerConfig, ledger: BatchLedger
) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken[0].socket.getsockname()[1]
    server = BankServer(dataclasses.replace(config, admin_port=port), ledger)
    with pytest.raises(OSError, match=f"admin port {port}"):
        await server.listen()
    await taken[0].aclose()


async def test_sessions_json(bank: RunningServer, admin: int) -> None:
    anonymous = await bank.client()
    client = await logged_in(bank)
    await client.request(Balance())
    status, content_type, body = await get(admin, "/sessions")
    assert status == 200 and content_type == "application/json"
    assert DEMO_ACCOUNT not in body
    connections = json.loads(body)["connections"]
    assert len(connections) == 2
    for entry in connections:
        assert set(entry) == {
            "account", "peer", "connected_since", "last_request_at", "terminal"
        }
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"])
        assert entry["terminal"] is None  # plaintext: no terminal certificate
        assert entry["connected_since"].endswith("Z")
        assert datetime.fromisoformat(entry["connected_since"]).utcoffset().total_seconds() == 0
    first, second = connections  # oldest first
    assert first["account"] is None and first["last_request_at"] is None
    assert second["account"] == mask_account(DEMO_ACCOUNT)
    assert datetime.fromisoformat(second["last_request_at"]) >= datetime.fromisoformat(
        second["connected_since"])
    await anonymous.aclose()
    await client.aclose()


async def test_unknown_path_and_other_methods(admin: int) -> None:
    assert (await get(admin, "/nope"))[0] == 404
    assert (await get(admin, "/"))[0] == 404
    assert (await get(admin, "/metrics", "POST"))[0] == 405
    assert (await get(admin, "/sessions", "DELETE"))[0] == 405
    assert (await get(admin, "/metrics?x=1"))[0] == 200


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read the whole response until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(HTTP_TIMEOUT_S):
        await stream.send_all(data)
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    await stream.aclose()
    return response


async def test_a_page_served_by_another_host_name_is_refused(admin: int) -> None:
    """DNS rebinding: a web page from attacker.example, whose name the attacker then
    points at 127.0.0.1, may have a browser on the bank's host fetch /sessions from its
    own origin and read the answer. The browser still names attacker.example in Host,
    so only loopback's own names are answered; a scraper of 127.0.0.1 (or localhost,
    through a tunnel) names one of those."""
    for host in (b"attacker.example:%d" % admin, b"attacker.example", b"10.0.0.5"):
        head = b"GET /sessions HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        response = await raw_exchange(admin, head)
        assert response.startswith(b"HTTP/1.1 421 "), response
        assert b"connections" not in response
    for host in (b"127.0.0.1:%d" % admin, b"localhost", b"LocalHost:1", b"[::1]:9"):
        head = b"GET /sessions HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        assert (await raw_exchange(admin, head)).startswith(b"HTTP/1.1 200 "), host


async def test_oversized_request_is_refused(admin: int) -> None:
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * ADMIN_REQUEST_BYTES_MAX
    response = await raw_exchange(admin, huge + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_too_many_headers_are_refused(admin: int) -> None:
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(ADMIN_HEADERS_MAX + 1))
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    response = await raw_exchange(admin, head)
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_garbage_is_a_bad_request(admin: int) -> None:
    response = await raw_exchange(admin, b"\x00\x01 not http\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")


async def test_slow_client_is_dropped(autojump_clock: trio.abc.Clock, admin: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", admin)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
    started = trio.current_time()
    assert await stream.receive_some(4096) == b""  # closed without an answer
    assert trio.current_time() - started == pytest.approx(ADMIN_READ_TIMEOUT_S, abs=0.5)
    await stream.aclose()


async def test_admin_connections_are_capped(autojump_clock: trio.abc.Clock, admin: int) -> None:
    held = [await trio.open_tcp_stream("127.0.0.1", admin) for _ in range(ADMIN_CONNECTIONS_MAX)]
    await trio.testing.wait_all_tasks_blocked()
    extra = await trio.open_tcp_stream("127.0.0.1", admin)
    started = trio.current_time()
    assert await extra.receive_some(4096) == b""
    assert trio.current_time() - started < ADMIN_READ_TIMEOUT_S  # closed at once
    for stream in [*held, extra]:
        await stream.aclose()


async def test_admin_port_setting_serves_on_loopback(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger
) -> None:
    port = free_port()
    bank = await start_server(nursery, config, ledger, admin_port=port)
    client = await logged_in(bank)
    samples = await scrape(port)
    assert samples["bank_sessions_logged_in", ""] == 1
    assert [listener.socket.getsockname()[0] for listener in bank.server._admin_listeners] == [
        "127.0.0.1"]
    await client.aclose()


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_admin_port_is_validated(port: int) -> None:
    with pytest.raises(ValueError, match="admin_port"):
        ServerConfig(admin_port=port)


def test_admin_port_is_off_by_default() -> None:
    assert ServerConfig().admin_port is None


async def test_admin_port_is_freed_when_the_bank_port_is_taken(
    config: ServerConfig, ledger: BatchLedger
) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    admin_port = free_port()
    server = BankServer(
        dataclasses.replace(config, port=taken[0].socket.getsockname()[1], admin_port=admin_port),
        ledger,
    )
    with pytest.raises(OSError):
        await server.listen()
    again = await trio.open_tcp_listeners(admin_port, host="127.0.0.1")  # not held
    for listener in [*taken, *again]:
        await listener.aclose()
