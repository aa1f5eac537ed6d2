from csvsniff import Dialect, count_outside_quotes, read_rows, split_row


def test_split_plain_and_quoted():
    assert split_row("a,b,c") == ["a", "b", "c"]
    assert split_row('"a,b",c') == ["a,b", "c"]
    assert split_row("x;;y", ";") == ["x", "", "y"]
    assert split_row("'a|b'|c", "|", "'") == ["a|b", "c"]


def test_count_outside_quotes():
    assert count_outside_quotes('a,"b,c",d', ",") == 2
    assert count_outside_quotes("a;b;c", ",") == 0


def test_read_rows():
    text = "a,b\n1,2\n\n3,4\n"
    assert read_rows(text, Dialect(",")) == [["a", "b"], ["1", "2"], ["3", "4"]]
