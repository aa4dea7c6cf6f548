"""Key sizes at upload: too small is refused (SPEC §3), very large is accepted with a warning."""

from __future__ import annotations

import pytest
import trustme

from edge.tls import bundle
from tests import pki

DOMAIN = "shop.custom.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_rsa_over_4096_bits_is_accepted_with_a_warning(ca: trustme.CA) -> None:
    big = pki.custom(ca, DOMAIN, key=pki.rsa_key(4160))
    result = bundle.validate(big.cert, big.key, DOMAIN)
    assert result.key_type is bundle.KeyType.RSA
    assert [w for w in result.warnings if "the RSA key has 4160 bits" in w and "ec256" in w], result.warnings


@pytest.mark.parametrize("bits", [2048, 4096])
def test_usual_rsa_sizes_get_no_key_warning(ca: trustme.CA, bits: int) -> None:
    usual = pki.custom(ca, DOMAIN, key=pki.rsa_key(bits))
    result = bundle.validate(usual.cert, usual.key, DOMAIN)
    assert not [w for w in result.warnings if "RSA key" in w], result.warnings


def test_rsa_under_2048_bits_is_refused(ca: trustme.CA) -> None:
    weak = pki.custom(ca, DOMAIN, key=pki.rsa_key(1024))
    with pytest.raises(bundle.BundleError, match="the RSA key has 1024 bits, under the 2048"):
        bundle.validate(weak.cert, weak.key, DOMAIN)
