"""Bulk scoring of message archives with Ray Data.

Every input row comes out exactly once, its columns untouched, with ``label``, its
``probability``, ``probabilities`` (a struct with one field per label, which SQL engines
read as ``probabilities.spam``), ``spam_probability`` for spam/not-spam models, ``model``
and ``score_error`` appended; a row that cannot be scored keeps a null label and says why.
Batches stay in Arrow from reader to writer so that timestamps, lists and
dictionary-encoded columns pass through unchanged. Output is written beside the target
and moved into place (locally), and marked complete with a ``_SUCCESS`` file, so a failed
job never leaves output that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from spam_gpt.classifier import is_spam_model
from spam_gpt.model_ref import pin_model_ref
from spam_gpt.predictor import Prediction, Predictor
from spam_gpt.progress import ScoringProgress
from spam_gpt.sources import (
    DataError,
    ParquetFooters,
    expand_inputs,
    filesystem_of,
    is_remote,
    local_path,
    read_files,
    resolve_column,
)

ADDED_COLUMNS = (
    "label",
    "probability",
    "probabilities",
    "spam_probability",
    "model",
    "score_error",
)
SUCCESS_FILE = "_SUCCESS"


class ScoringError(DataError):
    """The job cannot start; the message says what to change."""


def is_text_type(kind: pa.DataType) -> bool:
    """Text as any writer stores it: string, large_string, string_view, their dictionary
    encodings, or bytes (binary, as Hive and Impala write text), read as UTF-8."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(
        check(kind)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_string_view,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_binary_view,
        )
    )


def message_texts(column: pa.ChunkedArray) -> tuple[list[str | None], list[str | None]]:
    """The messages of a text column, and per row why it cannot be scored (or None)."""
    rows = len(column)
    if not is_text_type(column.type):
        return [None] * rows, [f"text column is {column.type}, not a string"] * rows
    texts: list[str | None] = []
    errors: list[str | None] = []
    for value in column.to_pylist():
        error = None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value, error = None, "text is not valid UTF-8"
        if value is None:
            error = error or "text is null"
        elif not value.strip():
            value, error = None, "text is empty"
        texts.append(value)
        errors.append(error)
    return texts, errors


def score_table(
    predictor: Predictor, table: pa.Table, text_column: str, model_ref: str
) -> pa.Table:
    """``table`` with the result columns appended, row for row."""
    texts, errors = message_texts(table.column(text_column))
    valid = [i for i, text in enumerate(texts) if text is not None]
    predictions: list[Prediction | None] = [None] * table.num_rows
    for i, prediction in zip(valid, predictor.predict([texts[i] for i in valid])):
        predictions[i] = prediction
    return append_results(table, predictor.meta.labels, predictions, errors, model_ref)


def append_results(
    table: pa.Table,
    labels: list[str],
    predictions: list[Prediction | None],
    errors: list[str | None],
    model_ref: str,
) -> pa.Table:
    rows = table.num_rows
    per_label = pa.struct([(label, pa.float64()) for label in labels])
    result = (
        table.append_column("label", pa.array([p and p.label for p in predictions], pa.string()))
        .append_column(
            "probability", pa.array([p and p.probability for p in predictions], pa.float64())
        )
        .append_column(
            "probabilities", pa.array([p and p.probabilities for p in predictions], per_label)
        )
    )
    if is_spam_model(labels):
        spam = [p and p.spam_probability for p in predictions]
        result = result.append_column("spam_probability", pa.array(spam, pa.float64()))
    return result.append_column("model", pa.array([model_ref] * rows, pa.string())).append_column(
        "score_error", pa.array(errors, pa.string())
    )


def empty_output(schema: pa.Schema, model_ref: str, tracking_uri: str | None) -> pa.Table:
    """The output of an input with no rows: no rows, every column (the model's labels
    decide the ``probabilities`` struct, so its description is read, not its weights)."""
    from spam_gpt.checkpoint import load_meta
    from spam_gpt.model_ref import resolve_model

    folder, _, _ = resolve_model(model_ref, tracking_uri)
    return append_results(schema.empty_table(), load_meta(folder).labels, [], [], model_ref)


class SpamScorer:
    """The Ray Data actor: loads the model once, then scores Arrow batches."""

    def __init__(
        self,
        model_ref: str,
        tracking_uri: str | None,
        text_column: str,
        threads: int,
        device: str,
        precision: str,
    ):
        import torch

        from spam_gpt.model_ref import load_predictor

        torch.set_num_threads(threads)
        self.predictor = load_predictor(
            model_ref,
            tracking_uri,
            device=device,
            precision=precision,
        )
        self.text_column = text_column
        self.model_ref = model_ref

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.predictor, batch, self.text_column, self.model_ref)


@dataclass
class ScoreSummary:
    rows: int
    scored: int
    errored: int
    label_shares: dict[str, float]  # share of the scored rows per label, most common first
    seconds: float
    output: str

    def __str__(self) -> str:
        shares = ", ".join(f"{label} {share:.1%}" for label, share in self.label_shares.items())
        return (
            f"Read {self.rows:,} rows: {self.scored:,} scored, {self.errored:,} errored; "
            f"labels: {shares or 'none'}; {self.rows / self.seconds:,.0f} rows/s "
            f"({self.seconds:.1f} s); output: {self.output}"
        )


def summarize(output: str, seconds: float) -> ScoreSummary:
    """Counts from the written files (the label column, streamed): never held in memory."""
    rows = 0
    counts: Counter = Counter()
    for batch in pa_ds.dataset(output, format="parquet").to_batches(columns=["label"]):
        rows += batch.num_rows
        counts.update(label for label in batch.column("label").to_pylist() if label is not None)
    scored = sum(counts.values())
    shares = {label: n / scored for label, n in counts.most_common()}
    return ScoreSummary(rows, scored, rows - scored, shares, seconds, output)


def write_success(output: str, summary: ScoreSummary) -> None:
    payload = json.dumps(asdict(summary), indent=2).encode()
    filesystem, path = filesystem_of(output)
    with filesystem.open_output_stream(f"{path}/{SUCCESS_FILE}") as stream:
        stream.write(payload)


def write_scored(scored, output: str, empty: Callable[[], pa.Table]) -> None:
    """Ray Data writes no file for no rows; then write ``empty()``, the output schema."""
    scored.write_parquet(output)
    filesystem, path = filesystem_of(output)
    found = filesystem.get_file_info(pa_fs.FileSelector(path, allow_not_found=True))
    if not any(info.path.endswith(".parquet") for info in found):
        filesystem.create_dir(path)
        pq.write_table(empty(), f"{path}/empty.parquet", filesystem=filesystem)


def run_scoring(
    model: str,
    inputs: list[str],
    output: str,
    *,
    text_column: str | None = None,
    batch_size: int = 512,
    concurrency: int = 1,
    cpus_per_actor: int = 1,
    gpu: bool = False,
    address: str | None = None,
    runtime_env: dict | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
    precision: str = "fp32",
) -> ScoreSummary:
    """Score ``inputs`` into the Parquet folder ``output``; see the module docstring."""
    from ray.data import ActorPoolStrategy

    from spam_gpt.ray_cluster import connect, require_cpus

    try:
        paths, fmt = expand_inputs(inputs)
    except DataError as error:
        raise ScoringError(str(error)) from None
    if not overwrite and not is_remote(output) and Path(local_path(output)).exists():
        raise ScoringError(f"--output {output} exists; choose a new folder or pass --overwrite")
    try:
        model_ref = pin_model_ref(model, tracking_uri)
    except FileNotFoundError as error:
        raise ScoringError(f"--model {model}: {error}") from None
    needed = concurrency * cpus_per_actor + 1
    connect(address, num_cpus=needed, runtime_env=runtime_env)
    try:
        require_cpus(needed, "--concurrency x --cpus-per-actor plus one CPU for reading")
    except ValueError as error:
        raise ScoringError(str(error)) from None
    footers = ParquetFooters.of(paths) if fmt == "parquet" else None
    dataset = read_files(paths, fmt, footers=footers)
    schema = dataset.schema()
    columns = list(schema.names)
    try:
        column = resolve_column(columns, text_column, "text", "--text-column")
    except DataError as error:
        raise ScoringError(str(error)) from None
    clashes = [c for c in ADDED_COLUMNS if c in columns]
    if clashes:
        raise ScoringError(f"the input already has column(s) {', '.join(clashes)}; rename them")
    scored = dataset.map_batches(
        SpamScorer,
        fn_constructor_kwargs={
            "model_ref": model_ref,
            "tracking_uri": tracking_uri,
            "text_column": column,
            "threads": cpus_per_actor,
            "device": "cuda" if gpu else "cpu",
            "precision": precision,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor,
        num_gpus=1 if gpu else 0,
    )

    def empty() -> pa.Table:
        fields = pa.schema(list(zip(schema.names, schema.types)))
        return empty_output(fields, model_ref, tracking_uri)

    def write(folder: str, output: str) -> ScoreSummary:
        """The scored rows into ``folder`` under a progress line, marked complete."""
        started = time.perf_counter()
        with ScoringProgress(folder, footers.rows if footers else None):
            write_scored(scored, folder, empty)
        summary = summarize(folder, time.perf_counter() - started)
        summary.output = output
        write_success(folder, summary)
        return summary

    if is_remote(output):
        return write(output, output)
    target = Path(local_path(output)).resolve()
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        summary = write(str(staging), str(target))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
