import pytest

from edge import names


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("www.example.com", "www.example.com"),
        ("WWW.Example.COM", "www.example.com"),
        ("www.example.com.", "www.example.com"),
        (b"Www.Example.com.", "www.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("localhost", None),  # a single label is no public name
        ("", None),
        (None, None),
        ("a..example.com", None),
        ("-a.example.com", None),
        ("a-.example.com", None),
        ("under_score.example.com", None),
        ("a" * 64 + ".example.com", None),
        (".".join(["a" * 63] * 4), None),  # 255 characters: over 253
        ("192.168.0.1.example.com", "192.168.0.1.example.com"),
        ("127.0.0.1", None),  # IP literals are not SNI host names (RFC 6066 §3)
        ("10.0.0.1.", None),
        (b"\xff\xfe.example.com", None),
        ("space .example.com", None),
    ],
)
def test_normalize(raw, expected):
    assert names.normalize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("*.Example.com", "*.example.com"),
        ("*.example.com.", "*.example.com"),
        ("*.com", None),
        ("a.*.example.com", None),
        ("*example.com", None),
        ("www.example.com", "www.example.com"),
    ],
)
def test_normalize_pattern(raw, expected):
    assert names.normalize_pattern(raw) == expected


def test_wildcard_parent_is_one_level_only():
    assert names.wildcard_parent("a.example.com") == "*.example.com"
    assert names.wildcard_parent("a.b.example.com") == "*.b.example.com"
    assert names.wildcard_parent("example.com") is None


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "example.com", False),
        ("www.example.com", "www.example.com", True),
        ("www.example.com", "api.example.com", False),
    ],
)
def test_covers(pattern, name, expected):
    assert names.covers(pattern, name) is expected


def test_one_label_under():
    assert names.is_one_label_under("demo.edge.localhost", "edge.localhost")
    assert not names.is_one_label_under("a.demo.edge.localhost", "edge.localhost")
    assert not names.is_one_label_under("edge.localhost", "edge.localhost")
    assert not names.is_one_label_under("xedge.localhost", "edge.localhost")
    assert names.is_under("a.b.edge.localhost", "edge.localhost")
    assert not names.is_under("notedge.localhost", "edge.localhost")
