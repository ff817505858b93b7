"""bank/tls.py: the operator's certificate files, and the TLS contexts built from them.

Covers the files ``init_ca_and_server`` and ``issue_terminal`` write (their contents and
modes, never overwriting, the real ``openssl``'s verdict on them), the contexts' settings
and their one-sentence errors, and real handshakes between ``server_context`` and
``client_context`` over socket pairs: every kind ``describe_verification_error`` gives,
seen from each end that sees one, and ``peer_identity`` once a handshake succeeds.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atm.__main__ import main as atm_main
from atm.errors import ExitCode
from bank.__main__ import main as bank_main
from bank.__main__ import tls_context as bank_tls_context
from bank.config import ServerConfig
from bank.tls import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CA_VALIDITY_DAYS,
    CLOCK_SKEW_S,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    SERVER_VALIDITY_DAYS,
    TERMINAL_VALIDITY_DAYS,
    TlsError,
    TlsFailure,
    TlsFileExists,
    TlsFiles,
    check_in_date,
    client_context,
    describe_verification_error,
    init_ca_and_server,
    issue_terminal,
    peer_identity,
    server_context,
)
from wire import Hello, Ping, encode

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
"""Certificates store whole seconds, so tests that compare dates start from one."""

LONG_AGO = NOW - datetime.timedelta(days=3 * 365)
"""Far enough back that a two-year certificate made then has expired."""

HOSTS = ["localhost", "127.0.0.1", "::1"]
TERMINAL = "atm-0042"

SOCKET_TIMEOUT_S = 10
"""A handshake over a socket pair takes milliseconds; this only stops a broken test hanging."""

OPENSSL_TIMEOUT_S = 30

GREETING = b"HELLO"
"""The bank speaks first in our protocol, so after the handshake the ATM reads first."""


# --- Fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> TlsFiles:
    """The bank's CA and server certificate, in a directory init creates."""
    return init_ca_and_server(tmp_path / "pki", HOSTS, now=NOW)


@pytest.fixture
def terminal(pki: TlsFiles) -> TlsFiles:
    return issue_terminal(pki.ca.parent, TERMINAL, now=NOW)


@pytest.fixture
def other_pki(tmp_path: Path) -> TlsFiles:
    """Another bank's CA: its certificates are right in every way but who signed them."""
    return init_ca_and_server(tmp_path / "other", HOSTS, now=NOW)


@pytest.fixture
def stranger(other_pki: TlsFiles) -> TlsFiles:
    return issue_terminal(other_pki.ca.parent, TERMINAL, now=NOW)


def bank_context(
    files: TlsFiles, *, client_ca: Path | None = None, tls12: bool = False
) -> ssl.SSLContext:
    return server_context(files.cert, files.key, client_ca=client_ca, tls12=tls12)


def atm_context(ca: Path, terminal: TlsFiles | None = None) -> ssl.SSLContext:
    if terminal is None:
        return client_context(ca, cert=None, key=None)
    return client_context(ca, cert=terminal.cert, key=terminal.key)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def extension(certificate: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


# --- Handshakes over a socket pair ---------------------------------------------------------

End = Callable[[socket.socket], object]
"""One end of a connection: what it returns, or the exception it raises, is its outcome."""


@dataclass(frozen=True)
class Session:
    """What one end saw of a handshake that worked."""

    peer: str | None
    version: str | None
    cipher: str


@dataclass(frozen=True)
class Ends:
    server: object
    client: object

    def kinds(self) -> tuple[TlsFailure | None, TlsFailure | None]:
        return kind_of(self.server), kind_of(self.client)


def kind_of(outcome: object) -> TlsFailure | None:
    return described(outcome)[0] if isinstance(outcome, BaseException) else None


def described(outcome: object) -> tuple[TlsFailure, str]:
    assert isinstance(outcome, BaseException), f"no error but {outcome}"
    return describe_verification_error(outcome)


def handshake(server: End, client: End) -> Ends:
    """Run both ends at once, each in a thread, over a connected pair of sockets."""
    server_socket, client_socket = socket.socketpair()
    with ThreadPoolExecutor(max_workers=2) as pool:
        server_outcome = pool.submit(_outcome, server, server_socket)
        client_outcome = pool.submit(_outcome, client, client_socket)
        return Ends(server_outcome.result(), client_outcome.result())


def _outcome(end: End, sock: socket.socket) -> object:
    sock.settimeout(SOCKET_TIMEOUT_S)
    with sock:
        try:
            return end(sock)
        except OSError as error:  # ssl.SSLError among them
            return error


def tls_bank(context: ssl.SSLContext) -> End:
    def serve(sock: socket.socket) -> Session:
        with context.wrap_socket(sock, server_side=True) as tls:
            tls.sendall(GREETING)
            assert tls.recv(16) == b"OK"
            return _session(tls)

    return serve


def tls_atm(context: ssl.SSLContext, *, host: str = "localhost") -> End:
    def connect(sock: socket.socket) -> Session:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            # With TLS 1.3 a bank that refuses the terminal's certificate says so after
            # the ATM's side of the handshake is done: this read is where the ATM hears it.
            assert tls.recv(16) == GREETING
            tls.sendall(b"OK")
            return _session(tls)

    return connect


def _session(tls: ssl.SSLSocket) -> Session:
    cipher = tls.cipher()
    assert cipher is not None
    return Session(peer_identity(tls), tls.version(), cipher[0])


def plaintext_bank(sock: socket.socket) -> None:
    """The bank without TLS: it says Hello first, whatever the client sends."""
    sock.sendall(encode(Hello(1024, 10, 100_000, 10, 30, 120)))
    _drain(sock)


def plaintext_atm(sock: socket.socket) -> None:
    sock.sendall(encode(Ping(), 1))
    _drain(sock)


def hanging_up(sock: socket.socket) -> None:
    """A peer that closes at once, as a port scanner or a stopping server does."""
    sock.shutdown(socket.SHUT_WR)
    _drain(sock)


def _drain(sock: socket.socket) -> None:
    """Read until the other end closes, so that closing this one cannot reset theirs."""
    while sock.recv(4096):
        pass


# --- init_ca_and_server --------------------------------------------------------------------


def test_init_writes_a_ca_and_a_server_certificate_it_signed(pki: TlsFiles):
    directory = pki.ca.parent
    assert pki == TlsFiles(
        ca=directory / CA_CERT_FILE,
        cert=directory / SERVER_CERT_FILE,
        key=directory / SERVER_KEY_FILE,
    )
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
    )
    ca, server = load_certificate(pki.ca), load_certificate(pki.cert)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)


def test_the_ca_may_sign_end_certificates_only(pki: TlsFiles):
    ca = load_certificate(pki.ca)
    constraints = extension(ca, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = extension(ca, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert extension(ca, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    )


def test_the_server_certificate_names_every_host_and_serves_only(pki: TlsFiles):
    ca, server = load_certificate(pki.ca), load_certificate(pki.cert)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert server.issuer == ca.subject
    names = extension(server, x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert extension(server, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    usage = extension(server, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert extension(server, x509.BasicConstraints).value.ca is False
    assert extension(server, x509.AuthorityKeyIdentifier).value.key_identifier == (
        extension(ca, x509.SubjectKeyIdentifier).value.digest
    )


def test_keys_are_p256_and_signatures_ecdsa_sha256(pki: TlsFiles):
    for path in (pki.ca, pki.cert):
        certificate = load_certificate(path)
        assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp256r1"
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    assert key.public_key() == load_certificate(pki.cert).public_key()


def test_validity_is_ten_years_for_the_ca_and_two_for_the_server(pki: TlsFiles):
    skew = datetime.timedelta(seconds=CLOCK_SKEW_S)
    for path, days in ((pki.ca, CA_VALIDITY_DAYS), (pki.cert, SERVER_VALIDITY_DAYS)):
        certificate = load_certificate(path)
        assert certificate.not_valid_before_utc == NOW - skew
        assert certificate.not_valid_after_utc == NOW + datetime.timedelta(days=days)


def test_serial_numbers_are_random(tmp_path: Path):
    first = init_ca_and_server(tmp_path / "a", HOSTS)
    second = init_ca_and_server(tmp_path / "b", HOSTS)
    serials = {load_certificate(p).serial_number for f in (first, second) for p in (f.ca, f.cert)}
    assert len(serials) == 4


def test_keys_are_0600_and_certificates_0644_whatever_the_umask(tmp_path: Path):
    for mask in (0o000, 0o077):
        with umask(mask):
            files = init_ca_and_server(tmp_path / f"umask-{mask:o}", HOSTS)
        assert file_mode(files.key) == file_mode(files.ca.parent / CA_KEY_FILE) == 0o600
        assert file_mode(files.cert) == file_mode(files.ca) == 0o644


def test_init_creates_its_directory_private_and_leaves_an_existing_one_alone(tmp_path: Path):
    with umask(0o000):
        created = init_ca_and_server(tmp_path / "new" / "pki", HOSTS)
    assert file_mode(created.ca.parent) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o750)
    init_ca_and_server(existing, HOSTS)
    assert file_mode(existing) == 0o750


@pytest.mark.parametrize("name", [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE])
def test_init_refuses_to_overwrite_any_file_and_writes_nothing(tmp_path: Path, name: str):
    (tmp_path / name).write_bytes(b"precious")
    with pytest.raises(TlsFileExists) as refused:
        init_ca_and_server(tmp_path, HOSTS)
    assert refused.value.path == tmp_path / name
    assert str(tmp_path / name) in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"precious"


def test_a_second_init_in_the_same_directory_is_refused(pki: TlsFiles):
    ca_before = pki.ca.read_bytes()
    with pytest.raises(TlsFileExists, match="already exists"):
        init_ca_and_server(pki.ca.parent, HOSTS)
    assert pki.ca.read_bytes() == ca_before


def test_a_dangling_symlink_is_an_existing_file(tmp_path: Path):
    """A link planted where a key will go must not send the key somewhere else."""
    (tmp_path / SERVER_KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TlsFileExists):
        init_ca_and_server(tmp_path, HOSTS)
    assert not (tmp_path / "elsewhere").exists()


def test_a_file_that_appears_meanwhile_is_kept_and_what_was_written_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """O_EXCL is the real guard; the check before writing only makes refusals tidy."""
    monkeypatch.setattr(os.path, "lexists", lambda path: False)
    (tmp_path / SERVER_KEY_FILE).write_bytes(b"theirs")  # the last file init writes
    with pytest.raises(TlsFileExists):
        init_ca_and_server(tmp_path, HOSTS)
    assert [p.name for p in tmp_path.iterdir()] == [SERVER_KEY_FILE]
    assert (tmp_path / SERVER_KEY_FILE).read_bytes() == b"theirs"


def test_a_failed_write_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TlsError, match=f"cannot write {tmp_path / CA_CERT_FILE}: No space left"):
        init_ca_and_server(tmp_path, HOSTS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ([], "at least one"),
        (["bank example"], "neither a DNS host name nor an IP address"),
        (["[::1]"], "neither"),
        (["-bank.example"], "neither"),
        (["bank..example"], "neither"),
        (["localhost", "ünïcode.example"], "neither"),
        (["a" * 63 + "." + "b" * 63], "at most 64 characters"),
    ],
)
def test_init_refuses_hosts_it_cannot_name_and_creates_nothing(
    tmp_path: Path, hosts: list[str], message: str
):
    with pytest.raises(TlsError, match=message):
        init_ca_and_server(tmp_path / "pki", hosts)
    assert not (tmp_path / "pki").exists()


def test_a_long_host_is_fine_after_the_first(tmp_path: Path):
    long_name = ".".join(["a" * 63] * 3)
    files = init_ca_and_server(tmp_path, ["bank.example", long_name])
    names = extension(load_certificate(files.cert), x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["bank.example", long_name]


def test_hosts_must_be_a_list_not_one_string(tmp_path: Path):
    with pytest.raises(TypeError):
        init_ca_and_server(tmp_path, "localhost")


def test_now_must_say_its_time_zone(tmp_path: Path):
    with pytest.raises(ValueError, match="aware"):
        init_ca_and_server(tmp_path, HOSTS, now=datetime.datetime(2030, 1, 1))


# --- issue_terminal ------------------------------------------------------------------------


def test_a_terminal_certificate_names_the_terminal_and_is_for_clients_only(
    pki: TlsFiles, terminal: TlsFiles
):
    directory = pki.ca.parent
    assert terminal == TlsFiles(
        ca=pki.ca,
        cert=directory / f"terminal-{TERMINAL}.pem",
        key=directory / f"terminal-{TERMINAL}.key",
    )
    ca, certificate = load_certificate(pki.ca), load_certificate(terminal.cert)
    certificate.verify_directly_issued_by(ca)
    assert certificate.subject.rfc4514_string() == f"CN={TERMINAL}"
    assert extension(certificate, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert extension(certificate, x509.KeyUsage).value.digital_signature
    assert extension(certificate, x509.BasicConstraints).value.ca is False
    assert certificate.not_valid_after_utc == NOW + datetime.timedelta(
        days=TERMINAL_VALIDITY_DAYS
    )
    assert file_mode(terminal.key) == 0o600
    assert file_mode(terminal.cert) == 0o644


def test_a_terminal_certificate_ends_no_later_than_its_ca(tmp_path: Path):
    ca_made = NOW - datetime.timedelta(days=CA_VALIDITY_DAYS - 100)
    pki = init_ca_and_server(tmp_path, HOSTS, now=ca_made)
    terminal = issue_terminal(tmp_path, TERMINAL, now=NOW)
    assert load_certificate(terminal.cert).not_valid_after_utc == (
        load_certificate(pki.ca).not_valid_after_utc
    )


def test_an_expired_ca_issues_nothing(tmp_path: Path):
    init_ca_and_server(tmp_path, HOSTS, now=NOW - datetime.timedelta(days=CA_VALIDITY_DAYS + 1))
    with pytest.raises(TlsError, match="expired on"):
        issue_terminal(tmp_path, TERMINAL)
    assert not list(tmp_path.glob("terminal-*"))


@pytest.mark.parametrize("name", ["atm-0042", "A.b_c-9", "x" * 64, "7"])
def test_terminal_names_of_letters_digits_and_dot_dash_underscore_are_fine(
    pki: TlsFiles, name: str
):
    assert issue_terminal(pki.ca.parent, name).cert.name == f"terminal-{name}.pem"


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "../ca", "a/b", "atm 1", "atm\n", "ätm", "atm-0042\x00"]
)
def test_other_terminal_names_are_refused_before_anything_is_written(pki: TlsFiles, name: str):
    with pytest.raises(TlsError, match="terminal name"):
        issue_terminal(pki.ca.parent, name)
    assert not list(pki.ca.parent.rglob("terminal-*"))


def test_a_terminal_is_issued_once(pki: TlsFiles, terminal: TlsFiles):
    key_before = terminal.key.read_bytes()
    with pytest.raises(TlsFileExists) as refused:
        issue_terminal(pki.ca.parent, TERMINAL)
    assert refused.value.path == terminal.cert
    assert terminal.key.read_bytes() == key_before


def test_issuing_without_a_ca_says_which_file_is_missing(tmp_path: Path):
    with pytest.raises(TlsError, match=rf"the certificate {tmp_path / CA_CERT_FILE} does not"):
        issue_terminal(tmp_path, TERMINAL)


def test_issuing_without_the_ca_key_says_so(pki: TlsFiles):
    ca_key = pki.ca.parent / CA_KEY_FILE
    ca_key.unlink()
    with pytest.raises(TlsError, match=rf"the private key {ca_key} does not exist"):
        issue_terminal(pki.ca.parent, TERMINAL)


def test_issuing_with_a_damaged_ca_key_says_so(pki: TlsFiles):
    ca_key = pki.ca.parent / CA_KEY_FILE
    ca_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TlsError, match=rf"{ca_key} is not a PEM private key"):
        issue_terminal(pki.ca.parent, TERMINAL)


def test_issuing_with_another_cas_key_says_so(pki: TlsFiles, other_pki: TlsFiles):
    ca_key = pki.ca.parent / CA_KEY_FILE
    ca_key.unlink()
    shutil.copy(other_pki.ca.parent / CA_KEY_FILE, ca_key)
    with pytest.raises(TlsError, match="is not the private key of the certificate"):
        issue_terminal(pki.ca.parent, TERMINAL)


# --- What openssl says of the files ----------------------------------------------------------

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None and os.environ.get("CI") != "true",
    reason="no openssl binary (under CI=true the test runs, and fails without one)",
)


def run_openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT_S,
        check=False,
    )


def openssl(*args: str | Path) -> str:
    """What openssl prints for a command that must succeed."""
    run = run_openssl(*args)
    assert run.returncode == 0, run.stderr
    return run.stdout


@needs_openssl
def test_openssl_verifies_each_certificate_for_its_purpose(pki: TlsFiles, terminal: TlsFiles):
    for path, purpose in ((pki.cert, "sslserver"), (terminal.cert, "sslclient")):
        verdict = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", pki.ca, path)
        assert verdict.strip() == f"{path}: OK"


@needs_openssl
def test_openssl_refuses_a_terminal_certificate_as_a_server_one(
    pki: TlsFiles, terminal: TlsFiles
):
    run = run_openssl("verify", "-purpose", "sslserver", "-CAfile", pki.ca, terminal.cert)
    assert run.returncode != 0
    assert "unsuitable certificate purpose" in run.stdout + run.stderr


@needs_openssl
def test_openssl_reads_the_alternative_names(pki: TlsFiles):
    names = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", pki.cert)
    assert names.split("\n", 1)[1].split() == [
        "DNS:localhost,",
        "IP",
        "Address:127.0.0.1,",
        "IP",
        "Address:0:0:0:0:0:0:0:1",
    ]


@needs_openssl
def test_openssl_reads_the_keys(pki: TlsFiles, terminal: TlsFiles):
    for key in (pki.ca.parent / CA_KEY_FILE, pki.key, terminal.key):
        assert openssl("pkey", "-noout", "-in", key) == ""


# --- server_context and client_context -------------------------------------------------------


def test_the_bank_speaks_tls_1_3_only_unless_told(pki: TlsFiles):
    assert bank_context(pki).minimum_version == ssl.TLSVersion.TLSv1_3
    assert bank_context(pki, tls12=True).minimum_version == ssl.TLSVersion.TLSv1_2


def test_with_tls_1_2_the_bank_offers_only_forward_secret_aead_ciphers(pki: TlsFiles):
    ciphers = bank_context(pki, tls12=True).get_ciphers()
    tls12 = [cipher["name"] for cipher in ciphers if cipher["protocol"] == "TLSv1.2"]
    assert tls12
    for name in tls12:
        assert name.startswith("ECDHE-"), name
        assert "-GCM-" in name or "CHACHA20-POLY1305" in name, name


def test_the_bank_requires_terminal_certificates_only_with_a_client_ca(pki: TlsFiles):
    assert bank_context(pki).verify_mode == ssl.CERT_NONE
    assert bank_context(pki, client_ca=pki.ca).verify_mode == ssl.CERT_REQUIRED


def test_both_contexts_refuse_renegotiation_and_verify_strictly(pki: TlsFiles):
    for context in (bank_context(pki, tls12=True), atm_context(pki.ca)):
        assert context.options & ssl.OP_NO_RENEGOTIATION
        assert context.verify_flags & ssl.VERIFY_X509_STRICT


def test_the_atm_checks_the_host_name_against_the_banks_ca_alone(pki: TlsFiles):
    context = atm_context(pki.ca)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "atm-bank CA"),),)
    ]


def test_sslkeylogfile_does_not_make_either_end_log_session_secrets(
    pki: TlsFiles, terminal: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    key_log = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(key_log))
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca, terminal))
    )
    assert ends.kinds() == (None, None)
    # Python opens the file and writes a comment as it makes a context; no secret follows.
    secrets = [line for line in key_log.read_text().splitlines() if not line.startswith("#")]
    assert secrets == []


def test_a_certificate_needs_its_key_on_the_atm(pki: TlsFiles, terminal: TlsFiles):
    with pytest.raises(TlsError, match="give both or neither"):
        client_context(pki.ca, cert=terminal.cert, key=None)
    with pytest.raises(TlsError, match="give both or neither"):
        client_context(pki.ca, cert=None, key=terminal.key)


@dataclass(frozen=True)
class Specimens:
    """Files a context must refuse, each in place of a good CA, certificate or key."""

    missing: Path
    directory: Path
    garbage: Path
    certificate: Path
    private_key: Path
    encrypted_key: Path
    other_key: Path


@pytest.fixture
def specimens(pki: TlsFiles, terminal: TlsFiles, tmp_path: Path) -> Specimens:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    encrypted_key = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"test password"),
        )
    )
    return Specimens(
        missing=tmp_path / "missing.pem",
        directory=tmp_path,
        garbage=garbage,
        certificate=pki.cert,
        private_key=pki.key,
        encrypted_key=encrypted_key,
        other_key=terminal.key,
    )


@dataclass(frozen=True)
class Broken:
    """One of a context's files (``role``: ca, cert or key) replaced by a specimen, and
    the start of the sentence that refuses it, where ``{path}`` is the specimen's."""

    role: str
    specimen: str
    sentence: str


BROKEN = [
    Broken("cert", "missing", "the certificate {path} does not exist"),
    Broken("cert", "garbage", "{path} is not a PEM certificate"),
    Broken("cert", "private_key", "{path} is not a PEM certificate"),
    Broken("key", "missing", "the private key {path} does not exist"),
    Broken("key", "directory", "cannot read the private key {path}: Is a directory"),
    Broken("key", "garbage", "{path} is not a PEM private key"),
    Broken("key", "certificate", "{path} is not a PEM private key"),
    Broken("key", "encrypted_key", "{path} is encrypted with a password"),
    Broken("key", "other_key", "{path} is not the private key of the certificate"),
    Broken("ca", "missing", "the certificate {path} does not exist"),
    Broken("ca", "private_key", "{path} is not a PEM certificate"),
]


@pytest.mark.parametrize("side", ["bank", "atm"])
@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: f"{b.role}-{b.specimen}")
def test_a_file_a_context_cannot_use_is_named_in_one_sentence(
    pki: TlsFiles, specimens: Specimens, side: str, broken: Broken
):
    files = {"ca": pki.ca, "cert": pki.cert, "key": pki.key}
    files[broken.role] = getattr(specimens, broken.specimen)
    with pytest.raises(TlsError) as refused:
        if side == "bank":
            server_context(files["cert"], files["key"], client_ca=files["ca"])
        else:
            client_context(files["ca"], cert=files["cert"], key=files["key"])
    message = str(refused.value)
    assert message.startswith(broken.sentence.format(path=files[broken.role]))
    assert "PRIVATE KEY" not in message
    assert "\n" not in message


# --- Handshakes ------------------------------------------------------------------------------


def test_a_terminal_with_its_certificate_is_served_and_named(pki: TlsFiles, terminal: TlsFiles):
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca, terminal))
    )
    assert ends.server == Session(f"CN={TERMINAL}", "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert ends.client == Session("CN=localhost", "TLSv1.3", "TLS_AES_256_GCM_SHA384")


def test_without_a_client_ca_a_terminal_is_anonymous(pki: TlsFiles, terminal: TlsFiles):
    ends = handshake(tls_bank(bank_context(pki)), tls_atm(atm_context(pki.ca, terminal)))
    assert isinstance(ends.server, Session)
    assert ends.server.peer is None


@pytest.mark.parametrize("host", HOSTS)
def test_the_atm_accepts_each_name_and_address_the_certificate_has(pki: TlsFiles, host: str):
    ends = handshake(tls_bank(bank_context(pki)), tls_atm(atm_context(pki.ca), host=host))
    assert ends.kinds() == (None, None)


def test_no_terminal_certificate_when_one_is_required(pki: TlsFiles):
    ends = handshake(tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca)))
    assert ends.kinds() == (TlsFailure.CERTIFICATE_REQUIRED, TlsFailure.CERTIFICATE_REQUIRED)


def test_a_terminal_certificate_from_another_ca(pki: TlsFiles, stranger: TlsFiles):
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca, stranger))
    )
    assert ends.kinds() == (TlsFailure.UNKNOWN_CA, TlsFailure.CERTIFICATE_REFUSED)
    assert "not signed by a CA trusted there" in described(ends.client)[1]


def test_a_bank_certificate_from_another_ca(pki: TlsFiles, other_pki: TlsFiles):
    ends = handshake(tls_bank(bank_context(other_pki)), tls_atm(atm_context(pki.ca)))
    assert ends.kinds() == (TlsFailure.CERTIFICATE_REFUSED, TlsFailure.UNKNOWN_CA)


@pytest.mark.parametrize("host", ["bank.example", "10.0.0.1", "::2"])
def test_a_name_or_address_the_bank_certificate_lacks(pki: TlsFiles, host: str):
    ends = handshake(tls_bank(bank_context(pki)), tls_atm(atm_context(pki.ca), host=host))
    assert ends.kinds() == (TlsFailure.CERTIFICATE_REFUSED, TlsFailure.HOSTNAME_MISMATCH)


def test_an_expired_bank_certificate(tmp_path: Path):
    expired = init_ca_and_server(tmp_path, HOSTS, now=LONG_AGO)
    ends = handshake(tls_bank(bank_context(expired)), tls_atm(atm_context(expired.ca)))
    assert ends.kinds() == (TlsFailure.CERTIFICATE_REFUSED, TlsFailure.EXPIRED)


def test_an_expired_terminal_certificate(pki: TlsFiles):
    expired = issue_terminal(pki.ca.parent, TERMINAL, now=LONG_AGO)
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca, expired))
    )
    assert ends.kinds() == (TlsFailure.EXPIRED, TlsFailure.CERTIFICATE_REFUSED)
    assert "expired" in described(ends.client)[1]


def test_the_bank_will_not_start_with_an_expired_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Every ATM would fail its handshake; the operator hears why at once, not from them."""
    expired = init_ca_and_server(tmp_path / "tls", HOSTS, now=LONG_AGO)
    db = tmp_path / "bank.db"
    assert bank_main([
        "--db", str(db), "--key-file", str(tmp_path / "bank.key"), "--port", "0",
        "--tls-cert", str(expired.cert), "--tls-key", str(expired.key),
    ]) == 1
    until = load_certificate(expired.cert).not_valid_after_utc
    assert capsys.readouterr().err == (
        f"bank: the certificate {expired.cert} expired on {until:%Y-%m-%d}; issue a new one"
        " (python -m bank tls-init, tls-terminal)\n"
    )
    assert not db.exists()


def test_an_atm_will_not_start_with_an_expired_terminal_certificate(
    pki: TlsFiles, capsys: pytest.CaptureFixture[str]
):
    """Under TLS 1.3 the bank's refusal reaches the ATM only as a closed connection."""
    expired = issue_terminal(pki.ca.parent, TERMINAL, now=LONG_AGO)
    assert atm_main([
        "--port", "1", "--tls-ca", str(pki.ca),
        "--tls-cert", str(expired.cert), "--tls-key", str(expired.key),
    ]) == ExitCode.USAGE
    assert f"atm: the certificate {expired.cert} expired on " in capsys.readouterr().err


def test_a_certificate_not_valid_yet_names_the_clock(tmp_path: Path):
    early = init_ca_and_server(tmp_path, HOSTS, now=NOW + datetime.timedelta(days=1))
    with pytest.raises(TlsError, match=r"is not valid until .* UTC; check this machine's clock"):
        check_in_date(early.cert)
    check_in_date(early.cert, now=NOW + datetime.timedelta(days=1))


def test_a_terminal_certificate_cannot_serve_as_the_banks(pki: TlsFiles, terminal: TlsFiles):
    ends = handshake(tls_bank(bank_context(terminal)), tls_atm(atm_context(pki.ca)))
    assert ends.kinds() == (TlsFailure.CERTIFICATE_REFUSED, TlsFailure.BAD_CERTIFICATE)
    assert "purpose" in described(ends.client)[1]


def test_the_banks_certificate_cannot_identify_a_terminal(pki: TlsFiles):
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca)), tls_atm(atm_context(pki.ca, pki))
    )
    assert ends.kinds() == (TlsFailure.BAD_CERTIFICATE, TlsFailure.CERTIFICATE_REFUSED)


def tls12_only(context: ssl.SSLContext, *, ciphers: str | None = None) -> ssl.SSLContext:
    """An ATM that cannot speak TLS 1.3, and perhaps only weaker ciphers."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def test_tls_1_2_is_refused_by_default(pki: TlsFiles):
    ends = handshake(tls_bank(bank_context(pki)), tls_atm(tls12_only(atm_context(pki.ca))))
    assert ends.kinds() == (TlsFailure.WRONG_VERSION, TlsFailure.WRONG_VERSION)


def test_tls_1_2_is_accepted_when_enabled_with_an_aead_cipher(pki: TlsFiles, terminal: TlsFiles):
    ends = handshake(
        tls_bank(bank_context(pki, client_ca=pki.ca, tls12=True)),
        tls_atm(tls12_only(atm_context(pki.ca, terminal))),
    )
    assert isinstance(ends.server, Session)
    assert ends.server.version == "TLSv1.2"
    assert ends.server.cipher.startswith("ECDHE-ECDSA-")
    assert ends.server.peer == f"CN={TERMINAL}"


def test_an_atm_with_neither_tls_1_3_nor_an_aead_cipher(pki: TlsFiles):
    cbc_only = tls12_only(atm_context(pki.ca), ciphers="ECDHE-ECDSA-AES128-SHA256")
    ends = handshake(tls_bank(bank_context(pki, tls12=True)), tls_atm(cbc_only))
    assert ends.kinds() == (TlsFailure.WRONG_VERSION, TlsFailure.WRONG_VERSION)


def test_a_plaintext_atm_at_a_tls_bank(pki: TlsFiles):
    ends = handshake(tls_bank(bank_context(pki)), plaintext_atm)
    assert kind_of(ends.server) is TlsFailure.PLAINTEXT_PEER


def test_a_tls_atm_at_a_plaintext_bank(pki: TlsFiles):
    ends = handshake(plaintext_bank, tls_atm(atm_context(pki.ca)))
    assert kind_of(ends.client) is TlsFailure.PLAINTEXT_PEER


def test_a_peer_that_hangs_up_during_the_handshake(pki: TlsFiles):
    assert kind_of(handshake(tls_bank(bank_context(pki)), hanging_up).server) is (
        TlsFailure.CONNECTION_CLOSED
    )
    assert kind_of(handshake(hanging_up, tls_atm(atm_context(pki.ca))).client) is (
        TlsFailure.CONNECTION_CLOSED
    )


async def test_through_trio_the_cause_of_a_broken_stream_is_described(pki: TlsFiles):
    """Trio's SSLStream raises BrokenResourceError from the ssl error, as the ATM sees it."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, bank_context(pki), server_side=True)
    client = trio.SSLStream(client_transport, atm_context(pki.ca), server_hostname="bank.example")
    with trio.fail_after(SOCKET_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handshake_or_close, server)
            broken = await _handshake_or_close(client)
    assert isinstance(broken, trio.BrokenResourceError)
    kind, sentence = describe_verification_error(broken)
    assert kind is TlsFailure.HOSTNAME_MISMATCH
    assert sentence == (
        "the bank's certificate is not issued for the host name or address connected to"
    )


async def test_through_trio_the_terminal_is_named(pki: TlsFiles, terminal: TlsFiles):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(
        server_transport, bank_context(pki, client_ca=pki.ca), server_side=True
    )
    client = trio.SSLStream(
        client_transport, atm_context(pki.ca, terminal), server_hostname="localhost"
    )
    with trio.fail_after(SOCKET_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
    assert peer_identity(server) == f"CN={TERMINAL}"
    assert peer_identity(client) == "CN=localhost"


MemoryTlsStream = trio.SSLStream[
    trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
]


async def _handshake_or_close(stream: MemoryTlsStream) -> trio.BrokenResourceError | None:
    """The handshake's error, if any, after closing: Trio (0.35) sends no alert when a
    handshake fails (python-trio/trio#3413), so the other end learns of it from the close."""
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as error:
        await stream.aclose()
        return error
    return None


# --- peer_identity and describe_verification_error, directly ----------------------------------


@dataclass
class Peer:
    """Stands in for an SSL socket, as getpeercert() would answer."""

    certificate: Mapping[str, object] | None

    def getpeercert(self) -> Mapping[str, object] | None:
        return self.certificate


def test_no_verified_certificate_is_no_identity():
    assert peer_identity(Peer(None)) is None
    assert peer_identity(Peer({})) is None  # what Python gives for one it did not verify
    assert peer_identity(Peer({"subject": ((("organizationName", "Bank"),),)})) is None


def test_an_unprintable_name_cannot_forge_a_log_line():
    forged = "atm-1\n2030-01-01 INFO withdrawal approved"
    identity = peer_identity(Peer({"subject": ((("commonName", forged),),)}))
    assert identity == "CN='atm-1\\n2030-01-01 INFO withdrawal approved'"


def test_an_error_without_an_ssl_cause_is_other():
    assert describe_verification_error(ConnectionResetError(104, "Connection reset by peer")) == (
        TlsFailure.OTHER,
        "the TLS connection failed: [Errno 104] Connection reset by peer",
    )
    assert describe_verification_error(trio.BrokenResourceError()) == (
        TlsFailure.OTHER,
        "the TLS connection failed: BrokenResourceError",
    )


def test_an_ssl_error_of_an_unlisted_reason_is_other_and_named():
    error = ssl.SSLError(1, "[SSL: BAD_DH_VALUE] bad dh value")
    error.reason = "BAD_DH_VALUE"
    assert describe_verification_error(error) == (
        TlsFailure.OTHER,
        "the TLS connection failed: BAD_DH_VALUE",
    )


def test_every_kind_is_a_plain_word_for_an_exit_code():
    assert all(kind.value.isidentifier() and kind.value.islower() for kind in TlsFailure)


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o644, True)])
def test_a_tls_key_others_can_read_is_warned_of_at_start(
    pki: TlsFiles, mode: int, warned: bool, caplog: pytest.LogCaptureFixture
):
    """Refused for the PIN key; for the TLS key, a group may be meant to read it."""
    pki.key.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="bank"):
        assert bank_tls_context(ServerConfig(tls_cert=pki.cert, tls_key=pki.key)) is not None
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ([f"the TLS private key {pki.key} is accessible by group or others"
                     f" (mode {mode:04o}): anyone who can read it can pose as this bank;"
                     f" run: chmod 600 {pki.key}"] if warned else [])


def test_the_bank_will_not_serve_with_a_certificate_that_is_not_a_servers(
    pki: TlsFiles, terminal: TlsFiles
):
    """Every ATM would refuse it ('unsuitable certificate purpose')."""
    with pytest.raises(TlsError, match=r"ca\.pem is a CA's certificate, not a server"):
        bank_tls_context(ServerConfig(tls_cert=pki.ca, tls_key=pki.ca.parent / CA_KEY_FILE))
    with pytest.raises(TlsError, match=r"is not a server certificate \(a terminal's"):
        bank_tls_context(ServerConfig(tls_cert=terminal.cert, tls_key=terminal.key))
    assert bank_tls_context(ServerConfig(tls_cert=pki.cert, tls_key=pki.key)) is not None


def test_an_atm_will_not_start_with_the_banks_certificate_as_its_own(
    pki: TlsFiles, capsys: pytest.CaptureFixture[str]
):
    assert atm_main(["--port", "1", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.cert),
                     "--tls-key", str(pki.key)]) == ExitCode.USAGE
    assert capsys.readouterr().err == (
        f"atm: {pki.cert} is not a terminal certificate (a server's, perhaps)\n"
    )
