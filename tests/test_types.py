import pytest

from kvmsim.types import format_size, parse_size


@pytest.mark.parametrize("text,value", [("4K", 4096), ("2M", 2 << 20), ("1G", 1 << 30), ("64GiB", 64 << 30),
                                        ("12", 12), (8192, 8192)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "4Q", "-1", "1.5G", None, True, -4])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size_roundtrip():
    for s in ("4K", "2M", "1G", "3T"):
        assert format_size(parse_size(s)) == s
