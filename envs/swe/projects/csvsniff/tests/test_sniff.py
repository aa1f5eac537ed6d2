import pytest

from csvsniff import Dialect, SniffError, has_header, sniff, sniff_delimiter


def test_delimiters():
    assert sniff_delimiter("a,b,c\n1,2,3") == ","
    assert sniff_delimiter("a;b;c\n1;2;3") == ";"
    assert sniff_delimiter("a\tb\n1\t2") == "\t"
    assert sniff_delimiter("a|b\n1|2") == "|"


def test_consistency_beats_frequency():
    sample = "name;note\nann;hi, there, you\nbob;ok\ncy;fine"
    assert sniff_delimiter(sample) == ";"


def test_empty_sample():
    with pytest.raises(SniffError):
        sniff_delimiter("\n\n")


def test_header_detection_integers_and_fixed_width():
    assert has_header("id,count\n1,20\n2,35", ",")
    assert not has_header("1,20\n2,35\n3,40", ",")
    assert has_header("code,city\nAB,Paris\nCD,Rome", ",")


def test_sniff_single_quotes():
    sample = "'name'|'age'\n'ann'|'31'\n'bob'|'45'"
    assert sniff(sample) == Dialect("|", "'", True)
