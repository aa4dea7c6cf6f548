import json

import pytest

from edge.records import CertMeta, encode_bundle
from edge.store.base import Event, EventKind, cert_key
from edge.store.index import Index
from edge.tls.selector import DEFAULT, PLATFORM, BundleKey, Selector, Source

PEM = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\ny\n"
NOW = 1_000_000.0


def add(index, domain, source, key_type="ecdsa", not_before=0.0, not_after=2e9, fp="fp"):
    key = cert_key(domain, source, key_type)
    meta = CertMeta(domain, source, key_type, not_before, not_after, fp)
    index.apply(Event(EventKind.PUT, key, encode_bundle(meta, PEM), 1))
    index.apply(Event(EventKind.PUT, f"domains/{domain}", json.dumps({"app": "a"}).encode(), 1))


@pytest.fixture
def index():
    return Index()


@pytest.fixture
def selector(index):
    return Selector(index, "apps.test", strict_sni=False)


def test_rule1_custom_beats_acme(index, selector):
    add(index, "www.example.com", "acme")
    add(index, "www.example.com", "custom")
    assert selector.select("www.example.com", NOW).source is Source.CUSTOM


def test_rule2_acme_when_custom_expired_or_not_yet_valid(index, selector):
    add(index, "www.example.com", "custom", not_after=NOW - 1)
    add(index, "www.example.com", "acme")
    assert selector.select("www.example.com", NOW).source is Source.ACME
    add(index, "www.example.com", "custom", not_before=NOW + 1)
    assert selector.select("www.example.com", NOW).source is Source.ACME


def test_rule3_wildcard_one_label_only(index, selector):
    add(index, "*.example.com", "custom")
    assert selector.select("a.example.com", NOW).source is Source.WILDCARD
    assert selector.select("a.b.example.com", NOW) is DEFAULT
    assert selector.select("example.com", NOW) is DEFAULT


def test_rule3_ignores_acme_on_wildcard(index, selector):
    add(index, "*.example.com", "acme")
    assert selector.select("a.example.com", NOW) is DEFAULT


def test_exact_acme_beats_wildcard_custom(index, selector):
    add(index, "*.example.com", "custom")
    add(index, "a.example.com", "acme")
    assert selector.select("a.example.com", NOW).source is Source.ACME


def test_rule4_platform(selector):
    assert selector.select("apps.test", NOW) is PLATFORM
    assert selector.select("demo.apps.test", NOW) is PLATFORM
    assert selector.select("x.demo.apps.test", NOW) is DEFAULT


def test_rule5_default_and_strict(index):
    assert Selector(index, "apps.test", False).select("nope.test", NOW) is DEFAULT
    assert Selector(index, "apps.test", False).select(None, NOW) is DEFAULT
    assert Selector(index, "apps.test", True).select("nope.test", NOW) is None
    assert Selector(index, "apps.test", True).select(None, NOW) is None
    assert Selector(index, "apps.test", True).select("demo.apps.test", NOW) is PLATFORM


def test_both_key_types_served_and_cache_key_tracks_fingerprints(index, selector):
    add(index, "www.example.com", "custom", "ecdsa", fp="e1")
    add(index, "www.example.com", "custom", "rsa", fp="r1")
    first = selector.select("www.example.com", NOW)
    assert sorted(b.key_type for b in first.bundles) == ["ecdsa", "rsa"]
    add(index, "www.example.com", "custom", "rsa", fp="r2")
    second = selector.select("www.example.com", NOW)
    assert second.cache_key != first.cache_key
    # Only the valid one of two key types is served.
    add(index, "www.example.com", "custom", "rsa", not_after=NOW - 1, fp="r3")
    assert [b.key_type for b in selector.select("www.example.com", NOW).bundles] == ["ecdsa"]


def test_cache_key_is_the_record_values_and_digest(index, selector):
    add(index, "www.example.com", "custom", "ecdsa", fp="e1")
    choice = selector.select("www.example.com", NOW)
    (meta,) = choice.bundles
    assert choice.cache_key == (BundleKey("www.example.com", "custom", "ecdsa", meta.digest),)
    assert meta.digest != 0  # the digest of the stored value the index accepted
    assert choice.cache_key[0].store_key == cert_key("www.example.com", "custom", "ecdsa")


def test_a_remembered_choice_ends_when_a_certificate_expires_or_starts(index, selector):
    """The choice among a name's certificates is kept between handshakes; it
    must still follow the clock: expiry, a later not-before, and a clock that
    steps back (NTP) all change what is served at once."""
    add(index, "www.example.com", "custom", not_after=NOW + 10)
    add(index, "www.example.com", "acme", not_before=NOW + 5)
    assert selector.select("www.example.com", NOW).source is Source.CUSTOM
    assert selector.select("www.example.com", NOW + 9.9).source is Source.CUSTOM
    assert selector.select("www.example.com", NOW + 10).source is Source.ACME  # custom expired
    assert selector.select("www.example.com", NOW + 4).source is Source.CUSTOM  # clock stepped back
    assert selector.select("www.example.com", NOW - 1).source is Source.CUSTOM
    add(index, "www.example.com", "custom", not_after=NOW + 1)
    assert selector.select("www.example.com", NOW + 4.5) is DEFAULT  # custom gone, acme not yet valid


def test_a_remembered_choice_follows_a_change_of_the_record(index, selector):
    add(index, "www.example.com", "custom", fp="a")
    first = selector.select("www.example.com", NOW)
    assert selector.select("www.example.com", NOW) is first  # kept, not worked out again
    add(index, "www.example.com", "custom", fp="b")  # replaced: a new digest
    second = selector.select("www.example.com", NOW)
    assert second.cache_key != first.cache_key
    index.apply(Event(EventKind.DELETE, "domains/www.example.com", None, 2))  # detached
    assert selector.select("www.example.com", NOW) is DEFAULT


def test_a_remembered_wildcard_choice_follows_the_clock(index, selector):
    add(index, "*.example.com", "custom", not_after=NOW + 10)
    assert selector.select("a.example.com", NOW).source is Source.WILDCARD
    assert selector.select("b.example.com", NOW + 10) is DEFAULT
    assert selector.select("a.example.com", NOW + 1).source is Source.WILDCARD
