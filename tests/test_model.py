"""The chapter's GPT: sizes, causal attention, the classifier head and token choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spam_gpt.classifier import SpamClassifier, set_trainable_layers
from spam_gpt.model import (
    GPT2_SIZES,
    MODEL_CONFIGS,
    GPTModel,
    MultiHeadAttention,
    generate_text_simple,
    init_gpt2_weights,
    model_config,
)
from spam_gpt.packing import pack_sequences


def count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize(
    ("name", "tied_millions"),
    [("gpt2-small", 124), ("gpt2-medium", 355), ("gpt2-large", 774), ("gpt2-xl", 1558)],
)
def test_gpt2_sizes_have_their_published_parameter_counts(name, tied_millions):
    with torch.device("meta"):
        model = GPTModel(GPT2_SIZES[name])
    tied = count(model) - model.out_head.weight.numel()  # GPT-2 shares out_head with tok_emb
    assert round(tied / 1e6) == tied_millions


def test_chapter_4_parameter_count_without_qkv_bias():
    with torch.device("meta"):
        model = GPTModel(dataclasses.replace(GPT2_SIZES["gpt2-small"], qkv_bias=False))
    assert count(model) == 163_009_536


def small_gpt() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(MODEL_CONFIGS["tiny"]).eval()


def test_attention_is_causal():
    model = small_gpt()
    ids = torch.randint(0, 50000, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = 7
    with torch.no_grad():
        assert torch.allclose(model(ids)[0, :8], model(changed)[0, :8], atol=1e-6)
        assert not torch.allclose(model(ids)[0, 8:], model(changed)[0, 8:])


def test_greedy_generation_appends_the_argmax_token():
    model = small_gpt()
    ids = torch.tensor([[5211, 345, 423, 640]])
    out = generate_text_simple(model, ids, max_new_tokens=3, context_size=256)
    assert out.shape == (1, 7) and out[0, :4].tolist() == ids[0].tolist()
    with torch.no_grad():
        assert out[0, 4].item() == model(ids)[0, -1].argmax().item()


def test_greedy_generation_decodes_each_prompt_of_a_batch_on_its_own():
    model = small_gpt()
    prompts = torch.tensor([[5211, 345, 423, 640], [40, 1842, 257, 3797]])
    together = generate_text_simple(model, prompts, max_new_tokens=4, context_size=256)
    for row, prompt in enumerate(prompts):
        alone = generate_text_simple(model, prompt[None], max_new_tokens=4, context_size=256)
        assert torch.equal(together[row], alone[0])


def test_gpt2_initialisation_draws_weights_at_std_0_02_and_zero_biases():
    torch.manual_seed(0)
    model = GPTModel(model_config("tiny"))
    init_gpt2_weights(model)
    linear = model.trf_blocks[0].ff.layers[0]
    for weights in (model.tok_emb.weight, model.pos_emb.weight, linear.weight):
        assert abs(weights.mean().item()) < 0.002
        assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(linear.bias) == 0


def test_attention_drops_out_while_training_only():
    cfg = dataclasses.replace(MODEL_CONFIGS["tiny"], drop_rate=0.5)
    torch.manual_seed(0)
    attention = MultiHeadAttention(cfg)
    x = torch.randn(2, 10, cfg.emb_dim)
    assert not torch.equal(attention(x), attention(x))  # a module starts in training mode
    attention.eval()
    assert torch.equal(attention(x), attention(x))
    with pytest.raises(ValueError, match="emb_dim 64 is not divisible by n_heads 5"):
        MultiHeadAttention(dataclasses.replace(cfg, n_heads=5))


def test_an_unknown_model_name_lists_the_known_ones():
    assert model_config("tiny") is MODEL_CONFIGS["tiny"]
    known = "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini"
    with pytest.raises(ValueError, match=f"^unknown model 'gpt5'; choose one of {known}$"):
        model_config("gpt5")


def test_token_choices_read_the_intended_position():
    classifier = SpamClassifier(small_gpt(), token="last_real").eval()
    message = torch.tensor([[10, 20, 30]])
    padded = torch.tensor([[10, 20, 30, 50256, 50256]])
    with torch.no_grad():
        unpadded = classifier(message, torch.tensor([3]))
        assert torch.allclose(classifier(padded, torch.tensor([3])), unpadded, atol=1e-6)
        classifier.token = "last"
        assert not torch.allclose(classifier(padded, torch.tensor([3])), unpadded, atol=1e-4)
        expected_last = classifier.gpt.out_head(classifier.gpt.features(padded)[:, -1])
        torch.testing.assert_close(classifier(padded, torch.tensor([3])), expected_last)
        classifier.token = "first"
        assert torch.allclose(
            classifier(padded, torch.tensor([3])), classifier(message[:, :1], torch.tensor([1]))
        )


def test_reading_some_positions_gives_the_full_pass_at_them():
    """In evaluation the last block computes only the positions read (several per row,
    in any order, packed rows included) and gives the same states as the full pass."""
    config = dataclasses.replace(MODEL_CONFIGS["tiny"], n_layers=2)
    torch.manual_seed(0)
    gpt = GPTModel(config)
    init_gpt2_weights(gpt)
    gpt.eval()
    batch = pack_sequences([list(range(100 + n, 100 + 2 * n)) for n in (5, 9, 1, 30, 12, 2)])[0]
    ids = torch.randint(0, 50000, (4, 20))
    rows, columns = torch.tensor([3, 0, 3, 1, 0, 2]), torch.tensor([5, 19, 2, 0, 4, 19])
    with torch.no_grad():
        full = gpt.features(batch.input_ids, batch.positions, batch.attn_mask)
        read = (batch.rows, batch.ends)
        assert batch.attn_mask is not None and len(set(batch.rows.tolist())) < len(batch.rows)
        torch.testing.assert_close(
            gpt.features(batch.input_ids, batch.positions, batch.attn_mask, read), full[read]
        )
        torch.testing.assert_close(
            gpt.features(ids, read=(rows, columns)), gpt.features(ids)[rows, columns]
        )
    gpt.trf_blocks[-1].forward_at = None  # training never takes the shortcut
    gpt.train()
    assert gpt.features(ids, read=(rows, columns)).shape == (6, config.emb_dim)


@pytest.mark.parametrize(
    ("trainable", "expected"),
    [
        ("last_layer", {"out_head"}),
        ("last_block", {"out_head", "final_norm", "trf_blocks.3"}),
        ("last_two_blocks", {"out_head", "final_norm", "trf_blocks.3", "trf_blocks.2"}),
        (
            "all",
            {
                "out_head",
                "final_norm",
                "tok_emb",
                "pos_emb",
                *(f"trf_blocks.{i}" for i in range(4)),
            },
        ),
    ],
)
def test_trainable_layers(trainable, expected):
    torch.manual_seed(0)
    classifier = SpamClassifier(GPTModel(model_config("mini")))  # four blocks
    assert classifier.gpt.out_head.out_features == 2
    set_trainable_layers(classifier, trainable)
    trained = {
        ".".join(name.split(".")[1:3]) if ".trf_blocks." in f".{name}" else name.split(".")[1]
        for name, p in classifier.named_parameters()
        if p.requires_grad
    }
    assert trained == expected
