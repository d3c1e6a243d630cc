"""Labelled messages for training: which rows count, which split each row is in, and the
label set. Works one batch at a time, so the same rules hold for a laptop's CSV and for
an archive of fifty million rows read by many Ray tasks.

- A row with a null or blank text, or a null or blank label, is skipped and counted.
- Splits come from a split column (train/validation/test), from separate validation and
  test inputs, or from a seeded, stratified split: every distinct text hashes (with the
  seed) to a 64-bit key, and each class is cut at the requested fractions in key order.
  The cut is exact per class (up to copies of one text, which always land together, so a
  message never straddles train and test), and it is the same on one machine or many.
  A class of more than ``EXACT_SPLIT_ROWS`` rows is cut at the fractions of the key
  range instead, which needs no memory per row.
- Labels are strings (integers read as their digits). The set is the training split's,
  sorted (numerically when every label is an integer), unless ``--labels`` fixes it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from spam_gpt.corpus import LABEL_NAMES, SPLIT_NAMES, build_splits, read_splits
from spam_gpt.sources import (
    DataError,
    SourceFile,
    expand_inputs,
    file_batches,
    file_columns,
    is_remote,
    list_files,
    local_path,
    resolve_column,
)
from spam_gpt.tokenizer import get_tokenizer

CHAPTER_FRACTIONS = (0.7, 0.1)
EXACT_SPLIT_ROWS = 1_000_000
KEY_SPACE = 1 << 64
SKIPPED_EXAMPLES = 5


@dataclass
class DataSpec:
    """Where labelled messages come from and how they divide into splits."""

    paths: list[str]
    text_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    validation_data: list[str] | None = None
    test_data: list[str] | None = None
    split: tuple[float, float] = CHAPTER_FRACTIONS
    split_seed: int = 123
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        if bool(self.validation_data) != bool(self.test_data):
            raise DataError(
                "--validation-data and --test-data go together: give both, or neither to "
                "split --data with --split"
            )
        if self.split_column and self.validation_data:
            raise DataError("give either --split-column or --validation-data/--test-data")
        if self.labels is not None and (
            len(set(self.labels)) != len(self.labels) or len(self.labels) < 2
        ):
            raise DataError(f"--labels needs two or more distinct labels, not {self.labels}")
        self.split = tuple(self.split)
        check_fractions(self.split)
        self.paths = absolute_paths(self.paths)
        self.validation_data = self.validation_data and absolute_paths(self.validation_data)
        self.test_data = self.test_data and absolute_paths(self.test_data)


def absolute_paths(paths: list[str]) -> list[str]:
    """Local paths made absolute, so Ray workers and ``--resume`` elsewhere find them."""
    return [path if is_remote(path) else os.path.abspath(local_path(path)) for path in paths]


def parse_fractions(text: str) -> tuple[float, float]:
    """``--split``: train and validation fractions (test gets the rest), or all three."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise DataError(f"--split {text}: expected fractions such as 0.7,0.1") from None
    if len(values) == 3:
        if abs(sum(values) - 1) > 1e-9:
            raise DataError(
                f"--split {text}: train, validation and test fractions add up to "
                f"{sum(values):g}, not 1"
            )
        values = values[:2]
    if len(values) != 2:
        raise DataError(f"--split {text}: give TRAIN,VALIDATION (test gets the rest)")
    check_fractions(tuple(values))
    return values[0], values[1]


def check_fractions(fractions: tuple[float, float]) -> None:
    train, validation = fractions
    if train <= 0 or validation <= 0 or train + validation >= 1:
        raise DataError(
            f"--split {train:g},{validation:g} does not add up: train and validation must be "
            f"above 0 and leave some rows for test (they add up to {train + validation:g})"
        )


def split_sizes(count: int, fractions: tuple[float, float]) -> tuple[int, int, int]:
    """Rows of one class per split, cut as the chapter cuts its data frame."""
    train, validation = int(count * fractions[0]), int(count * fractions[1])
    return train, validation, count - train - validation


def fewest_rows(fractions: tuple[float, float]) -> int:
    """The smallest class that gives every split at least one row."""
    count = 3
    while min(split_sizes(count, fractions)) < 1:
        count += 1
    return count


class InMemory(NamedTuple):
    """A table already in memory (the chapter's splits), named for messages."""

    name: str
    table: pa.Table


Source = SourceFile | InMemory


class Part(NamedTuple):
    """Inputs that feed one split (``split``), or whose rows each get a split from the
    split column or the hash (``split`` None)."""

    split: str | None
    sources: list[Source]


class Columns(NamedTuple):
    text: str
    label: str
    split: str | None


def source_batches(source: Source, columns: Columns) -> Iterator[pa.Table]:
    needed = [c for c in columns if c is not None]
    if isinstance(source, InMemory):
        yield source.table.select(needed)
        return
    yield from file_batches(source, needed)


def source_name(source: Source) -> str:
    return source.name if isinstance(source, InMemory) else source.path


def source_columns(source: Source) -> list[str]:
    return source.table.column_names if isinstance(source, InMemory) else file_columns(source)


def resolve_columns(spec: DataSpec, source: Source) -> Columns:
    names = source_columns(source)
    where = source_name(source)
    try:
        text = resolve_column(names, spec.text_column, "text", "--text-column")
        label = resolve_column(names, spec.label_column, "label", "--label-column")
        split = spec.split_column and resolve_column(
            names, spec.split_column, "split", "--split-column"
        )
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    return Columns(text, label, split)


def row_place(source: Source, index: int) -> str:
    """Where a row is, as a person would look it up: a CSV line, a Parquet row."""
    if isinstance(source, InMemory):
        return f"{source.name} row {index + 1}"
    if source.format == "parquet":
        return f"{source.path} row {index + 1}"
    return f"{source.path} line {index + 2}"  # after the header


def label_name(value: object) -> str | None:
    """A label as text: integers as their digits (1.0 read from a column with nulls is 1)."""
    if value is None:
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if value.is_integer():
            value = int(value)
    name = str(value).strip()
    return name or None


def split_name(value: object) -> str | None:
    if value is None:
        return None
    name = str(value).strip().lower()
    return name or None


def hash_key(text: str, seed: int) -> int:
    """The text's place in the seeded order that the stratified split cuts."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


class Row(NamedTuple):
    """A usable row: its text, label name and split (None: the hash decides)."""

    text: str
    label: str
    split: str | None


def usable_rows(
    table: pa.Table, columns: Columns, fixed_split: str | None, offset: int
) -> tuple[list[tuple[int, Row]], list[tuple[int, str]]]:
    """(row index, row) of the usable rows; (row index, why) of the skipped ones."""
    texts = table.column(columns.text).to_pylist()
    labels = table.column(columns.label).to_pylist()
    splits = table.column(columns.split).to_pylist() if columns.split else None
    rows, skipped = [], []
    for i, (text, value) in enumerate(zip(texts, labels)):
        label = label_name(value)
        split = split_name(splits[i]) if splits is not None else fixed_split
        if not isinstance(text, str):
            reason = "text is null" if text is None else "text is not a string"
        elif not text.strip():
            reason = "text is blank"
        elif label is None:
            reason = "label is null"
        elif splits is not None and split is None:
            reason = "split is null"
        else:
            if split is not None and split not in SPLIT_NAMES:
                raise DataError(
                    f"split column {columns.split!r} holds {splits[i]!r} (row "
                    f"{offset + i + 1}); its values must be train, validation or test"
                )
            rows.append((offset + i, Row(text, label, split)))
            continue
        skipped.append((offset + i, reason))
    return rows, skipped


def token_counts(texts: list[str]) -> list[int]:
    return [len(ids) for ids in get_tokenizer().encode_ordinary_batch(texts, num_threads=2)]


@dataclass
class HashedClass:
    """One class's rows whose split the hash decides: counts and longest message per
    split at the fixed key-range cut, and (up to a cap) every row's key and length for
    the exact cut."""

    count: int = 0
    fixed_counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    fixed_longest: list[int] = field(default_factory=lambda: [0, 0, 0])
    keys: list[np.ndarray] | None = field(default_factory=list)
    lengths: list[np.ndarray] | None = field(default_factory=list)

    def add(self, keys: np.ndarray, lengths: np.ndarray, bounds: tuple[int, int]) -> None:
        self.count += len(keys)
        places = fixed_places(keys, bounds)
        for split in range(3):
            chosen = lengths[places == split]
            self.fixed_counts[split] += len(chosen)
            self.fixed_longest[split] = max(self.fixed_longest[split], int(chosen.max(initial=0)))
        if self.keys is not None:
            self.keys.append(keys)
            self.lengths.append(lengths)
            self.cap()

    def merge(self, other: HashedClass) -> None:
        self.count += other.count
        for split in range(3):
            self.fixed_counts[split] += other.fixed_counts[split]
            self.fixed_longest[split] = max(self.fixed_longest[split], other.fixed_longest[split])
        if self.keys is not None and other.keys is not None:
            self.keys += other.keys
            self.lengths += other.lengths
            self.cap()
        else:
            self.keys = self.lengths = None

    def cap(self) -> None:
        if self.count > EXACT_SPLIT_ROWS:
            self.keys = self.lengths = None


def fixed_bounds(fractions: tuple[float, float]) -> tuple[int, int]:
    return int(fractions[0] * KEY_SPACE), int((fractions[0] + fractions[1]) * KEY_SPACE)


def fixed_places(keys: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    """0, 1, 2 (train, validation, test) per key at the given cut points."""
    low, high = (np.uint64(min(b, KEY_SPACE - 1)) for b in bounds)
    return (keys >= low).astype(np.int8) + (keys >= high).astype(np.int8)


@dataclass
class ScanStats:
    """What one pass over the inputs learns, without keeping any rows."""

    rows: int = 0
    counts: Counter = field(default_factory=Counter)  # (split, label) -> rows
    longest: Counter = field(default_factory=Counter)  # split -> tokens of its longest row
    hashed: dict[str, HashedClass] = field(default_factory=dict)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    digests: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: ScanStats) -> ScanStats:
        self.rows += other.rows
        self.counts.update(other.counts)
        for split, longest in other.longest.items():
            self.longest[split] = max(self.longest[split], longest)
        for label, stats in other.hashed.items():
            if label in self.hashed:
                self.hashed[label].merge(stats)
            else:
                self.hashed[label] = stats
        self.skipped += other.skipped
        room = SKIPPED_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples += other.skipped_examples[:room]
        self.digests += other.digests
        return self


def counted_rows(
    source: Source, columns: Columns, split: str | None, stats: ScanStats
) -> Iterator[list[Row]]:
    """The usable rows of ``source``, a batch at a time; every row counted in ``stats``,
    and the skipped ones named there."""
    offset = 0
    for table in source_batches(source, columns):
        rows, skipped = usable_rows(table, columns, split, offset)
        offset += table.num_rows
        stats.rows += table.num_rows
        stats.skipped += len(skipped)
        room = SKIPPED_EXAMPLES - len(stats.skipped_examples)
        stats.skipped_examples += [f"{row_place(source, i)} ({why})" for i, why in skipped[:room]]
        yield [row for _, row in rows]


def skipped_line(skipped: int, rows: int, examples: list[str]) -> str | None:
    """One line saying which rows were left out, or None if none were."""
    if not skipped:
        return None
    more = ", …" if skipped > len(examples) else ""
    return (
        f"Skipped {skipped:,} of {rows:,} rows with a null or blank text or a null label: "
        f"{'; '.join(examples)}{more}"
    )


def scan_source(
    source: Source, columns: Columns, split: str | None, fractions, seed: int
) -> ScanStats:
    """Count one input's rows per split and label, their lengths in tokens, and the rows
    that must be skipped; remember nothing else."""
    stats = ScanStats()
    digest = hashlib.sha256()
    bounds = fixed_bounds(fractions)
    for rows in counted_rows(source, columns, split, stats):
        lengths = token_counts([row.text for row in rows])
        hashed: dict[str, tuple[list[int], list[int]]] = {}
        for row, length in zip(rows, lengths):
            digest.update(f"{row.label}\t{row.text}\n".encode())
            if row.split is None:
                keys, sizes = hashed.setdefault(row.label, ([], []))
                keys.append(hash_key(row.text, seed))
                sizes.append(length)
            else:
                stats.counts[row.split, row.label] += 1
                stats.longest[row.split] = max(stats.longest[row.split], length)
        for label, (keys, sizes) in hashed.items():
            target = stats.hashed.setdefault(label, HashedClass())
            target.add(np.array(keys, np.uint64), np.array(sizes, np.int64), bounds)
    stats.digests.append((source_name(source), digest.hexdigest()))
    return stats


def ordered_labels(found: Iterable[str]) -> list[str]:
    """Sorted, numerically when every label is an integer."""
    found = set(found)
    if all(label.lstrip("-").isdigit() for label in found):
        return sorted(found, key=int)
    return sorted(found)


@dataclass
class SplitPlan:
    """Everything the training rows are cut and encoded by, learnt from one scan."""

    labels: list[str]
    counts: dict[str, dict[str, int]]  # split -> label -> rows
    longest: int  # tokens of the longest training message
    seed: int
    bounds: dict[str, tuple[int, int]]  # class -> key cut points for hashed rows
    rows: int
    skipped: int
    skipped_examples: list[str]
    checksum: str

    def split_rows(self, split: str) -> int:
        return sum(self.counts[split].values())

    def skipped_line(self) -> str | None:
        """One line saying which rows were left out, or None if none were."""
        return skipped_line(self.skipped, self.rows, self.skipped_examples)

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {self.split_rows(split):,}" for split in SPLIT_NAMES)
        return f"{len(self.labels)} labels ({', '.join(self.labels)}); {sizes} rows"

    def place(self, row: Row) -> str | None:
        """The split of a usable row (None: its label is not trained on)."""
        if row.split is not None:
            return row.split
        bounds = self.bounds.get(row.label)
        if bounds is None:
            return None
        key = hash_key(row.text, self.seed)
        return SPLIT_NAMES[(key >= bounds[0]) + (key >= bounds[1])]


def exact_cut(stats: HashedClass, fractions) -> tuple[tuple[int, int], list[int], list[int]]:
    """Cut points at the fractions of this class's rows in key order, with the rows and
    longest message per split."""
    keys = np.concatenate(stats.keys)
    order = np.argsort(keys, kind="stable")
    keys, lengths = keys[order], np.concatenate(stats.lengths)[order]
    train, validation, _ = split_sizes(len(keys), fractions)
    cuts = (train, train + validation)
    bounds = tuple(int(keys[i]) if i < len(keys) else KEY_SPACE for i in cuts)

    def below(bound: int) -> int:
        return len(keys) if bound >= KEY_SPACE else int(np.searchsorted(keys, np.uint64(bound)))

    edges = [0, below(bounds[0]), below(bounds[1]), len(keys)]
    counts = [edges[k + 1] - edges[k] for k in range(3)]
    longest = [int(lengths[edges[k] : edges[k + 1]].max(initial=0)) for k in range(3)]
    return bounds, counts, longest


def make_plan(
    spec: DataSpec,
    stats: ScanStats,
    fixed_labels: list[str] | None,
    labels_origin: str = "--labels",
) -> SplitPlan:
    """Check the scanned data against the rules in the module docstring; every error
    names what to change. ``fixed_labels`` (else ``spec.labels``) are the only labels
    allowed, in their order; ``labels_origin`` says where they came from."""
    fractions = spec.split
    counts = {split: Counter() for split in SPLIT_NAMES}
    for (split, label), n in stats.counts.items():
        counts[split][label] += n
    longest = {split: stats.longest.get(split, 0) for split in SPLIT_NAMES}
    bounds: dict[str, tuple[int, int]] = {}
    needed = fewest_rows(fractions)
    for label, hashed in sorted(stats.hashed.items()):
        if min(split_sizes(hashed.count, fractions)) < 1:
            raise DataError(
                f"label {label!r} has {hashed.count} row(s); a {fractions[0]:g}/"
                f"{fractions[1]:g}/{1 - sum(fractions):g} split needs at least {needed} rows "
                "of every label so that each split gets one: add rows, leave the label out "
                "with --labels, or give the splits yourself (--split-column, --validation-data)"
            )
        if hashed.keys is not None:
            cut, per_split, longest_per_split = exact_cut(hashed, fractions)
        else:
            cut = fixed_bounds(fractions)
            per_split, longest_per_split = hashed.fixed_counts, hashed.fixed_longest
        bounds[label] = cut
        for k, split in enumerate(SPLIT_NAMES):
            counts[split][label] += per_split[k]
            longest[split] = max(longest[split], longest_per_split[k])
    found = set().union(*counts.values())
    labels = fixed_labels or spec.labels
    if labels is not None:
        outside = sorted(found - set(labels))
        if outside:
            rows = sum(counts[s][label] for s in SPLIT_NAMES for label in outside)
            remedy = (
                "add them there or remove those rows"
                if labels_origin == "--labels"  # else a trained model's, which cannot grow
                else "remove those rows, or train a model on them"
            )
            raise DataError(
                f"label(s) {', '.join(map(repr, outside))} ({rows:,} rows) are not among "
                f"{labels_origin} ({', '.join(labels)}); {remedy}"
            )
    else:
        labels = ordered_labels(counts["train"])
        unseen = sorted(found - set(labels))
        if unseen:
            raise DataError(
                f"label(s) {', '.join(map(repr, unseen))} appear in validation or test but "
                "never in train; add training rows for them or remove those rows"
            )
    if len(counts["train"]) < 2:
        only = ", ".join(map(repr, counts["train"])) or "none"
        raise DataError(
            f"the training split has {len(counts['train'])} label(s) ({only}); a classifier "
            "needs two or more: check --label-column"
        )
    for split in SPLIT_NAMES:
        if not sum(counts[split].values()):
            raise DataError(f"the {split} split has no usable rows")
    return SplitPlan(
        labels=list(labels),
        counts={s: {label: counts[s][label] for label in labels} for s in SPLIT_NAMES},
        longest=longest["train"],
        seed=spec.split_seed,
        bounds=bounds,
        rows=stats.rows,
        skipped=stats.skipped,
        skipped_examples=stats.skipped_examples,
        checksum=hashlib.sha256(repr(stats.digests).encode()).hexdigest(),
    )


def files_of(paths: list[str], option: str) -> list[SourceFile]:
    expanded, fmt = expand_inputs(paths, option)
    files = list_files(expanded, fmt)
    if not files:
        raise DataError(f"{option} {' '.join(paths)} holds no data files")
    return files


def parts_of(spec: DataSpec) -> list[Part]:
    """The inputs grouped by the split they feed."""
    if spec.validation_data:
        return [
            Part("train", files_of(spec.paths, "--data")),
            Part("validation", files_of(spec.validation_data, "--validation-data")),
            Part("test", files_of(spec.test_data, "--test-data")),
        ]
    return [Part(None, files_of(spec.paths, "--data"))]


def chapter_parts(splits: dict) -> list[Part]:
    """The chapter's split frames (``Label`` 0/1) as inputs labelled with its names."""
    parts = []
    for split in SPLIT_NAMES:
        frame = splits[split]
        names = [LABEL_NAMES[int(label)] for label in frame["Label"]]
        table = pa.table({"Text": pa.array(list(frame["Text"]), pa.string()), "Label": names})
        parts.append(Part(split, [InMemory(split, table)]))
    return parts


def is_prepared_folder(paths: list[str]) -> bool:
    """One local folder as ``spam-gpt prepare`` writes it (train/validation/test files)."""
    if len(paths) != 1 or is_remote(paths[0]):
        return False
    folder = Path(local_path(paths[0]))
    return all(
        (folder / f"{split}.csv").is_file() or (folder / f"{split}.parquet").is_file()
        for split in SPLIT_NAMES
    )


class LabelledInputs(NamedTuple):
    """The inputs of a training run, each part's columns, and labels fixed in advance
    (the chapter's data keeps its names; ``None``: learnt from the training split)."""

    spec: DataSpec
    parts: list[Part]
    columns: list[Columns]
    fixed_labels: list[str] | None


def labelled_inputs(spec: DataSpec | None) -> LabelledInputs:
    """The chapter's bundled splits (no spec), a ``spam-gpt prepare`` folder (read as
    the chapter's), or the spec's own files."""
    if spec is None or is_prepared_folder(spec.paths):
        splits = read_splits(local_path(spec.paths[0])) if spec else build_splits()
        parts = chapter_parts(splits)
        spec = DataSpec(paths=spec.paths if spec else [])
        fixed = list(LABEL_NAMES)
    else:
        parts, fixed = parts_of(spec), None
    columns = [resolve_columns(spec, part.sources[0]) for part in parts]
    return LabelledInputs(spec, parts, columns, fixed)


def scan_in_process(inputs: LabelledInputs) -> ScanStats:
    stats = ScanStats()
    for part, columns in zip(inputs.parts, inputs.columns):
        for source in part.sources:
            scanned = scan_source(
                source, columns, part.split, inputs.spec.split, inputs.spec.split_seed
            )
            stats.merge(scanned)
    return stats


def load_every_row(inputs: LabelledInputs, labels: list[str]) -> tuple[pd.DataFrame, ScanStats]:
    """Every usable row as ``Text`` and ``Label`` (an index into ``labels``, a model's),
    whichever split training would put it in, and what was skipped (``rows``,
    ``skipped``, ``skipped_examples``): for messages a model never trained on, which need
    no split and may hold a single label."""
    index = {label: i for i, label in enumerate(labels)}
    texts, found, outside, stats = [], [], Counter(), ScanStats()
    for part, columns in zip(inputs.parts, inputs.columns):
        for source in part.sources:
            for rows in counted_rows(source, columns, part.split, stats):
                for row in rows:
                    if row.label in index:
                        texts.append(row.text)
                        found.append(index[row.label])
                    else:
                        outside[row.label] += 1
    if outside:
        count = sum(outside.values())
        raise DataError(
            f"{count:,} {'row has a label' if count == 1 else 'rows have labels'} the model "
            "does not know "
            f"({', '.join(sorted(outside))}; it knows {', '.join(labels)}): remove those rows, "
            "or train a model on them"
        )
    if not texts:
        raise DataError("the data has no row with both a text and a label")
    return pd.DataFrame({"Label": found, "Text": texts}), stats


def split_rows(
    table: pa.Table, columns: Columns, part_split: str | None, plan: SplitPlan
) -> dict[str, tuple[list[str], list[int]]]:
    """Texts and label indices of the rows of ``table``, per split."""
    rows, _ = usable_rows(table, columns, part_split, 0)
    index = {label: i for i, label in enumerate(plan.labels)}
    chosen: dict[str, tuple[list[str], list[int]]] = {split: ([], []) for split in SPLIT_NAMES}
    for _, row in rows:
        split = plan.place(row)
        if split is not None and row.label in index:
            chosen[split][0].append(row.text)
            chosen[split][1].append(index[row.label])
    return chosen


def encode_split(
    table: pa.Table, columns: Columns, part_split: str | None, plan: SplitPlan, split: str
) -> pa.Table:
    """``map_batches`` on Ray: the rows of ``split`` as token ids and label indices. Kept
    in this module, which imports no torch, because every process that runs or plans the
    map (Ray Data's tasks, each split's coordinator) imports the module it lives in."""
    texts, labels = split_rows(table, columns, part_split, plan)[split]
    ids = get_tokenizer().encode_ordinary_batch(texts, num_threads=1)
    return pa.table(
        {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "label": pa.array(labels, pa.int64()),
        }
    )


def load_in_process(
    inputs: LabelledInputs, labels_origin: str = "--labels"
) -> tuple[SplitPlan, dict[str, pd.DataFrame]]:
    """Scan, plan, then read every split into memory as frames of ``Text`` and
    ``Label`` (an index into ``plan.labels``): for data that fits on one machine."""
    stats = scan_in_process(inputs)
    plan = make_plan(inputs.spec, stats, inputs.fixed_labels, labels_origin)
    texts: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    labels: dict[str, list[int]] = {split: [] for split in SPLIT_NAMES}
    for part, columns in zip(inputs.parts, inputs.columns):
        for source in part.sources:
            for table in source_batches(source, columns):
                chosen = split_rows(table, columns, part.split, plan)
                for split, (split_texts, split_labels) in chosen.items():
                    texts[split] += split_texts
                    labels[split] += split_labels
    frames = {
        split: pd.DataFrame({"Label": labels[split], "Text": texts[split]}) for split in SPLIT_NAMES
    }
    return plan, frames
