"""TLS with terminal certificates: the files an operator creates, and the contexts that use them.

The bank serves the protocol inside TLS, and may require every ATM to prove which terminal
it is with a certificate signed by the bank's own private CA (mutual TLS). This module is
the part that needs no event loop:

- ``init_ca_and_server`` creates that CA and the server's certificate, ``issue_terminal``
  one certificate per ATM. Files are PEM, so ``openssl`` reads them; keys are EC P-256,
  certificates are signed with ECDSA-SHA256, and keys are written unencrypted with mode
  0600 from the moment they exist (a server starts unattended, so the file mode protects
  its key, not a password). An existing file is never replaced: losing a CA key would
  strand every terminal.
- ``server_context`` and ``client_context`` turn those files into ``ssl.SSLContext``
  objects, refusing with a sentence that names the file rather than OpenSSL's codes.
- ``peer_identity`` names the terminal for the log; ``describe_verification_error``
  turns a failed handshake into a kind (the ATM's exit code) and a sentence (the log).

Every failure an operator can cause raises ``TlsError``, whose text is one sentence that
names the file at fault; no message contains key material.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY_DAYS = 3650
"""Ten years: replacing the CA means issuing every terminal a new certificate."""

SERVER_VALIDITY_DAYS = 730
"""Two years: reissuing it from the CA takes a moment."""

TERMINAL_VALIDITY_DAYS = 730
"""Two years, like the server's."""

CLOCK_SKEW_S = 3600
"""Certificates start this long before they are made, so that a machine whose clock runs
up to an hour behind the one that issued them accepts them at once."""

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

CA_COMMON_NAME = "atm-bank CA"

TERMINAL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
"""A terminal's name: its certificate's CN and part of its file names. Without a slash it
cannot leave the directory, and it is short enough for a CN."""

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*", re.ASCII)
"""A DNS host name as RFC 1123 allows it (ASCII; an IDN host is given in its xn-- form)."""

COMMON_NAME_CHARS_MAX = 64
"""X.509's upper bound for a CN (ub-common-name); the server's first host becomes its CN."""

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""For TLS 1.2 only forward-secret key exchange with AEAD encryption; TLS 1.3 has nothing
else and ignores this list."""

_PRIVATE_FILE_MODE = 0o600
_PUBLIC_FILE_MODE = 0o644
_DIRECTORY_MODE = 0o700


class TlsError(Exception):
    """A TLS file or setting cannot be used; the text is a sentence for the operator."""


class TlsFileExists(TlsError):
    """A file would be overwritten; nothing was written."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} already exists; refusing to overwrite it"
            " (choose another directory, or remove it deliberately)"
        )
        self.path = path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What one side of a connection configures TLS with: the CA it trusts, and its own
    certificate and key. (The CA's key stays in the directory, as ``ca.key``.)"""

    ca: Path
    cert: Path
    key: Path


# --- Creating certificates ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class _NewFile:
    path: Path
    content: bytes
    private: bool


def init_ca_and_server(
    directory: Path, hosts: Sequence[str], *, now: datetime.datetime | None = None
) -> TlsFiles:
    """Create a private CA and a server certificate for ``hosts`` in ``directory``.

    ``hosts`` are the DNS names and IP addresses ATMs connect to; the first is also the
    certificate's CN. Refuses (``TlsFileExists``) if any of the four files exists, so a
    CA is never replaced by accident. ``now`` (an aware datetime) dates the certificates.
    """
    names = _server_names(hosts)
    now = _timestamp(now)
    _make_directory(directory)
    ca_key = _new_key()
    authority = _Authority(_ca_certificate(ca_key, now=now), ca_key)
    server_key = _new_key()
    server_certificate = _leaf_certificate(
        authority,
        server_key,
        common_name=hosts[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alternative_names=names,
        validity_days=SERVER_VALIDITY_DAYS,
        now=now,
    )
    files = TlsFiles(
        ca=directory / CA_CERT_FILE,
        cert=directory / SERVER_CERT_FILE,
        key=directory / SERVER_KEY_FILE,
    )
    _write_new_files([
        _NewFile(files.ca, _certificate_pem(authority.certificate), private=False),
        _NewFile(directory / CA_KEY_FILE, _key_pem(ca_key), private=True),
        _NewFile(files.cert, _certificate_pem(server_certificate), private=False),
        _NewFile(files.key, _key_pem(server_key), private=True),
    ])
    return files


def issue_terminal(
    directory: Path, name: str, *, now: datetime.datetime | None = None
) -> TlsFiles:
    """Issue terminal ``name`` a client certificate from the CA in ``directory``.

    Writes ``terminal-NAME.pem`` and ``terminal-NAME.key`` beside the CA; the ATM needs
    them and ``ca.pem``, never ``ca.key``. The certificate ends with the CA if that comes
    first, since a chain is only as valid as its CA.
    """
    if not TERMINAL_NAME.fullmatch(name):
        raise TlsError(
            f"terminal name {name!r} must be 1 to 64 letters, digits, '-', '_' or '.'"
        )
    now = _timestamp(now)
    authority = _load_authority(directory, now=now)
    key = _new_key()
    certificate = _leaf_certificate(
        authority,
        key,
        common_name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        alternative_names=[],
        validity_days=TERMINAL_VALIDITY_DAYS,
        now=now,
    )
    files = TlsFiles(
        ca=directory / CA_CERT_FILE,
        cert=directory / f"terminal-{name}.pem",
        key=directory / f"terminal-{name}.key",
    )
    _write_new_files([
        _NewFile(files.cert, _certificate_pem(certificate), private=False),
        _NewFile(files.key, _key_pem(key), private=True),
    ])
    return files


def _timestamp(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now


def _server_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        raise TypeError("hosts is a sequence of host names, not one string")
    if not hosts:
        raise TlsError("the server certificate needs at least one host name or IP address")
    if len(hosts[0]) > COMMON_NAME_CHARS_MAX:
        raise TlsError(
            f"the first host becomes the certificate's name, at most {COMMON_NAME_CHARS_MAX}"
            f" characters: put a shorter one first instead of {hosts[0]!r}"
        )
    return [_general_name(host) for host in hosts]


def _general_name(host: str) -> x509.GeneralName:
    """An IP address where ``host`` is one (IPv4 or IPv6), since a client connecting to
    an address checks the certificate's IP addresses, never its DNS names."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(host):
        raise TlsError(f"{host!r} is neither a DNS host name nor an IP address")
    return x509.DNSName(host)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_certificate(key: ec.EllipticCurvePrivateKey, *, now: datetime.datetime) -> x509.Certificate:
    """Self-signed, and allowed to sign only end certificates (path length 0)."""
    name = _name(CA_COMMON_NAME)
    builder = _builder(
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        not_before=now,
        not_after=now + datetime.timedelta(days=CA_VALIDITY_DAYS),
    )
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    return builder.sign(key, hashes.SHA256())


def _leaf_certificate(
    authority: _Authority,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alternative_names: list[x509.GeneralName],
    validity_days: int,
    now: datetime.datetime,
) -> x509.Certificate:
    """An end certificate good for one purpose only (``usage``): a terminal's certificate
    cannot serve as the bank's, nor the bank's identify a terminal."""
    not_after = min(
        now + datetime.timedelta(days=validity_days), authority.certificate.not_valid_after_utc
    )
    builder = _builder(
        subject=_name(common_name),
        issuer=authority.certificate.subject,
        public_key=key.public_key(),
        not_before=now,
        not_after=not_after,
    )
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    builder = builder.add_extension(_key_usage(digital_signature=True), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
        critical=False,
    )
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    return builder.sign(authority.key, hashes.SHA256())


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """What every certificate has, including the key identifier that lets a verifier
    pick the right CA (and that Python 3.13's strict verification requires)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - datetime.timedelta(seconds=CLOCK_SKEW_S))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _load_authority(directory: Path, *, now: datetime.datetime) -> _Authority:
    """The CA in ``directory``, if its key is its own and it has not expired."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    certificate, key = _read_key_pair(cert_path, key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{key_path} is not an elliptic-curve key, as this tool makes")
    if now >= certificate.not_valid_after_utc:
        raise TlsError(
            f"the CA in {cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d};"
            " create a new CA in another directory"
        )
    return _Authority(certificate, key)


# --- Files ---------------------------------------------------------------------------------


def _make_directory(directory: Path) -> None:
    """Only its owner may list or enter a new directory, since it will hold keys."""
    try:
        directory.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
    except OSError as error:
        raise TlsError(f"cannot create the directory {directory}: {error.strerror}") from error


def _write_new_files(files: Sequence[_NewFile]) -> None:
    """Write every file or none, and never over an existing one.

    All targets are checked before the first is written, so a refusal leaves nothing
    behind; O_EXCL still refuses a file that appears meanwhile, and what this call
    created is then removed again.
    """
    for file in files:
        if os.path.lexists(file.path):
            raise TlsFileExists(file.path)
    created: list[Path] = []
    try:
        for file in files:
            fd = _create_new_file(file)
            created.append(file.path)
            _write_and_close(fd, file)
        for directory in {file.path.parent for file in files}:
            _fsync_directory(directory)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def _create_new_file(file: _NewFile) -> int:
    """A new file, or TlsFileExists if anything is at its path, even a dangling symlink.

    A private file is created with mode 0600, so it is never readable by others even for
    a moment.
    """
    mode = _PRIVATE_FILE_MODE if file.private else _PUBLIC_FILE_MODE
    try:
        return os.open(file.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TlsFileExists(file.path) from None
    except OSError as error:
        raise TlsError(f"cannot create {file.path}: {error.strerror}") from error


def _write_and_close(fd: int, file: _NewFile) -> None:
    """A certificate gets exactly 0644 whatever the umask: the server and the ATM may run
    as other users than the operator who made it, and it holds nothing secret."""
    try:
        with os.fdopen(fd, "wb") as stream:
            if not file.private:
                os.fchmod(stream.fileno(), _PUBLIC_FILE_MODE)
            stream.write(file.content)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        raise TlsError(f"cannot write {file.path}: {error.strerror}") from error


def _fsync_directory(directory: Path) -> None:
    """Make the new names durable: a CA key lost in a crash would strand its terminals."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise TlsError(f"cannot sync the directory {directory}: {error.strerror}") from error


def _read_key_pair(cert: Path, key: Path) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """Both files, checked one by one so that an error names the file at fault (OpenSSL
    says only that something failed)."""
    certificate = _read_certificate(cert)
    private_key = _read_private_key(key)
    if certificate.public_key() != private_key.public_key():
        raise TlsError(f"{key} is not the private key of the certificate {cert}")
    return certificate, private_key


def check_in_date(path: Path, *, now: datetime.datetime | None = None) -> None:
    """Refuse a certificate of our own that no peer would accept today.

    Serving with an expired certificate, every ATM's handshake fails; an ATM with an
    expired terminal certificate hears, under TLS 1.3, only that the bank closed the
    connection. Said at start, it names the file and the date. (The contexts themselves
    do not refuse: the tests build them with expired certificates on purpose.)
    """
    certificate = _read_certificate(path)
    now = _timestamp(now)
    if now >= certificate.not_valid_after_utc:
        raise TlsError(
            f"the certificate {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d};"
            " issue a new one (python -m bank tls-init, tls-terminal)"
        )
    if now < certificate.not_valid_before_utc:
        raise TlsError(
            f"the certificate {path} is not valid until"
            f" {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )


def check_purpose(path: Path, *, server: bool) -> None:
    """Refuse a certificate of our own that is not for our end of the connection: a CA's
    (ca.pem given as --tls-cert) or the other end's (a terminal's to the bank, the bank's
    to an ATM). The peer refuses it in every handshake, with 'unsuitable certificate
    purpose' on its side and nothing clear on ours. One without extended key usage is
    for any purpose, and passes."""
    certificate = _read_certificate(path)
    role, other = ("server", "terminal") if server else ("terminal", "server")
    try:
        if certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise TlsError(f"{path} is a CA's certificate, not a {role} certificate")
    except x509.ExtensionNotFound:
        pass
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if wanted not in usages:
        raise TlsError(f"{path} is not a {role} certificate (a {other}'s, perhaps)")


def _read_certificate(path: Path) -> x509.Certificate:
    data = _read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate") from None


def _read_private_key(path: Path) -> PrivateKeyTypes:
    """The key, or a sentence that says what is wrong with its file and nothing of it."""
    data = _read_file(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(
            f"{path} is encrypted with a password; use an unencrypted key"
            " protected by mode 0600, as the bank's tools write"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"{path} is not a PEM private key") from None


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"the {what} {path} does not exist") from None
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path}: {error.strerror}") from error


# --- Contexts ------------------------------------------------------------------------------


def server_context(
    cert: Path, key: Path, *, client_ca: Path | None, tls12: bool = False
) -> ssl.SSLContext:
    """The bank's context: TLS 1.3 (1.2 as well if ``tls12``), and with ``client_ca``
    every ATM must present a certificate signed by that CA, or the handshake fails."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _harden(context, minimum=ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3)
    _load_own_certificate(context, cert=cert, key=key)
    if client_ca is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        _read_certificate(client_ca)
        with _ssl_errors(f"cannot use the CA certificate {client_ca}"):
            context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path, *, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The ATM's context: trusts only the bank's CA (never the system's CAs), checks the
    host name, and presents the terminal's certificate when given one.

    Its minimum is TLS 1.2, so that whether 1.2 is allowed is the bank's decision alone.
    """
    if (cert is None) != (key is None):
        raise TlsError("a terminal certificate and its key go together; give both or neither")
    _read_certificate(ca)
    with _ssl_errors(f"cannot use the CA certificate {ca}"):
        # Passing the CA file here is what keeps the system's CAs out of this context.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    _harden(context, minimum=ssl.TLSVersion.TLSv1_2)
    if cert is not None and key is not None:
        _load_own_certificate(context, cert=cert, key=key)
    return context


def _harden(context: ssl.SSLContext, *, minimum: ssl.TLSVersion) -> None:
    context.minimum_version = minimum
    context.set_ciphers(TLS12_CIPHERS)
    # Renegotiation (TLS 1.2 only) lets a client make the server redo expensive work.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # The checks Python 3.13 makes by default, on every version, so every version agrees.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    # create_default_context honours SSLKEYLOGFILE: every session's secrets would go to
    # a file because of an environment variable. It has written only a comment there yet.
    context.keylog_filename = None  # type: ignore[assignment]


def _load_own_certificate(context: ssl.SSLContext, *, cert: Path, key: Path) -> None:
    _read_key_pair(cert, key)
    with _ssl_errors(f"cannot use the certificate {cert} with the key {key}"):
        context.load_cert_chain(cert, key, password=_never_prompt)


def _never_prompt() -> bytes:
    """Called only for an encrypted key, which _read_private_key has already refused;
    without it OpenSSL would ask for a password on the terminal, blocking the start."""
    raise TlsError("the private key is encrypted; use an unencrypted key with mode 0600")


@contextmanager
def _ssl_errors(sentence: str) -> Iterator[None]:
    """OpenSSL's failures (ssl.SSLError is an OSError) as a TlsError with ``sentence``."""
    try:
        yield
    except OSError as error:
        detail = getattr(error, "reason", None) or error.strerror or str(error)
        raise TlsError(f"{sentence}: {detail}") from error


# --- After the handshake ------------------------------------------------------------------


class HasPeerCertificate(Protocol):
    """An ssl.SSLSocket, ssl.SSLObject or trio.SSLStream once its handshake is done."""

    def getpeercert(self) -> Mapping[str, object] | None: ...


def peer_identity(ssl_object: HasPeerCertificate) -> str | None:
    """``CN=atm-0042`` for the log, from the peer's verified certificate; None without one.

    Python gives the certificate's fields only once it has verified it, so this is never
    a name the peer merely claimed. A name with unprintable characters is escaped, so a
    certificate cannot forge a log line.
    """
    certificate = ssl_object.getpeercert()
    if not certificate:
        return None
    name = _common_name(certificate.get("subject"))
    if name is None:
        return None
    if name.isascii() and name.isprintable():
        return f"CN={name}"
    return f"CN={name!a}"


def _common_name(subject: object) -> str | None:
    """The CN from getpeercert()'s subject: a tuple of RDNs, each of (field, value) pairs."""
    for rdn in subject if isinstance(subject, tuple) else ():
        for attribute in rdn:
            match attribute:
                case ("commonName", str(value)):
                    return value
    return None


# --- Why a handshake failed --------------------------------------------------------------


class TlsFailure(StrEnum):
    """Why a TLS handshake failed, in a word a program can act on (the ATM's exit code)."""

    UNKNOWN_CA = "unknown_ca"
    HOSTNAME_MISMATCH = "hostname_mismatch"
    EXPIRED = "expired"
    BAD_CERTIFICATE = "bad_certificate"
    CERTIFICATE_REQUIRED = "certificate_required"
    CERTIFICATE_REFUSED = "certificate_refused"
    WRONG_VERSION = "wrong_version"
    PLAINTEXT_PEER = "plaintext_peer"
    CONNECTION_CLOSED = "connection_closed"
    OTHER = "other"


# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them:
# this side refused the other side's certificate.
_VERIFY_CODES = {
    2: TlsFailure.UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT
    7: TlsFailure.UNKNOWN_CA,  # CERT_SIGNATURE_FAILURE: a namesake of the CA signed it
    9: TlsFailure.EXPIRED,  # CERT_NOT_YET_VALID
    10: TlsFailure.EXPIRED,  # CERT_HAS_EXPIRED
    18: TlsFailure.UNKNOWN_CA,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: TlsFailure.UNKNOWN_CA,  # SELF_SIGNED_CERT_IN_CHAIN
    20: TlsFailure.UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: TlsFailure.UNKNOWN_CA,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    62: TlsFailure.HOSTNAME_MISMATCH,  # HOSTNAME_MISMATCH
    64: TlsFailure.HOSTNAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}

# ssl.SSLError.reason: what went wrong in the handshake itself.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": TlsFailure.CERTIFICATE_REQUIRED,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": TlsFailure.CERTIFICATE_REQUIRED,
    "UNSUPPORTED_PROTOCOL": TlsFailure.WRONG_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": TlsFailure.WRONG_VERSION,
    "NO_SHARED_CIPHER": TlsFailure.WRONG_VERSION,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": TlsFailure.WRONG_VERSION,
    "WRONG_VERSION_NUMBER": TlsFailure.PLAINTEXT_PEER,
    "HTTP_REQUEST": TlsFailure.PLAINTEXT_PEER,
    "HTTPS_PROXY_REQUEST": TlsFailure.PLAINTEXT_PEER,
    "UNEXPECTED_EOF_WHILE_READING": TlsFailure.CONNECTION_CLOSED,
}

# The alerts by which the other side refuses this side's certificate, and why.
_REFUSALS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a CA trusted there",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired or is not yet valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it is bad, or not for the name connected to",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "it is not issued for this use",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it is not acceptable there",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked",
}

_SENTENCES = {
    TlsFailure.UNKNOWN_CA: "the other side's certificate is not signed by the CA trusted here",
    TlsFailure.HOSTNAME_MISMATCH: (
        "the bank's certificate is not issued for the host name or address connected to"
    ),
    TlsFailure.EXPIRED: (
        "the other side's certificate has expired or is not yet valid"
        " (renew it, or check the clocks)"
    ),
    TlsFailure.BAD_CERTIFICATE: "the other side's certificate is not acceptable: {detail}",
    TlsFailure.CERTIFICATE_REQUIRED: (
        "the bank requires a terminal certificate and none was presented"
    ),
    TlsFailure.CERTIFICATE_REFUSED: "the other side refused this side's certificate: {detail}",
    TlsFailure.WRONG_VERSION: (
        "the two sides have no TLS version or cipher in common"
        " (the bank accepts TLS 1.2 only when told to)"
    ),
    TlsFailure.PLAINTEXT_PEER: "the other side does not speak TLS (is TLS on at both ends?)",
    TlsFailure.CONNECTION_CLOSED: (
        "the other side closed the connection during the TLS handshake"
        " (it may have refused this side's certificate, or not speak TLS)"
    ),
    TlsFailure.OTHER: "the TLS connection failed: {detail}",
}
"""One sentence per kind; ``{detail}`` is OpenSSL's own words, or why a certificate was
refused, for the kinds too broad to say it in advance."""

_CAUSES_MAX = 8
"""How far down a chain of exceptions to look for the ssl error."""


def describe_verification_error(error: BaseException) -> tuple[TlsFailure, str]:
    """Why a handshake failed: a kind for a program and a sentence for a person.

    Takes what the handshake raised, or what wraps it (Trio's SSLStream raises
    BrokenResourceError from the ssl error). The sentence holds no secret: OpenSSL's
    words at most, never certificate or key contents.
    """
    kind, detail = _classify(_ssl_cause(error))
    return kind, _SENTENCES[kind].format(detail=detail)


def _classify(error: BaseException) -> tuple[TlsFailure, str]:
    """The kind, and the detail its sentence may show."""
    if isinstance(error, ssl.SSLCertVerificationError):
        kind = _VERIFY_CODES.get(error.verify_code, TlsFailure.BAD_CERTIFICATE)
        return kind, error.verify_message
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason in _REFUSALS:
            return TlsFailure.CERTIFICATE_REFUSED, _REFUSALS[reason]
        if reason in _REASONS:
            return _REASONS[reason], reason
        if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return TlsFailure.CONNECTION_CLOSED, reason
        return TlsFailure.OTHER, reason or str(error)
    return TlsFailure.OTHER, str(error) or type(error).__name__


def _ssl_cause(error: BaseException) -> BaseException:
    """The first ssl error in ``error``'s chain of causes, else ``error`` itself."""
    link: BaseException | None = error
    for _ in range(_CAUSES_MAX):
        if link is None or isinstance(link, ssl.SSLError):
            break
        link = link.__cause__ or link.__context__
    return link if isinstance(link, ssl.SSLError) else error
