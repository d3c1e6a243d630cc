"""The offline tokenizer is tiktoken's own ``gpt2`` encoding."""

from __future__ import annotations

import hashlib
import shutil
from importlib import resources

import pytest
import tiktoken

from spam_gpt.corpus import bundled_corpus_bytes, parse_collection
from spam_gpt.tokenizer import PAD_TOKEN_ID, encode_text, get_tokenizer

TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


@pytest.fixture
def tiktoken_reference(tmp_path, monkeypatch) -> tiktoken.Encoding:
    """``tiktoken.get_encoding("gpt2")`` itself, its download cache pre-filled offline."""
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((TIKTOKEN_URL + name).encode()).hexdigest()
        source = resources.files("spam_gpt").joinpath("assets", "gpt2_bpe", name)
        with resources.as_file(source) as path:
            shutil.copy(path, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    from tiktoken.registry import ENCODINGS

    ENCODINGS.pop("gpt2", None)  # make get_encoding build it now, from that cache
    return tiktoken.get_encoding("gpt2")


def test_the_chapters_token_ids():
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Do you have time") == [5211, 345, 423, 640]
    assert tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [PAD_TOKEN_ID]
    assert tokenizer.n_vocab == 50257


def test_every_message_tokenizes_exactly_as_tiktoken(tiktoken_reference):
    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    texts += ["héllo 🙂 ünïcödé", "   spaces  \n\tand tabs", "it's we'll they've I'd"]
    ours = get_tokenizer()
    assert [ours.encode(t) for t in texts] == [tiktoken_reference.encode(t) for t in texts]
    assert ours.decode(ours.encode(texts[0])) == texts[0]


def test_user_text_cannot_inject_the_special_token():
    ids = encode_text("free <|endoftext|> prize")
    assert PAD_TOKEN_ID not in ids
    assert get_tokenizer().decode(ids) == "free <|endoftext|> prize"


def test_needs_no_cache_folder_and_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "absent"))
    fresh = get_tokenizer.__wrapped__()  # bypass the memo: build it again here
    assert fresh.encode("Do you have time") == [5211, 345, 423, 640]
    assert not (tmp_path / "absent").exists()
