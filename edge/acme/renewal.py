"""When a domain needs an order, and why (SPEC §2, §7; RFC 9773 ARI): pure functions.

Every custom domain (not a wildcard) gets an acme certificate of each
configured key type when it has no custom certificate that stays valid for
more than ``STANDBY_BEFORE``: no custom certificate at all, a deleted one, an
expired one, or one close to its end (the *standby*, so that a lapse or a
deletion falls through to acme at once, SPEC §2 rule 2). The standby is kept
renewed for as long as the custom certificate stays that close to its end,
however short the acme certificates live.

An acme certificate is renewed at the time its *plan* says. The plan comes
from the CA's renewal information (RFC 9773 §4.2: a uniformly random time
inside the ``suggestedWindow``, asked again when ``Retry-After`` says, kept
between ``ari_min`` and ``ari_max``), or, when the CA has no ``renewalInfo``
or answers badly, from the certificate's own lifetime (two thirds of it,
SPEC §7). A plan is tied to the fingerprint of the certificate it is for:
a plan for another certificate (a node that did not see the last renewal)
says nothing, and the lifetime rule stands until the renewal information is
asked again.
"""

from __future__ import annotations

import datetime
import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from edge.records import CertMeta, CertSource, DomainCerts

STANDBY_BEFORE = 14 * 86400  # SPEC §2: a custom certificate this close to expiry gets an acme standby
RENEW_AFTER = 2 / 3  # SPEC §7: without renewal information, renew at two thirds of the lifetime
ARI_MIN = 3600.0  # RFC 9773 §4.3: Retry-After is honoured, within these bounds (seconds)
ARI_MAX = 86400.0
OVERDUE_AFTER = 3600.0  # a planned renewal this far in the past, not done, is overdue (the alert)

REASONS = ("ari", "lifetime", "retry")  # why the next renewal is when it is


@dataclass
class Plan:
    """When to renew one stored acme certificate, and when to ask its CA again."""

    fingerprint: str  # the certificate this plan is for
    issuer: str  # the directory URL of the CA that issued it
    renew_at: float  # POSIX seconds
    reason: str  # "ari" (the CA's window) or "lifetime" (two thirds)
    ari_next: float  # when to ask renewalInfo again (RFC 9773 §4.3)
    cert_id: str = ""  # RFC 9773 §4.1, for "replaces" in the renewal's order
    ari_failures: int = 0  # renewalInfo errors in a row for this certificate (the back-off, §4.3.3)

    @classmethod
    def from_dict(cls, data: Any) -> Plan | None:
        try:
            return cls(str(data["fingerprint"]), str(data["issuer"]), float(data["renew_at"]),
                       str(data["reason"]), float(data["ari_next"]), str(data.get("cert_id", "")),
                       int(data.get("ari_failures", 0)))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class DomainStatus:
    """``acme/status/<domain>``: what the manager last did for a domain, and its plans."""

    state: str  # "pending" (an order runs), "valid", "failed"
    failures: int = 0  # consecutive failures
    last_error: str | None = None
    next_attempt: float | None = None  # not before (back-off), POSIX seconds
    valid_until: float | None = None
    updated: float = 0.0
    plans: dict[str, dict[str, Any]] | None = None  # key type -> Plan, as a dict
    next_renewal: float | None = None  # for `edge domains`: the soonest of the plans (or the retry)
    renewal_reason: str | None = None  # one of REASONS

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, value: bytes) -> DomainStatus | None:
        try:
            data = json.loads(value)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None

    def plan(self, key_type: str) -> Plan | None:
        return Plan.from_dict((self.plans or {}).get(key_type))

    def summarize(self) -> None:
        """Set ``next_renewal`` and ``renewal_reason`` from the plans (a retry comes first)."""
        if self.state == "failed" and self.next_attempt is not None:
            self.next_renewal, self.renewal_reason = self.next_attempt, "retry"
            return
        plans = [p for p in (self.plan(k) for k in self.plans or {}) if p is not None]
        soonest = min(plans, key=lambda p: p.renew_at, default=None)
        self.next_renewal = soonest.renew_at if soonest else None
        self.renewal_reason = soonest.reason if soonest else None


def renew_at(meta: CertMeta) -> float:
    """SPEC §7's lifetime rule: two thirds of the way from notBefore to notAfter."""
    return meta.not_before + RENEW_AFTER * (meta.not_after - meta.not_before)


def parse_window(body: bytes) -> tuple[float, float]:
    """(start, end) of a RenewalInfo object (RFC 9773 §4.2); ValueError when malformed.

    ``end`` must come after ``start``: a window that does not is invalid (§4.2)."""
    try:
        window = json.loads(body)["suggestedWindow"]
        start = datetime.datetime.fromisoformat(str(window["start"]).replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(str(window["end"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed renewal information ({exc.__class__.__name__}: {exc})") from None
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("malformed renewal information (times without a UTC offset, RFC 3339)")
    if end <= start:
        raise ValueError("invalid renewal information: the window ends before it starts (RFC 9773 §4.2)")
    return start.timestamp(), end.timestamp()


def pick_in_window(start: float, end: float, rng: random.Random | None = None) -> float:
    """RFC 9773 §4.2: a uniformly random time inside the window, so that a fleet of
    clients does not renew all at once. A time already past means renew now."""
    return (rng or random).uniform(start, end)


def next_check(retry_after: float | None, lowest: float = ARI_MIN, highest: float = ARI_MAX) -> float:
    """Seconds until renewalInfo is asked again: Retry-After (RFC 9773 §4.3), within bounds."""
    if retry_after is None:
        retry_after = 6 * 3600.0  # §4.3 suggests six hours when the server says nothing
    return min(highest, max(lowest, retry_after))


def ari_backoff(failures: int, lowest: float = ARI_MIN, highest: float = ARI_MAX,
                retry_after: float | None = None) -> float:
    """Seconds until renewalInfo is asked again after ``failures`` errors in a row: RFC 9773
    §4.3.3 asks for exponential back-off on errors, and a malformed answer is one (a
    long-term error: the client decides when to ask again). It starts at ``lowest`` and
    doubles up to ``highest``, the bounds Retry-After is held to (§4.3.2); a Retry-After
    the CA sent with its error is honoured within them."""
    delay = min(highest, lowest * 2 ** max(0, failures - 1))
    if retry_after is not None:
        delay = max(delay, min(highest, retry_after))
    return delay


def plan_after_error(lifetime: Plan, previous: Plan | None, unreachable: bool, now: float,
                     lowest: float = ARI_MIN, highest: float = ARI_MAX, retry_after: float | None = None) -> Plan:
    """The plan when a certificate's renewalInfo could not be had (never fatal, RFC 9773 §4.3.3).

    ``lifetime`` is the lifetime-rule plan for the certificate. While its CA cannot be
    reached, the CA's last window for it stands; after any other error (a malformed or
    invalid answer, a refusal) the lifetime rule does. Either way it is asked again
    with back-off, counted per certificate."""
    same = previous is not None and previous.fingerprint == lifetime.fingerprint
    failures = (previous.ari_failures if previous is not None and same else 0) + 1
    base = previous if previous is not None and same and unreachable and previous.reason == "ari" else lifetime
    return replace(base, ari_next=now + ari_backoff(failures, lowest, highest, retry_after), ari_failures=failures)


def _current(held: DomainCerts | None, key_type: str, now: float) -> CertMeta | None:
    mine = [m for m in (held.of(CertSource.ACME) if held else ()) if m.key_type == key_type and m.not_after > now]
    return max(mine, key=lambda m: m.not_after, default=None)


def _custom_far(held: DomainCerts | None, now: float) -> float | None:
    """The standby time when a custom certificate stays valid past ``STANDBY_BEFORE``."""
    custom = held.valid(CertSource.CUSTOM, now) if held else ()
    custom_end = max((m.not_after for m in custom), default=None)
    if custom_end is not None and custom_end - now > STANDBY_BEFORE:
        return custom_end - STANDBY_BEFORE
    return None


def planned(meta: CertMeta, plan: Plan | None) -> tuple[float, str]:
    """(when to renew, why) for one certificate: its plan if it is for it, else the lifetime rule."""
    if plan is not None and plan.fingerprint == meta.fingerprint:
        return plan.renew_at, plan.reason
    return renew_at(meta), "lifetime"


def needs(held: DomainCerts | None, key_types: tuple[str, ...], now: float,
          status: DomainStatus | None = None) -> tuple[list[str], float | None]:
    """(key types to order now, when to look again otherwise) for one domain.

    Pure: the whole policy of SPEC §2/§7 and RFC 9773 in one place, unit-tested as such."""
    standby_at = _custom_far(held, now)
    if standby_at is not None:
        return [], standby_at  # served by its custom certificate; standby later
    due: list[str] = []
    later: list[float] = []
    for key_type in key_types:
        meta = _current(held, key_type, now)
        if meta is None:
            due.append(key_type)
            continue
        plan = status.plan(key_type) if status else None
        when, _ = planned(meta, plan)
        if when <= now:
            due.append(key_type)
            continue
        later.append(when)
        if plan is not None and plan.fingerprint == meta.fingerprint:
            later.append(max(now, plan.ari_next))
    return due, min(later, default=None)


def ari_checks(held: DomainCerts | None, key_types: tuple[str, ...], now: float,
               status: DomainStatus | None) -> list[str]:
    """Key types whose certificate's renewal information is to be asked now (RFC 9773 §4.3):
    never asked for this certificate, or its Retry-After has passed."""
    if _custom_far(held, now) is not None:
        return []
    out = []
    for key_type in key_types:
        meta = _current(held, key_type, now)
        if meta is None:
            continue
        plan = status.plan(key_type) if status else None
        if plan is None or plan.fingerprint != meta.fingerprint or plan.ari_next <= now:
            out.append(key_type)
    return out


def soonest(held: DomainCerts | None, key_types: tuple[str, ...], now: float,
            status: DomainStatus | None) -> tuple[float, str, float | None] | None:
    """(next planned renewal or retry, its reason, when the certificates fall due) of a
    domain, for metrics and `edge domains`; None when a custom certificate serves it."""
    if _custom_far(held, now) is not None:
        return None
    plans = []
    for key_type in key_types:
        meta = _current(held, key_type, now)
        if meta is not None:  # a missing one is a first order, not a renewal
            plans.append(planned(meta, status.plan(key_type) if status else None))
    certs_due = min((when for when, _ in plans), default=None)
    if status is not None and status.state == "failed" and status.next_attempt is not None:
        return status.next_attempt, "retry", certs_due
    if not plans:
        return None
    when, reason = min(plans)
    return when, reason, certs_due


def backoff(failures: int, minimum: float, maximum: float, retry_after: float | None = None) -> float:
    delay = min(maximum, minimum * 2 ** max(0, failures - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def fall_back(kind: str, validation: bool, now: float, delay: float, valid_until: float | None) -> bool:
    """After an order failed at one CA, is the next CA asked at once?

    Yes when that CA cannot be reached or rate-limits, or when waiting ``delay``
    (the back-off) would leave the domain without a valid certificate of this
    key type. No when the CA reached the domain and validation failed
    (RFC 8555 §8: the name does not point here; another CA would see the same)."""
    if validation:
        return False
    if kind in ("unreachable", "rate_limited"):
        return True
    return valid_until is None or now + delay >= valid_until
