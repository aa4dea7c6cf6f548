"""Counters published by one worker read back in another, and summed."""

from __future__ import annotations

import pytest

from edge.histogram import Histogram
from edge.metrics import decode, encode, merge
from edge.tls.selector import Source
from edge.tls.stats import HandshakeStats


def test_a_snapshot_with_tuple_keys_survives_json() -> None:
    stats = HandshakeStats()
    stats.done("TLSv1.3", Source.CUSTOM, 0.004)
    stats.fail("timeout")
    snapshot = {"processes": 1, **stats.counters()}
    assert decode(encode(snapshot)) == snapshot
    assert snapshot["handshakes_ok"] == {("TLSv1.3", "custom"): 1}


def test_workers_sum_key_by_key() -> None:
    a = {"processes": 1, "handshakes_ok": {("TLSv1.3", "acme"): 2}, "handshake_buckets": [1, 0], "not_tls": 1}
    b = {"processes": 1, "handshakes_ok": {("TLSv1.3", "acme"): 1, ("TLSv1.2", "custom"): 4},
         "handshake_buckets": [0, 3], "not_tls": 0}
    total = merge([a, decode(encode(b))])
    assert total == {"processes": 2, "handshakes_ok": {("TLSv1.3", "acme"): 3, ("TLSv1.2", "custom"): 4},
                     "handshake_buckets": [1, 3], "not_tls": 1}


def test_histogram_counts_each_value_under_its_first_bound() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        h.observe(value)
    assert h.counts == [2, 1, 1] and h.total == pytest.approx(7.65)
