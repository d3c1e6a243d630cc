"""The endpoint's own Prometheus metrics, beside Ray Serve's request and latency metrics.

Recorded through ``ray.serve.metrics`` (which adds the deployment, replica and application
tags) and exported by Ray's metrics agent on every node, prefixed ``ray_``.
"""

from __future__ import annotations

import collections

from ray.serve.metrics import Counter, Gauge, Histogram

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """One set per replica; created in the replica, where Serve's tags are known."""

    def __init__(self) -> None:
        self.predictions = Counter(
            "spam_gpt_predictions",
            description="messages classified, by predicted label and model version",
            tag_keys=("label", "model_version"),
        )
        self.batch_size = Histogram(
            "spam_gpt_batch_size",
            description="messages per forward pass",
            boundaries=BATCH_BOUNDARIES,
        )
        self.load_seconds = Gauge(
            "spam_gpt_model_load_seconds",
            description="seconds the replica took to load the model version it answers with",
            tag_keys=("model_version",),
        )
        self.answering = Gauge(
            "spam_gpt_model_version_answering",
            description="1 for the model version this replica answers with, 0 for earlier ones",
            tag_keys=("model_name", "model_version"),
        )

    def loaded(self, name: str, version: str, seconds: float, replaced: str | None) -> None:
        """A model version took over (``replaced``: the one it replaced, if any)."""
        if replaced is not None:
            self.answering.set(0, tags={"model_name": name, "model_version": replaced})
        self.answering.set(1, tags={"model_name": name, "model_version": version})
        self.load_seconds.set(seconds, tags={"model_version": version})

    def answered(self, labels: list[str], version: str) -> None:
        """One forward pass's predicted labels."""
        self.batch_size.observe(len(labels))
        for label, count in collections.Counter(labels).items():
            self.predictions.inc(count, tags={"label": label, "model_version": version})
