import pytest

from datefmt import Date, ParseError, parse_date


def test_iso():
    assert parse_date("2024-03-09") == Date(2024, 3, 9)
    assert parse_date("  2024-3-9 ") == Date(2024, 3, 9)


def test_numeric_day_first_and_month_first():
    assert parse_date("09/03/2024") == Date(2024, 3, 9)
    assert parse_date("09/03/2024", day_first=False) == Date(2024, 9, 3)
    assert parse_date("9.3.2024") == Date(2024, 3, 9)


def test_two_digit_years():
    assert parse_date("01/02/24") == Date(2024, 2, 1)
    assert parse_date("01/02/87") == Date(1987, 2, 1)


def test_month_names():
    assert parse_date("March 9, 2024") == Date(2024, 3, 9)
    assert parse_date("Mar 9th 2024") == Date(2024, 3, 9)
    assert parse_date("9 March 2024") == Date(2024, 3, 9)
    assert parse_date("Sep. 21st, 2023") == Date(2023, 9, 21)


def test_errors():
    with pytest.raises(ParseError):
        parse_date("yesterday")
    with pytest.raises(ParseError, match="unknown month"):
        parse_date("Smarch 3, 2024")
    with pytest.raises(ParseError):
        parse_date("2023-02-29")
