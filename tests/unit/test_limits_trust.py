"""[server] trusted_proxies / proxy_protocol, [limits], [metrics]: parsing and the limit structures."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

import pytest

from edge import config
from edge.limits import MAX_TRACKED, ConnectionLimits, RateLimiter


def parse(text: str) -> config.Config:
    return config.parse(text, Path("/etc/edge/edge.toml"))


def test_defaults_are_off() -> None:
    cfg = parse("")
    assert not cfg.server.proxy_protocol and not cfg.server.trusted_proxies
    assert cfg.limits == config.LimitsConfig(0, 0.0, 0, 0)
    assert cfg.metrics_per_app is True


def test_trusted_proxies_v4_v6_and_mapped() -> None:
    cfg = parse('[server]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]\n')
    trusted = cfg.server.trusted_proxies
    assert "10.1.2.3" in trusted and b"10.1.2.3" in trusted
    assert "fd12::1" in trusted and "192.0.2.7" in trusted
    assert "::ffff:10.9.9.9" in trusted  # a dual-stack socket's view of an IPv4 peer
    assert "11.0.0.1" not in trusted and "fe80::1" not in trusted and "garbage" not in trusted


def test_proxy_protocol_without_trusted_proxies_is_refused_naming_the_key() -> None:
    with pytest.raises(config.ConfigError, match=r"\[server\] trusted_proxies: proxy_protocol = true"):
        parse("[server]\nproxy_protocol = true\n")


@pytest.mark.parametrize("text, key", [
    ('[server]\ntrusted_proxies = ["10.0.0.1/8"]\n', "trusted_proxies"),
    ('[server]\ntrusted_proxies = "10.0.0.0/8"\n', "trusted_proxies"),
    ("[limits]\nconnections_per_ip = -1\n", "connections_per_ip"),
    ("[limits]\nrequests_per_ip_per_second = -1\n", "requests_per_ip_per_second"),
    ("[limits]\nburst = true\n", "burst"),
    ("[limits]\nmax_conections = 3\n", "max_conections"),
    ('[metrics]\nper_app = "no"\n', "per_app"),
])
def test_bad_values_name_file_line_and_key(text: str, key: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"edge.toml:2: \[\w+\] {key}:"):
        parse(text)


def test_limits_parsed() -> None:
    cfg = parse("[limits]\nconnections_per_ip = 20\nrequests_per_ip_per_second = 5\nburst = 10\n"
                "max_connections = 1000\n[metrics]\nper_app = false\n")
    assert cfg.limits == config.LimitsConfig(20, 5.0, 10, 1000)
    assert cfg.limits.bucket_size == 10 and config.LimitsConfig(0, 2.5).bucket_size == 3
    assert cfg.metrics_per_app is False


def test_connections_per_ip_counts_and_releases() -> None:
    limits = ConnectionLimits(per_ip=2, max_connections=0)
    a, b, c = limits.slot(), limits.slot(), limits.slot()
    assert a.assign("192.0.2.1") and b.assign("192.0.2.1")
    assert not c.assign("192.0.2.1") and limits.refused == 1
    assert limits.open == 3
    del c
    a.release()
    a.release()  # idempotent
    assert limits.open == 1 and limits.by_ip == {"192.0.2.1": 1}
    del b  # dropped without release(): the last reference releases it
    assert limits.open == 0 and limits.by_ip == {}


def test_max_connections_calls_back_when_room() -> None:
    limits = ConnectionLimits(per_ip=0, max_connections=2)
    slots = [limits.slot(), limits.slot()]
    assert limits.full()
    woken: list[int] = []
    limits.when_room(lambda: woken.append(1))
    slots.pop().release()
    assert woken == [1] and not limits.full()


def test_token_bucket_burst_then_rate() -> None:
    rate = RateLimiter(rate=10.0, size=5)
    ip, other = b"192.0.2.1", b"192.0.2.2"
    assert [rate.take(ip, 100.0) for _ in range(5)] == [0.0] * 5
    wait = rate.take(ip, 100.0)
    assert wait == pytest.approx(0.1)
    assert rate.take(other, 100.0) == 0.0  # another address is unaffected
    assert rate.take(ip, 100.11) == 0.0  # one token back after 1/rate seconds
    assert rate.take(ip, 100.11) > 0 and rate.limited == 2


def test_one_million_addresses_stay_bounded() -> None:
    rate = RateLimiter(rate=1.0, size=1)
    gc.collect()
    tracemalloc.start()
    for n in range(1_000_000):
        rate.take(b"10.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255), float(n))
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rate.buckets) == MAX_TRACKED
    assert current < 32 * 1024 * 1024, current
    print(f"1M addresses: {len(rate.buckets)} buckets, {current / 2**20:.1f} MiB", file=sys.stderr)
