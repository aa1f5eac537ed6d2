from semverlite import Version, max_satisfying, satisfies


def test_comparators():
    assert satisfies("1.5.0", ">=1.2.0 <2.0.0")
    assert not satisfies("2.0.0", ">=1.2.0 <2.0.0")
    assert satisfies("1.2.0", ">= 1.2.0")
    assert satisfies("3.0.0", "<1.0.0 || >=3.0.0")


def test_caret_and_tilde():
    assert satisfies("1.9.9", "^1.2.3") and not satisfies("2.0.0", "^1.2.3") and not satisfies("1.2.2", "^1.2.3")
    assert satisfies("1.2.9", "~1.2.3") and not satisfies("1.3.0", "~1.2.3")


def test_wildcards_and_exact():
    assert satisfies("1.2.7", "1.2.x") and not satisfies("1.3.0", "1.2.*")
    assert satisfies("1.9.0", "1") and satisfies("1.2.3", "1.2.3") and not satisfies("1.2.4", "=1.2.3")


def test_max_satisfying():
    assert max_satisfying(["1.2.3", "1.4.0", "2.0.0"], "^1.2.0") == Version(1, 4, 0)
    assert max_satisfying(["1.2.3"], ">=3.0.0") is None
