"""Token embeddings that share their spelling, for models trained from random weights.

GPT-2's tokenizer gives `` free``, ``free``, `` Free`` and `` FREE`` rows of their own, and
a model that starts from random weights learns each row only from the messages that hold
that token: most of the 50,257 are never seen in a few thousand messages. With
``--embeddings spelled`` each token's embedding, while training, is its own row plus the
mean of vectors for the character n-grams of its spelling (lowercased, without the leading
space: 2 to 5 characters and the whole word), hashed into one shared table, as fastText
does for words. Tokens spelled alike start alike and learn together, and a token the
training messages never show still carries what its n-grams learnt elsewhere.

After training the n-gram part is folded into the plain embedding matrix
(:func:`fold_spelling`), so the saved model is the chapter's GPT: loaded, scored and served
as any other.
"""

from __future__ import annotations

import itertools
import zlib
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from spam_gpt.tokenizer import get_tokenizer

TABLE = "table"
SPELLED = "spelled"
EMBEDDINGS = (TABLE, SPELLED)
NGRAM_SIZES = range(2, 6)
NGRAM_BUCKETS = 1 << 15
# Measured on the tiny preset (benchmarks/RESULTS.md): the n-gram vectors start wider than
# GPT-2's 0.02, since a token's share is their mean over about twenty of them.
NGRAM_STD = 0.1
FOLD_CHUNK = 4096


def spelling_ngrams(token: bytes) -> set[str]:
    """The n-grams of a token's lowercased word, marked at both ends, and the word itself."""
    word = token.decode("utf-8", "replace").strip().lower()
    marked = f"<{word}>"
    grams = {f"word:{word}"}
    for n in NGRAM_SIZES:
        grams.update(marked[i : i + n] for i in range(max(1, len(marked) - n + 1)))
    return grams


def ngram_bucket(gram: str) -> int:
    """A stable hash (the same in every process, unlike ``hash``) into the shared table."""
    return zlib.crc32(gram.encode()) % NGRAM_BUCKETS


@cache
def vocabulary_ngrams() -> tuple[torch.Tensor, torch.Tensor]:
    """Every GPT-2 token's n-gram buckets, one after another, and where each token's start
    (the last entry is the total)."""
    encoding = get_tokenizer()
    per_token = [
        sorted({ngram_bucket(g) for g in spelling_ngrams(encoding.decode_single_token_bytes(t))})
        for t in range(encoding.n_vocab)
    ]
    starts = torch.tensor([0, *itertools.accumulate(map(len, per_token))])
    return torch.tensor(list(itertools.chain.from_iterable(per_token))), starts


class SpelledEmbedding(nn.Module):
    """``nn.Embedding``'s call, returning each token's row plus its spelling's n-gram mean."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        buckets, starts = vocabulary_ngrams()
        if table.num_embeddings != len(starts) - 1:
            raise ValueError(
                f"--embeddings {SPELLED} needs GPT-2's vocabulary of {len(starts) - 1} tokens, "
                f"not {table.num_embeddings}"
            )
        self.table = table
        self.ngrams = nn.Embedding(NGRAM_BUCKETS, table.embedding_dim)
        nn.init.normal_(self.ngrams.weight, std=NGRAM_STD)
        # Rebuilt from the tokenizer, so never saved.
        self.register_buffer("buckets", buckets, persistent=False)
        self.register_buffer("starts", starts, persistent=False)

    def spelled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean n-gram vector of each of ``tokens`` (one dimension)."""
        first = self.starts[tokens]
        counts = self.starts[tokens + 1] - first
        bag_starts = torch.cumsum(counts, 0) - counts
        flat = torch.arange(int(counts.sum()), device=tokens.device)
        flat += torch.repeat_interleave(first - bag_starts, counts)
        return F.embedding_bag(self.buckets[flat], self.ngrams.weight, bag_starts, mode="mean")

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        unique, where = torch.unique(token_ids, return_inverse=True)
        return self.table(token_ids) + self.spelled(unique)[where]

    @torch.no_grad()
    def folded(self) -> nn.Embedding:
        """The plain table, each row with its spelling's share added: the same embeddings."""
        tokens = torch.arange(self.table.num_embeddings, device=self.table.weight.device)
        for chunk in tokens.split(FOLD_CHUNK):
            self.table.weight[chunk] += self.spelled(chunk)
        return self.table


def spell_embeddings(gpt: nn.Module) -> None:
    """Give a freshly initialised GPT spelled token embeddings for training."""
    gpt.tok_emb = SpelledEmbedding(gpt.tok_emb)


def fold_spelling(gpt: nn.Module) -> None:
    """Put the plain ``nn.Embedding`` back, the n-grams folded in (after training)."""
    if isinstance(gpt.tok_emb, SpelledEmbedding):
        gpt.tok_emb = gpt.tok_emb.folded()
