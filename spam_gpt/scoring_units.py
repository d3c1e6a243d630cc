"""The units of a scoring job, and the manifest that lets a job stopped part way resume.

The input is cut into units when the job starts: a Parquet file in runs of rows (see
:func:`unit_size`), a CSV/TSV file whole. Each unit is scored into its own file,
``part-NNNNN.parquet``, which appears only once complete (written under a hidden name,
then renamed). ``_manifest.json`` records the job: the model, the text column, the
precision and every unit. A resumed job plans its units again, refuses to go on when they
differ from the manifest's (the input or the command changed), and scores only the units
without a part file, so every input row lands in the output exactly once however often
the job is stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from spam_gpt.sources import (
    ParquetFooters,
    SourceFile,
    file_batches,
    filesystem_of,
    with_partitions,
)

UNIT_ROWS = 50_000  # at most: what a stop can cost per actor
# At least: a small input is not scattered over tiny files, and each unit fills its forward
# passes (gpt2-small int8 predicted 10 % more messages/s in calls of 500 rows than of 250).
# Small enough that the actor that finishes last runs alone for a few seconds only: a
# single-thread actor scores gpt2-small in int8 at about 130 rows/s on an Intel Xeon
# (benchmarks/RESULTS.md).
MIN_UNIT_ROWS = 500
SPREAD = 64  # units a small input is cut into, so that as many actors can share it
MANIFEST_FILE = "_manifest.json"
WRITING_SUFFIX = ".writing"
ROW_GROUP_BYTES = 64 << 20
PART_NAME = re.compile(r"part-(\d+)\.parquet$")


@dataclass(frozen=True)
class Unit:
    """Rows ``start`` to ``stop`` of one input file (``stop`` None: to its end)."""

    path: str
    format: str
    partitions: dict
    start: int
    stop: int | None

    @property
    def rows(self) -> int | None:
        return None if self.stop is None else self.stop - self.start


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def unit_size(rows: int) -> int:
    """Rows per unit for an input of ``rows``: about ``SPREAD`` units up to 3.2 million
    rows, runs of ``UNIT_ROWS`` beyond. It depends on the input alone, so a job resumed
    with another ``--concurrency`` plans the same units."""
    return max(MIN_UNIT_ROWS, min(UNIT_ROWS, -(-rows // SPREAD)))


def plan_units(
    files: list[SourceFile], footers: ParquetFooters | None, unit_rows: int | None = None
) -> list[Unit]:
    """Parquet files (``footers`` given) in runs of ``unit_rows`` (default
    :func:`unit_size`), a file with no rows as one empty unit (its part carries the
    schema); CSV/TSV files whole."""
    if footers is None:
        return [Unit(file.path, file.format, file.partitions, 0, None) for file in files]
    size = unit_rows or unit_size(footers.rows)
    units = []
    for file, footer in zip(footers.files, footers.footers):
        rows = footer.num_rows
        for start in range(0, max(rows, 1), size):
            stop = min(start + size, rows)
            units.append(Unit(file.path, file.format, file.partitions, start, stop))
    return units


@dataclass(frozen=True)
class Manifest:
    model: str
    text_column: str
    precision: str
    units: list[Unit]

    def save(self, folder: str) -> None:
        filesystem, where = filesystem_of(folder)
        filesystem.create_dir(where)
        with filesystem.open_output_stream(f"{where}/{MANIFEST_FILE}") as stream:
            stream.write(json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, folder: str) -> Manifest | None:
        filesystem, where = filesystem_of(folder)
        try:
            with filesystem.open_input_stream(f"{where}/{MANIFEST_FILE}") as stream:
                saved = json.loads(stream.read())
        except FileNotFoundError:
            return None
        return cls(**{**saved, "units": [Unit(**unit) for unit in saved["units"]]})

    def difference(self, started: Manifest) -> str | None:
        """Why this job cannot finish ``started``, the one its folder holds (None: it can)."""
        for name in ("model", "text_column", "precision"):
            if getattr(self, name) != getattr(started, name):
                return f"it ran with {name} {getattr(started, name)!r}, not {getattr(self, name)!r}"
        if self.units != started.units:
            now, then = rows_by_file(self.units), rows_by_file(started.units)
            changed = ", ".join(
                sorted(path for path in now.keys() | then.keys() if now.get(path) != then.get(path))
            )
            return f"files were added, removed or changed in size since it started: {changed}"
        return None


def rows_by_file(units: list[Unit]) -> dict[str, list[tuple[int, int | None]]]:
    rows: dict[str, list[tuple[int, int | None]]] = {}
    for unit in units:
        rows.setdefault(unit.path, []).append((unit.start, unit.stop))
    return rows


def finished_parts(folder: str) -> set[int]:
    """The units whose part file is in ``folder`` (complete: parts appear by rename)."""
    filesystem, where = filesystem_of(folder)
    selector = pa_fs.FileSelector(where, allow_not_found=True)
    names = (info.base_name for info in filesystem.get_file_info(selector))
    return {int(match.group(1)) for name in names if (match := PART_NAME.fullmatch(name))}


def remove_unfinished(folder: str) -> None:
    """Drop the half-written parts of a job that was stopped while writing them."""
    filesystem, where = filesystem_of(folder)
    for info in filesystem.get_file_info(pa_fs.FileSelector(where, allow_not_found=True)):
        if info.base_name.endswith(WRITING_SUFFIX):
            filesystem.delete_file(info.path)


def unit_tables(unit: Unit, batch_rows: int) -> Iterator[pa.Table]:
    """The unit's rows, ``batch_rows`` at a time, with its partition values as columns."""
    source = SourceFile(unit.path, unit.format, unit.partitions)
    if unit.stop is None:
        yield from rebatched(file_batches(source), batch_rows)
        return
    filesystem, where = filesystem_of(unit.path)
    with filesystem.open_input_file(where) as handle:
        reader = pq.ParquetFile(handle)
        groups, first, position = [], 0, 0
        for group in range(reader.metadata.num_row_groups):
            rows = reader.metadata.row_group(group).num_rows
            if position < unit.stop and position + rows > unit.start:
                first = position if not groups else first
                groups.append(group)
            position += rows
        if not groups:
            return
        position = first
        for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups):
            low, high = max(unit.start - position, 0), min(unit.stop - position, batch.num_rows)
            if high > low:
                table = pa.Table.from_batches([batch.slice(low, high - low)])
                yield with_partitions(table, unit.partitions)
            position += batch.num_rows


def rebatched(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    for table in tables:
        for offset in range(0, table.num_rows, rows):
            yield table.slice(offset, rows)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns: types widened, missing columns null."""
    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_part(folder: str, index: int, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    """The unit's scored rows as its part file, in row groups of up to ``ROW_GROUP_BYTES``;
    the file takes its name only when complete. Returns the rows written."""
    filesystem, where = filesystem_of(folder)
    final = f"{where}/{part_name(index)}"
    writing = f"{where}/.{part_name(index)}{WRITING_SUFFIX}"
    rows, held, held_bytes = 0, [], 0
    with filesystem.open_output_stream(writing) as stream, pq.ParquetWriter(stream, schema) as out:
        for table in tables:
            held.append(table)
            rows, held_bytes = rows + table.num_rows, held_bytes + table.nbytes
            if held_bytes >= ROW_GROUP_BYTES:
                out.write_table(pa.concat_tables(held))
                held, held_bytes = [], 0
        if held or not rows:
            out.write_table(pa.concat_tables(held) if held else schema.empty_table())
    filesystem.move(writing, final)
    return rows
