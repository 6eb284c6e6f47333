"""Feature lists: `0,5,10`, `0-20`, `0-10,50-60`."""

from __future__ import annotations

import pytest

from saeray.cli.featlist import FeatureListError, parse_features


@pytest.mark.parametrize("spec, want", [
    ("0,5,10", [0, 5, 10]),
    ("0-20", list(range(21))),
    ("0-10,50-60", list(range(11)) + list(range(50, 61))),
    ("10,5,5,0-2,1", [0, 1, 2, 5, 10]),
    (" 3 , 7 - 9 ", [3, 7, 8, 9]),
    ("4-4", [4]),
    (7, [7]),
    (["0-2", "5", 9], [0, 1, 2, 5, 9]),
])
def test_parse(spec, want):
    assert parse_features(spec) == want


@pytest.mark.parametrize("spec, message", [
    ("10-5", "reversed range '10-5'.*5-10"),
    ("abc", "cannot read 'abc'"),
    ("1.5", "cannot read '1.5'"),
    ("1-2-3", "cannot read '1-2-3'"),
    ("-3", "negative"),
    ("2--3", "negative"),
    ("", "empty feature list"),
    ("1,,2", "empty item"),
    ("1,", "empty item"),
    (True, "not a list"),
])
def test_errors(spec, message):
    with pytest.raises(FeatureListError, match=message):
        parse_features(spec)


def test_bound_and_error_type():
    assert parse_features("0-15", n_features=16) == list(range(16))
    with pytest.raises(ValueError, match="feature 16 is out of range: the SAE has 16 features"):
        parse_features("10-20", n_features=16)
