"""Pretrained GPT-2 weights in the Hugging Face layout, loaded into the chapter's GPT.

A weights source is a folder (``config.json`` with ``model.safetensors``, or a sharded
``model.safetensors.index.json``), or a Hub repository: a short name (``gpt2-small`` …
``gpt2-xl``) or a repository id, with an optional ``@revision`` (branch, tag or commit).
Repositories are fetched with ``huggingface_hub`` into the standard Hugging Face cache,
the one transformers shares, so ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``
and ``HF_HUB_OFFLINE`` mean what they mean there, and only the files the loader reads are
fetched (the config first, so a repository of another architecture costs no download).
Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file

from spam_gpt.model import GPTConfig, GPTModel

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_FILES = (INDEX_FILE, SINGLE_FILE)
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


class WeightsNotFound(FileNotFoundError):
    """No weights could be found or fetched; the message says how to provide them."""


def hub_reference(name: str) -> tuple[str, str | None]:
    """``org/model@revision`` as (repository id, revision); ``gpt2-small`` and ``gpt2``
    both mean ``openai-community/gpt2``."""
    repo, _, revision = name.partition("@")
    return HUB_NAMES.get(repo, repo), revision or None


def reference(repo: str, revision: str | None) -> str:
    """How a user writes a Hub reference: ``org/model`` or ``org/model@revision``."""
    return f"{repo}@{revision}" if revision else repo


def is_weights_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def check_gpt2_config(config: Path, origin: str) -> None:
    """Refuse another architecture before any weights are read or fetched."""
    hf = json.loads(config.read_text())
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        found = ", ".join(hf.get("architectures") or []) or model_type
        raise WeightsNotFound(
            f"{origin} holds a {model_type!r} model ({found}), not GPT-2; --weights needs a "
            "GPT-2-architecture model in safetensors (gpt2-small … gpt2-xl, or one of your own)"
        )


def fetch(repo: str, revision: str | None, filename: str, *, local_only: bool) -> Path:
    return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_only))


def fetch_weight_files(repo: str, revision: str | None, local_only: bool = False) -> Path:
    """The snapshot folder holding the config and every safetensors file of ``repo``:
    the shards a ``model.safetensors.index.json`` names, else ``model.safetensors``. The
    config comes first and must be GPT-2's, so another architecture costs no download."""
    check_gpt2_config(
        fetch(repo, revision, CONFIG_FILE, local_only=local_only), reference(repo, revision)
    )
    try:
        index = fetch(repo, revision, INDEX_FILE, local_only=local_only)
    except RemoteEntryNotFoundError:
        return fetch(repo, revision, SINGLE_FILE, local_only=local_only).parent
    except LocalEntryNotFoundError:
        if not knows_missing(repo, revision):
            raise
        return fetch(repo, revision, SINGLE_FILE, local_only=local_only).parent
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        fetch(repo, revision, shard, local_only=local_only)
    return index.parent


def knows_missing(repo: str, revision: str | None) -> bool:
    """The cache recorded that ``repo`` has no shard index (a single-file checkpoint)."""
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    return try_to_load_from_cache(repo, INDEX_FILE, revision=revision) is _CACHED_NO_EXIST


def hub_answers(timeout: float = 5) -> bool:
    """Whether the Hub's host takes a connection (not asked offline, nor through a proxy,
    which huggingface_hub reaches on its own): an unreachable one costs five tries over
    about 25 s, each printed, before huggingface_hub gives up."""
    import huggingface_hub.constants as hf

    if hf.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urllib.parse.urlsplit(hf.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def not_a_weights_folder(path: Path) -> str:
    """What ``path`` lacks to be a weights folder, and how to get there."""
    layout = "point --weights at a folder laid out like a Hugging Face GPT-2 repository"
    if path.is_file():
        return f"{path} is a file; {layout} (config.json and {SINGLE_FILE})"
    if not (path / CONFIG_FILE).is_file():
        return f"{path} has no {CONFIG_FILE}; {layout}"
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{path} holds its weights as {', '.join(pickles)}, a PyTorch pickle, which "
            f"spam-gpt does not load (unpickling runs code); write them as {SINGLE_FILE}, for "
            f'example with transformers: python -c "from transformers import GPT2LMHeadModel '
            f"as M; M.from_pretrained('{path}').save_pretrained('{path}')\""
        )
    return f"{path} has no {SINGLE_FILE}; {layout}"


def resolve_weights(source: str) -> Path:
    """A folder holding HF-layout weights for ``source`` (a path or a Hub reference)."""
    path = Path(source).expanduser()
    if path.exists():
        if is_weights_folder(path):
            check_gpt2_config(path / CONFIG_FILE, str(path))
            return path
        raise WeightsNotFound(not_a_weights_folder(path))
    repo, revision = hub_reference(source)
    try:
        return fetch_weight_files(repo, revision, local_only=not hub_answers())
    except WeightsNotFound:
        raise
    except RevisionNotFoundError:
        raise WeightsNotFound(
            f"{repo} has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except RepositoryNotFoundError:
        reason = (
            f"no repository {repo!r} on the Hub, or it is private or gated and no token with "
            "access was sent (set HF_TOKEN or run `hf auth login`)"
        )
    except RemoteEntryNotFoundError:
        at = reference(repo, revision)
        reason = f"{at} has no {CONFIG_FILE} with {SINGLE_FILE}: not a safetensors GPT-2"
    except LocalEntryNotFoundError:
        reason = "not in the Hugging Face cache, and offline (HF_HUB_OFFLINE) or unreachable"
    except (HfHubHTTPError, OSError) as error:
        reason = f"download failed: {error}"
    raise WeightsNotFound(
        f"no weights for {source!r}: not a folder; {reason}. Provide them with --weights "
        f"PATH (a folder with config.json and model.safetensors, e.g. from `hf download "
        f"{repo}` on a machine that is online), or train from scratch with --weights random "
        "(the `tiny` preset does)"
    ) from None


def cached_weights(name: str) -> Path | None:
    """The weights of a Hub reference if they are in the local cache (no network)."""
    repo, revision = hub_reference(name)
    try:
        return fetch_weight_files(repo, revision, local_only=True)
    except LocalEntryNotFoundError:
        return None


def read_hf_config(folder: Path, drop_rate: float = 0.0) -> GPTConfig:
    """Translate a GPT-2 ``config.json`` into the chapter's config."""
    hf = json.loads((folder / CONFIG_FILE).read_text())
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
