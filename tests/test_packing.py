"""Packed forward passes: several messages per row, each computed as if it were alone."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from spam_gpt.checkpoint import ClassifierMeta
from spam_gpt.classifier import SpamClassifier
from spam_gpt.config import resolve_config
from spam_gpt.dataset import SpamDataset, create_loader, make_batch
from spam_gpt.model import GPTConfig, GPTModel, init_gpt2_weights
from spam_gpt.packing import pack_rows, packed_batch, packed_batches
from spam_gpt.precision import per_token_int8_runs_here
from spam_gpt.predictor import Predictor
from spam_gpt.training import calc_loss_batch, calc_loss_loader, confusion_matrix_loader

CONFIG = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2)


def classifier(token: str) -> SpamClassifier:
    torch.manual_seed(0)
    gpt = GPTModel(CONFIG)
    init_gpt2_weights(gpt)
    return SpamClassifier(gpt, token=token).eval()


def random_messages(count: int, longest: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50257) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def test_rows_hold_every_message_once_within_their_length():
    lengths = [30, 1, 12, 64, 7, 7, 20, 100, 3]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 32 or len(row) == 1
    assert rows[0] == [7] and rows[1] == [3]  # longest first, oversize alone
    assert len(rows) == 5  # 100 | 64 | 30+1 | 20+7+3 | 12+7


def test_single_message_rows_need_no_mask():
    batch = packed_batch([[1, 2, 3], [4, 5]], [[0], [1]])
    assert batch.attn_mask is None
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 50256]]
    assert batch.ends.tolist() == [2, 1]


def test_packed_rows_have_restarting_positions_and_a_block_mask():
    batch = packed_batch([[1, 2], [3, 4, 5]], [[1, 0]])
    assert batch.input_ids.tolist() == [[3, 4, 5, 1, 2]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.starts.tolist() == [0, 3] and batch.ends.tolist() == [2, 4]
    mask = batch.attn_mask[0, 0].int().tolist()
    assert mask[4] == [0, 0, 0, 1, 1] and mask[2] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("token", ["last_real", "first"])
def test_packed_logits_equal_each_message_alone(token):
    model = classifier(token)
    messages = random_messages(40, 60)
    with torch.no_grad():
        alone = torch.cat(
            [model(torch.tensor([ids]), torch.tensor([len(ids)])) for ids in messages]
        )
        packed = torch.zeros_like(alone)
        masked = []
        for order, batch in packed_batches(messages, row_tokens=64, max_tokens=192):
            packed[order] = model.packed_logits(batch)
            masked.append(batch.attn_mask is not None)
    assert len(masked) > 1 and any(masked)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_predictions_do_not_depend_on_the_company_a_message_keeps():
    model = classifier("last_real")
    meta = ClassifierMeta(CONFIG.to_dict(), "last_real", "batch", max_length=60)
    predictor = Predictor(model, meta, max_tokens=256)
    texts = ["Call now to win a prize", "see you at 6?", "ok", "Free entry " * 20] * 5
    together = [row[1] for row in predictor.class_probabilities(predictor.tokenize(texts))]
    alone = [predictor.class_probabilities(predictor.tokenize([text]))[0][1] for text in texts]
    assert together == pytest.approx(alone, abs=1e-6)
    assert len({round(p, 4) for p in together}) == 4  # the messages really differ


def test_int8_rows_of_64_hold_long_messages_alone_and_change_no_prediction():
    """GPT-2-sized models in int8 pack rows of 64 tokens (packing_for); a message longer
    than that gets a row of its own and the pass is as wide as it, and each token's
    activations are rounded on their own scale, so packing changes nothing."""
    config = GPTConfig(context_length=128, emb_dim=768, n_heads=12, n_layers=1)
    torch.manual_seed(0)
    gpt = GPTModel(config)
    init_gpt2_weights(gpt)
    meta = ClassifierMeta(config.to_dict(), "last_real", "batch", max_length=120)
    predictor = Predictor(SpamClassifier(gpt).eval(), meta, precision="int8")
    assert (predictor.row_tokens, predictor.max_tokens) == (64, 512)
    texts = ["Free entry to win a prize " * 20, "see you at 6?", "ok", "Call now " * 20] * 4
    ids = predictor.tokenize(texts)
    assert max(map(len, ids)) > 64 > min(map(len, ids))
    together = [row[1] for row in predictor.class_probabilities(ids)]
    alone = [predictor.class_probabilities([one])[0][1] for one in ids]
    # torch.ao, where the CPU lacks VNNI, rounds a whole pass on one scale.
    tolerance = 1e-5 if per_token_int8_runs_here() else 0.05
    assert together == pytest.approx(alone, abs=tolerance)
    assert len({round(p, 4) for p in together}) == 4


@pytest.mark.parametrize("token", ["last_real", "first"])
def test_packed_training_loss_and_gradients_equal_per_batch_padding(token):
    """What `fast` trains on: the same loss and the same gradient, to 1e-5, as padding
    each batch to its longest message."""
    messages = random_messages(8, 60, seed=3)
    labels = [i % 2 for i in range(8)]
    results = []
    for pack in (False, True):
        model = classifier(token).train()
        batch = make_batch(messages, labels, pad_to=None, pack=pack)
        assert (batch.packed is not None) == pack
        loss = calc_loss_batch(batch, model, torch.device("cpu"))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert padded_grads["gpt.trf_blocks.0.att.W_query.weight"].abs().sum() > 0


def test_packed_evaluation_counts_what_padded_evaluation_counts():
    model = classifier("last_real")
    dataset = SpamDataset(
        pd.DataFrame(
            {
                "Text": [f"message number {i} " * (i % 9 + 1) for i in range(50)],
                "Label": [i % 2 for i in range(50)],
            }
        )
    )
    loaders = [create_loader(dataset, 8, train=False, padding="batch", pack=p) for p in (0, 1)]
    device = torch.device("cpu")
    confusions = [confusion_matrix_loader(loader, model, device) for loader in loaders]
    assert torch.equal(confusions[0], confusions[1]) and confusions[0].sum() == 50
    losses = [calc_loss_loader(loader, model, device, 4) for loader in loaders]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_only_tokens_that_packing_leaves_unchanged_are_packed():
    assert resolve_config("fast").packs and resolve_config("tiny").packs
    assert not resolve_config("chapter").packs
    assert not resolve_config("fast", {"packing": "off"}).packs
    batch = make_batch([[1, 2, 3]], [0], pad_to=None, pack=True)
    with pytest.raises(ValueError, match="needs its padding"):
        classifier("last")(batch.input_ids, batch.lengths, batch.packed, batch.unpack)
