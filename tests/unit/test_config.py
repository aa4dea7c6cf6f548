import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge import config

ROOT = Path(__file__).parents[2]
SHIPPED = ROOT / "config" / "edge.toml"


def shipped_text() -> str:
    """config/edge.toml as committed: `make serve` runs the working copy, whose
    ports a developer may change, and that must not fail the tests."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:config/edge.toml"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked release)
        return SHIPPED.read_text()


def parse(text: str, name: str = "edge.toml") -> config.Config:
    return config.parse(text, Path("/etc/edge") / name)


def test_shipped_config_loads_with_spec_defaults():
    cfg = config.parse(shipped_text(), SHIPPED)
    assert cfg.server.https == (config.Address("127.0.0.1", 8443),)
    assert cfg.server.http == (config.Address("127.0.0.1", 8080),)
    assert cfg.platform.domain == "edge.localhost"
    assert cfg.store.backend == "file"
    # Relative paths resolve against the config file's directory.
    assert cfg.store.path == SHIPPED.parent.parent / "var" / "store"
    assert cfg.platform.cert == SHIPPED.parent.parent / "var" / "dev" / "platform.crt"
    assert cfg.tls.min_version == "TLSv1.2"
    assert cfg.tls.context_cache_size == 10000
    assert cfg.proxy.handshake_timeout == 10


def test_empty_config_gets_defaults():
    cfg = parse("")
    assert cfg.platform.strict_sni is False
    assert cfg.store.path == Path("/etc/edge/var/store")


def test_unknown_key_names_file_and_line():
    with pytest.raises(config.ConfigError) as exc:
        parse('[server]\nhttps = ["127.0.0.1:1"]\n\n[tls]\nmin_versoin = "TLSv1.2"\n')
    assert str(exc.value).startswith("/etc/edge/edge.toml:5: [tls] min_versoin: unknown key")


def test_wrong_type_names_line():
    with pytest.raises(config.ConfigError, match=r"edge.toml:3: \[platform\] strict_sni: expected bool"):
        parse('[platform]\ndomain = "apps.example.net"\nstrict_sni = "yes"\n')


def test_invalid_toml_names_line():
    with pytest.raises(config.ConfigError, match=r"edge.toml:2: invalid TOML"):
        parse('[server]\nhttps = "x" "y"\n')


def test_bad_address():
    with pytest.raises(config.ConfigError, match=r":2: \[server\] https: 'localhost' is not host:port"):
        parse('[server]\nhttps = ["localhost"]\n')


def test_ipv6_and_wildcard_addresses():
    cfg = parse('[server]\nhttps = ["[::1]:8443", ":443"]\n')
    assert cfg.server.https == (config.Address("::1", 8443), config.Address("0.0.0.0", 443))


def test_tls_versions_below_12_refused():
    with pytest.raises(config.ConfigError, match="older versions are unsafe"):
        parse('[tls]\nmin_version = "TLSv1.1"\n')


def test_admin_beyond_loopback_needs_token():
    with pytest.raises(config.ConfigError, match="set admin_token"):
        parse('[server]\nadmin = "0.0.0.0:9090"\n')
    assert parse('[server]\nadmin = "0.0.0.0:9090"\nadmin_token = "s3cret"\n').server.admin_token == "s3cret"


def test_platform_domain_normalised_and_checked():
    assert parse('[platform]\ndomain = "Apps.Example.NET."\n').platform.domain == "apps.example.net"
    with pytest.raises(config.ConfigError, match="not a valid host name"):
        parse('[platform]\ndomain = "bad_domain"\n')


def test_unknown_section():
    with pytest.raises(config.ConfigError, match=r"edge.toml:1: \[serverr\]: unknown section"):
        parse("[serverr]\n")


def test_missing_file():
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(Path("/nonexistent/edge.toml"))


def test_default_cert_needs_both():
    with pytest.raises(config.ConfigError, match="set both default_cert and default_key"):
        parse('[tls]\ndefault_cert = "d.crt"\n')


def test_production_config_parses():
    cfg = config.load(SHIPPED.parent.parent / "deploy" / "edge.toml")
    assert cfg.server.https == (config.Address("0.0.0.0", 443),)
    assert cfg.server.http == (config.Address("0.0.0.0", 80),)
    assert cfg.platform.dev_certificates is False


def test_acme_settings_and_their_errors():
    cfg = parse('[acme]\nenabled = true\nkey_types = ["ecdsa", "rsa"]\nchallenges = ["tls-alpn-01"]\n'
                'backoff_min = 5\nbackoff_max = 600\n')
    assert cfg.acme.key_types == ("ecdsa", "rsa") and cfg.acme.challenges == ("tls-alpn-01",)
    assert (cfg.acme.backoff_min, cfg.acme.backoff_max) == (5.0, 600.0)
    assert parse("").acme.key_types == ("ecdsa",)  # SPEC: ECDSA P-256 unless told otherwise
    with pytest.raises(config.ConfigError, match=r":2: \[acme\] challenges: expected a list of distinct values"):
        parse('[acme]\nchallenges = ["dns-01"]\n')
    with pytest.raises(config.ConfigError, match=r"\[acme\] key_types"):
        parse('[acme]\nkey_types = []\n')
    with pytest.raises(config.ConfigError, match=r"\[acme\] backoff_min: expected 0 < backoff_min <= backoff_max"):
        parse('[acme]\nbackoff_min = 100\nbackoff_max = 10\n')
    with pytest.raises(config.ConfigError, match=r"\[acme\] directory: expected the https:// URL"):
        parse('[acme]\nenabled = true\ndirectory = "http://acme.example/dir"\n')


def test_acme_needs_the_listeners_its_challenges_use():
    with pytest.raises(config.ConfigError, match=r'\[acme\] challenges: http-01 is answered on the \[server\] http'):
        parse('[server]\nhttp = []\n[acme]\nenabled = true\n')
    assert parse('[server]\nhttp = []\n[acme]\nenabled = true\nchallenges = ["tls-alpn-01"]\n').acme.enabled
    with pytest.raises(config.ConfigError, match=r"\[acme\] ca_bundle: /etc/edge/missing.pem is not a file"):
        parse('[acme]\nenabled = true\nca_bundle = "missing.pem"\n')


def test_admin_hosts_and_metrics_address():
    cfg = parse('[server]\nadmin_hosts = ["Edge-Admin.Internal."]\nmetrics = "0.0.0.0:9100"\n')
    assert cfg.server.admin_hosts == ("edge-admin.internal",)
    assert cfg.server.metrics == config.Address("0.0.0.0", 9100)  # read-only: no token needed beyond loopback
    assert parse("").server.metrics is None and parse("").server.admin_hosts == ()
    with pytest.raises(config.ConfigError, match=r"edge.toml:2: \[server\] admin_hosts: expected a list of host"):
        parse('[server]\nadmin_hosts = ["not a name"]\n')
    with pytest.raises(config.ConfigError, match=r"\[server\] metrics: .* is not host:port"):
        parse('[server]\nmetrics = "9100"\n')


def test_a_developers_port_change_does_not_fail_the_tests(tmp_path: Path):
    # The first thing a new user may do: change the ports of config/edge.toml
    # (8443 was taken). The suite's config tests must still pass.
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    shutil.copy(Path(__file__), clone / "tests" / "unit" / "test_config.py")  # this version of the tests
    edited = clone / "config" / "edge.toml"
    edited.write_text(edited.read_text().replace("127.0.0.1:8443", "127.0.0.1:9443")
                      .replace("127.0.0.1:8080", "127.0.0.1:9080"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/unit/test_config.py", "-k", "not a_developers"],
                            cwd=clone, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
