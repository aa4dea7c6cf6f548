"""One ACME order, in RFC 8555's verbs, on the reference client (certbot's ``acme``).

Everything here blocks (``acme`` runs on ``requests``): the manager calls it
in a thread, never on the event loop. What the order needs from the rest of
edge (publishing a challenge answer in the store so that any node can answer
it) comes in as plain callables.

``acme`` no longer ships TLS-ALPN-01 (RFC 8737), so its challenge type and
validation certificate are defined here; HTTP-01 comes from the library.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edge.acme import renewal
from edge.records import KeyType
from edge.tls import csr

log = logging.getLogger(__name__)

USER_AGENT = "edge-proxy (+acme-python)"
TLS_ALPN_PROTOCOL = "acme-tls/1"
# RFC 8737 §3: id-pe-acmeIdentifier, a critical extension holding the SHA-256
# digest of the key authorization as a DER OCTET STRING.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
BAD_NONCE_RETRIES = 5  # RFC 8555 §6.5: a badNonce answer carries a fresh nonce; try again
ORDER_DEADLINE = 120.0  # seconds for validation and issuance before an order is given up
KEY_TYPES = {KeyType.ECDSA: "ec256", KeyType.RSA: "rsa2048"}  # edge key type -> CSR key


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 tls-alpn-01 response (an empty object on the wire, RFC 8555 §7.5.1)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737 tls-alpn-01 challenge."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **unused_kwargs: Any) -> str:
        return self.key_authorization(account_key)


class AcmeError(Exception):
    """An order that did not give a certificate.

    ``kind`` is the metric label (``failed``, ``rate_limited``, ``unreachable``);
    ``retry_after`` (seconds) is the server's word on when to try again;
    ``validation`` says the CA reached the domain and its challenge failed;
    ``config`` that edge's settings do not fit the CA.
    """

    def __init__(self, message: str, kind: str = "failed", retry_after: float | None = None,
                 validation: bool = False, config: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.validation = validation
        self.config = config  # edge's configuration does not fit this CA (an unknown profile)


class _NewOrder(messages.NewOrder):
    """RFC 8555 §7.4 newOrder with ``profile`` (draft-aaron-acme-profiles) and
    ``replaces`` (RFC 9773 §5: the ARI identifier of the certificate it replaces)."""

    profile: str | None = jose.field("profile", omitempty=True)
    replaces: str | None = jose.field("replaces", omitempty=True)


def cert_id(cert_pem: bytes) -> str:
    """RFC 9773 §4.1: base64url(authorityKeyIdentifier) "." base64url(DER serial number)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise ValueError("the certificate has no authority key identifier")
    serial = cert.serial_number
    der = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)  # DER INTEGER: room for the sign
    return f"{jose.b64.b64encode(aki).decode()}.{jose.b64.b64encode(der).decode()}"


@dataclass(frozen=True, slots=True)
class Issued:
    key_pem: bytes
    chain_pem: bytes  # leaf first, then intermediates, as the server sent them
    replaced: str = ""  # the "replaces" the order that gave it carried (RFC 9773 §5); "": none


# What an order asks of the store, as blocking calls:
#   publish(kind, name, value) with kind "http-01" (name: token) or
#   "tls-alpn-01" (name: domain); withdraw(kind, name) when done.
Publish = Callable[[str, str, bytes], None]
Withdraw = Callable[[str, str], None]


def tls_alpn_certificate(domain: str, key_authorization: str) -> bytes:
    """The self-signed validation certificate + key of RFC 8737 §3, one PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_account_key() -> bytes:
    """An account key (ECDSA P-256, ES256 signatures), PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _retry_after_seconds(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Network(client.ClientNetwork):
    """``ClientNetwork`` that keeps the last Retry-After (and the problem of a 409, which
    ``acme`` raises as a bare ConflictError) and retries badNonce more than once."""

    last_retry_after: str | None = None
    last_conflict: str = ""

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        if response.status_code == 409:  # RFC 9773's alreadyReplaced comes as one (§5)
            try:
                problem = response.json()
                self.last_conflict = f"{problem.get('type', '')}: {problem.get('detail', '')}"
            except (ValueError, AttributeError):
                self.last_conflict = ""
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(BAD_NONCE_RETRIES - 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                log.debug("ACME server refused a nonce (badNonce); retrying with the fresh one")
        return self._post_once(*args, **kwargs)


class AcmeClient:
    """An account on one ACME server. Blocking; one instance per order."""

    def __init__(self, directory_url: str, account_key_pem: bytes, email: str = "",
                 ca_bundle: Path | None = None, timeout: int = 30) -> None:
        self.directory_url = directory_url
        private = serialization.load_pem_private_key(account_key_pem, None)
        if isinstance(private, ec.EllipticCurvePrivateKey):
            self.account_key: jose.JWK = jose.JWKEC(key=private)
            alg = jose.ES256
        elif isinstance(private, rsa.RSAPrivateKey):
            self.account_key = jose.JWKRSA(key=private)
            alg = jose.RS256
        else:
            raise AcmeError("the stored ACME account key is neither ECDSA nor RSA")
        self.email = email
        self.net = _Network(self.account_key, alg=alg, user_agent=USER_AGENT, timeout=timeout)
        if ca_bundle is not None:
            self.net.verify_ssl = str(ca_bundle)  # type: ignore[assignment]  # requests takes a path
        self._acme: client.ClientV2 | None = None
        self._directory_json: dict[str, Any] | None = None

    # --- errors, in one place -------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except errors.ConflictError:
            raise  # not a failure: the caller knows what it means
        except messages.Error as exc:
            retry = _retry_after_seconds(self.net.last_retry_after)
            kind = "rate_limited" if exc.code == "rateLimited" else "failed"
            raise AcmeError(f"{what}: the ACME server said {exc.code or 'error'}: {exc.detail or exc}",
                            kind, retry) from None
        except requests.RequestException as exc:
            raise AcmeError(f"{what}: cannot reach the ACME server {self.directory_url}: {exc}",
                            "unreachable") from None
        except errors.ValidationError as exc:
            details = []
            for authzr in exc.failed_authzrs:
                for chall in authzr.body.challenges:
                    if chall.error is not None:
                        details.append(f"{chall.chall.typ}: {chall.error.detail or chall.error.code}")
            raise AcmeError(f"{what}: validation failed ({'; '.join(details) or 'no detail given'})",
                            validation=True) from None
        except errors.TimeoutError:
            raise AcmeError(f"{what}: the ACME server did not finish within {ORDER_DEADLINE:.0f} s") from None
        except errors.Error as exc:
            raise AcmeError(f"{what}: {exc}") from None

    def _directory(self) -> messages.Directory:
        """RFC 8555 §7.1.1; the raw JSON is kept for ``meta.profiles`` and ``renewalInfo``."""
        if self._directory_json is None:
            response = self._call("reading the ACME directory", self.net.get, self.directory_url)
            try:
                self._directory_json = dict(response.json())
            except (ValueError, TypeError):
                raise AcmeError(f"{self.directory_url} is not an ACME directory (no JSON object)") from None
        return messages.Directory.from_json(json.loads(json.dumps(self._directory_json)))  # it pops "meta"

    def profiles(self) -> dict[str, str]:
        """The directory's ``meta.profiles``: name -> description (empty: the CA has none)."""
        self._directory()
        meta = (self._directory_json or {}).get("meta") or {}
        profiles = meta.get("profiles") if isinstance(meta, dict) else None
        return {str(k): str(v) for k, v in profiles.items()} if isinstance(profiles, dict) else {}

    def check_profile(self, profile: str) -> None:
        """An unknown profile is refused before any order, naming what the CA offers."""
        if not profile:
            return
        offered = self.profiles()
        if profile not in offered:
            names = ", ".join(sorted(offered)) or "none (it has no meta.profiles)"
            raise AcmeError(f"[acme] profile {profile!r} is not offered by {self.directory_url}; "
                            f"it offers: {names}", "failed", config=True)

    def _client(self) -> client.ClientV2:
        if self._acme is None:
            acme = client.ClientV2(self._directory(), self.net)
            registration = messages.NewRegistration.from_data(
                email=self.email or None, terms_of_service_agreed=True
            )
            try:
                self._call("registering the ACME account", acme.new_account, registration)
            except errors.ConflictError as exc:  # RFC 8555 §7.3.1: the key has an account already
                self.net.account = messages.RegistrationResource(uri=exc.location, body=registration)
            self._acme = acme
        return self._acme

    def register(self) -> None:
        """Create the account (or find it again: newAccount is idempotent per key)."""
        self._client()

    def renewal_info(self, cert_pem: bytes) -> tuple[tuple[float, float] | None, float | None]:
        """RFC 9773 §4.1: (suggested window or None, Retry-After seconds) for a certificate.

        None when the directory has no ``renewalInfo``; ValueError when the answer is
        malformed (§4.2); AcmeError when the CA cannot be reached or refuses."""
        self._directory()
        base_url = (self._directory_json or {}).get("renewalInfo")
        if not isinstance(base_url, str) or not base_url:
            return None, None
        url = f"{base_url.rstrip('/')}/{cert_id(cert_pem)}"
        # An unauthenticated GET (§4.1), not POST-as-GET.
        response = self._call("asking for renewal information", self.net.get, url, "application/json")
        retry = _retry_after_seconds(response.headers.get("Retry-After"))
        return renewal.parse_window(response.content), retry

    def order(self, domain: str, key_type: str, challenge_types: tuple[str, ...],
              publish: Publish, withdraw: Withdraw, profile: str = "", replaces: str = "") -> Issued:
        """Order a certificate for ``domain``: new key, CSR, challenges, finalize.

        ``profile`` names one of the directory's ``meta.profiles`` ("": the CA's default);
        ``replaces`` is the ARI identifier of the certificate this one renews (RFC 9773 §5)."""
        self.check_profile(profile)
        acme = self._client()
        key_pem, csr_pem = csr.make_csr(domain, KEY_TYPES[key_type])
        what = f"ordering a certificate for {domain}"
        try:
            order = self._call(what, self._new_order, acme, csr_pem, profile, replaces)
        except (AcmeError, errors.ConflictError) as exc:
            if not replaces or (isinstance(exc, AcmeError) and exc.kind != "failed"):
                if isinstance(exc, errors.ConflictError):
                    raise AcmeError(f"{what}: the ACME server answered 409 Conflict") from None
                raise
            # RFC 9773 §5: alreadyReplaced (409), or a certificate the CA does not know
            # (restarted, another of its accounts, or Pebble's lookup of a serial whose DER
            # value starts with 0x00, letsencrypt/pebble#550): "replaces" is only a hint.
            log.warning("ACME: the order for %s replacing %s was refused (%s); ordering without replaces",
                        domain, replaces, exc if isinstance(exc, AcmeError) else
                        f"409 Conflict: {self.net.last_conflict or 'no problem document'}")
            order = self._call(what, self._new_order, acme, csr_pem, profile, "")
            replaces = ""
        published: list[tuple[str, str]] = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # RFC 8555 §7.1.4: an authorization the account holds already
                challb = self._pick(authzr, challenge_types, domain)
                validation = challb.chall.key_authorization(self.account_key)
                if challb.chall.typ == "http-01":
                    name = challb.chall.encode("token")
                    publish("http-01", name, validation.encode())
                else:
                    name = domain
                    publish("tls-alpn-01", name, tls_alpn_certificate(domain, validation))
                published.append((challb.chall.typ, name))
                self._call(f"answering the {challb.chall.typ} challenge for {domain}", acme.answer_challenge,
                           challb, challb.chall.response(self.account_key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
            done = self._call(f"validating {domain}", acme.poll_and_finalize, order, deadline)
        finally:
            for kind, name in published:
                try:
                    withdraw(kind, name)
                except Exception as exc:  # a leftover answer expires or does no harm
                    log.warning("could not remove the %s answer for %s: %s", kind, domain, exc)
        return Issued(key_pem, done.fullchain_pem.encode(), replaces)

    @staticmethod
    def _new_order(acme: client.ClientV2, csr_pem: bytes, profile: str, replaces: str) -> messages.OrderResource:
        """``ClientV2.new_order`` with ``replaces`` (RFC 9773 §5), which it does not send."""
        request = x509.load_pem_x509_csr(csr_pem)
        names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name)
                       for name in names.get_values_for_type(x509.DNSName)]
        body = _NewOrder(identifiers=identifiers, profile=profile or None, replaces=replaces or None)
        response = acme._post(acme.directory["newOrder"], body)
        order = messages.Order.from_json(response.json())
        authorizations = [acme._authzr_from_response(acme._post_as_get(url), uri=url)
                          for url in order.authorizations]
        return messages.OrderResource(body=order, uri=response.headers.get("Location"),
                                      authorizations=authorizations, csr_pem=csr_pem)

    @staticmethod
    def _pick(authzr: messages.AuthorizationResource, challenge_types: tuple[str, ...],
              domain: str) -> messages.ChallengeBody:
        offered = {c.chall.typ: c for c in authzr.body.challenges}
        for typ in challenge_types:
            if typ in offered:
                return offered[typ]
        raise AcmeError(
            f"the ACME server offers {', '.join(sorted(offered)) or 'no challenge'} for {domain}, "
            f"none of the configured {', '.join(challenge_types)}"
        )
