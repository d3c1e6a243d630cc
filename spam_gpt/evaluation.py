"""Accuracy and spam precision/recall of a saved model on the chapter's splits."""

from __future__ import annotations

import pandas as pd
import torch

from spam_gpt.predictor import Predictor
from spam_gpt.training import accuracy_of, count_confusion, spam_scores


def evaluate_predictor(predictor: Predictor, splits: dict[str, pd.DataFrame]) -> dict:
    """Every row of each split (the chapter's train accuracy drops the last partial batch;
    this does not), plus the test set's spam scores and confusion matrix."""
    metrics: dict = {}
    for name, frame in splits.items():
        probabilities = predictor.spam_probabilities(predictor.tokenize(list(frame["Text"])))
        confusion = count_confusion(
            torch.tensor([int(x) for x in frame["Label"]]),
            torch.tensor([int(p > 0.5) for p in probabilities]),
        )
        metrics[f"{name}_accuracy"] = accuracy_of(confusion)
        if name == "test":
            metrics |= spam_scores(confusion) | {"confusion_matrix": confusion.int().tolist()}
    return metrics
