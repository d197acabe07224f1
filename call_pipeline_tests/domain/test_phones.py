import math

import pandas as pd
import pytest

from call_pipeline.domain.phones import is_masked_phone, mask_phone, normalize_phone, phone_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13800000001", "13800000001"),
        ("138 0000 0001", "13800000001"),
        ("138-0000-0001", "13800000001"),
        ("(138) 0000-0001", "13800000001"),
        (" 13800000001 ", "13800000001"),
        ("+86 138 0000 0001", "13800000001"),
        ("+86-13800000001", "13800000001"),
        ("8613800000001", "13800000001"),
        ("008613800000001", "13800000001"),
        ("0086 21 1234 5678", "2112345678"),
        ("１３８００００００01", "13800000001"),
        (13800000001, "13800000001"),
        (13800000001.0, "13800000001"),
        ("021-12345678", "02112345678"),
        # 86 in front of something that is not an 11-digit mobile is part of the number.
        ("86123456", "86123456"),
        ("8602112345678", "8602112345678"),
    ],
)
def test_normalize_phone(raw, expected):
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "   ", "--", "+", math.nan, pd.NA, "abc", True])
def test_normalize_phone_empty_is_none(raw):
    assert normalize_phone(raw) is None


def test_normalize_phone_same_number_written_differently_compares_equal():
    forms = ["13800000001", "+86 138-0000-0001", "0086 13800000001", "(86)13800000001"]
    assert {normalize_phone(f) for f in forms} == {"13800000001"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13800000001", "138****0001"),
        ("+86 138 0000 0001", "138****0001"),
        ("02112345678", "021****5678"),
        ("12345", "***45"),
        ("12", "**"),
        (None, "<no phone>"),
        ("", "<no phone>"),
    ],
)
def test_mask_phone(raw, expected):
    assert mask_phone(raw) == expected


def test_mask_phone_never_shows_the_middle_digits():
    assert "0000" not in mask_phone("13800000001")[3:7]


@pytest.mark.parametrize("raw", ["138****8888", "138＊＊＊＊8888", "+86 138****8888", "138xxxx8888", "138XXXX8888",
                                 "138####8888", "138••••8888", "****8888"])
def test_masked_numbers_have_no_matching_key(raw):
    assert is_masked_phone(raw)
    assert phone_key(raw) is None


@pytest.mark.parametrize("raw", ["13800008888", "+86 138-0000-8888", "0571-8888 8888", "", None, "  "])
def test_plain_numbers_are_not_masked(raw):
    assert not is_masked_phone(raw)
    assert phone_key(raw) == normalize_phone(raw)
