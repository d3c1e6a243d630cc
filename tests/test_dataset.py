"""Datasets and loaders: the chapter's sizes, padding, batches, and worker shards."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from spam_gpt.corpus import build_splits
from spam_gpt.dataset import ShardedBatchSampler, SpamDataset, create_loader
from spam_gpt.tokenizer import PAD_TOKEN_ID

SPLITS = build_splits()


def datasets() -> dict[str, SpamDataset]:
    train = SpamDataset(SPLITS["train"])
    return {
        "train": train,
        **{n: SpamDataset(SPLITS[n], max_length=train.max_length) for n in ("validation", "test")},
    }


def test_max_length_is_the_longest_training_message_and_pads_with_50256():
    data = datasets()
    assert data["train"].max_length == 120
    loader = create_loader(data["validation"], 8, train=False, padding="fixed")
    batch = next(iter(loader))
    assert batch.input_ids.shape == (8, 120)
    first = batch.input_ids[0]
    assert (first[batch.lengths[0] :] == PAD_TOKEN_ID).all()
    assert first[: batch.lengths[0]].tolist() == data["validation"].encoded_texts[0]


def test_truncation_to_max_length():
    short = SpamDataset(SPLITS["test"], max_length=10)
    assert max(len(ids) for ids in short.encoded_texts) == 10


def test_chapter_batch_counts():
    counts = [len(create_loader(d, 8, train=name == "train")) for name, d in datasets().items()]
    assert counts == [130, 19, 38]


def test_batch_padding_pads_only_to_each_batchs_longest():
    loader = create_loader(datasets()["test"], 8, train=False, padding="batch")
    widths = [batch.input_ids.shape[1] for batch in loader]
    lengths = [int(batch.lengths.max()) for batch in loader]
    assert widths == lengths and max(widths) < 120


def test_one_worker_shuffles_exactly_like_the_chapters_dataloader():
    train = datasets()["train"]

    def three_epochs(loader: DataLoader, unpad) -> list:
        torch.manual_seed(123)
        return [[unpad(batch) for batch in loader] for _ in range(3)]

    chapter = DataLoader(
        train, batch_size=8, shuffle=True, drop_last=True, collate_fn=lambda items: items
    )
    ours = create_loader(train, 8, train=True)
    expected = three_epochs(chapter, lambda items: [ids for ids, _ in items])
    got = three_epochs(
        ours, lambda b: [row[:n] for row, n in zip(b.input_ids.tolist(), b.lengths.tolist())]
    )
    assert got == expected


def test_workers_split_each_global_batch_without_overlap():
    samplers = [
        ShardedBatchSampler(1045, 8, shuffle=True, drop_last=True, rank=r, world_size=2)
        for r in range(2)
    ]
    shards = []
    for sampler in samplers:
        torch.manual_seed(7)  # every worker seeds alike
        shards.append(list(sampler))
    single = ShardedBatchSampler(1045, 8, shuffle=True, drop_last=True)
    torch.manual_seed(7)
    whole = list(single)
    assert len(shards[0]) == len(shards[1]) == len(whole) == 130
    for k, batch in enumerate(whole):
        assert shards[0][k] + shards[1][k] == batch and len(shards[0][k]) == 4
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) == 1040  # each used once; 5 dropped as drop_last does


def test_validation_shards_cover_every_example_once():
    shards = [
        list(ShardedBatchSampler(149, 8, shuffle=False, drop_last=False, rank=r, world_size=2))
        for r in range(2)
    ]
    seen = sorted(i for shard in shards for batch in shard for i in batch)
    assert seen == list(range(149))
