"""The pickle-free checkpoint loads exactly what was saved, without drawing the random
weights the file replaces, and refuses a file that lacks a tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from spam_gpt.checkpoint import (
    WEIGHTS_FILE,
    ClassifierMeta,
    load_classifier,
    save_classifier,
)
from spam_gpt.classifier import SpamClassifier
from spam_gpt.model import GPTConfig, GPTModel, init_gpt2_weights

CONFIG = GPTConfig(
    vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0
)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    gpt = GPTModel(CONFIG)
    init_gpt2_weights(gpt)
    classifier = SpamClassifier(gpt, token="last_real", num_classes=3)
    meta = ClassifierMeta(CONFIG.to_dict(), "last_real", "batch", 32, labels=["a", "b", "c"])
    return classifier, save_classifier(classifier, meta, tmp_path / "model")


def test_a_loaded_classifier_holds_every_saved_tensor_exactly(saved):
    classifier, folder = saved
    loaded, meta = load_classifier(folder)
    assert meta.labels == ["a", "b", "c"]
    expected, got = classifier.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.tensor([[5, 9, 200, 7]])
    lengths = torch.tensor([4])
    with torch.inference_mode():
        assert torch.equal(loaded(ids, lengths), classifier.eval()(ids, lengths))


def test_loading_draws_no_random_numbers_and_modules_built_after_it_do(saved):
    torch.manual_seed(0)
    load_classifier(saved[1])
    after_load = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(4)), "the load drew random weights"
    torch.manual_seed(0)
    drawn = torch.nn.Linear(64, 64).weight
    assert drawn.abs().max() <= 1 / 8 and drawn.std() > 0.05  # kaiming's uniform(-1/8, 1/8)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.nn.Linear(64, 64).weight)


def test_a_checkpoint_missing_a_tensor_is_refused_not_left_uninitialised(saved):
    folder = saved[1]
    tensors = load_file(folder / WEIGHTS_FILE)
    del tensors["gpt.final_norm.weight"]
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "spam-gpt-classifier"})
    with pytest.raises(RuntimeError, match=r"Missing key.*gpt\.final_norm\.weight"):
        load_classifier(folder)
