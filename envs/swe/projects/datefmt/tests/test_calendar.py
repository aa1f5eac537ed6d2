import pytest

from datefmt import Date, days_in_month, is_leap_year


def test_leap_years():
    assert is_leap_year(2024) and is_leap_year(1996)
    assert not is_leap_year(2023) and not is_leap_year(1900) and not is_leap_year(2100)


def test_days_in_month():
    assert [days_in_month(2023, m) for m in range(1, 13)] == [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    assert days_in_month(2024, 2) == 29
    with pytest.raises(ValueError):
        days_in_month(2024, 13)


def test_invalid_dates_are_rejected():
    with pytest.raises(ValueError):
        Date(2023, 2, 29)
    with pytest.raises(ValueError):
        Date(2023, 4, 31)
    with pytest.raises(ValueError):
        Date(2023, 0, 1)


def test_day_of_year_and_ordinal():
    assert Date(2023, 1, 1).day_of_year() == 1
    assert Date(2023, 12, 31).day_of_year() == 365
    assert Date(1, 1, 1).ordinal() == 1
    assert Date(2024, 1, 2).ordinal() - Date(2023, 12, 30).ordinal() == 3


def test_from_ordinal_round_trip_mid_month():
    for date in [Date(1, 1, 1), Date(1999, 12, 31), Date(2024, 7, 15), Date(2023, 3, 10)]:
        assert Date.from_ordinal(date.ordinal()) == date


def test_weekday():
    assert Date(2024, 1, 1).weekday() == 0  # a Monday
    assert Date(2023, 12, 31).weekday() == 6


def test_ordering_and_str():
    assert Date(2023, 5, 1) < Date(2023, 5, 2) < Date(2024, 1, 1)
    assert str(Date(987, 6, 5)) == "0987-06-05"
