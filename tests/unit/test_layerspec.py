import pytest

from klstore.errors import KlstoreError
from klstore.spec import parse_layers


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", tuple(range(28))),
        ("0,15-21,27", (0, 15, 16, 17, 18, 19, 20, 21, 27)),
        ("-4--1", (24, 25, 26, 27)),
        ("-1", (27,)),
        ("3, 1,3", (1, 3)),
        ("0--25", (0, 1, 2, 3)),
    ],
)
def test_valid_specs(spec, expected):
    assert parse_layers(spec, 28) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("40", "layer 40: m has 28 layers, 0-27"),
        ("-29", "layer -29: m has 28 layers, 0-27"),
        ("1-x", "malformed layer spec '1-x'"),
        ("5-2", "runs backwards"),
        ("", "empty layer spec"),
        ("1,,2", "malformed layer spec"),
    ],
)
def test_invalid_specs(spec, message):
    with pytest.raises(KlstoreError, match=message):
        parse_layers(spec, 28, "m")
