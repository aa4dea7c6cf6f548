"""RFC 9773 renewal information and the renewal plan, as pure functions; the
ARI certificate identifier; the choice of falling back to a second CA; the
[acme] settings of this issue."""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.acme.client import cert_id
from edge.acme.renewal import (
    ARI_MAX,
    ARI_MIN,
    DomainStatus,
    Plan,
    ari_backoff,
    ari_checks,
    fall_back,
    needs,
    next_check,
    parse_window,
    pick_in_window,
    plan_after_error,
    soonest,
)
from edge.config import ConfigError, parse
from edge.records import CertMeta, DomainCerts

DAY = 86400.0
NOW = 1_800_000_000.0


def certs(*metas: CertMeta) -> DomainCerts:
    out = DomainCerts()
    for meta in metas:
        out = out.replaced(meta)
    return out


def acme(not_before: float, not_after: float, fingerprint: str = "f1") -> CertMeta:
    return CertMeta("www.example.com", "acme", "ecdsa", not_before, not_after, fingerprint)


def status_with(plan: Plan, state: str = "valid") -> DomainStatus:
    from dataclasses import asdict

    return DomainStatus(state, plans={"ecdsa": asdict(plan)})


def test_cert_id_is_rfc_9773_appendix_a():
    # RFC 9773 Appendix A: keyIdentifier 69:88:5B:..:D4, serial 00:87:65:43:21.
    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "example")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0x87654321).not_valid_before(dt.datetime(2025, 1, 1))
            .not_valid_after(dt.datetime(2025, 2, 1))
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))
    assert cert_id(cert.public_bytes(serialization.Encoding.PEM)) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_parse_window_and_its_refusals():
    body = json.dumps({"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},
                       "explanationURL": "https://acme.example.com/docs/ari"}).encode()
    start, end = parse_window(body)
    assert end - start == DAY and start == dt.datetime(2025, 1, 2, 4, tzinfo=dt.UTC).timestamp()
    for bad in (b"{not json", b"[]", b'{"suggestedWindow": {}}',
                b'{"suggestedWindow": {"start": "yesterday", "end": "2025-01-03T04:00:00Z"}}',
                b'{"suggestedWindow": {"start": "2025-01-02T04:00:00", "end": "2025-01-03T04:00:00"}}'):
        with pytest.raises(ValueError, match="malformed"):
            parse_window(bad)
    with pytest.raises(ValueError, match="ends before it starts"):  # RFC 9773 §4.2
        parse_window(b'{"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}')


def test_a_random_time_inside_the_window():
    rng = random.Random(7)
    picks = [pick_in_window(NOW + DAY, NOW + 2 * DAY, rng) for _ in range(200)]
    assert all(NOW + DAY <= p <= NOW + 2 * DAY for p in picks)
    assert max(picks) - min(picks) > 0.8 * DAY  # spread over the window, not its start


def test_retry_after_is_bounded_between_an_hour_and_a_day():
    assert next_check(21600) == 21600
    assert next_check(5) == ARI_MIN == 3600
    assert next_check(10 * DAY) == ARI_MAX == DAY
    assert next_check(None) == 6 * 3600  # none said: six hours
    assert next_check(5, 1, 2) == 2  # the test settings


def test_renewal_information_errors_back_off_within_the_bounds():
    # RFC 9773 §4.3.3: exponential back-off after errors, from an hour up to a day (§4.3.2's bounds).
    assert [ari_backoff(n) for n in range(1, 8)] == [3600, 7200, 14400, 28800, 57600, DAY, DAY]
    assert ari_backoff(1, 1, 8) == 1 and ari_backoff(4, 1, 8) == 8 and ari_backoff(9, 1, 8) == 8
    assert ari_backoff(1, retry_after=5 * 3600) == 5 * 3600  # the CA's Retry-After with its error
    assert ari_backoff(1, retry_after=9 * DAY) == DAY


def test_a_malformed_answer_is_the_lifetime_rule_and_a_ca_that_is_down_keeps_its_window():
    lifetime = Plan("f1", "https://ca/dir", NOW + 40 * DAY, "lifetime", NOW, "id")
    ari = Plan("f1", "https://ca/dir", NOW + 59 * DAY, "ari", NOW - 1, "id")
    first = plan_after_error(lifetime, ari, False, NOW)  # a malformed answer
    assert (first.reason, first.renew_at, first.ari_next, first.ari_failures) == ("lifetime", NOW + 40 * DAY,
                                                                               NOW + 3600, 1)
    second = plan_after_error(lifetime, first, False, NOW)
    assert (second.ari_next, second.ari_failures) == (NOW + 7200, 2)
    # Unreachable: the CA's last window for this certificate stands, with the same back-off.
    down = plan_after_error(lifetime, ari, True, NOW)
    assert (down.reason, down.renew_at, down.ari_next, down.ari_failures) == ("ari", NOW + 59 * DAY, NOW + 3600, 1)
    # Errors are counted per certificate: a plan for another one starts again at one.
    other = Plan("f0", "https://ca/dir", NOW, "ari", NOW, "id", ari_failures=6)
    assert plan_after_error(lifetime, other, True, NOW).ari_failures == 1
    assert Plan.from_dict({**asdict(second)}) == second and Plan.from_dict(
        {k: v for k, v in asdict(second).items() if k != "ari_failures"}).ari_failures == 0  # older states


def test_a_plan_for_this_certificate_decides_and_one_for_another_does_not():
    meta = acme(NOW - 2 * DAY, NOW + 4 * DAY)  # a 6-day certificate, 2 days old
    ari = Plan("f1", "https://ca/dir", NOW + DAY, "ari", NOW + 3600, "id")
    due, later = needs(certs(meta), ("ecdsa",), NOW, status_with(ari))
    assert due == [] and later == NOW + 3600  # the next renewal-information check comes first
    assert needs(certs(meta), ("ecdsa",), NOW + DAY, status_with(ari))[0] == ["ecdsa"]
    # The lifetime rule when the plan is another certificate's: 2/3 of 6 days = day 4.
    other = Plan("f0", "https://ca/dir", NOW - DAY, "ari", NOW + 3600, "id")
    due, later = needs(certs(meta), ("ecdsa",), NOW, status_with(other))
    assert due == [] and later == NOW + 2 * DAY


def test_a_window_moved_into_the_past_is_due_at_once():
    meta = acme(NOW - DAY, NOW + 89 * DAY)
    moved = Plan("f1", "https://ca/dir", NOW - 3600, "ari", NOW + 3600, "id")
    assert needs(certs(meta), ("ecdsa",), NOW, status_with(moved))[0] == ["ecdsa"]


def test_renewal_information_is_asked_for_new_certificates_and_after_retry_after():
    meta = acme(NOW - DAY, NOW + 89 * DAY)
    assert ari_checks(certs(meta), ("ecdsa",), NOW, None) == ["ecdsa"]
    fresh = Plan("f1", "https://ca/dir", NOW + 59 * DAY, "ari", NOW + 3600, "id")
    assert ari_checks(certs(meta), ("ecdsa",), NOW, status_with(fresh)) == []
    assert ari_checks(certs(meta), ("ecdsa",), NOW + 3600, status_with(fresh)) == ["ecdsa"]
    custom = CertMeta("www.example.com", "custom", "ecdsa", NOW - DAY, NOW + 60 * DAY, "c")
    assert ari_checks(certs(meta, custom), ("ecdsa",), NOW, None) == []  # served by custom: not asked


def test_six_day_standby_is_kept_renewed_while_the_custom_certificate_is_near_its_end():
    custom = CertMeta("www.example.com", "custom", "ecdsa", NOW - 80 * DAY, NOW + 10 * DAY, "c")
    for age in (0, 3, 6, 9):  # every 3 days a new 6-day standby
        now = NOW + age * DAY
        standby = acme(now - 4.1 * DAY, now + 1.9 * DAY)
        assert needs(certs(custom, standby), ("ecdsa",), now)[0] == ["ecdsa"], age
        renewed = acme(now, now + 6 * DAY)
        due, later = needs(certs(custom, renewed), ("ecdsa",), now)
        assert due == [] and later == now + 4 * DAY


def test_soonest_and_its_reason():
    meta = acme(NOW - DAY, NOW + 5 * DAY)
    ari = Plan("f1", "https://ca/dir", NOW + 2 * DAY, "ari", NOW + 3600, "id")
    assert soonest(certs(meta), ("ecdsa",), NOW, status_with(ari)) == (NOW + 2 * DAY, "ari", NOW + 2 * DAY)
    assert soonest(certs(meta), ("ecdsa",), NOW, None) == (NOW + 3 * DAY, "lifetime", NOW + 3 * DAY)
    failed = status_with(ari, "failed")
    failed.next_attempt = NOW + 60
    assert soonest(certs(meta), ("ecdsa",), NOW, failed) == (NOW + 60, "retry", NOW + 2 * DAY)
    status = status_with(ari)
    status.summarize()
    assert (status.next_renewal, status.renewal_reason) == (NOW + 2 * DAY, "ari")
    assert DomainStatus.from_bytes(status.to_bytes()) == status


def test_when_the_next_ca_is_asked():
    # Unreachable or rate-limited: at once, even with months of certificate left.
    assert fall_back("unreachable", False, NOW, 60, NOW + 60 * DAY)
    assert fall_back("rate_limited", False, NOW, 60, NOW + 60 * DAY)
    # Another failure: only when the back-off would outlast the certificate in service.
    assert not fall_back("failed", False, NOW, 3600, NOW + 2 * DAY)
    assert fall_back("failed", False, NOW, 3 * DAY, NOW + 2 * DAY)
    assert fall_back("failed", False, NOW, 60, None)  # nothing valid in service
    # The domain failed validation: another CA would see the same DNS.
    assert not fall_back("failed", True, NOW, 60, None)


def test_acme_settings_of_this_issue(tmp_path: Path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    text = (f'[acme]\nprofile = "shortlived"\nari_min = 60\nfallback_directories = ["https://b.example/dir", '
            f'{{directory = "https://c.example/dir", ca_bundle = "{bundle}", profile = "classic"}}, '
            f'{{directory = "https://d.example/dir", profile = ""}}]\n')
    acme_cfg = parse(text, tmp_path / "edge.toml").acme
    assert acme_cfg.profile == "shortlived" and acme_cfg.ari_min == 60 and acme_cfg.ari_max == 86400
    assert [c.directory for c in acme_cfg.cas] == ["https://acme-v02.api.letsencrypt.org/directory",
                                                    "https://b.example/dir", "https://c.example/dir",
                                                    "https://d.example/dir"]
    assert acme_cfg.cas[2].ca_bundle == bundle
    # Each CA's profile: the primary's setting; a fallback's own, its default (""), or as the primary (None).
    assert [c.profile for c in acme_cfg.cas] == ["shortlived", None, "classic", ""]
    for bad, said in (('fallback_directories = ["http://b/dir"]', "https:// URL"),
                      ('fallback_directories = [{dir = "https://b/dir"}]', "expected a directory URL or a table"),
                      ('fallback_directories = [{directory = "https://b/dir", profile = 6}]', "profile = "),
                      ('fallback_directories = ["https://b/dir", "https://b/dir"]', "appear once"),
                      ("ari_min = 100\nari_max = 10", "ari_min <= ari_max")):
        with pytest.raises(ConfigError, match=said):
            parse(f"[acme]\n{bad}\n", tmp_path / "edge.toml")
