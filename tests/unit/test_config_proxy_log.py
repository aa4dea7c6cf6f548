"""The [log] access_format and [proxy] http_reuse keys (issue #15.11, #11.6)."""

from pathlib import Path

import pytest

from edge import config


def parse(text: str) -> config.Config:
    return config.parse(text, Path("/etc/edge/edge.toml"))


def test_access_format_default_and_combined():
    assert parse("").log.access_format == "json"
    assert parse('[log]\naccess_format = "combined"\n').log.access_format == "combined"


def test_access_format_refuses_others_with_line():
    with pytest.raises(config.ConfigError) as exc:
        parse('[log]\nlevel = "info"\naccess_format = "common"\n')
    assert str(exc.value).startswith("/etc/edge/edge.toml:3: [log] access_format")


def test_http_reuse_values():
    assert parse("").proxy.http_reuse == "always"
    assert parse('[proxy]\nhttp_reuse = "safe"\n').proxy.http_reuse == "safe"
    with pytest.raises(config.ConfigError, match="http_reuse"):
        parse('[proxy]\nhttp_reuse = "never"\n')
