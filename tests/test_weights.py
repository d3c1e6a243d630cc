"""Pretrained-weight loading, proven against transformers on random small GPT-2s whose
activations are the size real GPT-2's are (see ``conftest.real_scale_gpt2``), and fetching
through huggingface_hub from a local Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, GPT2Model

from spam_gpt.cli import main
from spam_gpt.model import GPTConfig, generate_text_simple
from spam_gpt.packing import pack_sequences
from spam_gpt.tokenizer import encode_text, get_tokenizer
from spam_gpt.weights import (
    INDEX_FILE,
    WeightsNotFound,
    cached_weights,
    is_weights_folder,
    load_pretrained_gpt,
    read_hf_config,
    resolve_weights,
)

from .conftest import free_port
from .fake_hub import folder_files, hub_layout, published

PROMPT = "Every effort moves you"


# How close is close: transformers fuses the query, key and value projections into one
# Conv1D where the chapter keeps three Linear layers, so the two add in different orders; on
# the real-scale model they agree to about 1e-6 of the logits' largest magnitude. Every slip
# this suite guards against moves them further: the exact GELU by 3.8e-4, the LayerNorm
# epsilon by 4e-3, a bias or LayerNorm parameter from the wrong tensor or an untransposed
# weight by 0.3 or more. 1e-5 lies between, with room on both sides.
RELATIVE_TOLERANCE = 1e-5


def relative_difference(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def assert_matches_transformers(ours: torch.nn.Module, reference: GPT2LMHeadModel) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        assert relative_difference(ours(ids), reference(ids).logits) <= RELATIVE_TOLERANCE


def test_the_real_scale_model_has_real_scale_activations(scaled_gpt2_dir):
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    tensors = dict(reference.named_parameters())
    for name, tensor in tensors.items():
        assert (tensor != 0).all() and (tensor != 1).all(), name
    values = [tuple(t.flatten()[:4].tolist()) for t in tensors.values()]
    assert len(set(values)) == len(values)  # every tensor its own
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states
    norms = [h.norm(dim=-1).mean().item() for h in hidden]
    assert norms[0] < 2 and 100 < norms[1] < norms[2] < 1000  # embeddings small, then hundreds


def test_save_pretrained_layout_matches_transformers_logits(scaled_gpt2_dir):
    ours, folder = load_pretrained_gpt(str(scaled_gpt2_dir))
    assert folder == scaled_gpt2_dir
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    assert_matches_transformers(ours.eval(), reference)


def test_hub_layout_matches_transformers_logits(scaled_gpt2_dir, tmp_path):
    plain = hub_layout(scaled_gpt2_dir, tmp_path / "gpt2")
    ours, _ = load_pretrained_gpt(str(plain))
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    assert_matches_transformers(ours.eval(), reference)


def padded_messages() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded messages of uneven length, as a batch of the fast preset holds."""
    generator = torch.Generator().manual_seed(2)
    lengths = torch.tensor([40, 7, 23, 1, 31])
    ids = torch.randint(0, 50256, (len(lengths), 40), generator=generator)
    ids[torch.arange(40) >= lengths[:, None]] = 50256
    return ids, lengths


def test_last_real_token_features_match_transformers(scaled_gpt2_dir):
    """What a ``last_real`` classifier reads, padded and packed, against transformers'
    hidden state of each message's last token under its attention mask."""
    ours, _ = load_pretrained_gpt(str(scaled_gpt2_dir))
    ours.eval()
    reference = GPT2Model.from_pretrained(scaled_gpt2_dir).eval()
    ids, lengths = padded_messages()
    rows = torch.arange(len(lengths))
    mask = (torch.arange(40) < lengths[:, None]).long()
    packed, unpack = pack_sequences([row[:n].tolist() for row, n in zip(ids, lengths)])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state[rows, lengths - 1]
        padded = ours.features(ids)[rows, lengths - 1]
        hidden = ours.features(packed.input_ids, packed.positions, packed.attn_mask)
        from_packed = hidden[packed.rows, packed.ends][unpack]
    assert relative_difference(padded, expected) <= RELATIVE_TOLERANCE
    assert relative_difference(from_packed, expected) <= RELATIVE_TOLERANCE


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


def test_greedy_generation_matches_transformers(scaled_gpt2_dir, tmp_path):
    """From the Hub's layout, which has no ``lm_head``: the output head must be the token
    embeddings, tied, as GPT-2's is."""
    ours, _ = load_pretrained_gpt(str(hub_layout(scaled_gpt2_dir, tmp_path / "hub")))
    ids = torch.tensor([encode_text(PROMPT)])
    expected = transformers_greedy(scaled_gpt2_dir, ids, 15)
    assert torch.equal(generate_text_simple(ours, ids, 15, 256), expected)
    assert len(set(expected[0, ids.shape[1] :].tolist())) > 3  # a continuation, not a loop


def test_generate_command_prints_prompt_and_greedy_continuation(scaled_gpt2_dir, capsys):
    expected = transformers_greedy(scaled_gpt2_dir, torch.tensor([encode_text(PROMPT)]), 8)
    weights = str(scaled_gpt2_dir)
    args = ["generate", "--weights", weights, "--prompt", PROMPT, "--max-new-tokens", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith(PROMPT)
    assert printed == get_tokenizer().decode(expected[0].tolist())


def test_sharded_checkpoint_loads(scaled_gpt2_dir, tmp_path):
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_pretrained_gpt(str(tmp_path))
    assert_matches_transformers(ours.eval(), reference)


def test_a_hub_name_is_downloaded_into_the_hugging_face_cache(scaled_gpt2_dir, tmp_path, hub):
    commit = hub.repo("openai-community/gpt2-medium").add(published(scaled_gpt2_dir, tmp_path))
    folder = resolve_weights("gpt2-medium")
    cache = tmp_path / "hf-cache" / "models--openai-community--gpt2-medium"
    assert folder == cache / "snapshots" / commit  # the cache transformers shares
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert hub.downloads("pytorch_model.bin") == 0 and hub.downloads("README.md") == 0
    ours, _ = load_pretrained_gpt("gpt2-medium")  # again: from the cache, nothing fetched
    assert hub.downloads("model.safetensors") == 1
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    assert_matches_transformers(ours.eval(), reference)


def test_a_revision_picks_that_commit(scaled_gpt2_dir, tmp_path, hub):
    repo = hub.repo("team/sms-gpt2")
    old = repo.add(published(scaled_gpt2_dir, tmp_path), "main", "v1")
    newer = folder_files(hub_layout(scaled_gpt2_dir, tmp_path / "newer"))
    newer["config.json"] = newer["config.json"].replace(b'"n_head": 4', b'"n_head": 2')
    new = repo.add(newer, "main")
    assert resolve_weights("team/sms-gpt2").name == new
    assert resolve_weights("team/sms-gpt2@v1").name == old
    assert resolve_weights(f"team/sms-gpt2@{old}").name == old
    assert load_pretrained_gpt("team/sms-gpt2@v1")[0].cfg.n_heads == 4
    with pytest.raises(WeightsNotFound, match="team/sms-gpt2 has no revision 'v9'"):
        resolve_weights("team/sms-gpt2@v9")


def test_a_sharded_repository_fetches_every_shard(scaled_gpt2_dir, tmp_path, hub):
    reference = GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).eval()
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = folder_files(tmp_path / "sharded")
    shards = [name for name in files if name.startswith("model-")]
    assert len(shards) > 1
    hub.repo("team/sharded").add(files)
    folder = resolve_weights("team/sharded")
    assert {p.name for p in folder.iterdir()} == {"config.json", INDEX_FILE, *shards}
    assert_matches_transformers(load_pretrained_gpt("team/sharded")[0].eval(), reference)


def test_a_private_repository_needs_hf_token(scaled_gpt2_dir, tmp_path, hub, monkeypatch):
    hub.repo("team/private").add(published(scaled_gpt2_dir, tmp_path))
    hub.repo("team/private").token = "hf_secret"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(WeightsNotFound, match=r"private or gated.*HF_TOKEN"):
        resolve_weights("team/private")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert is_weights_folder(resolve_weights("team/private"))
    sent = {headers.get("authorization") for _, path, headers in hub.requests if "private" in path}
    assert "Bearer hf_secret" in sent


def test_offline_uses_the_cached_snapshot_and_nothing_else(
    scaled_gpt2_dir, tmp_path, hub, monkeypatch
):
    import huggingface_hub.constants as hf

    commit = hub.repo("openai-community/gpt2").add(published(scaled_gpt2_dir, tmp_path))
    assert resolve_weights("gpt2-small").name == commit
    asked = len(hub.requests)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert resolve_weights("gpt2-small").name == commit
    assert cached_weights("gpt2-small").name == commit
    assert len(hub.requests) == asked  # offline: not one request
    assert cached_weights("gpt2-large") is None
    with pytest.raises(WeightsNotFound, match="not in the Hugging Face cache, and offline"):
        resolve_weights("gpt2-large")


def test_an_unreachable_hub_is_not_retried_and_the_cache_still_serves(
    scaled_gpt2_dir, tmp_path, hub, monkeypatch, caplog
):
    """huggingface_hub would try a host that refuses connections five times over about
    25 s, logging each try: a laptop on a train gets the cache, or the error, at once."""
    import huggingface_hub.constants as hf

    commit = hub.repo("openai-community/gpt2").add(published(scaled_gpt2_dir, tmp_path))
    assert resolve_weights("gpt2-small").name == commit
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(hf, "ENDPOINT", nowhere)
    monkeypatch.setattr(
        hf, "HUGGINGFACE_CO_URL_TEMPLATE", nowhere + "/{repo_id}/resolve/{revision}/{filename}"
    )
    assert resolve_weights("gpt2-small").name == commit
    with pytest.raises(WeightsNotFound, match="not in the Hugging Face cache, and offline"):
        resolve_weights("gpt2-large")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_another_architecture_is_refused_before_its_weights_are_fetched(hub):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    hub.repo("meta/tiny-llama").add(
        {"config.json": json.dumps(config).encode(), "model.safetensors": b"x" * 1000}
    )
    with pytest.raises(
        WeightsNotFound,
        match=r"meta/tiny-llama holds a 'llama' model \(LlamaForCausalLM\), not GPT-2",
    ):
        resolve_weights("meta/tiny-llama")
    assert hub.downloads("model.safetensors") == 0


def test_offline_without_weights_says_how_to_provide_them(tmp_path):
    """As a user runs it: HF_HUB_OFFLINE=1 in the environment, an empty cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    command = ["generate", "--weights", "gpt2-xl", "--prompt", "hi"]
    done = subprocess.run(
        [sys.executable, "-m", "spam_gpt.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--weights PATH" in lines[0] and "--weights random" in lines[0]
    assert "hf download openai-community/gpt2-xl" in lines[0]


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"no config\.json"):
        resolve_weights(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(WeightsNotFound, match=r"has no model\.safetensors"):
        resolve_weights(str(tmp_path))  # a config alone is not a checkpoint
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle, never opened")
    with pytest.raises(WeightsNotFound, match=r"pytorch_model\.bin, a PyTorch pickle, which"):
        resolve_weights(str(tmp_path))  # what older downloads hold: named, with a way out


def sharded(scaled_gpt2_dir: Path, folder: Path) -> dict[str, bytes]:
    GPT2LMHeadModel.from_pretrained(scaled_gpt2_dir).save_pretrained(folder, max_shard_size="200KB")
    return folder_files(folder)


def test_a_revision_is_cached_and_found_again_without_a_request(scaled_gpt2_dir, tmp_path, hub):
    """Each file of a revision comes from that revision, and the cache finds it again with
    the Hub online but not asked: a single-file and a sharded repository whose ``main``
    holds something else."""
    single, shards = hub.repo("team/single"), hub.repo("team/shards")
    v1_single = single.add(published(scaled_gpt2_dir, tmp_path), "v1")
    v1_shards = shards.add(sharded(scaled_gpt2_dir, tmp_path / "sharded"), "v1")
    other = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"not weights"}
    single.add(other, "main")
    shards.add(other, "main")
    assert resolve_weights("team/single@v1").name == v1_single
    assert resolve_weights("team/shards@v1").name == v1_shards
    assert (resolve_weights("team/shards@v1") / INDEX_FILE).is_file()
    asked = len(hub.requests)
    assert cached_weights("team/single@v1").name == v1_single
    assert cached_weights("team/shards@v1").name == v1_shards
    assert cached_weights("team/single") is None  # main was never fetched
    assert len(hub.requests) == asked


def test_a_revision_without_weights_is_named_with_it(hub):
    hub.repo("team/config-only").add({"config.json": b'{"model_type": "gpt2"}'}, "v2")
    with pytest.raises(WeightsNotFound, match=r"team/config-only@v2 has no config\.json with"):
        resolve_weights("team/config-only@v2")


def write_config(folder: Path, **fields) -> Path:
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **fields}))
    return folder


def test_a_config_without_sizes_is_gpt2_small(tmp_path):
    assert read_hf_config(write_config(tmp_path)) == GPTConfig(
        vocab_size=50257,
        context_length=1024,
        emb_dim=768,
        n_heads=12,
        n_layers=12,
        drop_rate=0.0,
        qkv_bias=True,
    )
    sized = write_config(tmp_path, n_ctx=512, n_embd=64, n_head=4, n_layer=2, vocab_size=100)
    assert read_hf_config(sized, drop_rate=0.1) == GPTConfig(
        vocab_size=100, context_length=512, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1
    )
    assert read_hf_config(write_config(tmp_path, n_positions=256, n_ctx=512)).context_length == 256


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_both_names_of_gpt2s_tanh_gelu_are_accepted(tmp_path, activation):
    config = read_hf_config(write_config(tmp_path, activation_function=activation))
    assert config.emb_dim == 768


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"activation_function": "gelu"}, "activation 'gelu' is not GPT-2's tanh GELU"),
        ({"activation_function": "relu"}, "activation 'relu' is not GPT-2's tanh GELU"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon must be GPT-2's 1e-5"),
        ({"layer_norm_epsilon": 1e-3}, "layer_norm_epsilon must be GPT-2's 1e-5"),
    ],
)
def test_a_config_that_is_not_gpt2s_arithmetic_is_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        read_hf_config(write_config(tmp_path, **fields))


def not_found(source: str, repo: str, reason: str) -> str:
    """The whole of resolve_weights' message for a Hub reference it could not use."""
    return (
        f"no weights for {source!r}: not a folder; {reason}. Provide them with --weights PATH "
        f"(a folder with config.json and model.safetensors, e.g. from `hf download {repo}` on "
        "a machine that is online), or train from scratch with --weights random (the `tiny` "
        "preset does)"
    )


def message_of(source: str) -> str:
    with pytest.raises(WeightsNotFound) as error:
        resolve_weights(source)
    return str(error.value)


def test_each_failure_says_what_to_do_in_full(scaled_gpt2_dir, tmp_path, hub, monkeypatch):
    import huggingface_hub.constants as hf

    hub.repo("team/private").add(published(scaled_gpt2_dir, tmp_path))
    hub.repo("team/private").token = "hf_secret"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert message_of("team/private") == not_found(
        "team/private",
        "team/private",
        "no repository 'team/private' on the Hub, or it is private or gated and no token with "
        "access was sent (set HF_TOKEN or run `hf auth login`)",
    )
    hub.repo("team/public").add(published(scaled_gpt2_dir, tmp_path))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with monkeypatch.context() as patch:  # a cache that cannot be written
        patch.setattr(hf, "HF_HUB_CACHE", str(blocked / "hf-cache"))
        assert message_of("team/public").startswith(
            "no weights for 'team/public': not a folder; download failed: [Errno 20] Not a "
            "directory"
        )
    hub.repo("team/config-only").add({"config.json": b'{"model_type": "gpt2"}'})
    assert message_of("team/config-only") == not_found(
        "team/config-only",
        "team/config-only",
        "team/config-only has no config.json with model.safetensors: not a safetensors GPT-2",
    )
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert message_of("gpt2-large") == not_found(
        "gpt2-large",
        "openai-community/gpt2-large",
        "not in the Hugging Face cache, and offline (HF_HUB_OFFLINE) or unreachable",
    )
    folder = tmp_path / "empty"
    folder.mkdir()
    assert message_of(str(folder)) == (
        f"{folder} has no config.json; point --weights at a folder laid out like a Hugging "
        "Face GPT-2 repository"
    )


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        (
            {"model_type": "bert", "architectures": ["BertModel", "BertForMaskedLM"]},
            "BertModel, BertForMaskedLM",
        ),
        ({"model_type": "t5"}, "t5"),
    ],
)
def test_a_local_folder_of_another_architecture_is_named(tmp_path, config, found):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert message_of(str(tmp_path)) == (
        f"{tmp_path} holds a {config['model_type']!r} model ({found}), not GPT-2; --weights "
        "needs a GPT-2-architecture model in safetensors (gpt2-small … gpt2-xl, or one of "
        "your own)"
    )


def test_another_architecture_at_a_revision_is_named_with_it(hub):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    hub.repo("meta/llama").add({"config.json": json.dumps(config).encode()}, "v1")
    assert message_of("meta/llama@v1").startswith("meta/llama@v1 holds a 'llama' model")


def test_a_checkpoint_missing_a_tensor_names_it(scaled_gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    tensors = load_file(scaled_gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.ln_2.bias"]
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_bytes((scaled_gpt2_dir / "config.json").read_bytes())
    with pytest.raises(ValueError) as error:
        load_pretrained_gpt(str(folder))
    assert str(error.value) == (
        f"{folder}: tensor 'h.1.ln_2.bias' is missing; is this a GPT-2 checkpoint?"
    )


def test_a_config_without_model_type_is_gpt2s(scaled_gpt2_dir, tmp_path):
    folder = hub_layout(scaled_gpt2_dir, tmp_path / "untyped")
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_weights(str(folder)) == folder


def test_dropout_comes_from_the_caller_and_is_off_by_default(scaled_gpt2_dir):
    assert load_pretrained_gpt(str(scaled_gpt2_dir))[0].cfg.drop_rate == 0.0
    assert load_pretrained_gpt(str(scaled_gpt2_dir), drop_rate=0.2)[0].cfg.drop_rate == 0.2


def test_the_head_is_tied_to_the_token_embeddings_whatever_lm_head_holds(scaled_gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "untied"
    folder.mkdir()
    tensors = load_file(scaled_gpt2_dir / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_bytes((scaled_gpt2_dir / "config.json").read_bytes())
    ours = load_pretrained_gpt(str(folder))[0]
    assert torch.equal(ours.out_head.weight, tensors["lm_head.weight"])
    assert_matches_transformers(ours.eval(), GPT2LMHeadModel.from_pretrained(folder).eval())
