"""TLS for CallFS: self-signed certificates for a cluster (``callfs cert generate``), the server's
SSL context, and the context nodes use to verify each other."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from callfs.errors import ConfigError


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def generate_self_signed(
    hosts: Sequence[str],
    cert_path: Path,
    key_path: Path,
    days: int = 825,
    common_name: str = "CallFS",
) -> None:
    """Write a self-signed ECDSA P-256 certificate valid for ``hosts`` (DNS names and IPs) and its
    key (mode 0600). The certificate is its own CA, so peers can trust it with ``ca_file``."""
    if not hosts:
        raise ValueError("at least one host name or IP address is required")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The listener's context; a clear ``ConfigError`` naming the keys when the files are missing,
    unreadable or do not match."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for key, value in (("server.cert_file", cert_file), ("server.key_file", key_file)):
        if not value:
            raise ConfigError(f"{key} is required for TLS")
        if not Path(value).is_file():
            raise ConfigError(f"{key}: file {value!r} not found")
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        # without this, OpenSSL prompts on the terminal for a passphrase and start-up waits
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            raise ConfigError(
                "server.key_file is encrypted (protected by a passphrase), which is not "
                "supported: store it unencrypted, readable by the service user only "
                "(openssl pkey -in KEY -out PLAIN.key)"
            ) from exc
        raise ConfigError(
            "server.cert_file and server.key_file could not be loaded together "
            f"(not PEM, or the key does not match the certificate): {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"server.cert_file/server.key_file unreadable: {exc.strerror}") from exc
    return ctx


def client_context(skip_verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """How a node verifies other nodes: the system trust store plus ``ca_file`` (a private CA or a
    cluster's self-signed certificate), or no verification at all when ``skip_verify``."""
    if skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"CA file {ca_file!r} could not be loaded") from exc
    return ctx
