"""A self-describing, pickle-free checkpoint of a fine-tuned classifier.

``model.safetensors`` holds the tensors; ``spam_gpt.json`` says how to rebuild the model
(architecture, token choice, padding, max_length), which tokenizer and labels it uses, how
it was trained and how it scored. Loading reads JSON and safetensors, never pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from spam_gpt.classifier import LABEL_NAMES, SpamClassifier
from spam_gpt.model import GPTConfig, GPTModel

FORMAT = "spam-gpt-classifier"
META_FILE = "spam_gpt.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ClassifierMeta:
    """Everything beyond the tensors that predicting needs, and the run's provenance."""

    model_config: dict
    token: str
    padding: str
    max_length: int
    tokenizer: str = "gpt2"
    labels: list[str] = field(default_factory=lambda: list(LABEL_NAMES))
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    name: str = "spam-gpt"
    version: str = "local"


def save_classifier(classifier: SpamClassifier, meta: ClassifierMeta, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": FORMAT})
    payload = {"format": FORMAT, **meta.__dict__}
    (out / META_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return out


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_meta(folder: Path) -> ClassifierMeta:
    """The checkpoint's description alone (labels, config), without its tensors."""
    payload = json.loads((folder / META_FILE).read_text())
    if payload.pop("format", None) != FORMAT:
        raise ValueError(f"{folder / META_FILE} is not a {FORMAT} description")
    return ClassifierMeta(**payload)


def load_classifier(path: str | Path) -> tuple[SpamClassifier, ClassifierMeta]:
    """The classifier in eval mode and its metadata, from a folder ``save_classifier`` wrote."""
    folder = Path(path)
    if not is_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a spam-gpt checkpoint (it needs {META_FILE} and {WEIGHTS_FILE}); "
            "train one with `spam-gpt train --output DIR` and pass DIR/model"
        )
    meta = load_meta(folder)
    with WithoutRandomInit():
        gpt = GPTModel(GPTConfig(**meta.model_config))
        classifier = SpamClassifier(gpt, token=meta.token, num_classes=len(meta.labels))
    classifier.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=True)
    return classifier.eval(), meta


class WithoutRandomInit(TorchFunctionMode):
    """Modules built inside skip ``torch.nn.init``'s random draws, which a checkpoint's
    tensors replace at once: half of gpt2-small's load time (0.7 of 1.4 s). The meta
    device would skip it too, but its ``normal_`` imports torch's compiler (1.2 s). Torch
    function modes hold for the current thread only."""

    SKIPPED = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:  # torch hands their tensor over by keyword
            return kwargs["tensor"] if kwargs and "tensor" in kwargs else args[0]
        return func(*args, **(kwargs or {}))
