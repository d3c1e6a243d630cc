"""Units of a scoring job and its manifest, without Ray: every row in exactly one unit."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spam_gpt.scoring_units import (
    Manifest,
    conform,
    finished_parts,
    plan_units,
    remove_unfinished,
    unit_size,
    unit_tables,
    write_part,
)
from spam_gpt.sources import ParquetFooters


def write_file(path, rows: int, row_group_size: int) -> None:
    table = pa.table(
        {"id": pa.array(range(rows), pa.int64()), "text": [f"m{i}" for i in range(rows)]}
    )
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize("unit_rows", [1, 7, 100, 1000])
def test_units_hold_every_row_once_across_row_groups(tmp_path, unit_rows):
    write_file(tmp_path / "a.parquet", 250, row_group_size=33)
    write_file(tmp_path / "b.parquet", 0, row_group_size=33)
    footers = ParquetFooters.of([str(tmp_path)])
    units = plan_units(footers.files, footers, unit_rows=unit_rows)
    seen = {"a.parquet": [], "b.parquet": []}
    for unit in units:
        rows = [r for t in unit_tables(unit, batch_rows=5) for r in t.column("id").to_pylist()]
        assert len(rows) == unit.rows
        seen[unit.path.rsplit("/", 1)[1]] += rows
    assert seen == {"a.parquet": list(range(250)), "b.parquet": []}
    assert [u.rows for u in units if u.path.endswith("b.parquet")] == [0]  # one empty unit


def test_small_inputs_are_spread_over_units_and_large_ones_cut_in_runs():
    assert unit_size(127) == 500  # one small file: one unit
    assert unit_size(16_716) == 500  # passes filled: not 64 units of 262 rows
    assert unit_size(100_000) == 1_563  # 64 units, for up to 64 actors
    assert unit_size(10_000_000) == 50_000  # what a stop can cost per actor


def test_conform_widens_types_and_fills_missing_columns():
    schema = pa.schema([("id", pa.int64()), ("text", pa.large_string()), ("extra", pa.string())])
    table = pa.table({"id": pa.array([1], pa.int32()), "text": pa.array(["hi"], pa.string_view())})
    result = conform(table, schema)
    assert result.schema == schema
    assert result.to_pylist() == [{"id": 1, "text": "hi", "extra": None}]


def test_parts_appear_only_when_complete(tmp_path):
    schema = pa.schema([("id", pa.int64())])

    def failing():
        yield pa.table({"id": [1, 2]}, schema=schema)
        raise RuntimeError("actor lost")

    with pytest.raises(RuntimeError):
        write_part(str(tmp_path), 3, failing(), schema)
    assert finished_parts(str(tmp_path)) == set()
    assert [p.name for p in tmp_path.iterdir()] == [".part-00003.parquet.writing"]
    remove_unfinished(str(tmp_path))
    assert not list(tmp_path.iterdir())
    assert write_part(str(tmp_path), 3, iter([]), schema) == 0  # no rows: the schema still
    assert finished_parts(str(tmp_path)) == {3}
    assert pq.read_table(tmp_path / "part-00003.parquet").schema == schema


def test_a_manifest_says_why_a_job_cannot_resume(tmp_path):
    write_file(tmp_path / "a.parquet", 10, row_group_size=10)
    footers = ParquetFooters.of([str(tmp_path)])
    started = Manifest("runs/m", "text", "fp32", plan_units(footers.files, footers))
    started.save(str(tmp_path / "out"))
    assert Manifest.load(str(tmp_path / "out")) == started
    assert Manifest.load(str(tmp_path / "elsewhere")) is None
    assert started.difference(started) is None
    int8 = Manifest("runs/m", "text", "int8", started.units)
    assert int8.difference(started) == "it ran with precision 'fp32', not 'int8'"
    write_file(tmp_path / "a.parquet", 11, row_group_size=10)
    write_file(tmp_path / "c.parquet", 3, row_group_size=10)
    footers = ParquetFooters.of([str(tmp_path / "a.parquet"), str(tmp_path / "c.parquet")])
    grown = Manifest("runs/m", "text", "fp32", plan_units(footers.files, footers))
    why = grown.difference(started)
    assert "added, removed or changed in size" in why
    assert "a.parquet" in why and "c.parquet" in why
