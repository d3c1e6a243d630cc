"""Pretrained-weight loading, proven against transformers on a random small GPT-2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from spam_gpt.cli import main
from spam_gpt.model import generate_text_simple
from spam_gpt.tokenizer import encode_text, get_tokenizer
from spam_gpt.weights import WeightsNotFound, load_pretrained_gpt, resolve_weights

PROMPT = "Every effort moves you"


def hub_layout(hf_dir: Path, target: Path) -> Path:
    """The same weights as the Hub publishes them: no ``transformer.`` prefix, no lm_head."""
    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(hf_dir / "model.safetensors")
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(plain, target / "model.safetensors")
    shutil.copy(hf_dir / "config.json", target / "config.json")
    return target


def assert_matches_transformers(ours: torch.nn.Module, reference: GPT2LMHeadModel) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        difference = (ours(ids) - reference(ids).logits).abs().max().item()
    assert difference <= 1e-4


def test_save_pretrained_layout_matches_transformers_logits(hf_gpt2_dir):
    ours, folder = load_pretrained_gpt(str(hf_gpt2_dir))
    assert folder == hf_gpt2_dir
    assert_matches_transformers(ours.eval(), GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval())


def test_hub_layout_matches_transformers_logits(hf_gpt2_dir, tmp_path):
    plain = hub_layout(hf_gpt2_dir, tmp_path / "gpt2")
    ours, _ = load_pretrained_gpt(str(plain))
    assert_matches_transformers(ours.eval(), GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval())


def transformers_greedy(hf_dir: Path, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy continuation by transformers itself (never stopping at end-of-text)."""
    reference = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    return reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=50256,
    )


def test_greedy_generation_matches_transformers(hf_gpt2_dir):
    ours, _ = load_pretrained_gpt(str(hf_gpt2_dir))
    ids = torch.tensor([encode_text(PROMPT)])
    expected = transformers_greedy(hf_gpt2_dir, ids, 15)
    assert torch.equal(generate_text_simple(ours, ids, 15, 256), expected)


def test_generate_command_prints_prompt_and_greedy_continuation(hf_gpt2_dir, capsys):
    expected = transformers_greedy(hf_gpt2_dir, torch.tensor([encode_text(PROMPT)]), 8)
    args = ["generate", "--weights", str(hf_gpt2_dir), "--prompt", PROMPT, "--max-new-tokens", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith(PROMPT)
    assert printed == get_tokenizer().decode(expected[0].tolist())


def test_sharded_checkpoint_loads(hf_gpt2_dir, tmp_path):
    reference = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_pretrained_gpt(str(tmp_path))
    assert_matches_transformers(ours.eval(), reference)


def test_weights_are_found_in_the_hugging_face_cache(hf_gpt2_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    hub_layout(hf_gpt2_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_weights("gpt2-small") == snapshot
    assert resolve_weights("openai-community/gpt2") == snapshot


def test_weights_are_downloaded_from_the_hub_when_online(
    hf_gpt2_dir, tmp_path, monkeypatch, http_folder
):
    hub = tmp_path / "hub-site"
    hub_layout(hf_gpt2_dir, hub / "openai-community" / "gpt2-medium" / "resolve" / "main")
    monkeypatch.setenv("HF_ENDPOINT", http_folder(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("SPAM_GPT_CACHE", str(tmp_path / "spam-gpt-cache"))
    folder = resolve_weights("gpt2-medium")
    assert folder.is_relative_to(tmp_path / "spam-gpt-cache")
    ours, _ = load_pretrained_gpt("gpt2-medium")  # second time: from the cache, no download
    assert_matches_transformers(ours.eval(), GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval())


def test_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound, match="--weights PATH"):
        resolve_weights("gpt2-small")
    assert main(["generate", "--weights", "gpt2-xl", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--weights random" in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"no config\.json"):
        resolve_weights(str(tmp_path))
