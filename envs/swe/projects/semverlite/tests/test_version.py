import pytest

from semverlite import InvalidVersion, Version


def test_parse_and_str():
    v = Version.parse("1.2.3-beta.1+build.5")
    assert (v.major, v.minor, v.patch, v.prerelease, v.build) == (1, 2, 3, ("beta", "1"), ("build", "5"))
    assert str(v) == "1.2.3-beta.1+build.5"
    assert Version.parse("v2.0.0") == Version(2, 0, 0)


def test_invalid():
    for text in ["1.2", "01.2.3", "1.2.3-", "1.2.3.4", "a.b.c"]:
        with pytest.raises(InvalidVersion):
            Version.parse(text)


def test_release_ordering():
    versions = [Version.parse(t) for t in ["1.10.0", "1.2.0", "0.9.9", "1.2.10", "1.2.9", "2.0.0"]]
    assert [str(v) for v in sorted(versions)] == ["0.9.9", "1.2.0", "1.2.9", "1.2.10", "1.10.0", "2.0.0"]


def test_prerelease_identifiers():
    assert Version.parse("1.0.0-alpha") < Version.parse("1.0.0-alpha.1") < Version.parse("1.0.0-beta")
    assert Version.parse("1.0.0-1") < Version.parse("1.0.0-alpha")


def test_build_metadata_is_ignored():
    assert Version.parse("1.0.0+a") == Version.parse("1.0.0+b")
    assert len({Version.parse("1.0.0+a"), Version.parse("1.0.0+b")}) == 1


def test_bump():
    assert str(Version.parse("1.2.3").bump("major")) == "2.0.0"
    assert str(Version.parse("1.2.3").bump("patch")) == "1.2.4"
    assert str(Version.parse("1.3.0-rc.1").bump("minor")) == "1.3.0"
    assert str(Version.parse("1.2.3-rc.1").bump("patch")) == "1.2.3"
    with pytest.raises(ValueError):
        Version(1, 0, 0).bump("build")
