"""The chapter's loss and accuracy plots (epochs below, examples seen above), a
confusion-matrix plot and a sweep's test accuracy per variant, each written as PDF and
PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on headless workers
import matplotlib.pyplot as plt
import pandas as pd
import torch

from spam_gpt.training import TrainingHistory


def save_figure(fig: plt.Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.pdf", out_dir / f"{stem}.png"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def plot_values(
    epochs_seen: torch.Tensor,
    examples_seen: torch.Tensor,
    train_values: list[float],
    val_values: list[float],
    label: str,
    out_dir: Path,
) -> list[Path]:
    """One curve per split against epochs, with a second x-axis of examples seen."""
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()
    ax2.plot(examples_seen, train_values, alpha=0)  # invisible: only aligns the top axis
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{label}-plot")


def plot_history(history: TrainingHistory, out_dir: str | Path) -> list[Path]:
    """``loss-plot`` and ``accuracy-plot`` as the chapter draws them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    epochs = history.epochs_done
    paths = []
    for label, train, val in (
        ("loss", history.train_losses, history.val_losses),
        ("accuracy", history.train_accs, history.val_accs),
    ):
        epochs_seen = torch.linspace(0, epochs, len(train))
        examples_seen = torch.linspace(0, history.examples_seen, len(train))
        paths += plot_values(epochs_seen, examples_seen, train, val, label, out)
    return paths


def plot_confusion_matrix(
    confusion: torch.Tensor, labels: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Test-set counts, true label by row, so a reader sees what the model confuses."""
    size = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * size, 2 + 0.8 * size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(size), labels=labels)
    if size > 3:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_yticks(range(size), labels=labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    peak = confusion.max().item()
    for row in range(size):
        for col in range(size):
            count = confusion[row, col].item()
            color = "white" if count > peak / 2 else "black"
            ax.text(col, row, f"{int(count)}", ha="center", va="center", color=color, fontsize=12)
    ax.set_title("Test set")
    fig.tight_layout()
    return save_figure(fig, Path(out_dir), "confusion-matrix")


def plot_sweep(trials: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``test-accuracy``: a bar per variant (the mean over its seeds), a dot per trial."""
    variants = list(dict.fromkeys(trials["variant"]))  # in the grid's order
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(variants)))
    means = [trials.loc[trials["variant"] == v, "test_accuracy"].mean() * 100 for v in variants]
    ax.barh(range(len(variants)), means, color="tab:blue", alpha=0.6)
    rows = [variants.index(v) for v in trials["variant"]]
    ax.scatter(trials["test_accuracy"] * 100, rows, color="black", s=12, zorder=3)
    for row, mean in enumerate(means):
        ax.annotate(
            f"{mean:.2f}%",
            (mean, row),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(variants)), variants, fontsize=8)
    ax.invert_yaxis()
    low = min(trials["test_accuracy"]) * 100
    ax.set_xlim(max(0.0, low - 5), 101)
    ax.set_xlabel("Test accuracy (%)")
    ax.set_title("Test accuracy per variant (bar: mean over seeds; dots: trials)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, "test-accuracy")
