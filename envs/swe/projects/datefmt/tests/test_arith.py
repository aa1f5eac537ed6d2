from datefmt import Date, add_days, add_months, days_between


def test_add_days_within_a_month_and_over_new_year():
    assert add_days(Date(2024, 3, 9), 5) == Date(2024, 3, 14)
    assert add_days(Date(2023, 12, 30), 3) == Date(2024, 1, 2)
    assert add_days(Date(2024, 1, 2), -3) == Date(2023, 12, 30)


def test_days_between():
    assert days_between(Date(2024, 1, 1), Date(2024, 12, 31)) == 365
    assert days_between(Date(2024, 1, 10), Date(2024, 1, 3)) == -7


def test_add_months():
    assert add_months(Date(2024, 1, 15), 1) == Date(2024, 2, 15)
    assert add_months(Date(2024, 3, 31), 1) == Date(2024, 4, 30)
    assert add_months(Date(2024, 5, 10), -4) == Date(2024, 1, 10)
    assert add_months(Date(2023, 1, 31), 1) == Date(2023, 2, 28)
