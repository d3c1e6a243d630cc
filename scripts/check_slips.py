"""Apply, one at a time, the architectural slips the weight-parity tests must catch, and
check that each fails them (issue: "the pretrained-weights proof must catch every slip").

    python scripts/check_slips.py

Each slip is a one-line edit of ``spam_gpt/model.py``, ``weights.py`` or ``packing.py`` made
in a copy of the package and its tests; the parity tests run in that copy. Prints one line
per slip and exits 1 if any slip leaves the tests green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_weights.py", "tests/test_packing.py", "tests/test_model.py"]
SLIPS = {
    "exact GELU": ("model.py", 'nn.GELU(approximate="tanh")', "nn.GELU()"),
    "LayerNorm epsilon 1e-6": (
        "model.py",
        "self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)",
        "self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-6)",
    ),
    "query and key biases swapped": ("weights.py", "q_b, k_b, v_b = ", "k_b, q_b, v_b = "),
    "ln_1 bias taken from ln_2": ("weights.py", 'hf[h + "ln_1.bias"]', 'hf[h + "ln_2.bias"]'),
    "ln_2 weight taken from ln_1": ("weights.py", 'hf[h + "ln_2.weight"]', 'hf[h + "ln_1.weight"]'),
    "final norm bias from its weight": ("weights.py", 'hf["ln_f.bias"]', 'hf["ln_f.weight"]'),
    "attention output bias from the MLP's": (
        "weights.py",
        'hf[h + "attn.c_proj.bias"]',
        'hf[h + "mlp.c_proj.bias"]',
    ),
    "MLP output bias from attention's": (
        "weights.py",
        'hf[h + "mlp.c_proj.bias"]',
        'hf[h + "attn.c_proj.bias"]',
    ),
    "no query/key/value bias": ("weights.py", "qkv_bias=True", "qkv_bias=False"),
    "attention output without bias": (
        "model.py",
        "self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)",
        "self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=False)",
    ),
    "an extra bias on the output head": (
        "model.py",
        "nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)",
        "nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=True)",
    ),
    "Conv1D weight untransposed": (
        "weights.py",
        'hf[h + "attn.c_proj.weight"].T',
        'hf[h + "attn.c_proj.weight"]',
    ),
    "attention scaled by the model width": (
        "model.py",
        "is_causal=attn_mask is None,",
        "is_causal=attn_mask is None, scale=1 / dim**0.5,",
    ),
    "positions offset by one": (
        "model.py",
        "positions = torch.arange(in_idx.shape[1], device=in_idx.device)",
        "positions = torch.arange(1, in_idx.shape[1] + 1, device=in_idx.device)",
    ),
    "output head not tied to the token embeddings": (
        "weights.py",
        'hf.get("lm_head.weight", hf["wte.weight"])',
        'hf.get("lm_head.weight", hf["wte.weight"].flip(0))',
    ),
    "packed positions do not restart": (
        "packing.py",
        "positions[r, column : column + n] = torch.arange(n)",
        "positions[r, column : column + n] = torch.arange(column, column + n)",
    ),
    "packed mask lets a message see its neighbour": (
        "packing.py",
        "(segments[:, :, None] == segments[:, None, :]) & causal",
        "(segments[:, :, None] >= 0) & causal",
    ),
}


def tests_fail_with(module: str, old: str, new: str) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        for part in ("spam_gpt", "tests"):
            shutil.copytree(ROOT / part, Path(folder) / part)
        shutil.copy(ROOT / "pyproject.toml", folder)
        target = Path(folder) / "spam_gpt" / module
        source = target.read_text()
        if source.count(old) != 1:
            raise SystemExit(f"{module}: {old!r} occurs {source.count(old)} times, not once")
        target.write_text(source.replace(old, new))
        run = subprocess.run(  # pytest puts the copy first on sys.path: it tests the copy
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=folder,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
        )
        return run.returncode != 0


def main() -> int:
    survivors = []
    for name, (module, old, new) in SLIPS.items():
        caught = tests_fail_with(module, old, new)
        print(f"{'caught  ' if caught else 'MISSED  '} {name} ({module})", flush=True)
        if not caught:
            survivors.append(name)
    print(f"{len(SLIPS) - len(survivors)} of {len(SLIPS)} slips caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
