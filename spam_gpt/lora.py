"""LoRA, as the book's appendix E applies it: the GPT frozen, low-rank adapters on every
attention and feed-forward projection, the new head trained in full.

The adapters come from Hugging Face's ``peft`` (the optional extra ``spam-gpt[lora]``),
injected into the chapter's own modules by name. After training they are merged into the
projections they adapt, so the saved checkpoint is the plain classifier (safetensors, no
adapter code) and scoring and serving run at full speed.
"""

from __future__ import annotations

from importlib.util import find_spec

from torch import nn

# Module names in spam_gpt.model: attention's four projections, the feed-forward pair.
LORA_TARGETS = ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")
MISSING_PEFT = (
    "--trainable lora needs Hugging Face's peft; install it with: pip install 'spam-gpt[lora]'"
)


def require_peft() -> None:
    """Fail before any work starts when the ``lora`` extra is not installed."""
    if find_spec("peft") is None:
        raise ValueError(MISSING_PEFT)


def add_lora(classifier: nn.Module, rank: int, alpha: float) -> None:
    """Freeze everything, add rank-``rank`` adapters scaled by ``alpha / rank`` (B starts
    at zero, so the model starts as it was), and train them and the head."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    classifier.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, classifier.gpt)
    classifier.gpt.out_head.requires_grad_(True)


def merge_lora(classifier: nn.Module) -> None:
    """Fold each adapter into its projection and put the plain ``nn.Linear`` back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(n, m) for n, m in classifier.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge()
        parent, _, attribute = name.rpartition(".")
        setattr(classifier.get_submodule(parent), attribute, layer.get_base_layer())
