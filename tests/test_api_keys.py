"""Where API keys come from, and how an offered key is checked."""

from __future__ import annotations

import pytest

from spam_gpt.api_keys import KEYS_VARIABLE, ApiKeyError, KeyCheck, read_api_keys


def test_keys_come_from_the_file_and_the_environment(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team A\nalpha-key\n\n  beta-key  \n")
    keys = read_api_keys(str(key_file), {KEYS_VARIABLE: "gamma, delta,"})
    assert sorted(keys) == ["alpha-key", "beta-key", "delta", "gamma"]
    assert read_api_keys(None, {}) == []  # no keys: an open endpoint
    key_file.write_text("\ufeffalpha-key\r\nbeta-key\r\n", encoding="utf-8")  # Windows Notepad
    assert read_api_keys(str(key_file), {}) == ["alpha-key", "beta-key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the API key file"), ("# only a comment\n\n", "holds no key")],
)
def test_a_bad_key_file_is_refused_with_the_reason(tmp_path, content, message):
    key_file = tmp_path / "keys"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ApiKeyError, match=message):
        read_api_keys(str(key_file), {})


def test_a_key_with_white_space_is_refused():
    with pytest.raises(ApiKeyError, match="white space"):
        read_api_keys(None, {KEYS_VARIABLE: "two words"})


def test_only_a_listed_key_is_allowed():
    check = KeyCheck(["alpha-key", "beta-key"])
    assert check.required
    assert check.allows("alpha-key") and check.allows("beta-key")
    for wrong in (None, "", "alpha", "alpha-key ", "ALPHA-KEY", "gamma"):
        assert not check.allows(wrong)
    open_check = KeyCheck([])
    assert not open_check.required and open_check.allows(None)


def test_only_digests_are_kept():
    check = KeyCheck(["alpha-key"])
    assert all(b"alpha-key" not in digest for digest in check.digests)
