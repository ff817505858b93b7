"""The protocol inside TLS, end to end with the in-process server and the ATM's own
connection code, over real TLS on loopback with certificates from ``bank.tls`` (what
``python -m bank tls-init`` and ``tls-terminal`` write).

A terminal with its certificate logs in and its entries name it; one without is refused,
and so are a server signed by another CA, a certificate for another host name and an
expired one, each with its own word and exit code; plaintext clients at the TLS port and
TLS clients at a plaintext port fail cleanly and cost nothing else; 300 connections that
never finish a handshake neither keep an honest ATM out nor outlive the login deadline;
and the real ``openssl s_client`` completes a TLS 1.3 handshake with the server.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import socket
import ssl
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from atm.connection import Connection
from atm.errors import ExitCode, TlsFailed
from bank.batch_ledger import BatchLedger
from bank.config import ServerConfig
from bank.store import read_books
from bank.tls import (
    TlsFailure,
    TlsFiles,
    client_context,
    init_ca_and_server,
    issue_terminal,
    server_context,
)
from tests.helpers import (
    DEMO_ACCOUNT,
    DEMO_PIN,
    RunningServer,
    WireClient,
    settle,
    start_server,
    txn_id,
)
from wire import (
    Deposit,
    DepositReply,
    Login,
    LoginReply,
    Ping,
    PingReply,
    Resume,
    ResumeReply,
    Status,
)

HALF_OPEN_HANDSHAKES = 300
OPENSSL_TIMEOUT_S = 20


@pytest.fixture
def pki(tmp_path: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost."""
    return init_ca_and_server(tmp_path / "tls", ["127.0.0.1", "localhost"])


@pytest.fixture
def terminal(pki: TlsFiles, tmp_path: Path) -> TlsFiles:
    return issue_terminal(tmp_path / "tls", "atm-0042")


def mutual(pki: TlsFiles) -> ssl.SSLContext:
    return server_context(pki.cert, pki.key, client_ca=pki.ca)


async def tls_bank(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, context: ssl.SSLContext
) -> RunningServer:
    return await start_server(nursery, config, ledger, tls=context)


async def open_atm(
    bank: RunningServer, ca: Path, terminal: TlsFiles | None = None, host: str = "127.0.0.1"
) -> Connection:
    context = client_context(
        ca, cert=terminal.cert if terminal else None, key=terminal.key if terminal else None
    )
    return await Connection.open(host, bank.port, tls=context)


async def test_a_terminal_with_its_certificate_logs_in_and_its_entries_name_it(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    terminal: TlsFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    atm = await open_atm(bank, pki.ca, terminal)
    assert (await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)).status is Status.APPROVED
    deposit = await atm.request(Deposit(txn_id(), 5_00), DepositReply)
    assert deposit.status is Status.APPROVED
    await atm.aclose()
    entries = read_books(tmp_path / "bank.db").entries
    assert [(e.entry_id, e.terminal) for e in entries] == [(deposit.entry_id, "CN=atm-0042")]
    session_lines = [r.getMessage() for r in caplog.records if "conn 1 " in r.getMessage()]
    assert any("CN=atm-0042: login AC-***45 APPROVED" in line for line in session_lines)


async def test_without_a_client_ca_no_terminal_certificate_is_needed(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
):
    context = server_context(pki.cert, pki.key, client_ca=None)
    bank = await tls_bank(nursery, config, ledger, context)
    atm = await open_atm(bank, pki.ca)
    assert (await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)).status is Status.APPROVED
    await atm.aclose()


async def test_an_atm_without_a_terminal_certificate_is_refused(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    caplog: pytest.LogCaptureFixture,
):
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    with pytest.raises(TlsFailed) as refused:
        await open_atm(bank, pki.ca)
    assert refused.value.exit_code is ExitCode.TLS_FAILED
    assert refused.value.kind in {TlsFailure.CERTIFICATE_REQUIRED, TlsFailure.CONNECTION_CLOSED}
    await settle()
    assert "TLS handshakes from 127.0.0.1 fail" in caplog.text
    assert bank.server.connection_count == 0


async def test_a_terminal_certificate_from_another_ca_is_refused(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    tmp_path: Path,
):
    stranger = init_ca_and_server(tmp_path / "other", ["127.0.0.1"])
    foreign = issue_terminal(tmp_path / "other", "atm-0666")
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    with pytest.raises(TlsFailed):
        await open_atm(bank, pki.ca, foreign)
    assert stranger.ca != pki.ca


@pytest.mark.parametrize(
    ("server_hosts", "connect_to", "days_ago", "kind"),
    [
        (["127.0.0.1"], "127.0.0.1", 0, TlsFailure.UNKNOWN_CA),  # signed by another CA
        (["localhost"], "127.0.0.1", 0, TlsFailure.HOSTNAME_MISMATCH),
        (["127.0.0.1"], "127.0.0.1", 3 * 365, TlsFailure.EXPIRED),
    ],
    ids=["unknown CA", "wrong host name", "expired"],
)
async def test_the_atm_refuses_a_bank_it_cannot_verify(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, tmp_path: Path,
    server_hosts: list[str], connect_to: str, days_ago: int, kind: TlsFailure,
):
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_ago)
    served = init_ca_and_server(tmp_path / "served", server_hosts, now=then)
    trusted = served.ca
    if kind is TlsFailure.UNKNOWN_CA:
        trusted = init_ca_and_server(tmp_path / "trusted", ["127.0.0.1"]).ca
    bank = await tls_bank(
        nursery, config, ledger, server_context(served.cert, served.key, client_ca=None)
    )
    with pytest.raises(TlsFailed) as refused:
        await open_atm(bank, trusted, host=connect_to)
    assert refused.value.kind is kind


async def test_plaintext_at_the_tls_port_costs_nothing_but_a_warning(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    terminal: TlsFiles, caplog: pytest.LogCaptureFixture,
):
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    for _ in range(3):
        plain = await WireClient.connect(bank.port)
        await plain.send_raw(b"AT\x01\x01" + bytes(20))  # a plaintext LOGIN-shaped frame
        assert await plain.closed()  # not one byte of the protocol back
        await plain.aclose()
    await settle()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not speak TLS" in warnings[0].getMessage()
    atm = await open_atm(bank, pki.ca, terminal)
    assert (await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)).status is Status.APPROVED
    await atm.aclose()


async def test_tls_at_a_plaintext_port_is_named_as_such(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
):
    bank = await start_server(nursery, config, ledger)
    with pytest.raises(TlsFailed) as refused:
        await open_atm(bank, pki.ca)
    assert refused.value.kind is TlsFailure.PLAINTEXT_PEER


async def test_half_open_handshakes_neither_lock_atms_out_nor_outlive_the_login_deadline(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, config: ServerConfig,
    ledger: BatchLedger, pki: TlsFiles, terminal: TlsFiles,
):
    """300 connections that start a TLS handshake (a few bytes of a ClientHello, or
    nothing) from 30 addresses, under each address's cap: an honest ATM is served at once
    (the frozen clock proves no deadline helped), and at the login deadline all go."""
    mock_clock.autojump_threshold = 5.0  # a hang fails (the clock moves) instead of hanging
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    stalled = []
    for i in range(HALF_OPEN_HANDSHAKES):
        sock = trio.socket.socket()
        await sock.bind((f"127.0.0.{2 + i % 30}", 0))
        await sock.connect(("127.0.0.1", bank.port))
        if i % 2:
            await sock.send(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
        stalled.append(sock)
    await settle()
    assert bank.server.connection_count == HALF_OPEN_HANDSHAKES
    started = trio.current_time()
    atm = await open_atm(bank, pki.ca, terminal)
    assert (await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)).status is Status.APPROVED
    assert trio.current_time() == started
    mock_clock.jump(config.login_timeout_s)
    await settle()
    assert bank.server.connection_count == 1  # only the honest ATM's
    await atm.aclose()
    for sock in stalled:
        sock.close()


async def test_openssl_s_client_completes_a_tls_1_3_handshake(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    terminal: TlsFiles,
):
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed (Debian's openssl package)"
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    with trio.fail_after(OPENSSL_TIMEOUT_S):
        result = await trio.run_process(
            [openssl, "s_client", "-connect", f"127.0.0.1:{bank.port}", "-brief",
             "-CAfile", str(pki.ca), "-verify_return_error", "-verify_ip", "127.0.0.1",
             "-cert", str(terminal.cert), "-key", str(terminal.key)],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
        )
    # errors="replace": stdout also carries what the bank sent, its binary HELLO frame.
    report = result.stderr.decode(errors="replace") + result.stdout.decode(errors="replace")
    assert "Protocol version: TLSv1.3" in report, report
    assert "Verification: OK" in report, report


async def test_a_session_token_resumes_only_from_its_own_terminal(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    terminal: TlsFiles, tmp_path: Path,
):
    """Under mutual TLS a stolen token is no use over another terminal's certificate,
    and is not spent by the attempt: its own terminal still resumes with it."""
    thief_cert = issue_terminal(tmp_path / "tls", "atm-0666")
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    owner = await open_atm(bank, pki.ca, terminal)
    login = await owner.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)
    assert login.status is Status.APPROVED
    await owner.request(Ping(), PingReply)  # the SESSION_TOKEN notice is read by now
    token = owner.session_token
    assert token is not None
    thief = await open_atm(bank, pki.ca, thief_cert)
    stolen = await thief.request(Resume(DEMO_ACCOUNT, token), ResumeReply)
    assert stolen.status is Status.UNKNOWN_SESSION
    again = await open_atm(bank, pki.ca, terminal)
    resumed = await again.request(Resume(DEMO_ACCOUNT, token), ResumeReply)
    assert resumed.status is Status.APPROVED
    for atm in (owner, thief, again):
        await atm.aclose()


async def test_garbage_records_and_resets_mid_handshake_cost_one_warning(
    nursery: trio.Nursery, config: ServerConfig, ledger: BatchLedger, pki: TlsFiles,
    terminal: TlsFiles, caplog: pytest.LogCaptureFixture,
):
    bank = await tls_bank(nursery, config, ledger, mutual(pki))
    for payload in (b"\x16\x03\x01\x00\x05hello", b"\x17\x03\x03\x00\x10" + bytes(16)):
        for _ in range(3):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", bank.port))
            await sock.send(payload)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset in the middle of the handshake
    await settle()
    assert bank.server.connection_count == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # At most one line per source: 127.0.0.1, and "(peer gone)" for a connection reset
    # before the server could ask who it was from.
    sources = [line.split(" fail: ")[0] for line in warnings]
    assert all(line.startswith("TLS handshakes from ") for line in warnings), warnings
    assert len(sources) == len(set(sources)) >= 1, warnings
    atm = await open_atm(bank, pki.ca, terminal)  # and an honest ATM is served
    login = await atm.request(Login(DEMO_ACCOUNT, DEMO_PIN), LoginReply)
    assert login.status is Status.APPROVED
    await atm.aclose()
