from intervalset import Interval, IntervalSet


def test_add_merges_overlaps():
    s = IntervalSet([(1, 4), (2, 6), (10, 12)])
    assert list(s) == [Interval(1, 6), Interval(10, 12)]
    s.add(0, 20)
    assert list(s) == [Interval(0, 20)]


def test_add_keeps_separate_intervals_sorted():
    s = IntervalSet([(10, 12), (1, 2), (5, 6)])
    assert list(s) == [Interval(1, 2), Interval(5, 6), Interval(10, 12)]
    assert len(s) == 3 and s.total_length() == 4


def test_empty_intervals_are_ignored():
    assert len(IntervalSet([(3, 3)])) == 0


def test_membership():
    s = IntervalSet([(1, 3), (5, 8)])
    assert 1 in s and 2.5 in s and 5 in s and 7.9 in s
    assert 0 not in s and 4 not in s and 9 not in s


def test_remove_from_the_edges():
    s = IntervalSet([(0, 10)])
    s.remove(0, 3)
    assert list(s) == [Interval(3, 10)]
    s.remove(8, 12)
    assert list(s) == [Interval(3, 8)]
    s.remove(0, 100)
    assert list(s) == []


def test_union_and_intersection():
    a = IntervalSet([(0, 5), (10, 15)])
    b = IntervalSet([(3, 12), (20, 25)])
    assert a.union(b) == IntervalSet([(0, 15), (20, 25)])
    assert a.intersection(b) == IntervalSet([(3, 5), (10, 12)])


def test_complement_with_a_gap_at_the_start():
    s = IntervalSet([(2, 4), (6, 10)])
    assert s.complement(0, 10) == IntervalSet([(0, 2), (4, 6)])
