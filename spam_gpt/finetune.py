"""The chapter's fine-tuning recipe from start to finish, for one process or one of many.

The same function runs in ``spam-gpt train`` and inside each Ray Train worker: a
:class:`Workers` value says which share of each batch this process takes, how results are
summed across processes, and how the model is wrapped (DistributedDataParallel).
Seeds are set at the chapter's three points, so a run repeats exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import pandas as pd
import torch
from torch import nn

from spam_gpt.checkpoint import ClassifierMeta, save_classifier
from spam_gpt.classifier import (
    LABEL_NAMES,
    SpamClassifier,
    count_parameters,
    set_trainable_layers,
)
from spam_gpt.config import LORA, RANDOM_WEIGHTS, TrainConfig
from spam_gpt.corpus import SPLIT_NAMES
from spam_gpt.dataset import Batch, SpamDataset, create_loader
from spam_gpt.lora import add_lora, merge_lora
from spam_gpt.memory import PeakMemory, peak_rss_mb
from spam_gpt.model import GPTModel, init_gpt2_weights, model_config
from spam_gpt.plots import plot_confusion_matrix, plot_history
from spam_gpt.spelling import SPELLED, fold_spelling, spell_embeddings
from spam_gpt.tokenizer import encode_text
from spam_gpt.training import (
    BestWeights,
    EvalHook,
    Reduce,
    TrainingHistory,
    accuracy_of,
    confusion_matrix_loader,
    final_scores,
    local_only,
    say,
    train_classifier_simple,
)
from spam_gpt.training_state import TrainingState
from spam_gpt.weights import load_pretrained_gpt

FUSED_ADAMW_DEVICES = ("cpu", "cuda")


@dataclass
class Workers:
    """This process's place among the training workers (one process: the defaults)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce: Reduce = local_only
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module


def adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The chapter's AdamW, as PyTorch's fused kernel where it has one: the default on a
    CPU makes a dozen passes over each tensor a step. The tiny preset's 3.3 M parameters,
    most of them its token embeddings, took 22 ms a step unfused and 3 ms fused on one
    core (benchmarks/optimizer.py); losses agree within rounding."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=device.type in FUSED_ADAMW_DEVICES,
    )


class Loaders(NamedTuple):
    """What one process reads: an epoch's training batches, the batches the loss and
    accuracy estimates read, and every split in full for the final metrics."""

    train: Iterable[Batch]
    train_probe: Iterable[Batch]
    validation_probe: Iterable[Batch]
    final: dict[str, Iterable[Batch]]


class TrainingData(Protocol):
    """Labelled messages as training reads them: in memory, or streamed on Ray."""

    labels: list[str]

    def longest(self) -> int:
        """Tokens of the longest training message."""

    def loaders(self, cfg: TrainConfig, max_length: int, workers: Workers) -> Loaders: ...


@dataclass
class InMemoryData:
    """Splits held as frames of ``Text`` and ``Label`` (an index into ``labels``): the
    chapter's, or a laptop's own messages. Loaders are the chapter's, so on the
    chapter's splits every batch, loss and accuracy is the chapter's."""

    splits: dict[str, pd.DataFrame]
    labels: list[str] = field(default_factory=lambda: list(LABEL_NAMES))

    def longest(self) -> int:
        return max(len(encode_text(text)) for text in self.splits["train"]["Text"])

    def loaders(self, cfg: TrainConfig, max_length: int, workers: Workers) -> Loaders:
        loaders = {
            name: create_loader(
                SpamDataset(self.splits[name], max_length=max_length),
                cfg.batch_size,
                train=name == "train",
                padding=cfg.padding,
                rank=workers.rank,
                world_size=workers.world_size,
                pack=cfg.packs,
            )
            for name in SPLIT_NAMES
        }
        return Loaders(loaders["train"], loaders["train"], loaders["validation"], loaders)


@dataclass
class FinetuneResult:
    classifier: SpamClassifier
    meta: ClassifierMeta
    history: TrainingHistory
    metrics: dict
    test_confusion: torch.Tensor


def build_gpt(cfg: TrainConfig) -> tuple[GPTModel, str]:
    """The base model and a description of where its weights came from."""
    if cfg.weights == RANDOM_WEIGHTS:
        arch = model_config(cfg.model)
        gpt = GPTModel(dataclasses.replace(arch, drop_rate=cfg.drop_rate))
        init_gpt2_weights(gpt)
        if cfg.embeddings == SPELLED:
            spell_embeddings(gpt)
        return gpt, f"random ({cfg.model})"
    gpt, folder = load_pretrained_gpt(cfg.weights, cfg.drop_rate)
    return gpt, str(folder)


def choose_max_length(cfg: TrainConfig, longest: int, context: int, verbose: bool) -> int:
    """``--max-length``, else the longest training message (the chapter's), cut to the
    model's context."""
    if cfg.max_length > context:
        raise ValueError(
            f"max_length {cfg.max_length} exceeds the model's context of {context} tokens; "
            "lower --max-length"
        )
    if cfg.max_length:
        return cfg.max_length
    if longest > context and verbose:
        say(f"The longest training message has {longest} tokens; truncating to {context}")
    return min(longest, context)


def finetune(
    cfg: TrainConfig,
    data: TrainingData | dict[str, pd.DataFrame],
    workers: Workers | None = None,
    *,
    resume: TrainingState | None = None,
    on_eval: EvalHook | None = None,
    on_epoch_end: Callable[[TrainingHistory, Callable[[], TrainingState]], None] | None = None,
    verbose: bool = True,
) -> FinetuneResult:
    """Train per ``cfg`` and measure full-set accuracies and test-set per-class scores.
    ``data`` may be the chapter's split frames themselves. ``on_epoch_end`` gets the
    history and a function that captures the state to resume from."""
    workers = workers or Workers()
    memory = PeakMemory()
    if isinstance(data, dict):
        data = InMemoryData(data)
    labels = list(data.labels)
    torch.manual_seed(cfg.seed)
    gpt, weights_source = build_gpt(cfg)
    max_length = choose_max_length(cfg, data.longest(), gpt.cfg.context_length, verbose)
    loaders = data.loaders(cfg, max_length, workers)
    torch.manual_seed(cfg.seed)
    classifier = SpamClassifier(gpt, token=cfg.token, num_classes=len(labels))
    classifier.precision = cfg.precision
    if cfg.trainable == LORA:
        add_lora(classifier, cfg.lora_rank, cfg.lora_alpha)
    else:
        set_trainable_layers(classifier, cfg.trainable)
    classifier.to(workers.device)
    model = workers.wrap(classifier)
    torch.manual_seed(cfg.seed)
    optimizer = adamw(model, cfg, workers.device)
    history = None
    if resume is not None:
        classifier.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.rng)
        history = resume.history
    best = None
    if cfg.keep == "best":
        best = BestWeights(loaders.final["validation"], resume.best if resume else None)

    def state_after(finished: TrainingHistory) -> TrainingState:
        weights, rng = classifier.state_dict(), torch.get_rng_state()
        kept = best.state if best else None
        return TrainingState(weights, optimizer.state_dict(), rng, finished, kept)

    def epoch_ended(finished: TrainingHistory) -> None:
        on_epoch_end(finished, lambda: state_after(finished))

    if verbose:
        say(
            f"Model: {weights_source}, {count_parameters(classifier):,} parameters, "
            f"{count_parameters(classifier, trainable_only=True):,} trainable ({cfg.trainable}); "
            f"{len(labels)} labels; {workers.world_size} worker(s), global batch {cfg.batch_size}",
        )
    started = time.perf_counter()
    history = train_classifier_simple(
        model,
        loaders.train,
        loaders.validation_probe,
        optimizer,
        workers.device,
        cfg.epochs,
        cfg.eval_freq,
        cfg.eval_iter,
        train_probe=loaders.train_probe,
        max_steps=cfg.max_steps or None,
        num_classes=len(labels),
        history=history,
        reduce=workers.reduce,
        on_eval=on_eval,
        on_epoch_end=epoch_ended if on_epoch_end else None,
        keep_best=best,
        patience=cfg.patience,
        verbose=verbose,
    )
    training_seconds = time.perf_counter() - started
    trainable_parameters = count_parameters(classifier, trainable_only=True)
    if cfg.trainable == LORA:
        merge_lora(classifier)  # measured as it is saved, scored and served
    fold_spelling(classifier.gpt)

    def confusion_of(split: str) -> torch.Tensor:
        return confusion_matrix_loader(
            loaders.final[split], classifier, workers.device, None, workers.reduce, len(labels)
        )

    confusion = confusion_of("test")
    metrics = {
        "train_accuracy": accuracy_of(confusion_of("train")),
        "validation_accuracy": accuracy_of(confusion_of("validation")),
        "test_accuracy": accuracy_of(confusion),
        **final_scores(confusion, labels),
        "training_seconds": training_seconds,
        "parameters": count_parameters(classifier),
        "trainable_parameters": trainable_parameters,
        "epochs_trained": history.epochs_done,
        "kept_epoch": history.best_epoch if best else history.epochs_done,
        "worker_peak_private_mb": per_worker(memory.stop(), workers),
        "worker_peak_rss_mb": per_worker(peak_rss_mb(), workers),
    }
    meta = ClassifierMeta(
        model_config=gpt.cfg.to_dict(),
        token=cfg.token,
        padding=cfg.padding,
        max_length=max_length,
        labels=labels,
        train_config={**cfg.to_dict(), "weights_source": weights_source},
        metrics={k: metrics[k] for k in ("train_accuracy", "validation_accuracy", "test_accuracy")},
    )
    return FinetuneResult(classifier, meta, history, metrics, confusion)


def per_worker(value: float, workers: Workers) -> list[float]:
    """One number from every worker, in rank order."""
    values = torch.zeros(workers.world_size, dtype=torch.float64)
    values[workers.rank] = value
    return [round(v, 1) for v in workers.reduce(values).tolist()]


def history_dict(history: TrainingHistory) -> dict:
    return dict(history.__dict__)


METRICS_FILE = "metrics.json"


def write_outputs(result: FinetuneResult, output_dir: str | Path) -> dict[str, Path]:
    """``model/``, ``metrics.json`` and the plots, in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_classifier(result.classifier, result.meta, out / "model")
    metrics_path = out / METRICS_FILE
    payload = {
        **result.metrics,
        "history": history_dict(result.history),
        "config": result.meta.train_config,
    }
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")
    plots = plot_history(result.history, out) + plot_confusion_matrix(
        result.test_confusion, result.meta.labels, out
    )
    return {"model": model_dir, "metrics": metrics_path, **{p.name: p for p in plots}}
