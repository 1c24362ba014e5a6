"""Certificates for mutual TLS between a mesh's Envoys: a local CA per stack description.

Shaped like Istio's defaults (istio.io, "Managing In-Mesh Certificates": a
self-signed RSA 2048 CA; sidecars make RSA keys, `WORKLOAD_RSA_KEY_SIZE` 2048;
Istio's proxy agent asks for 24 h workload certificates): one `MeshCa` signs
one certificate per Envoy, naming it by its SPIFFE identity
(`config.spiffe_id`) as URI SAN, for both server and client use, valid
`LIFETIME` from when it was made (backdated by `CLOCK_SKEW`). A run describes
each stack once, so one CA serves every start of that stack in the run: a run
or a `serve` longer than `LIFETIME` would meet expired certificates. The CA's
private key never leaves memory;
what deployers write is the CA certificate and each Envoy's own certificate
and key, generated files of the stack description (`harness.stacks.envoy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from baselines.envoy.config import spiffe_id

LIFETIME = timedelta(hours=24)
#: Certificates are valid from this long before they were made (clocks of containers differ).
CLOCK_SKEW = timedelta(minutes=5)
KEY_BITS = 2048
_PUBLIC_EXPONENT = 65537
_ORGANISATION = "dpumesh-bench"


@dataclass(frozen=True)
class Issued:
    """One Envoy's certificate and private key, PEM."""

    cert_pem: str
    key_pem: str


class MeshCa:
    """A CA for one stack's Envoys; `issue(name)` is the same certificate on every call."""

    def __init__(self, mesh: str, now: datetime | None = None) -> None:
        self._now = now or datetime.now(UTC)
        self._key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{mesh} mesh CA"),
            ]
        )
        public = self._key.public_key()
        self._cert = (
            self._builder(name, public)
            .issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._issued: dict[str, Issued] = {}

    @property
    def ca_pem(self) -> str:
        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, envoy: str) -> Issued:
        """The certificate and key of the Envoy named `envoy` (made on first use)."""
        if envoy not in self._issued:
            key = _new_key()
            public = key.public_key()
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, envoy),
                ]
            )
            ca_key_id = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
            cert = (
                self._builder(subject, public)
                .issuer_name(self._cert.subject)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(ca=False), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage(
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(envoy))]),
                    critical=True,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
                    critical=False,
                )
                .sign(self._key, hashes.SHA256())
            )
            self._issued[envoy] = Issued(
                cert.public_bytes(serialization.Encoding.PEM).decode(),
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
            )
        return self._issued[envoy]

    def _builder(self, subject: x509.Name, public: rsa.RSAPublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - CLOCK_SKEW)
            .not_valid_after(self._now + LIFETIME)
        )


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=_PUBLIC_EXPONENT, key_size=KEY_BITS)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; an Envoy signs handshakes (and RSA key exchange, TLS 1.2)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
