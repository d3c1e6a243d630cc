"""One predictor for ``classify``, Ray Data scoring and Ray Serve alike.

It loads a model once, then for each call tokenizes, truncates as the chapter does, packs
messages into rows with no padding between them (:mod:`spam_gpt.packing`), and runs
forward passes of a bounded number of tokens under ``torch.inference_mode``. Models that
read the last position (the chapter's ``last``) get each message padded to their training
length first, because that padding changes their answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from spam_gpt.checkpoint import ClassifierMeta, load_classifier
from spam_gpt.classifier import SPAM_LABEL, SpamClassifier, is_spam_model
from spam_gpt.packing import INT8_ROW_TOKENS, ROW_TOKENS, packed_batches
from spam_gpt.precision import (
    WEIGHT_DTYPES,
    autocast_for,
    quantize_int8,
    require_cpu_for_int8,
)
from spam_gpt.tokenizer import PAD_TOKEN_ID, encode_text


class Prediction(NamedTuple):
    """The most probable label, its probability, and every label's."""

    label: str
    probability: float
    probabilities: dict[str, float]

    @property
    def spam_probability(self) -> float | None:
        """P(spam) of a spam/not-spam model (see ``is_spam_model``), else None."""
        return self.probabilities[SPAM_LABEL] if is_spam_model(self.probabilities) else None


def default_max_tokens(emb_dim: int) -> int:
    """Tokens per forward pass: 1,024 for GPT-2's 768 dimensions (measured fastest for
    gpt2-small on a CPU), scaled so that each pass does about the same work (a pass costs
    tokens x emb_dim^2), because a small model is bound by per-pass overhead instead."""
    return 1024 * (768 // min(emb_dim, 768)) ** 2


def packing_for(emb_dim: int, precision: str, max_length: int) -> tuple[int, int]:
    """Tokens per packed row and per forward pass.

    GPT-2-sized models in int8 take rows of 64 and passes of 512 tokens: their products
    run about 3x faster than fp32's, so attention (fp32, each token across its whole
    row) and the fp32 values between the products (the GELU's 4 x emb_dim per token, out
    of cache in large passes) take a larger share. Two single-thread processes, as a
    scoring job runs, scored 9-22 % more messages/s of gpt2-small so (summed over both, in
    rounds alternating with the old layout; benchmarks/RESULTS.md).
    Smaller models are bound by per-pass overhead and keep the fp32 layout."""
    if precision == "int8" and emb_dim >= 768:
        return INT8_ROW_TOKENS, default_max_tokens(emb_dim) // 2
    return max(ROW_TOKENS, max_length), default_max_tokens(emb_dim)


class Predictor:
    def __init__(
        self,
        classifier: SpamClassifier,
        meta: ClassifierMeta,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        max_tokens: int | None = None,
        compile_int8: bool = False,
    ):
        """``compile_int8``: int8 rounds with torch.compile's kernels (about 8 % faster on
        gpt2-small, seconds to compile once per process), for predictors that run long:
        scoring actors and Serve replicas."""
        if precision not in WEIGHT_DTYPES:
            raise ValueError(
                f"precision must be one of {', '.join(WEIGHT_DTYPES)}, not {precision!r}"
            )
        self.device = torch.device(device)
        require_cpu_for_int8(precision, self.device.type)
        self.precision = precision
        # bf16 weights: about 3x faster on CPUs with AMX, probabilities within about 0.01.
        self.classifier = classifier.to(self.device, WEIGHT_DTYPES[precision]).eval()
        if precision == "int8":
            self.classifier = quantize_int8(self.classifier, compiled=compile_int8)
        self.meta = meta
        context = classifier.gpt.cfg.context_length
        self.max_length = min(meta.max_length, context)
        self.pad_to = meta.max_length if meta.token == "last" else None
        row, tokens = packing_for(classifier.gpt.cfg.emb_dim, precision, self.max_length)
        self.max_tokens = max_tokens or tokens
        self.row_tokens = max(row, self.pad_to or 0)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> Predictor:
        return cls(*load_classifier(path), **kwargs)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [encode_text(text)[: self.max_length] for text in texts]

    def class_probabilities(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each label's probability per message, in input order, from token ids."""
        if self.pad_to:
            token_ids = [list(ids) + [PAD_TOKEN_ID] * (self.pad_to - len(ids)) for ids in token_ids]
        sequences = [ids or [PAD_TOKEN_ID] for ids in token_ids]
        probabilities: list[list[float]] = [[]] * len(sequences)
        with torch.inference_mode():
            for order, batch in packed_batches(sequences, self.row_tokens, self.max_tokens):
                with autocast_for(self.device, self.precision):
                    logits = self.classifier.packed_logits(batch.to(self.device))
                rows = torch.softmax(logits.float(), dim=-1).cpu().tolist()
                for i, row in zip(order, rows):
                    probabilities[i] = row
        return probabilities

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Label, its probability and every label's probability per text, in input order."""
        labels = self.meta.labels
        predictions = []
        for row in self.class_probabilities(self.tokenize(texts)):
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(Prediction(labels[best], row[best], dict(zip(labels, row))))
        return predictions
