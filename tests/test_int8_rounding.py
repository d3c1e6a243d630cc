"""int8's per-token rounding compiled by torch.compile: the same integers as eager, the
same predictions, and eager with a warning where nothing can compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from spam_gpt.checkpoint import ClassifierMeta
from spam_gpt.classifier import SpamClassifier
from spam_gpt.model import GPTConfig, GPTModel, init_gpt2_weights
from spam_gpt.precision import (
    EAGER_ROUNDING,
    PerTokenInt8Linear,
    compiled_rounding,
    per_token_int8_runs_here,
)
from spam_gpt.predictor import Predictor


def rows_to_round() -> list[torch.Tensor]:
    """Passes as a model hands them on: widths of 768 and 3,072, tokens of different
    ranges, one token alone, a token of zeros, and GELU outputs (from -0.17 up)."""
    torch.manual_seed(0)
    spread = torch.randn(300, 768) * torch.linspace(0.01, 20.0, 300)[:, None]
    with_zeros = torch.cat([torch.zeros(1, 3072), torch.randn(6, 3072)])
    gelu = torch.nn.functional.gelu(torch.randn(512, 3072) * 1.5)
    return [spread, torch.randn(1, 768), with_zeros, gelu]


def test_compiled_rounding_gives_eager_roundings_integers_and_steps():
    compiled = compiled_rounding()
    assert compiled is not EAGER_ROUNDING, "torch.compile failed here: see the warning"
    with torch.inference_mode():
        for rows in rows_to_round():
            for eager_way, compiled_way in zip(EAGER_ROUNDING, compiled):
                want, got = eager_way(rows.clone()), compiled_way(rows.clone())
                assert got[0].dtype == torch.int8
                assert torch.equal(got[0], want[0])  # every integer the same
                for a, b in zip(got[1:], want[1:]):  # steps (and centres)
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def gpt2_wide_predictor(compile_int8: bool) -> Predictor:
    """A one-block model of gpt2-small's width in int8 (quantising replaces its layers, so
    each predictor gets a model of its own, built alike)."""
    config = GPTConfig(context_length=128, emb_dim=768, n_heads=12, n_layers=1)
    torch.manual_seed(0)
    gpt = GPTModel(config)
    init_gpt2_weights(gpt)
    meta = ClassifierMeta(config.to_dict(), "last_real", "batch", max_length=120)
    return Predictor(SpamClassifier(gpt).eval(), meta, precision="int8", compile_int8=compile_int8)


def test_a_predictor_compiling_int8_predicts_as_one_that_does_not():
    texts = ["Free entry to win a prize, txt WIN now", "see you at 6?", "ok", "Call now " * 20]
    eager, compiled = gpt2_wide_predictor(False), gpt2_wide_predictor(True)
    layers = [m for m in compiled.classifier.modules() if isinstance(m, PerTokenInt8Linear)]
    if per_token_int8_runs_here():
        assert len(layers) == 6 and all(m.rounding is compiled_rounding() for m in layers)
    else:  # torch.ao's layers round inside their own kernel: nothing to compile
        assert layers == []
    want = [p.probabilities for p in eager.predict(texts)]
    got = [p.probabilities for p in compiled.predict(texts)]
    for a, b in zip(got, want):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-6)


def test_without_a_cxx_compiler_int8_rounds_eagerly_and_says_why(tmp_path):
    script = (
        "import torch\n"
        "from spam_gpt.precision import EAGER_ROUNDING, compiled_rounding\n"
        "assert compiled_rounding() is EAGER_ROUNDING\n"
        "print(compiled_rounding().around_zero(torch.ones(1, 4))[0].tolist())\n"
    )
    environment = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),  # nothing compiled before
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[127, 127, 127, 127]]"
    assert "int8 rounds without torch.compile, about 7 % slower" in done.stderr
    assert "no-such-compiler" in done.stderr
    assert "needs a C++ compiler such as g++" in done.stderr
