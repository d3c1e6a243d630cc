"""Bulk scoring of message archives with Ray Data.

Every input row comes out exactly once, its columns untouched, with ``label``, its
``probability``, ``probabilities`` (a struct with one field per label, which SQL engines
read as ``probabilities.spam``), ``spam_probability`` for spam/not-spam models, ``model``
and ``score_error`` appended; a row that cannot be scored keeps a null label and says why.
Batches stay in Arrow from reader to writer so that timestamps, lists and
dictionary-encoded columns pass through unchanged.

The input is cut into units, each scored by a model actor into its own part file (see
:mod:`spam_gpt.scoring_units`), so a job stopped part way resumes where it stopped. Output
is written beside the target and moved into place (locally), and marked complete with a
``_SUCCESS`` file, so a stopped job never leaves output that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_ds
import pyarrow.fs as pa_fs

from spam_gpt.classifier import is_spam_model
from spam_gpt.model_ref import pin_model_ref
from spam_gpt.predictor import Prediction, Predictor
from spam_gpt.progress import ScoringProgress
from spam_gpt.scoring_units import (
    Manifest,
    conform,
    finished_parts,
    plan_units,
    remove_unfinished,
    unit_tables,
    write_part,
)
from spam_gpt.sources import (
    COMPRESSED_SUFFIXES,
    OTHER_FORMATS,
    TEXT_SUFFIXES,
    DataError,
    ParquetFooters,
    SourceFile,
    expand_inputs,
    file_columns,
    filesystem_of,
    is_remote,
    list_files,
    local_path,
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
RAISED = re.compile(r"(?P<name>[A-Za-z_][\w.]*): (?P<message>.+)")  # a traceback's last line
RESUME = "run the same command with --resume to finish it"


class ScoringError(DataError):
    """The job cannot start or go on; the message says what to change."""


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


def text_column_of(schema: pa.Schema, requested: str | None) -> str:
    """The text column, or a field nested in struct columns (``payload.text``), as
    pipelines that land JSON events in Parquet store messages. A column whose own name
    holds the dots wins."""
    if requested is None:
        try:
            return resolve_column(schema.names, None, "text", "--text-column")
        except DataError as error:
            nested = [path for path in struct_fields(schema) if path.lower().endswith(".text")]
            hint = f" (such as --text-column {nested[0]}, a field of a struct)" if nested else ""
            raise DataError(f"{error}{hint}") from None
    if requested in schema.names or "." not in requested:
        return resolve_column(schema.names, requested, "text", "--text-column")
    check_nested_field(schema, requested)
    return requested


def struct_fields(fields, prefix: str = "") -> Iterator[str]:
    """The dotted paths of every field nested in struct columns."""
    for field in fields:
        if pa.types.is_struct(field.type):
            yield from struct_fields(field.type, f"{prefix}{field.name}.")
        elif prefix:
            yield f"{prefix}{field.name}"


def check_nested_field(schema: pa.Schema, path: str) -> None:
    """Refuse ``a.b.c`` unless each step is a field of a struct, naming the fields there."""
    top, *names = path.split(".")
    kind = schema.field(resolve_column(schema.names, top, "text", "--text-column")).type
    for depth, name in enumerate(names):
        fields = [field.name for field in kind] if pa.types.is_struct(kind) else []
        if name not in fields:
            parent = ".".join([top, *names[:depth]])
            holds = f"its fields: {', '.join(fields)}" if fields else f"it is {kind}"
            raise DataError(f"--text-column {path}: {parent} has no field {name!r} ({holds})")
        kind = kind.field(name).type


def text_values(table: pa.Table, column: str) -> pa.ChunkedArray:
    """The column ``column``, or the field it names in struct columns (``a.b``)."""
    if column in table.column_names:
        return table.column(column)
    top, *path = column.split(".")
    values = table.column(top)
    for name in path:
        values = pc.struct_field(values, name)
    return values


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
    texts, errors = message_texts(text_values(table, text_column))
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


class UnitScorer:
    """The Ray Data actor: loads the model once, then scores whole units into their parts,
    all of its torch work on one thread (see :mod:`spam_gpt.torch_thread`)."""

    def __init__(
        self,
        job: ScoringJob,
        tracking_uri: str | None,
        threads: int,
        device: str,
        batch_size: int,
    ):
        from spam_gpt.model_ref import load_predictor
        from spam_gpt.torch_thread import TorchThread

        self.torch = TorchThread(threads)
        self.predictor = self.torch.run(
            load_predictor,
            job.manifest.model,
            tracking_uri,
            device=device,
            precision=job.manifest.precision,
            compile_int8=True,
        )
        self.job = job
        self.batch_size = batch_size
        labels = self.predictor.meta.labels
        self.schema = append_results(job.schema.empty_table(), labels, [], [], job.model).schema

    def __call__(self, batch: dict) -> dict:
        for index in batch["unit"]:
            self.torch.run(self.score_unit, int(index))
        return batch

    def score_unit(self, index: int) -> None:
        tables = unit_tables(self.job.manifest.units[index], self.batch_size)
        scored = (
            score_table(
                self.predictor, conform(t, self.job.schema), self.job.column, self.job.model
            )
            for t in tables
        )
        write_part(self.job.folder, index, scored, self.schema)


@dataclass
class ScoreSummary:
    rows: int
    scored: int
    errored: int
    label_shares: dict[str, float]  # share of the scored rows per label, most common first
    seconds: float
    output: str
    resumed: int = 0  # rows a stopped run of the job had scored already

    def __str__(self) -> str:
        shares = ", ".join(f"{label} {share:.1%}" for label, share in self.label_shares.items())
        earlier = f", {self.resumed:,} of them before resuming" if self.resumed else ""
        rate = (self.rows - self.resumed) / self.seconds
        return (
            f"Read {self.rows:,} rows{earlier}: {self.scored:,} scored, {self.errored:,} "
            f"errored; labels: {shares or 'none'}; {rate:,.0f} rows/s ({self.seconds:.1f} s); "
            f"output: {self.output}"
        )


def summarize(output: str, seconds: float, resumed: int = 0) -> ScoreSummary:
    """Counts from the written files (the label column, streamed): never held in memory."""
    rows = 0
    counts: Counter = Counter()
    for batch in pa_ds.dataset(output, format="parquet").to_batches(columns=["label"]):
        rows += batch.num_rows
        counts.update(label for label in batch.column("label").to_pylist() if label is not None)
    scored = sum(counts.values())
    shares = {label: n / scored for label, n in counts.most_common()}
    return ScoreSummary(rows, scored, rows - scored, shares, seconds, output, resumed)


def write_success(output: str, summary: ScoreSummary) -> None:
    payload = json.dumps(asdict(summary), indent=2).encode()
    filesystem, path = filesystem_of(output)
    with filesystem.open_output_stream(f"{path}/{SUCCESS_FILE}") as stream:
        stream.write(payload)


@dataclass(frozen=True)
class ScoringJob:
    """What a job scores, into which folder: planned on the driver before Ray starts."""

    manifest: Manifest
    schema: pa.Schema  # the input's columns, as every part holds them
    folder: str  # where the parts go: the output itself, or a hidden folder beside it
    output: str

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def column(self) -> str:
        return self.manifest.text_column


def input_schema(files: list[SourceFile], footers: ParquetFooters | None) -> pa.Schema:
    """Parquet: the union of the files' columns; CSV/TSV: every column as text."""
    if footers is not None:
        return footers.unified_schema()
    names = dict.fromkeys(name for file in files for name in file_columns(file))
    return pa.schema([(name, pa.string()) for name in names])


FILE_SUFFIXES = (*TEXT_SUFFIXES, *COMPRESSED_SUFFIXES, ".txt", *OTHER_FORMATS)


def refuse_file_name(output: str) -> None:
    """The output is a folder of Parquet parts: ``--output scored.csv`` would get a folder
    of that name holding Parquet, which no CSV reader opens."""
    path = output.rstrip("/")
    folder = path
    while (suffix := "." + folder.rsplit(".", 1)[-1].lower()) in FILE_SUFFIXES:
        folder = folder[: -len(suffix)]
    if folder != path:
        raise ScoringError(
            f"--output {output}: the output is a folder of Parquet files (parts, "
            f"_manifest.json, _SUCCESS), not a {path[len(folder) :]} file; name a folder such "
            f"as {folder} (pandas converts it afterwards, for example "
            f"pd.read_parquet('{folder}').to_csv('{folder}.csv', index=False))"
        )


def plan_job(
    model: str,
    inputs: list[str],
    output: str,
    text_column: str | None,
    precision: str,
    tracking_uri: str | None,
) -> ScoringJob:
    """The job's units, schema and folders, every input error found before Ray starts."""
    refuse_file_name(output)
    try:
        paths, fmt = expand_inputs(inputs)
        footers = ParquetFooters.of(paths) if fmt == "parquet" else None
        files = footers.files if footers else list_files(paths, fmt)
        if not files:
            raise DataError(f"--input {' '.join(inputs)} holds no {fmt} files")
        schema = input_schema(files, footers)
        column = text_column_of(schema, text_column)
    except DataError as error:
        raise ScoringError(str(error)) from None
    clashes = [c for c in ADDED_COLUMNS if c in schema.names]
    if clashes:
        raise ScoringError(f"the input already has column(s) {', '.join(clashes)}; rename them")
    try:
        model_ref = pin_model_ref(model, tracking_uri)
    except FileNotFoundError as error:
        raise ScoringError(f"--model {model}: {error}") from None
    units = plan_units(files, footers)
    folder = output
    if not is_remote(output):
        target = Path(local_path(output)).resolve()
        output, folder = str(target), str(target.parent / f".{target.name}.partial")
    return ScoringJob(Manifest(model_ref, column, precision, units), schema, folder, output)


def prepare_folder(job: ScoringJob, overwrite: bool, resume: bool) -> set[int]:
    """Start the job's folder, or keep a stopped job's parts to finish it; returns the
    units done already."""
    filesystem, where = filesystem_of(job.folder)
    started = Manifest.load(job.folder)
    is_done = filesystem.get_file_info(f"{job.output}/{SUCCESS_FILE}").type == pa_fs.FileType.File
    if overwrite:
        filesystem.delete_dir_contents(where, missing_dir_ok=True)
        started = None
    elif is_done or (not is_remote(job.output) and Path(job.output).exists()):
        finished = " (a finished job)" if is_done else ""
        raise ScoringError(
            f"--output {job.output} exists{finished}; choose a new folder or pass --overwrite"
        )
    if started is not None:
        done = finished_parts(job.folder)
        if not resume:
            raise ScoringError(
                f"a job stopped part way left {job.folder} ({len(done):,} of "
                f"{len(started.units):,} parts scored); add --resume to finish it, or "
                "--overwrite to start again"
            )
        why = job.manifest.difference(started)
        if why:
            raise ScoringError(
                f"cannot resume the job in {job.folder}: {why}; run it as it started, or "
                "pass --overwrite to start again"
            )
        remove_unfinished(job.folder)
        return done
    if resume:
        print(f"Nothing to resume at {job.folder}; starting the job", flush=True)
    job.manifest.save(job.folder)
    return set()


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
    resume: bool = False,
    precision: str = "fp32",
) -> ScoreSummary:
    """Score ``inputs`` into the Parquet folder ``output``; see the module docstring."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from spam_gpt.ray_cluster import connect, require_cpus, require_gpus

    if overwrite and resume:
        raise ScoringError("--resume keeps a stopped job's work and --overwrite drops it; pick one")
    job = plan_job(model, inputs, output, text_column, precision, tracking_uri)
    done = prepare_folder(job, overwrite, resume)
    todo = sorted(set(range(len(job.manifest.units))) - done)
    if done:
        print(
            f"Resuming: {len(done):,} of {len(job.manifest.units):,} parts are scored", flush=True
        )
    needed = concurrency * cpus_per_actor
    connect(address, num_cpus=needed, runtime_env=runtime_env)
    try:
        require_cpus(needed, "--concurrency x --cpus-per-actor")
        if gpu:
            require_gpus(concurrency, "actor")
    except ValueError as error:
        raise ScoringError(str(error)) from None
    total = sum(unit.rows or 0 for unit in job.manifest.units)
    known = all(unit.rows is not None for unit in job.manifest.units)
    started = time.perf_counter()
    progress = ScoringProgress(job.folder, total if known else None)
    before = progress.rows.count()  # footers read once: the progress line keeps them
    if todo:
        units = ray.data.from_items([{"unit": i} for i in todo], override_num_blocks=len(todo))
        scored = units.map_batches(
            UnitScorer,
            fn_constructor_kwargs={
                "job": job,
                "tracking_uri": tracking_uri,
                "threads": cpus_per_actor,
                "device": "cuda" if gpu else "cpu",
                "batch_size": batch_size,
            },
            batch_size=1,
            compute=ActorPoolStrategy(
                size=min(concurrency, len(todo)),
                max_tasks_in_flight_per_actor=units_in_flight(known),
            ),
            num_cpus=cpus_per_actor,
            num_gpus=1 if gpu else 0,
        )
        with progress:
            try:
                for _ in scored.iter_batches(batch_size=None):
                    pass
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see stopping.Terminated)
                print(f"Stopped: {saved_parts(job)}: {RESUME}", file=sys.stderr, flush=True)
                raise
            except Exception as error:
                raise ScoringError(
                    f"the job stopped ({cause_of(error)}); {saved_parts(job)}: fix the cause "
                    f"and {RESUME}"
                ) from error
    summary = summarize(job.folder, time.perf_counter() - started, before)
    summary.output = job.output
    write_success(job.folder, summary)
    if job.folder != job.output:
        if Path(job.output).exists():
            shutil.rmtree(job.output)
        os.replace(job.folder, job.output)
    return summary


def units_in_flight(equal_units: bool) -> int:
    """Units Ray Data hands each actor at once. It tells an actor of its next unit 0.1-0.2 s
    after the last ends (its scheduling loop waits 0.1 s a step): 4 % of a 500-row unit of
    gpt2-small in int8 on one core. A second unit queued on the actor hides that wait; with
    units of equal rows, actors of one speed still end within a unit of each other, as
    they do taking one at a time (benchmarks/RESULTS.md). Whole files (CSV, TSV)
    differ in size, and one queued behind a busy actor would keep it while an idle actor
    waits: they go one at a time."""
    return 2 if equal_units else 1


def saved_parts(job: ScoringJob) -> str:
    parts = len(finished_parts(job.folder))
    return f"{parts:,} of {len(job.manifest.units):,} parts are saved in {job.folder}"


def cause_of(error: Exception) -> str:
    """What stopped the job, as ``Name: message``: Ray raises its own wrapper, whose text
    carries the actor's traceback; the last exception named there outside Ray's is the
    one spam-gpt or its libraries raised."""
    raised = [
        match
        for line in str(error).splitlines()
        if (match := RAISED.fullmatch(line)) and not match["name"].startswith("ray.")
    ]
    if not raised:
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
    return f"{raised[-1]['name'].rsplit('.', 1)[-1]}: {raised[-1]['message'][:600]}"
