"""Training configuration: one dataclass, three presets, overrides from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from spam_gpt.classifier import TOKEN_CHOICES, TRAINABLE_CHOICES
from spam_gpt.dataset import PADDING_MODES
from spam_gpt.lora import require_peft
from spam_gpt.model import MODEL_CONFIGS
from spam_gpt.precision import TRAINING_PRECISIONS
from spam_gpt.spelling import EMBEDDINGS, SPELLED, TABLE

RANDOM_WEIGHTS = "random"
PACKING_MODES = ("auto", "off")
KEEP_CHOICES = ("last", "best")
LORA = "lora"
TRAINABLE = (*TRAINABLE_CHOICES, LORA)


@dataclass
class TrainConfig:
    """Everything that decides a fine-tuning run; the defaults are the chapter's recipe."""

    preset: str = "chapter"
    model: str = field(
        default="gpt2-small",
        metadata={"help": f"architecture for random weights: {', '.join(MODEL_CONFIGS)}"},
    )
    weights: str = field(
        default="gpt2-small",
        metadata={"help": "pretrained weights (folder, or name such as gpt2-medium) or 'random'"},
    )
    trainable: str = field(
        default="last_block",
        metadata={
            "help": f"layers to train: {', '.join(TRAINABLE_CHOICES)}, or {LORA} (adapters on "
            "a frozen GPT, needs spam-gpt[lora])"
        },
    )
    embeddings: str = field(
        default=TABLE,
        metadata={
            "help": f"{TABLE}: a row per token (chapter); {SPELLED}: while training, each "
            "token's row plus shared vectors of its spelling's character n-grams, folded into "
            "the table when saved (random weights only)"
        },
    )
    token: str = field(
        default="last", metadata={"help": f"token to classify from: {', '.join(TOKEN_CHOICES)}"}
    )
    padding: str = field(
        default="fixed",
        metadata={"help": "fixed: pad to max_length (chapter); batch: pad to each batch's longest"},
    )
    packing: str = field(
        default="auto",
        metadata={
            "help": "auto: a model reading the last real or first token trains on messages "
            "packed into rows, computing no padding (same numbers); off: padded batches"
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 autocast on GPUs, fp32 on CPUs; bf16: autocast on CPUs too "
            "(fast with AMX/AVX512-BF16); fp32"
        },
    )
    max_length: int = field(
        default=0,
        metadata={"help": "truncate messages to this many tokens (0: longest training one)"},
    )
    batch_size: int = field(
        default=8, metadata={"help": "global batch size, split evenly among workers"}
    )
    epochs: int = 5
    max_steps: int = field(
        default=0, metadata={"help": "stop after N optimizer steps (0: run every epoch)"}
    )
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = field(default=50, metadata={"help": "evaluate losses every N steps"})
    eval_iter: int = field(default=5, metadata={"help": "batches per loss/accuracy estimate"})
    seed: int = 123
    drop_rate: float = 0.0
    lora_rank: int = field(default=16, metadata={"help": "--trainable lora: adapter rank"})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "--trainable lora: adapters scaled by alpha / rank"}
    )
    keep: str = field(
        default="last",
        metadata={
            "help": "last: the final epoch's weights (chapter); best: the epoch with the best "
            "accuracy on the whole validation set"
        },
    )
    patience: int = field(
        default=0,
        metadata={"help": "stop after N epochs without a better validation accuracy (0: never)"},
    )

    def __post_init__(self) -> None:
        choices = {
            "trainable": TRAINABLE,
            "embeddings": EMBEDDINGS,
            "token": TOKEN_CHOICES,
            "padding": PADDING_MODES,
            "packing": PACKING_MODES,
            "precision": TRAINING_PRECISIONS,
            "keep": KEEP_CHOICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}"
                )
        if self.weights == RANDOM_WEIGHTS and self.model not in MODEL_CONFIGS:
            raise ValueError(f"model must be one of {', '.join(MODEL_CONFIGS)}, not {self.model!r}")
        if self.embeddings == SPELLED and self.weights != RANDOM_WEIGHTS:
            raise ValueError(
                f"--embeddings {SPELLED} trains token embeddings from scratch: it needs "
                f"--weights {RANDOM_WEIGHTS}, not {self.weights!r}"
            )
        positive = ("batch_size", "epochs", "eval_freq", "eval_iter", "lora_rank")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if min(self.max_length, self.max_steps, self.weight_decay, self.patience) < 0:
            raise ValueError("max_length, max_steps, weight_decay and patience must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be above 0, not {self.lr}")
        if self.trainable == LORA:
            require_peft()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def packs(self) -> bool:
        """Whether batches also come packed: only for tokens packing leaves unchanged."""
        return self.packing == "auto" and self.token != "last"


PRESETS: dict[str, dict] = {
    # Exactly the chapter: pretrained gpt2-small, last block, last token, padded to 120.
    "chapter": {},
    # The book's best ideas: per-batch padding and the last real token (98.33% in its table).
    "fast": {"padding": "batch", "token": "last_real"},
    # From scratch on a 2-core CPU: a small random model, every layer trained. Tuned with
    # sweeps over width, depth, learning rate, weight decay, dropout and --keep (see
    # benchmarks/RESULTS.md): one block, strong weight decay, no dropout, the best epoch
    # kept, token embeddings that share their spelling (spam_gpt.spelling).
    "tiny": {
        "model": "tiny",
        "weights": RANDOM_WEIGHTS,
        "embeddings": SPELLED,
        "trainable": "all",
        "token": "last_real",
        "padding": "batch",
        "lr": 1e-3,
        "epochs": 5,
        "batch_size": 8,
        "weight_decay": 2.0,
        "keep": "best",
    },
}


def resolve_config(preset: str, overrides: dict | None = None) -> TrainConfig:
    """The preset's fields with ``overrides`` (unset ones, i.e. ``None``, ignored) on top.
    A preset's spelled embeddings go with its random weights: ``--preset tiny --weights
    gpt2-small`` keeps the pretrained table unless ``--embeddings`` is given too."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(chosen) - known
    if unknown:
        raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    settings = {**PRESETS[preset], **chosen, "preset": preset}
    if settings.get("weights") != RANDOM_WEIGHTS and "embeddings" not in chosen:
        settings.pop("embeddings", None)
    return TrainConfig(**settings)
