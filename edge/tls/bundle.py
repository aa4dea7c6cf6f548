"""Validate an uploaded certificate bundle (PEM key + leaf + intermediates).

Every refusal is a ``BundleError`` whose message says what is wrong and how to
fix it, in one line. Nothing here touches the store: a refused upload changes
nothing because the caller writes only a bundle this module accepted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from edge import names
from edge.records import KeyType

MAX_BUNDLE_BYTES = 64 * 1024
MAX_CERTIFICATES = 10
MIN_RSA_BITS = 2048
# Above this, each full handshake signs with a key that costs the proxy's one
# core several times what 2048 bits does (RSA-8192: ~25 ms, against ~1 ms):
# accepted, since nothing in TLS forbids it, but the operator is told.
SLOW_RSA_BITS = 4096
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
WEAK_HASHES = {"sha1", "md5"}

_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKERS = (b"PRIVATE KEY-----",)
_PKCS7_DATA_OID = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1


class BundleError(ValueError):
    """An upload refused, with a one-line message saying what to do."""


@dataclass(frozen=True)
class Bundle:
    """A validated bundle, ready for the store."""

    key_type: KeyType
    names: tuple[str, ...]  # DNS names of the leaf (SAN), canonical form
    not_before: float  # POSIX seconds
    not_after: float
    fingerprint: str  # SHA-256 of the leaf, hex
    issuer: str
    chain_pem: bytes  # leaf first, then each issuer in turn
    key_pem: bytes  # PKCS#8, unencrypted
    self_signed: bool
    warnings: tuple[str, ...] = field(default=())

    @property
    def pem(self) -> bytes:
        """Chain then key in one PEM, as ``load_cert_chain`` and HAProxy take it."""
        return self.chain_pem + self.key_pem


def _describe_non_pem(data: bytes, what: str, path: str) -> BundleError:
    if not data.strip():
        return BundleError(f"{path}: the {what} file is empty; give the PEM file itself")
    if data[:1] == b"\x30":
        # DER SEQUENCE: a bare DER certificate/key, or a PKCS#12 archive, whose
        # PFX starts with version 3 then a pkcs7-data ContentInfo (RFC 7292 §4).
        if b"\x02\x01\x03" in data[:8] and _PKCS7_DATA_OID in data[:48]:
            return BundleError(
                f"{path}: this is a PKCS#12 (.pfx/.p12) archive, not PEM; extract it with "
                f"`openssl pkcs12 -in {path} -nodes -out bundle.pem` and upload the certificate "
                "and key parts as PEM"
            )
        if what == "certificate":
            fix = f"`openssl x509 -inform der -in {path} -out {path}.pem`"
        else:
            fix = f"`openssl pkey -inform der -in {path} -out {path}.pem`"
        return BundleError(
            f"{path}: the {what} is in binary DER form, not PEM; convert it with {fix}"
        )
    if b"-----BEGIN PKCS7-----" in data:
        return BundleError(
            f"{path}: this is a PKCS#7 bundle, not PEM certificates; convert it with "
            f"`openssl pkcs7 -print_certs -in {path} -out {path}.pem`"
        )
    return BundleError(
        f"{path}: no PEM {what} found (expected a '-----BEGIN "
        f"{'CERTIFICATE' if what == 'certificate' else 'PRIVATE KEY'}-----' block)"
    )


def load_certificates(data: bytes, path: str = "certificate") -> list[x509.Certificate]:
    if _CERT_BEGIN not in data:
        if any(marker in data for marker in _KEY_MARKERS):
            raise BundleError(
                f"{path}: holds a private key but no certificate; "
                "were --cert and --key swapped?"
            )
        raise _describe_non_pem(data, "certificate", path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(
            f"{path}: a PEM certificate block is damaged ({exc}); export the certificate again"
        ) from None


def load_private_key(data: bytes, path: str = "key") -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        raise BundleError(
            f"{path}: the private key is encrypted with a passphrase; remove it with "
            f"`openssl pkey -in {path} -out {path}.plain` and upload that file"
        )
    if not any(marker in data for marker in _KEY_MARKERS):
        if _CERT_BEGIN in data:
            raise BundleError(
                f"{path}: holds a certificate but no private key; were --cert and --key swapped?"
            )
        raise _describe_non_pem(data, "private key", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleError(
            f"{path}: the private key is encrypted with a passphrase; remove it with "
            f"`openssl pkey -in {path} -out {path}.plain` and upload that file"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{path}: the private key cannot be read ({exc}); export it again as PEM") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise BundleError(
            f"{path}: {type(key).__name__.removesuffix('PrivateKey') or 'this'} keys are not "
            "accepted by browsers for TLS servers; use an RSA (2048+ bits) or ECDSA P-256/P-384 key"
        )
    return key


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return ()
    out = []
    for raw in san.get_values_for_type(x509.DNSName):
        name = names.normalize_pattern(raw)
        if name:
            out.append(name)
    return tuple(out)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _order_chain(
    leaf: x509.Certificate, others: list[x509.Certificate], path: str
) -> list[x509.Certificate]:
    """Leaf first, then each certificate's issuer; refuse ones that do not link."""
    chain = [leaf]
    rest = list(others)
    while rest:
        current = chain[-1]
        issuer = next((c for c in rest if _signed_by(current, c)), None)
        if issuer is None:
            stray = rest[0]
            raise BundleError(
                f"{path}: the chain does not link: '{stray.subject.rfc4514_string()}' did not sign "
                f"'{current.subject.rfc4514_string()}'; upload the intermediates your CA gave "
                "for this certificate, leaf first"
            )
        chain.append(issuer)
        rest.remove(issuer)
    return chain


def _key_warnings(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: str) -> list[str]:
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size > SLOW_RSA_BITS:
        return [f"{path}: the RSA key has {key.key_size} bits; every full handshake for this domain costs "
                f"several times what a {MIN_RSA_BITS}-bit or ECDSA key does; prefer `--key-type ec256`"]
    return []


def _check_key_strength(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: str) -> KeyType:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise BundleError(
                f"{path}: the RSA key has {key.key_size} bits, under the {MIN_RSA_BITS} browsers "
                "require; create a new key (`edge csr DOMAIN --key-type rsa2048`) and reissue"
            )
        return KeyType.RSA
    curve = key.curve.name
    if curve not in ALLOWED_CURVES:
        raise BundleError(
            f"{path}: the EC key is on curve {curve}; only P-256 and P-384 are accepted by "
            "browsers; create a new key (`edge csr DOMAIN --key-type ec256`) and reissue"
        )
    return KeyType.ECDSA


def _check_covers(cert_names: tuple[str, ...], domain: str | None, cert_path: str) -> None:
    if domain is not None and domain not in cert_names and not any(
        names.covers(pattern, domain) for pattern in cert_names
    ):
        listed = ", ".join(cert_names) or "no DNS names"
        raise BundleError(
            f"{cert_path}: the certificate does not cover {domain} (it names {listed}); "
            f"get one whose subjectAltName includes {domain}"
            + ("" if names.is_wildcard(domain) else f" or *.{domain.split('.', 1)[1]}")
        )


def _check_validity(leaf: x509.Certificate, now: dt.datetime, cert_path: str) -> tuple[dt.datetime, dt.datetime]:
    not_before = leaf.not_valid_before_utc
    not_after = leaf.not_valid_after_utc
    if now >= not_after:
        raise BundleError(
            f"{cert_path}: the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC; "
            "renew it with your CA and upload the new one"
        )
    if now < not_before:
        raise BundleError(
            f"{cert_path}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M} UTC; "
            "upload it from then on, or check this machine's clock"
        )
    return not_before, not_after


def _trust_warnings(chain: list[x509.Certificate], self_signed: bool, cert_path: str) -> list[str]:
    leaf = chain[0]
    if self_signed:
        return [f"{cert_path}: the certificate is self-signed ({leaf.subject.rfc4514_string()}); "
                "browsers will not trust it"]
    if len(chain) == 1:
        # Browsers do not fetch a missing intermediate (most clients never do):
        # the server must send it, and it can only send what was uploaded.
        return [
            f"{cert_path}: no intermediate certificate came with it: its issuer "
            f"'{leaf.issuer.rfc4514_string()}' is not in the file, so clients that do not already hold "
            "it will not trust the certificate; upload the full chain your CA gave (leaf first, then "
            "its intermediates)"
        ]
    return []


def validate(
    cert_pem: bytes,
    key_pem: bytes,
    domain: str | None,
    *,
    now: dt.datetime | None = None,
    cert_path: str = "certificate",
    key_path: str = "key",
) -> Bundle:
    """Check an upload against every rule of SPEC §3 and return it ready to store.

    ``domain`` is the canonical domain (maybe ``*.example.com``) the bundle must
    cover; None skips that check (the platform certificate).
    """
    if len(cert_pem) + len(key_pem) > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{cert_path}: the bundle is {len(cert_pem) + len(key_pem)} bytes, over the "
            f"{MAX_BUNDLE_BYTES // 1024} KiB limit; upload only the leaf and its intermediates"
        )
    certs = load_certificates(cert_pem, cert_path)
    if len(certs) > MAX_CERTIFICATES:
        raise BundleError(
            f"{cert_path}: holds {len(certs)} certificates, over the limit of {MAX_CERTIFICATES}; "
            "upload only the leaf and its intermediates (not the root, not other chains)"
        )
    key = load_private_key(key_pem, key_path)
    key_type = _check_key_strength(key, key_path)

    # The leaf is the certificate of this key, wherever it stands in the file.
    public = _public_bytes(key.public_key())
    leaf_index = next(
        (i for i, c in enumerate(certs) if _public_bytes(c.public_key()) == public), None
    )
    if leaf_index is None:
        raise BundleError(
            f"{key_path}: the private key does not match the certificate in {cert_path}; "
            "upload the key the certificate was issued for"
        )
    warnings: list[str] = []
    leaf = certs[leaf_index]
    chain = _order_chain(leaf, certs[:leaf_index] + certs[leaf_index + 1 :], cert_path)
    if chain != certs:
        warnings.append(
            f"{cert_path}: the certificates were out of order; reordered leaf first, then issuers"
        )

    hash_alg = leaf.signature_hash_algorithm
    if hash_alg is not None and hash_alg.name in WEAK_HASHES:
        raise BundleError(
            f"{cert_path}: the certificate is signed with {hash_alg.name.upper()}, which browsers "
            "reject; ask your CA to reissue it with SHA-256"
        )

    cert_names = _dns_names(leaf)
    _check_covers(cert_names, domain, cert_path)
    not_before, not_after = _check_validity(leaf, now or dt.datetime.now(dt.UTC), cert_path)

    self_signed = leaf.issuer == leaf.subject and _signed_by(leaf, leaf)
    warnings += _trust_warnings(chain, self_signed, cert_path)
    warnings += _key_warnings(key, key_path)

    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_out = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Bundle(
        key_type=key_type,
        names=cert_names,
        not_before=not_before.timestamp(),
        not_after=not_after.timestamp(),
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        issuer=leaf.issuer.rfc4514_string(),
        chain_pem=chain_pem,
        key_pem=key_out,
        self_signed=self_signed,
        warnings=tuple(warnings),
    )


def stored_problem(pem: bytes) -> str | None:
    """Why a stored bundle (chain then key, as ``Bundle.pem``) cannot be served, or None.

    For ``edge check``: the index only reads the header of each bundle, so a
    file damaged inside its PEM is found here (or at its first handshake)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        return f"the certificate PEM is damaged ({exc})"
    start = pem.find(b"-----BEGIN", pem.rfind(b"-----END CERTIFICATE-----") + 1)
    try:
        key = serialization.load_pem_private_key(pem[start:], password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"the private key is damaged ({exc})"
    if _public_bytes(certs[0].public_key()) != _public_bytes(key.public_key()):
        return "the private key does not match the first certificate"
    return None
