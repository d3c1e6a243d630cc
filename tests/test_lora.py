"""LoRA through peft: the book's parameter count, merged weights that predict as the
adapted model did, and a checkpoint that is the plain classifier."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spam_gpt import lora
from spam_gpt.classifier import SpamClassifier, count_parameters
from spam_gpt.cli import main
from spam_gpt.config import resolve_config
from spam_gpt.model import GPTModel, model_config
from spam_gpt.predictor import Predictor

from .conftest import CHAPTER_HAM, CHAPTER_SPAM


def lora_classifier(model: str, rank: int = 16) -> SpamClassifier:
    torch.manual_seed(0)
    classifier = SpamClassifier(GPTModel(model_config(model)), token="last_real")
    lora.add_lora(classifier, rank, alpha=16)
    return classifier


def test_gpt2_small_trains_the_books_share_of_parameters():
    classifier = lora_classifier("gpt2-small")
    # The book's 2,666,528 adapts the head too; here the 2-label head trains in full.
    assert count_parameters(classifier, trainable_only=True) == 12 * 221_184 + 768 * 2 + 2
    lora.merge_lora(classifier)
    assert count_parameters(classifier) == 124_441_346  # the book's classifier, unchanged


def test_merged_weights_predict_like_the_adapters():
    classifier = lora_classifier("tiny", rank=4)
    for name, parameter in classifier.named_parameters():
        if "lora_" in name:  # B starts at zero; make every adapter count
            torch.nn.init.normal_(parameter, std=0.2)
    plain_keys = set(SpamClassifier(GPTModel(model_config("tiny"))).state_dict())
    ids = torch.randint(0, 50257, (3, 20))
    lengths = torch.tensor([20, 9, 1])
    classifier.eval()
    with torch.no_grad():
        adapted = classifier(ids, lengths)
        lora.merge_lora(classifier)
        merged = classifier(ids, lengths)
    assert (adapted - merged).abs().max() < 1e-5 * adapted.abs().max()
    assert set(classifier.state_dict()) == plain_keys


def test_lora_run_trains_under_a_tenth_and_saves_the_plain_classifier(tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["train", "--preset", "tiny", "--trainable", "lora", "--lora-rank", "8"]
    assert main([*args, "--epochs", "1", "--output", str(out)]) == 0
    assert "trainable (lora)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] < 0.1 * metrics["parameters"]
    assert metrics["config"]["lora_rank"] == 8
    with safe_open(out / "model" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not [name for name in names if "lora" in name]
    predictions = Predictor.from_checkpoint(out / "model").predict([CHAPTER_SPAM, CHAPTER_HAM])
    assert len(predictions) == 2


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setattr(lora, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'spam-gpt\[lora\]'"):
        resolve_config("tiny", {"trainable": "lora"})
