"""Turning the GPT into a classifier: the new head (one output per label), which layers
train, and which token's hidden state the label is read from."""

from __future__ import annotations

import torch
from torch import nn

from spam_gpt.corpus import LABEL_NAMES
from spam_gpt.model import GPTModel
from spam_gpt.packing import PackedBatch
from spam_gpt.precision import autocast_for

SPAM_LABEL = "spam"
TRAINABLE_CHOICES = ("last_layer", "last_block", "last_two_blocks", "all")
TOKEN_CHOICES = ("last", "last_real", "first")


def is_spam_model(labels) -> bool:
    """Two labels, one of them ``spam`` (the chapter's, or ham/spam): such a model's
    answers also carry the ``spam_probability`` they always had."""
    return len(labels) == 2 and SPAM_LABEL in labels


class SpamClassifier(nn.Module):
    """A GPT whose ``out_head`` maps one token's hidden state to one logit per label.

    ``token`` picks that position: ``last`` is the chapter's (the final position, padding
    included), ``last_real`` the last non-padding token (with a causal mask, exactly the
    unpadded computation), ``first`` the first token.
    """

    def __init__(self, gpt: GPTModel, token: str = "last", num_classes: int = len(LABEL_NAMES)):
        super().__init__()
        if token not in TOKEN_CHOICES:
            raise ValueError(f"token must be one of {TOKEN_CHOICES}, not {token!r}")
        self.token = token
        self.precision = "auto"  # how forward autocasts: see spam_gpt.precision
        self.gpt = gpt
        if gpt.out_head.out_features != num_classes:
            gpt.out_head = nn.Linear(gpt.cfg.emb_dim, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        packed: PackedBatch | None = None,
        unpack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits per message of a padded batch; when the batch also comes ``packed``
        (a ``last_real`` or ``first`` model), from the packed rows, which give each
        message exactly its unpadded computation and skip the padding."""
        with autocast_for(input_ids.device, self.precision):
            if packed is not None:
                if self.token == "last":
                    raise ValueError("a model reading the last position needs its padding")
                return self.packed_logits(packed)[unpack]
            return self.padded_logits(input_ids, lengths)

    def padded_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, tokens = input_ids.shape
        rows = torch.arange(batch, device=input_ids.device)
        if self.token == "last":
            columns = torch.full_like(rows, tokens - 1)
        elif self.token == "first":
            columns = torch.zeros_like(rows)
        else:
            columns = lengths.to(input_ids.device) - 1
        return self.gpt.out_head(self.gpt.features(input_ids, read=(rows, columns)))

    def packed_logits(self, batch: PackedBatch) -> torch.Tensor:
        """Logits per packed message (see :mod:`spam_gpt.packing`): ``first`` reads a
        message's first column, ``last`` and ``last_real`` its last (a ``last`` model's
        messages arrive padded to its training length, so that is the chapter's position)."""
        columns = batch.starts if self.token == "first" else batch.ends
        read = (batch.rows, columns)
        hidden = self.gpt.features(batch.input_ids, batch.positions, batch.attn_mask, read)
        return self.gpt.out_head(hidden)


def set_trainable_layers(classifier: SpamClassifier, trainable: str) -> None:
    """Freeze the GPT, then unfreeze what ``trainable`` names (``last_block``: the chapter's
    last transformer block and final LayerNorm, plus the new head in every case)."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, not {trainable!r}")
    gpt = classifier.gpt
    gpt.requires_grad_(trainable == "all")
    gpt.out_head.requires_grad_(True)
    blocks = {"last_block": 1, "last_two_blocks": 2}.get(trainable, 0)
    if blocks:
        gpt.final_norm.requires_grad_(True)
        for block in gpt.trf_blocks[-blocks:]:
            block.requires_grad_(True)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
