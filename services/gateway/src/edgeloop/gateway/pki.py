"""The platform's device CA: enrolment certificates for devices, the gateway's server
certificate. A device's identity is its certificate's common name (also in a SAN URI,
``urn:edgeloop:device:<id>``)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.contracts.names import check_device_id

__all__ = [
    "CertificateAuthority",
    "IssuedCert",
    "check_device_id",
    "common_name",
    "fingerprint",
    "server_credentials",
]


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    fingerprint: str
    not_after: datetime


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der(cert: bytes) -> bytes:
    if cert.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    return cert


def fingerprint(cert: bytes) -> str:
    """sha256 (hex) of a certificate's DER, given PEM or DER."""
    return hashlib.sha256(_der(cert)).hexdigest()


def common_name(cert: bytes) -> str:
    """The subject common name of a certificate (PEM or DER)."""
    parsed = x509.load_der_x509_certificate(_der(cert))
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA key and certificate that sign device and server certificates."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load_or_create(
        cls, directory: Path, *, common_name: str = "edgeloop device CA"
    ) -> CertificateAuthority:
        """The CA in ``directory`` (``ca.crt``, ``ca.key``), created on first use."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            return cls(cert_path.read_bytes(), key_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
        _write_private(key_path, ca.key_pem)
        tmp = cert_path.with_suffix(".tmp")
        tmp.write_bytes(ca.cert_pem)
        os.replace(tmp, cert_path)
        return ca

    def _issue(
        self,
        subject_cn: str,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
    ) -> IssuedCert:
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return IssuedCert(pem, _key_pem(key), serial, fingerprint(pem), cert.not_valid_after_utc)

    def issue_device(self, device_id: str, *, days: int = 365) -> IssuedCert:
        """A client certificate whose identity is ``device_id``."""
        check_device_id(device_id)
        return self._issue(
            device_id,
            [x509.UniformResourceIdentifier(f"urn:edgeloop:device:{device_id}")],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            days,
        )

    def issue_server(self, hostnames: Sequence[str], *, days: int = 825) -> IssuedCert:
        """A server certificate for ``hostnames`` (DNS names and IP addresses)."""
        if not hostnames:
            raise ValueError("a server certificate needs at least one host name")
        san: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        return self._issue(hostnames[0], san, ExtendedKeyUsageOID.SERVER_AUTH, days)


def server_credentials(
    directory: Path, ca: CertificateAuthority, hostnames: Sequence[str]
) -> tuple[bytes, bytes]:
    """(certificate, key) PEM of the gateway, issued again when the names change or it
    expires within 30 days."""
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    names_path = directory / "server.names"
    wanted = ",".join(hostnames)
    if cert_path.exists() and key_path.exists() and names_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        fresh = cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=30)
        if fresh and names_path.read_text() == wanted:
            return cert_path.read_bytes(), key_path.read_bytes()
    issued = ca.issue_server(hostnames)
    _write_private(key_path, issued.key_pem)
    cert_path.write_bytes(issued.cert_pem)
    names_path.write_text(wanted)
    return issued.cert_pem, issued.key_pem
