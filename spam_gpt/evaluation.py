"""Accuracy and per-label scores of a saved model on labelled splits."""

from __future__ import annotations

import pandas as pd
import torch

from spam_gpt.predictor import Predictor
from spam_gpt.training import accuracy_of, count_confusion, final_scores


def evaluate_predictor(predictor: Predictor, splits: dict[str, pd.DataFrame]) -> dict:
    """Every row of each split (frames of ``Text`` and ``Label``, an index into the
    model's labels; the chapter's train accuracy drops the last partial batch, this does
    not), plus the test set's per-label scores and confusion matrix."""
    labels = predictor.meta.labels
    metrics: dict = {}
    for name, frame in splits.items():
        rows = predictor.class_probabilities(predictor.tokenize(list(frame["Text"])))
        predicted = torch.tensor([max(range(len(row)), key=row.__getitem__) for row in rows])
        truth = torch.tensor([int(x) for x in frame["Label"]], dtype=torch.long)
        confusion = count_confusion(truth, predicted, len(labels))
        metrics[f"{name}_accuracy"] = accuracy_of(confusion)
        if name == "test":
            metrics |= final_scores(confusion, labels)
    return metrics
