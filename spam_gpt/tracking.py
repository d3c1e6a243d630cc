"""MLflow tracking for training jobs: one run per job, metrics logged exactly once.

The driver opens the run; rank 0 logs the curves as training goes, and the driver logs the
results, plots and model once it holds them. Metrics are logged with
explicit steps and skipped when MLflow already holds that step, so a worker group that is
restarted from its last checkpoint and replays an epoch (deterministically) neither
duplicates nor loses a point.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Map

from spam_gpt.classifier import is_spam_model
from spam_gpt.training import TrainingHistory

DEFAULT_EXPERIMENT = "spam-gpt"
DEFAULT_REGISTERED_MODEL = "spam-gpt"
JOB_TAG = "spam_gpt.job"
VERSION_TAG = "spam_gpt.registered_version"
RESULTS_TAG = "spam_gpt.results_logged"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
# MLflow's own settings for one quick try: a retry after a second, ten seconds to answer.
QUICK_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PYFUNC_MODEL_FILE = Path(__file__).with_name("mlflow_model.py")
EVAL_METRICS = ("train_loss", "val_loss", "examples_seen")
EPOCH_METRICS = ("train_accuracy", "val_accuracy")
FINAL_METRICS = {
    "train_accuracy": "final_train_accuracy",
    "validation_accuracy": "final_validation_accuracy",
    "test_accuracy": "test_accuracy",
    "macro_f1": "macro_f1",
    "spam_precision": "spam_precision",
    "spam_recall": "spam_recall",
    "spam_f1": "spam_f1",
    "training_seconds": "training_seconds",
}


def metric_key(name: str) -> str:
    """A label as part of an MLflow metric name, which allows letters, digits, ``_-. /``."""
    return re.sub(r"[^\w.\- ]", "_", name)


def final_metric_values(metrics: dict) -> dict[str, float]:
    """The run's final numbers under their MLflow names; per label as ``precision/spam``."""
    values = {FINAL_METRICS[k]: float(v) for k, v in metrics.items() if k in FINAL_METRICS}
    for label, scores in metrics["per_class"].items():
        for score in ("precision", "recall", "f1"):
            values[f"{score}/{metric_key(label)}"] = float(scores[score])
    for key in ("worker_peak_private_mb", "worker_peak_rss_mb"):
        for rank, peak in enumerate(metrics.get(key, [])):
            values[f"{key.removeprefix('worker_')}/worker_{rank}"] = float(peak)
    return values


def default_tracking_uri() -> str:
    """An SQLite store in the working folder, as an absolute URI so workers agree on it."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def absolute_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the default store; relative
    ``sqlite:///x.db`` and plain paths made absolute, servers unchanged."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def ui_for(uri: str) -> str:
    """Where to look at ``uri``'s runs: a tracking server is its own UI; a local store
    needs ``mlflow ui`` (which, pointed at a server's address, finds no runs)."""
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}"


@contextlib.contextmanager
def few_retries() -> Iterator[None]:
    """MLflow requests that give up within seconds: by default its client retries a server
    that does not answer for about four minutes per request."""
    saved = {name: os.environ.get(name) for name in QUICK_REQUESTS}
    os.environ.update(QUICK_REQUESTS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def best_effort() -> Iterator[None]:
    """MLflow requests that may be skipped: tried with :func:`few_retries`, a failure
    swallowed (where MLflow itself may be the fault, or the result is only a note)."""
    with contextlib.suppress(MlflowException), few_retries():
        yield


def reason_of(error: Exception) -> str:
    """The short reason of a failed MLflow request (its message holds the whole URL and the
    chain of exceptions)."""
    message = error.message if isinstance(error, MlflowException) else str(error)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out", message)
    return cause[0] if cause else message.strip().splitlines()[0][:200]


class NoTrackingServer(ValueError):
    """An http(s) tracking URI where no server answers."""


def answering(uri: str, timeout: float = 10) -> str:
    """``uri``, once the tracking server there answers: MLflow's client retries a refused
    connection for minutes, then fails with a traceback."""
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered: a proxy in front of it, or a server with a static prefix
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise NoTrackingServer(
            f"no MLflow server answers at {uri} ({reason}): start it (for example `mlflow "
            "server --backend-store-uri sqlite:///mlflow.db --port 5000`), or pass the right "
            "--tracking-uri"
        ) from None
    return uri


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it with an absolute artifact folder for local stores."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The commit of the checkout spam-gpt runs from, or ``unknown`` outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def open_run(
    client: MlflowClient, experiment: str, run_name: str, params: dict, tags: dict[str, str]
) -> str:
    """Create a run (a training job's or a sweep's) with its tags and parameters."""
    run = client.create_run(ensure_experiment(client, experiment), run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
    return run.info.run_id


def job_tags(job: dict, parent_run_id: str | None = None) -> dict[str, str]:
    """A job run's tags: the job description that ``--resume`` reads, and the sweep run
    it is nested under, if any."""
    tags = {JOB_TAG: json.dumps(job)}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return tags


def job_of_run(client: MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)
    if JOB_TAG not in run.data.tags:
        raise ValueError(f"MLflow run {run_id} was not started by `spam-gpt train --workers`")
    return json.loads(run.data.tags[JOB_TAG])


class RunLogger:
    """Rank 0's writer: each metric point goes to MLflow once, keyed by its step.

    Training does not wait on MLflow: while the server does not answer (restarted, a
    network fault), :meth:`keep_up` gives up within seconds and training goes on; the points
    stay due, and the next call that gets through logs them all."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.run_id = run_id
        self.last_step: dict[str, int] | None = None  # read from MLflow on first use
        self.unanswered = False  # whether MLflow did not take the last points

    def _due(self, key: str, steps, values, timestamp: int) -> list[Metric]:
        return [
            Metric(key, float(value), timestamp, step)
            for step, value in zip(steps, values)
            if step > self.last_step[key]
        ]

    def log_history(self, history: TrainingHistory) -> None:
        """Whatever of ``history`` MLflow does not hold yet."""
        if self.last_step is None:
            history_of = functools.partial(self.client.get_metric_history, self.run_id)
            self.last_step = {
                key: max((m.step for m in history_of(key)), default=-1)
                for key in (*EVAL_METRICS, *EPOCH_METRICS)
            }
        now = int(time.time() * 1000)
        steps, epochs = history.eval_steps, range(1, len(history.train_accs) + 1)
        series = {
            "train_loss": (steps, history.train_losses),
            "val_loss": (steps, history.val_losses),
            "examples_seen": (steps, history.eval_examples),
            "train_accuracy": (epochs, history.train_accs),
            "val_accuracy": (epochs, history.val_accs),
        }
        metrics = [m for key, (x, y) in series.items() for m in self._due(key, x, y, now)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
            for metric in metrics:
                self.last_step[metric.key] = max(self.last_step[metric.key], metric.step)

    def keep_up(self, history: TrainingHistory) -> None:
        """:meth:`log_history` during training: a server that does not answer within
        seconds is noted in ``unanswered`` (and the worker's log) and tried again at the next
        call."""
        try:
            with few_retries():
                self.log_history(history)
        except MlflowException as error:
            logging.getLogger(__name__).warning("MLflow did not take the metrics: %s", error)
            self.unanswered = True
        else:
            self.unanswered = False

    def note_resume(self, epoch: int) -> None:
        """A tag on the run (left out while MLflow does not answer)."""
        with best_effort():
            self.client.set_tag(self.run_id, "resumed_from_epoch", str(epoch))

    def log_results(
        self, metrics: dict, output_dir: Path, register_as: str | None, log_model: bool = True
    ) -> str | None:
        """Final metrics, plots, ``metrics.json``, and (``log_model``) the checkpoint and the
        pyfunc model, registered as a new version of ``register_as``, with any points of the
        curves that MLflow missed. Done once: a ``--resume`` after this step finds the run
        marked and leaves it alone."""
        tags = self.client.get_run(self.run_id).data.tags
        if RESULTS_TAG in tags:
            return tags.get(VERSION_TAG)
        self.log_history(TrainingHistory(**metrics["history"]))  # what MLflow missed
        now = int(time.time() * 1000)
        final = [Metric(k, v, now, 0) for k, v in final_metric_values(metrics).items()]
        self.client.log_batch(self.run_id, metrics=final)
        for path in sorted(output_dir.iterdir()):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        version = None
        if log_model:
            version = log_model_of_run(self.client, self.run_id, output_dir, register_as, metrics)
        self.client.set_tag(self.run_id, RESULTS_TAG, "true")
        return version


def log_model_of_run(
    client: MlflowClient, run_id: str, output_dir: Path, register_as: str | None, metrics: dict
) -> str | None:
    """A training run's checkpoint (``output_dir/model``) and pyfunc model into its run,
    registered as a new version of ``register_as`` (returned) when given."""
    client.log_artifacts(run_id, str(output_dir / "model"), "checkpoint")
    version = log_pyfunc_model(
        client.tracking_uri, run_id, output_dir / "model", register_as, metrics["labels"]
    )
    if version is not None:
        tag_version(client, run_id, register_as, version, metrics)
    return version


def tag_version(client: MlflowClient, run_id: str, name: str, version: str, metrics: dict) -> None:
    """What a registered version's readers look for first: test accuracy and labels; the
    run notes the version it became."""
    client.set_model_version_tag(name, version, "test_accuracy", f"{metrics['test_accuracy']:.4f}")
    client.set_model_version_tag(name, version, "labels", ",".join(metrics["labels"]))
    client.set_tag(run_id, VERSION_TAG, version)


def pyfunc_signature(labels: list[str]) -> ModelSignature:
    """Input ``text``; output ``label``, its ``probability``, every label's in
    ``probabilities``, and ``spam_probability`` for a spam/not-spam model."""
    outputs = [
        ColSpec("string", "label"),
        ColSpec("double", "probability"),
        ColSpec(Map(DataType.double), "probabilities"),
    ]
    if is_spam_model(labels):
        outputs.append(ColSpec("double", "spam_probability"))
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


def pyfunc_requirements() -> list[str]:
    """Pinned to what trained the model, so ``mlflow models predict`` rebuilds it."""
    from importlib.metadata import version

    packages = (
        "torch",
        "tiktoken",
        "safetensors",
        "pandas",
        "pyarrow",
        "mlflow",
        "tqdm",
        "matplotlib",
    )
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    checkpoint_dir: Path,
    register_as: str | None,
    labels: list[str],
) -> str | None:
    """Log the classifier as a pyfunc "model from code" (nothing pickled), carrying the
    spam_gpt package with it, and return the registered version if ``register_as``."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(Path(__file__).parent)],
            signature=pyfunc_signature(labels),
            input_example=pd.DataFrame({"text": ["Free entry! Text WIN to 80082 now"]}),
            pip_requirements=pyfunc_requirements(),
            registered_model_name=register_as,
        )
    version = info.registered_model_version
    return None if version is None else str(version)
