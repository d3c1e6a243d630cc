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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from spam_gpt.checkpoint import ClassifierMeta, save_classifier
from spam_gpt.classifier import SpamClassifier, count_parameters, set_trainable_layers
from spam_gpt.config import RANDOM_WEIGHTS, TrainConfig
from spam_gpt.dataset import SpamDataset, create_loader
from spam_gpt.model import GPTModel, init_gpt2_weights, model_config
from spam_gpt.plots import plot_confusion_matrix, plot_history
from spam_gpt.training import (
    EvalHook,
    Reduce,
    TrainingHistory,
    accuracy_of,
    calc_accuracy_loader,
    confusion_matrix_loader,
    local_only,
    say,
    spam_scores,
    train_classifier_simple,
)
from spam_gpt.training_state import TrainingState
from spam_gpt.weights import load_pretrained_gpt


@dataclass
class Workers:
    """This process's place among the training workers (one process: the defaults)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce: Reduce = local_only
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module


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
        return gpt, f"random ({cfg.model})"
    gpt, folder = load_pretrained_gpt(cfg.weights, cfg.drop_rate)
    return gpt, str(folder)


def build_datasets(cfg: TrainConfig, splits: dict[str, pd.DataFrame]) -> dict[str, SpamDataset]:
    """Validation and test are truncated to the training set's ``max_length``."""
    train = SpamDataset(splits["train"], max_length=cfg.max_length or None)
    return {
        "train": train,
        "validation": SpamDataset(splits["validation"], max_length=train.max_length),
        "test": SpamDataset(splits["test"], max_length=train.max_length),
    }


def finetune(
    cfg: TrainConfig,
    splits: dict[str, pd.DataFrame],
    workers: Workers | None = None,
    *,
    resume: TrainingState | None = None,
    on_eval: EvalHook | None = None,
    on_epoch_end: Callable[[TrainingHistory, SpamClassifier, torch.optim.Optimizer], None]
    | None = None,
    verbose: bool = True,
    progress: bool = True,
) -> FinetuneResult:
    """Train per ``cfg`` and measure full-set accuracies and test-set spam scores."""
    workers = workers or Workers()
    torch.manual_seed(cfg.seed)
    datasets = build_datasets(cfg, splits)
    loaders = {
        name: create_loader(
            dataset,
            cfg.batch_size,
            train=name == "train",
            padding=cfg.padding,
            rank=workers.rank,
            world_size=workers.world_size,
        )
        for name, dataset in datasets.items()
    }
    gpt, weights_source = build_gpt(cfg)
    if datasets["train"].max_length > gpt.cfg.context_length:
        raise ValueError(
            f"max_length {datasets['train'].max_length} exceeds the model's context of "
            f"{gpt.cfg.context_length} tokens; lower --max-length"
        )
    torch.manual_seed(cfg.seed)
    classifier = SpamClassifier(gpt, token=cfg.token)
    set_trainable_layers(classifier, cfg.trainable)
    classifier.to(workers.device)
    model = workers.wrap(classifier)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = None
    if resume is not None:
        classifier.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.rng)
        history = resume.history
    if verbose:
        say(
            f"Model: {weights_source}, {count_parameters(classifier):,} parameters, "
            f"{count_parameters(classifier, trainable_only=True):,} trainable ({cfg.trainable}); "
            f"{workers.world_size} worker(s), global batch {cfg.batch_size}",
        )
    started = time.perf_counter()
    history = train_classifier_simple(
        model,
        loaders["train"],
        loaders["validation"],
        optimizer,
        workers.device,
        cfg.epochs,
        cfg.eval_freq,
        cfg.eval_iter,
        history=history,
        reduce=workers.reduce,
        on_eval=on_eval,
        verbose=verbose,
        progress=progress,
        on_epoch_end=(lambda h: on_epoch_end(h, classifier, optimizer)) if on_epoch_end else None,
    )
    training_seconds = time.perf_counter() - started
    accuracies = {
        f"{name}_accuracy": calc_accuracy_loader(
            loaders[name], model, workers.device, reduce=workers.reduce
        )
        for name in ("train", "validation")
    }
    confusion = confusion_matrix_loader(
        loaders["test"], model, workers.device, reduce=workers.reduce
    )
    metrics = {
        **accuracies,
        "test_accuracy": accuracy_of(confusion),
        **spam_scores(confusion),
        "confusion_matrix": confusion.int().tolist(),
        "training_seconds": training_seconds,
    }
    meta = ClassifierMeta(
        model_config=gpt.cfg.to_dict(),
        token=cfg.token,
        padding=cfg.padding,
        max_length=datasets["train"].max_length,
        train_config={**cfg.to_dict(), "weights_source": weights_source},
        metrics={k: metrics[k] for k in ("train_accuracy", "validation_accuracy", "test_accuracy")},
    )
    return FinetuneResult(classifier, meta, history, metrics, confusion)


def history_dict(history: TrainingHistory) -> dict:
    return dict(history.__dict__)


def write_outputs(result: FinetuneResult, output_dir: str | Path) -> dict[str, Path]:
    """``model/``, ``metrics.json`` and the plots, in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_classifier(result.classifier, result.meta, out / "model")
    metrics_path = out / "metrics.json"
    payload = {
        **result.metrics,
        "history": history_dict(result.history),
        "config": result.meta.train_config,
    }
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")
    plots = plot_history(result.history, out) + plot_confusion_matrix(result.test_confusion, out)
    return {"model": model_dir, "metrics": metrics_path, **{p.name: p for p in plots}}
