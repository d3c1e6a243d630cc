"""Pretrained GPT-2 weights in the Hugging Face layout, loaded into the chapter's GPT.

A weights source is a folder (``config.json`` + ``model.safetensors``, or a sharded
``model.safetensors.index.json``), a model name found in the local Hugging Face cache,
or a name downloaded from the Hub when online. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from spam_gpt.model import GPTConfig, GPTModel

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")


class WeightsNotFound(FileNotFoundError):
    """No weights could be found or fetched; the message says how to provide them."""


def hub_repo(name: str) -> str:
    """``gpt2-small`` and ``gpt2`` both mean ``openai-community/gpt2``."""
    return HUB_NAMES.get(name, name)


def hf_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")
    return Path(hf_home) / "hub"


def spam_gpt_cache_dir() -> Path:
    return Path(os.environ.get("SPAM_GPT_CACHE", Path.home() / ".cache" / "spam-gpt"))


def is_weights_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def find_in_hf_cache(repo: str) -> Path | None:
    """The snapshot ``refs/main`` points at, else any complete snapshot, of ``repo``."""
    aliases = {repo, repo.removeprefix("openai-community/")}
    for alias in sorted(aliases):
        repo_dir = hf_cache_dir() / f"models--{alias.replace('/', '--')}"
        ref = repo_dir / "refs" / "main"
        candidates = [repo_dir / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
        candidates += sorted((repo_dir / "snapshots").glob("*"))
        for snapshot in candidates:
            if is_weights_folder(snapshot):
                return snapshot
    return None


def download_weights(repo: str) -> Path:
    """Fetch ``config.json`` and ``model.safetensors`` of ``repo`` from the Hub."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    target = spam_gpt_cache_dir() / "weights" / repo.replace("/", "--")
    if is_weights_folder(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        url = f"{endpoint}/{repo}/resolve/main/{name}"
        partial = target / f"{name}.partial"
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"{repo}/{name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        partial.rename(target / name)
    return target


def resolve_weights(source: str) -> Path:
    """A folder holding HF-layout weights for ``source`` (a path or a model name)."""
    path = Path(source).expanduser()
    if path.exists():
        if is_weights_folder(path):
            return path
        raise WeightsNotFound(
            f"{path} has no config.json with model.safetensors; point --weights at a folder "
            "laid out like a Hugging Face GPT-2 repository"
        )
    repo = hub_repo(source)
    cached = find_in_hf_cache(repo)
    if cached is not None:
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            return download_weights(repo)
        except OSError as error:
            reason = f"download failed: {error}"
    raise WeightsNotFound(
        f"no weights for {source!r}: not a folder, not in the Hugging Face cache "
        f"({hf_cache_dir()}), and not downloadable ({reason}). Provide them with --weights "
        f"PATH (a folder with config.json and model.safetensors, e.g. from `hf download "
        f"{repo}` on a machine that is online), or train from scratch with --weights random "
        "(the `tiny` preset does)"
    )


def read_hf_config(folder: Path, drop_rate: float = 0.0) -> GPTConfig:
    """Translate a GPT-2 ``config.json`` into the chapter's config."""
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{folder}/config.json describes a {hf['model_type']!r} model, not GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
        raise ValueError(f"{folder}: activation {activation!r} is not GPT-2's tanh GELU")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"{folder}: layer_norm_epsilon must be GPT-2's 1e-5")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
        emb_dim=hf.get("n_embd", 768),
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        drop_rate=drop_rate,
        qkv_bias=True,
    )


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, prefixes stripped."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return {key.removeprefix("transformer."): value for key, value in tensors.items()}


def hf_to_chapter_state_dict(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename GPT-2's tensors to the chapter's modules.

    GPT-2 stores linear layers as ``Conv1D`` (weights transposed) and the query, key and
    value projections fused in ``c_attn``; the chapter keeps three ``nn.Linear``.
    """
    state = {
        "tok_emb.weight": hf["wte.weight"],
        "pos_emb.weight": hf["wpe.weight"],
        "final_norm.weight": hf["ln_f.weight"],
        "final_norm.bias": hf["ln_f.bias"],
        "out_head.weight": hf.get("lm_head.weight", hf["wte.weight"]),
    }
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = hf[h + "attn.c_attn.weight"].T.chunk(3, dim=0)
        q_b, k_b, v_b = hf[h + "attn.c_attn.bias"].chunk(3)
        state |= {
            b + "att.W_query.weight": q_w,
            b + "att.W_key.weight": k_w,
            b + "att.W_value.weight": v_w,
            b + "att.W_query.bias": q_b,
            b + "att.W_key.bias": k_b,
            b + "att.W_value.bias": v_b,
            b + "att.out_proj.weight": hf[h + "attn.c_proj.weight"].T,
            b + "att.out_proj.bias": hf[h + "attn.c_proj.bias"],
            b + "norm1.weight": hf[h + "ln_1.weight"],
            b + "norm1.bias": hf[h + "ln_1.bias"],
            b + "norm2.weight": hf[h + "ln_2.weight"],
            b + "norm2.bias": hf[h + "ln_2.bias"],
            b + "ff.layers.0.weight": hf[h + "mlp.c_fc.weight"].T,
            b + "ff.layers.0.bias": hf[h + "mlp.c_fc.bias"],
            b + "ff.layers.2.weight": hf[h + "mlp.c_proj.weight"].T,
            b + "ff.layers.2.bias": hf[h + "mlp.c_proj.bias"],
        }
    return {key: value.contiguous() for key, value in state.items()}


def load_pretrained_gpt(source: str, drop_rate: float = 0.0) -> tuple[GPTModel, Path]:
    """The chapter's GPT holding the weights of ``source``, and the folder they came from."""
    folder = resolve_weights(source)
    cfg = read_hf_config(folder, drop_rate)
    model = GPTModel(cfg)
    try:
        state = hf_to_chapter_state_dict(read_hf_tensors(folder), cfg.n_layers)
    except KeyError as missing:
        raise ValueError(
            f"{folder}: tensor {missing} is missing; is this a GPT-2 checkpoint?"
        ) from None
    model.load_state_dict(state, strict=True)
    return model, folder
