import json

from edge.records import CertMeta, encode_bundle
from edge.store.base import Event, EventKind, cert_key
from edge.store.index import Index

PEM = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\ny\n"


def bundle(domain, source="custom", key_type="ecdsa", not_after=2e9, fingerprint="f1"):
    key = cert_key(domain, source, key_type)
    meta = CertMeta(domain, source, key_type, 0.0, not_after, fingerprint)
    return key, encode_bundle(meta, PEM)


def put(index, key, value, revision=1):
    index.apply(Event(EventKind.PUT, key, value, revision))


def test_apps_domains_and_certs():
    index = Index()
    put(index, "apps/demo", json.dumps({"backends": ["127.0.0.1:1"]}).encode())
    put(index, "domains/www.example.com", b'{"app": "demo"}')
    put(index, *bundle("www.example.com"))
    put(index, *bundle("www.example.com", key_type="rsa"))
    assert index.app_of("www.example.com").backends == ("127.0.0.1:1",)
    held = index.certs["www.example.com"]
    assert [m.key_type for m in held.of("custom")] == ["ecdsa", "rsa"]
    assert [m.key_type for m in held.valid("custom", 1.0)] == ["ecdsa", "rsa"]
    assert held.valid("custom", 3e9) == ()  # expired
    assert held.valid("acme", 1.0) == ()


def test_delete_removes_empty_entries():
    index = Index()
    key, value = bundle("a.example.com")
    put(index, key, value)
    index.apply(Event(EventKind.DELETE, key, None, 2))
    assert "a.example.com" not in index.certs
    assert index.revision == 2


def test_corrupt_value_keeps_previous_and_is_reported():
    index = Index()
    key, value = bundle("a.example.com", fingerprint="good")
    put(index, key, value)
    put(index, key, b"{broken\n" + PEM)
    assert index.certs["a.example.com"][0].fingerprint == "good"
    assert "bad header line" in index.errors[key]
    put(index, "apps/demo", b"[1, 2]")
    assert "apps/demo" in index.errors and "demo" not in index.apps
    # A later good value clears the error.
    put(index, key, bundle("a.example.com", fingerprint="new")[1])
    assert key not in index.errors


def test_missing_pem_is_an_error():
    index = Index()
    key, value = bundle("a.example.com")
    put(index, key, value.split(b"\n", 1)[0] + b"\nno pem here")
    assert "PEM certificate or key is missing" in index.errors[key]
