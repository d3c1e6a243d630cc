"""Accuracy and spam precision/recall of a saved model on the chapter's splits."""

from __future__ import annotations

import pandas as pd
import torch

from spam_gpt.predictor import Predictor
from spam_gpt.training import spam_scores


def confusion_matrix(labels: list[int], predicted: list[int]) -> torch.Tensor:
    """Counts ``[true label, predicted label]``."""
    counts = torch.zeros(2, 2, dtype=torch.float64)
    for true, guess in zip(labels, predicted):
        counts[true, guess] += 1
    return counts


def evaluate_predictor(predictor: Predictor, splits: dict[str, pd.DataFrame]) -> dict:
    """Every row of each split (the chapter's train accuracy drops the last partial batch;
    this does not), plus the test set's spam scores and confusion matrix."""
    metrics: dict = {}
    for name, frame in splits.items():
        probabilities = predictor.spam_probabilities(predictor.tokenize(list(frame["Text"])))
        confusion = confusion_matrix(
            [int(x) for x in frame["Label"]], [int(p > 0.5) for p in probabilities]
        )
        metrics[f"{name}_accuracy"] = (confusion.trace() / confusion.sum()).item()
        if name == "test":
            metrics |= spam_scores(confusion) | {"confusion_matrix": confusion.int().tolist()}
    return metrics
