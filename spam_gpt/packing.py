"""Packing several messages into one row, so that a forward pass computes no padding.

SMS messages are short (a median of 17 tokens) and uneven, so a batch padded to its
longest message spends most of its arithmetic on padding. A packed row holds messages
one after another; each token's position restarts with its message, and a block-diagonal
causal mask keeps every message from seeing its neighbours: each message's hidden states
equal those of its own unpadded forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from spam_gpt.tokenizer import PAD_TOKEN_ID

# Packed row length: longer rows pay for attention across the whole row (masked), shorter
# ones waste their tails. For inference over many messages, rows of 128 fill well and were
# fastest for gpt2-small on a CPU; a training batch holds a few messages (8 average 243
# tokens on the chapter's data), which rows of 128 would leave 22 % empty and one row of
# up to 512 leaves full.
ROW_TOKENS = 128
BATCH_ROW_TOKENS = 512


class PackedBatch(NamedTuple):
    """One forward pass. Message ``i`` (in the order given) sits in row ``rows[i]`` from
    column ``starts[i]`` to ``ends[i]`` inclusive. ``attn_mask`` is None when every row holds
    one message, which plain causal attention already handles."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_mask: torch.Tensor | None
    rows: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(None if t is None else t.to(device) for t in self))


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Message indices per row, longest first, each into the first row with room
    (first-fit decreasing). A message longer than ``row_tokens`` gets a row of its own."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_tokens - lengths[i])
    return rows


def packed_batch(sequences: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> PackedBatch:
    """Tensors for ``rows`` of ``sequences`` (each non-empty); messages numbered in row order."""
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    where: list[tuple[int, int, int]] = []
    for r, row in enumerate(rows):
        column = 0
        for k, i in enumerate(row):
            n = len(sequences[i])
            input_ids[r, column : column + n] = torch.tensor(sequences[i])
            positions[r, column : column + n] = torch.arange(n)
            segments[r, column : column + n] = k
            where.append((r, column, column + n - 1))
            column += n
    mask = None
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    located = torch.tensor(where, dtype=torch.long)
    return PackedBatch(input_ids, positions, mask, *located.unbind(1))


def pack_sequences(sequences: Sequence[Sequence[int]]) -> tuple[PackedBatch, torch.Tensor]:
    """One packed pass over ``sequences`` (each non-empty) and, for its logits, the
    indices that put them back in the order of ``sequences``."""
    rows = pack_rows([len(s) for s in sequences], max(BATCH_ROW_TOKENS, *map(len, sequences)))
    order = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    return packed_batch(sequences, rows), torch.argsort(order)


def packed_batches(
    sequences: Sequence[Sequence[int]], row_tokens: int, max_tokens: int
) -> Iterator[tuple[list[int], PackedBatch]]:
    """Forward passes of at most ``max_tokens`` tokens (whole rows) over all ``sequences``;
    each with the indices of its messages, in the order of the batch's messages."""
    rows = pack_rows([len(s) for s in sequences], row_tokens)
    rows_per_pass = max(1, max_tokens // row_tokens)
    for first in range(0, len(rows), rows_per_pass):
        chunk = rows[first : first + rows_per_pass]
        yield [i for row in chunk for i in row], packed_batch(sequences, chunk)
