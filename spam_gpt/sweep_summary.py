"""What a sweep found: one row per trial, the best of them, and the files that show it
(``summary.csv``, ``summary.md`` and a plot of test accuracy per variant)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from spam_gpt.plots import plot_sweep

COLUMNS = (
    "trial",
    "variant",
    "seed",
    "validation_accuracy",
    "test_accuracy",
    "macro_f1",
    "trainable_parameters",
    "training_seconds",
    "run_id",
    "error",
)
PERCENT = ("validation_accuracy", "test_accuracy", "macro_f1")


def summary_row(trial: dict, run_id: str, metrics: dict) -> dict:
    """A finished trial's row, from the trial and its ``metrics.json``."""
    return {
        "trial": trial["number"],
        "variant": trial["variant"],
        "seed": trial["seed"],
        **{key: metrics[key] for key in (*PERCENT, "trainable_parameters", "training_seconds")},
        "run_id": run_id,
        "error": "",
    }


def failed_row(trial: dict, error: str) -> dict:
    return {
        "trial": trial["number"],
        "variant": trial["variant"],
        "seed": trial["seed"],
        "error": error,
    }


def summary_frame(rows: Sequence[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    return frame.sort_values("trial").reset_index(drop=True)


def best_trial(frame: pd.DataFrame) -> pd.Series | None:
    """The finished trial with the best validation accuracy; ties go to the fewer
    trainable parameters, then to the earlier trial."""
    finished = frame[frame["error"] == ""]
    if finished.empty:
        return None
    ranked = finished.assign(minus_accuracy=-finished["validation_accuracy"]).sort_values(
        ["minus_accuracy", "trainable_parameters", "trial"]
    )
    return frame.loc[ranked.index[0]]


def markdown_table(frame: pd.DataFrame) -> str:
    """The table a person reads: accuracies in percent, parameters with separators."""
    header = ["trial", "variant", "seed", "val acc", "test acc", "macro F1", "trainable", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples():
        if row.error:
            cells = [str(row.trial), row.variant, str(row.seed), f"failed: {row.error}"]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [
                str(row.trial),
                row.variant,
                str(row.seed),
                *(f"{getattr(row, key) * 100:.2f}%" for key in PERCENT),
                f"{int(row.trainable_parameters):,}",
                f"{row.training_seconds:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.md").write_text(markdown_table(frame))
    finished = frame[frame["error"] == ""]
    plots = plot_sweep(finished, out_dir) if not finished.empty else []
    return [out_dir / "summary.csv", out_dir / "summary.md", *plots]
