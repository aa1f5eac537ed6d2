import pytest

from intervalset import Interval


def test_length_and_empty():
    assert Interval(2, 5).length == 3
    assert Interval(4, 4).is_empty()
    with pytest.raises(ValueError):
        Interval(5, 2)


def test_contains_inside_and_start():
    iv = Interval(1, 3)
    assert iv.contains(1) and iv.contains(2) and iv.contains(2.5)
    assert not iv.contains(0.5) and not iv.contains(7)


def test_overlaps():
    assert Interval(0, 5).overlaps(Interval(4, 9))
    assert not Interval(0, 5).overlaps(Interval(5, 9))
