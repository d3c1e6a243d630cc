"""Token datasets and loaders with the chapter's semantics, plus per-batch padding.

Padding lives in the collate function rather than in the dataset, so one dataset serves
both modes: ``fixed`` pads every batch to ``max_length`` (the chapter), ``batch`` pads to
the longest message in the batch (the same predictions under ``last_real``, far faster).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spam_gpt.packing import PackedBatch, pack_sequences
from spam_gpt.tokenizer import PAD_TOKEN_ID, encode_text

PADDING_MODES = ("fixed", "batch")


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (batch, tokens), right-padded with 50256
    labels: torch.Tensor  # (batch,)
    lengths: torch.Tensor  # (batch,) tokens before padding, at least 1
    packed: PackedBatch | None = None  # the same messages packed into rows, when packing
    unpack: torch.Tensor | None = None  # puts the packed logits back in batch order


class SpamDataset(Dataset):
    """Pre-tokenised messages truncated to ``max_length`` (default: the longest one)."""

    def __init__(self, frame: pd.DataFrame, max_length: int | None = None):
        self.labels = [int(label) for label in frame["Label"]]
        self.encoded_texts = [encode_text(text) for text in frame["Text"]]
        self.max_length = max_length or self._longest_encoded_length()
        self.encoded_texts = [ids[: self.max_length] for ids in self.encoded_texts]

    @classmethod
    def from_rows(cls, rows: Sequence[dict], max_length: int) -> SpamDataset:
        """Rows already tokenized (``input_ids`` and a ``label`` index), truncated."""
        dataset = cls.__new__(cls)
        dataset.labels = [int(row["label"]) for row in rows]
        dataset.encoded_texts = [[int(i) for i in row["input_ids"]][:max_length] for row in rows]
        dataset.max_length = max_length
        return dataset

    def _longest_encoded_length(self) -> int:
        return max(len(ids) for ids in self.encoded_texts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded_texts[index], self.labels[index]


def pad_token_ids(
    sequences: Sequence[Sequence[int]], pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with 50256 to ``pad_to`` (or the longest sequence); return ids, lengths.

    An empty sequence becomes a single pad token, so every row has a last real position.
    """
    lengths = [max(len(ids), 1) for ids in sequences]
    width = pad_to or max(lengths, default=1)
    rows = [list(ids) + [PAD_TOKEN_ID] * (width - len(ids)) for ids in sequences]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)


def make_batch(
    sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_to: int | None, pack: bool
) -> Batch:
    """Padded tensors for a batch and, with ``pack``, the same messages packed into rows
    (see :mod:`spam_gpt.packing`), which a model reading the last real or the first
    token computes with no padding at all."""
    input_ids, lengths = pad_token_ids(sequences, pad_to)
    label_tensor = torch.tensor(list(labels), dtype=torch.long)
    if not pack:
        return Batch(input_ids, label_tensor, lengths)
    packed, unpack = pack_sequences([list(ids) or [PAD_TOKEN_ID] for ids in sequences])
    return Batch(input_ids, label_tensor, lengths, packed, unpack)


class PadCollator:
    """Collate ``(ids, label)`` pairs into a :class:`Batch` (picklable for workers)."""

    def __init__(self, pad_to: int | None, pack: bool = False):
        self.pad_to = pad_to
        self.pack = pack

    def __call__(self, items: list[tuple[list[int], int]]) -> Batch:
        return make_batch([ids for ids, _ in items], [y for _, y in items], self.pad_to, self.pack)


class ShardedBatchSampler(Sampler[list[int]]):
    """This worker's share of each global batch.

    All workers draw the same permutation (seeded like ``RandomSampler`` from the global
    torch RNG, which every worker seeds alike), cut it into global batches of
    ``batch_size``, and take the ``rank``-th slice of each. So N workers process exactly the
    batches one process would, every example once per epoch, and with one worker the
    order equals ``DataLoader(shuffle=True)``'s after the same ``torch.manual_seed``.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} is global and must divide evenly among "
                f"{world_size} workers; choose a multiple of {world_size}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.per_worker = batch_size // world_size

    def __len__(self) -> int:
        whole = self.num_examples / self.batch_size
        return math.floor(whole) if self.drop_last else math.ceil(whole)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for k in range(len(self)):
            start = k * self.batch_size + self.rank * self.per_worker
            end = min(start + self.per_worker, (k + 1) * self.batch_size)
            yield order[start:end]


def create_loader(
    dataset: SpamDataset,
    batch_size: int,
    *,
    train: bool,
    padding: str = "fixed",
    rank: int = 0,
    world_size: int = 1,
    pack: bool = False,
) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch; the others keep order.
    ``pack`` adds the packed rows to every batch (see :func:`make_batch`)."""
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, not {padding!r}")
    sampler = ShardedBatchSampler(
        len(dataset), batch_size, shuffle=train, drop_last=train, rank=rank, world_size=world_size
    )
    pad_to = dataset.max_length if padding == "fixed" else None
    collate = PadCollator(pad_to, pack)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
