"""The chapter's loss, accuracy and training-loop functions, made safe for several workers.

Each function keeps the chapter's name and meaning. Where the chapter averages over the
batches one process sees, these first sum per batch, then call ``reduce`` (identity in
one process, an all-reduce across Ray Train workers) so every worker reports the same
numbers over all workers' data.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# tqdm.auto's async class calls iter() on its iterable at once, which draws from the
# torch RNG through DataLoader and would shift every later shuffle.
from tqdm import tqdm

from spam_gpt.classifier import is_spam_model
from spam_gpt.dataset import Batch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def local_only(tensor: torch.Tensor) -> torch.Tensor:
    """The reduce of a single process: its own numbers are everyone's."""
    return tensor


def say(line: str) -> None:
    """Print a line straight to stdout. Ray Train patches ``print`` in its workers to log
    and also echo, which would show every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def batch_logits(batch: Batch, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    packed = None if batch.packed is None else batch.packed.to(device)
    unpack = None if batch.unpack is None else batch.unpack.to(device)
    logits = model(batch.input_ids.to(device), batch.lengths.to(device), packed, unpack)
    return logits.float()


def calc_loss_batch(batch: Batch, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Cross-entropy of the classification logits against the labels."""
    return F.cross_entropy(batch_logits(batch, model, device), batch.labels.to(device))


def first_batches(data_loader: Iterable[Batch], num_batches: int | None) -> Iterator[Batch]:
    """The first ``num_batches`` batches, or all of them (a stream need not know how many)."""
    if num_batches is None:
        return iter(data_loader)
    return (batch for _, batch in zip(range(min(num_batches, len(data_loader))), data_loader))


def calc_loss_loader(
    data_loader: Iterable[Batch],
    model: torch.nn.Module,
    device: torch.device,
    num_batches: int | None = None,
    reduce: Reduce = local_only,
) -> float:
    """Mean over batches of each batch's mean loss, as the chapter computes it."""
    limit = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if limit == 0:
        return float("nan")
    sums = torch.zeros(limit, dtype=torch.float64)
    counts = torch.zeros(limit, dtype=torch.float64)
    for i, batch in enumerate(first_batches(data_loader, limit)):
        if len(batch.labels):
            logits = batch_logits(batch, model, device)
            loss = F.cross_entropy(logits, batch.labels.to(device), reduction="sum")
            sums[i], counts[i] = loss.item(), len(batch.labels)
    sums, counts = reduce(sums), reduce(counts)
    return (sums / counts).mean().item()


def count_confusion(
    labels: torch.Tensor, predicted: torch.Tensor, num_classes: int = 2
) -> torch.Tensor:
    """Counts ``[true label, predicted label]`` of two label vectors."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    ones = torch.ones(len(predicted), dtype=torch.float64)
    return counts.index_put_((labels, predicted), ones, accumulate=True)


def accuracy_of(confusion: torch.Tensor) -> float:
    return (confusion.trace() / confusion.sum()).item()


def confusion_matrix_loader(
    data_loader: Iterable[Batch],
    model: torch.nn.Module,
    device: torch.device,
    num_batches: int | None = None,
    reduce: Reduce = local_only,
    num_classes: int = 2,
) -> torch.Tensor:
    """Counts ``[true label, predicted label]`` over the first ``num_batches`` batches."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for batch in first_batches(data_loader, num_batches):
            if len(batch.labels):
                predicted = batch_logits(batch, model, device).argmax(dim=-1).cpu()
                counts += count_confusion(batch.labels, predicted, num_classes)
    return reduce(counts)


def calc_accuracy_loader(
    data_loader: Iterable[Batch],
    model: torch.nn.Module,
    device: torch.device,
    num_batches: int | None = None,
    reduce: Reduce = local_only,
    num_classes: int = 2,
) -> float:
    """Share of correct argmax predictions (the chapter's accuracy)."""
    return accuracy_of(
        confusion_matrix_loader(data_loader, model, device, num_batches, reduce, num_classes)
    )


def evaluate_model(
    model: torch.nn.Module,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch],
    device: torch.device,
    eval_iter: int,
    reduce: Reduce = local_only,
) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, reduce)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, reduce)
    model.train()
    return train_loss, val_loss


@dataclass
class TrainingHistory:
    """What the chapter's ``train_classifier_simple`` returns, plus where it stopped."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_examples: list[int] = field(default_factory=list)
    train_accs: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    examples_seen: int = 0
    global_step: int = -1
    epochs_done: int = 0
    stopped_at_max_steps: bool = False
    best_epoch: int = 0  # the first epoch with the highest validation accuracy
    stopped_early: bool = False  # by --patience


EvalHook = Callable[[TrainingHistory], None]
EpochHook = Callable[[TrainingHistory], None]


class BestWeights:
    """``--keep best``: a copy of the weights of the best epoch so far, put back at the
    end, so the final evaluation and the saved model are that epoch's. Epochs are judged on
    ``judged_on``, the whole validation set as the final evaluation reads it."""

    def __init__(self, judged_on: Iterable[Batch], state: dict | None = None):
        self.judged_on = judged_on
        self.state = state

    def remember(self, model: torch.nn.Module) -> None:
        state = unwrapped(model).state_dict()
        self.state = {k: v.detach().clone() for k, v in state.items()}

    def restore(self, model: torch.nn.Module) -> None:
        unwrapped(model).load_state_dict(self.state)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier inside DistributedDataParallel (whose keys add ``module.``)."""
    return getattr(model, "module", model)


def train_classifier_simple(
    model: torch.nn.Module,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    *,
    train_probe: Iterable[Batch] | None = None,
    max_steps: int | None = None,
    num_classes: int = 2,
    history: TrainingHistory | None = None,
    reduce: Reduce = local_only,
    on_eval: EvalHook | None = None,
    on_epoch_end: EpochHook | None = None,
    keep_best: BestWeights | None = None,
    patience: int = 0,
    verbose: bool = True,
) -> TrainingHistory:
    """The chapter's loop: a step per batch, losses every ``eval_freq`` steps on
    ``eval_iter`` batches, accuracies on ``eval_iter`` batches after each epoch.

    Estimates read ``train_probe`` (default: ``train_loader``, the chapter's) and
    ``val_loader``. ``max_steps`` ends training after that many optimizer steps, with
    the epoch's accuracies and hook as at any epoch's end. ``history`` continues a
    stopped run from its last finished epoch; ``examples_seen`` counts examples over all
    workers. ``keep_best`` measures each epoch's validation accuracy on its whole
    validation set and ends with the best epoch's weights; ``patience`` stops after that
    many epochs without a better one. ``verbose`` prints the chapter's lines, with a bar
    where stderr is a terminal (never on Ray workers, whose output goes to Ray's log files,
    nor into a log file).
    """
    history = history or TrainingHistory()
    train_probe = train_loader if train_probe is None else train_probe
    world_size = round(reduce(torch.ones(1, dtype=torch.float64)).item())
    show_bar = verbose and sys.stderr.isatty()

    def log(line: str) -> None:
        if show_bar:
            tqdm.write(line)
        elif verbose:
            say(line)

    for epoch in range(history.epochs_done, num_epochs):
        if history.stopped_at_max_steps or history.stopped_early:
            break
        model.train()
        steps = tqdm(
            train_loader,
            desc=f"Epoch {epoch + 1}/{num_epochs}",
            unit="step",
            disable=not show_bar,
            leave=False,
        )
        for batch in steps:
            optimizer.zero_grad()
            loss = calc_loss_batch(batch, model, device)
            loss.backward()
            optimizer.step()
            history.examples_seen += batch.input_ids.shape[0] * world_size
            history.global_step += 1
            if history.global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_probe, val_loader, device, eval_iter, reduce
                )
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.eval_steps.append(history.global_step)
                history.eval_examples.append(history.examples_seen)
                steps.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
                log(
                    f"Ep {epoch + 1} (Step {history.global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
                if on_eval:
                    on_eval(history)
            if max_steps is not None and history.global_step + 1 >= max_steps:
                history.stopped_at_max_steps = True
                steps.close()
                log(f"Stopping after {max_steps} steps (--max-steps)")
                break
        train_accuracy = calc_accuracy_loader(
            train_probe, model, device, eval_iter, reduce, num_classes
        )
        if keep_best:
            val_accuracy = calc_accuracy_loader(
                keep_best.judged_on, model, device, None, reduce, num_classes
            )
        else:
            val_accuracy = calc_accuracy_loader(
                val_loader, model, device, eval_iter, reduce, num_classes
            )
        log(
            f"Training accuracy: {train_accuracy * 100:.2f}% | "
            f"Validation accuracy: {val_accuracy * 100:.2f}%"
        )
        history.train_accs.append(train_accuracy)
        history.val_accs.append(val_accuracy)
        history.epochs_done = epoch + 1
        if not history.best_epoch or val_accuracy > history.val_accs[history.best_epoch - 1]:
            history.best_epoch = history.epochs_done
            if keep_best:
                keep_best.remember(model)
        if patience and history.epochs_done - history.best_epoch >= patience:
            history.stopped_early = True
            log(f"Stopping: no better validation accuracy for {patience} epoch(s) (--patience)")
        if on_epoch_end:
            on_epoch_end(history)
        if history.stopped_early:
            break
    if keep_best and keep_best.state is not None and history.best_epoch != history.epochs_done:
        keep_best.restore(model)  # the summary says so (``kept_epoch_note``)
    return history


def class_scores(confusion: torch.Tensor, labels: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support, and macro F1, from ``[true,
    predicted]`` counts; a class never predicted (or never present) scores 0."""
    per_class = {}
    for k, label in enumerate(labels):
        tp = confusion[k, k].item()
        predicted, actual = confusion[:, k].sum().item(), confusion[k, :].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(actual),
        }
    macro_f1 = sum(scores["f1"] for scores in per_class.values()) / len(per_class)
    return {"per_class": per_class, "macro_f1": macro_f1}


def spam_scores(confusion: torch.Tensor, labels: Sequence[str] = ("not spam", "spam")) -> dict:
    """Precision, recall and F1 of the spam class (the chapter's), flat."""
    scores = class_scores(confusion, labels)["per_class"]["spam"]
    return {f"spam_{key}": scores[key] for key in ("precision", "recall", "f1")}


def final_scores(confusion: torch.Tensor, labels: list[str]) -> dict:
    """Per-class scores, macro F1 and the confusion matrix; a spam/not-spam model also
    keeps the flat ``spam_precision``/``spam_recall``/``spam_f1`` it always had."""
    scores = {**class_scores(confusion, labels), "labels": labels}
    if is_spam_model(labels):
        scores |= spam_scores(confusion, labels)
    return scores | {"confusion_matrix": confusion.int().tolist()}
