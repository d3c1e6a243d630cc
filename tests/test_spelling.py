"""Spelled token embeddings: tokens spelled alike share n-grams and learn together, and
folding them into the plain table after training changes no embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spam_gpt.classifier import SpamClassifier
from spam_gpt.config import resolve_config
from spam_gpt.model import GPTConfig, GPTModel, init_gpt2_weights
from spam_gpt.spelling import (
    SpelledEmbedding,
    fold_spelling,
    spell_embeddings,
    spelling_ngrams,
    vocabulary_ngrams,
)
from spam_gpt.tokenizer import get_tokenizer

CONFIG = GPTConfig(
    vocab_size=50257, context_length=16, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0
)


def token(text: str) -> int:
    (only,) = get_tokenizer().encode(text)
    return only


@pytest.fixture
def spelled() -> SpelledEmbedding:
    torch.manual_seed(0)
    return SpelledEmbedding(nn.Embedding(CONFIG.vocab_size, CONFIG.emb_dim))


def test_case_and_the_leading_space_do_not_change_a_spelling():
    same = [token(t) for t in (" free", "free", " Free", " FREE")]
    assert len(set(same)) == 4, "GPT-2 gives each its own row"
    grams = [spelling_ngrams(get_tokenizer().decode_single_token_bytes(t)) for t in same]
    assert all(g == grams[0] for g in grams)
    assert {"<f", "free", "ree>", "word:free"} <= grams[0]
    assert "word:freedom" in spelling_ngrams(b" freedom") and "<free" in spelling_ngrams(
        b" freedom"
    )


def test_each_embedding_is_its_row_plus_the_mean_of_its_ngram_vectors(spelled):
    buckets, starts = vocabulary_ngrams()
    ids = torch.tensor([[token(" free"), token(" FREE"), token(" call"), 50256]])
    expected = torch.stack(
        [
            spelled.table.weight[t]
            + spelled.ngrams.weight[buckets[starts[t] : starts[t + 1]]].mean(0)
            for t in ids[0].tolist()
        ]
    )
    got = spelled(ids)[0]
    torch.testing.assert_close(got, expected)
    spelling = spelled.spelled(ids[0])
    assert torch.equal(spelling[0], spelling[1]) and not torch.equal(spelling[0], spelling[2])


def test_a_token_never_trained_on_learns_from_one_spelled_alike(spelled):
    seen, unseen, unrelated = token(" FREE"), token("free"), token(" tomorrow")
    before = spelled(torch.tensor([unseen, unrelated])).detach()
    optimizer = torch.optim.SGD(spelled.parameters(), lr=1.0)
    spelled(torch.tensor([[seen]])).sum().backward()
    optimizer.step()
    after = spelled(torch.tensor([unseen, unrelated])).detach()
    assert spelled.table.weight.grad[unseen].abs().sum() == 0, "its own row got no gradient"
    assert not torch.allclose(after[0], before[0]), "yet its embedding moved with ' FREE'"
    assert torch.equal(after[1], before[1]), "a token sharing no n-gram stays put"


def test_folding_gives_the_plain_classifier_the_same_logits():
    torch.manual_seed(1)
    gpt = GPTModel(CONFIG)
    init_gpt2_weights(gpt)
    spell_embeddings(gpt)
    classifier = SpamClassifier(gpt, token="last_real", num_classes=2).eval()
    ids = torch.tensor([[token(" free"), token(" call"), 11, 50256], [7, 8, 9, 10]])
    lengths = torch.tensor([3, 4])
    with torch.no_grad():
        spelled_logits = classifier(ids, lengths)
        fold_spelling(gpt)
        folded_logits = classifier(ids, lengths)
    assert type(gpt.tok_emb) is nn.Embedding
    assert set(classifier.state_dict()) == set(
        SpamClassifier(GPTModel(CONFIG), token="last_real", num_classes=2).state_dict()
    )
    torch.testing.assert_close(folded_logits, spelled_logits, rtol=0, atol=1e-6)


def test_spelled_embeddings_need_random_weights():
    assert resolve_config("tiny").embeddings == "spelled"
    assert resolve_config("chapter").embeddings == "table"
    with pytest.raises(ValueError, match="needs --weights random, not 'gpt2-small'"):
        resolve_config("chapter", {"embeddings": "spelled"})
    # The tiny recipe on pretrained weights keeps their table, unless asked otherwise.
    assert resolve_config("tiny", {"weights": "gpt2-small"}).embeddings == "table"
    with pytest.raises(ValueError, match="needs --weights random, not 'gpt2-small'"):
        resolve_config("tiny", {"weights": "gpt2-small", "embeddings": "spelled"})
    with pytest.raises(ValueError, match="embeddings must be one of table, spelled"):
        resolve_config("tiny", {"embeddings": "letters"})
