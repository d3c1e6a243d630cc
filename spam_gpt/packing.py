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

import numpy as np
import torch

from spam_gpt.tokenizer import PAD_TOKEN_ID

# Packed row length: longer rows pay for attention across the whole row (masked), shorter
# ones waste their tails. For inference over many messages, rows of 128 fill well and were
# fastest for gpt2-small on a CPU; a training batch holds a few messages (8 average 243
# tokens on the chapter's data), which rows of 128 would leave 22 % empty and one row of
# up to 512 leaves full.
ROW_TOKENS = 128
INT8_ROW_TOKENS = 64  # GPT-2-sized models in int8, where attention's share grows (predictor)
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
    """Tensors for ``rows`` of ``sequences`` (each non-empty); messages numbered in row order.
    Filled a row at a time in numpy: per-message tensor writes cost more than a tiny
    model's share of the pass."""
    lengths = [[len(sequences[i]) for i in row] for row in rows]
    width = max(map(sum, lengths))
    input_ids = np.full((len(rows), width), PAD_TOKEN_ID, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    for r, (row, sizes) in enumerate(zip(rows, lengths)):
        used = sum(sizes)
        input_ids[r, :used] = [token for i in row for token in sequences[i]]
        positions[r, :used] = np.concatenate([np.arange(n) for n in sizes])
        segments[r, :used] = np.repeat(np.arange(len(row)), sizes)
    ends = np.concatenate([np.cumsum(sizes) - 1 for sizes in lengths])
    starts = ends - np.concatenate(lengths) + 1
    located_rows = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    segment_ids = torch.from_numpy(segments)
    mask = None
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    return PackedBatch(
        torch.from_numpy(input_ids),
        torch.from_numpy(positions),
        mask,
        *(torch.from_numpy(a.astype(np.int64)) for a in (located_rows, starts, ends)),
    )


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
