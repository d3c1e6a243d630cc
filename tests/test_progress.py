"""The scoring progress line: rows counted from finished files only."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from spam_gpt.progress import WrittenRows, progress_line


def test_rows_are_counted_from_finished_files_only(tmp_path):
    rows = WrittenRows(str(tmp_path / "out"))
    assert rows.count() == 0  # no folder yet
    (tmp_path / "out" / "region=eu").mkdir(parents=True)
    pq.write_table(pa.table({"id": range(300)}), tmp_path / "out" / "a.parquet")
    pq.write_table(pa.table({"id": range(45)}), tmp_path / "out" / "region=eu" / "b.parquet")
    complete = (tmp_path / "out" / "a.parquet").read_bytes()
    (tmp_path / "out" / "c.parquet").write_bytes(complete[: len(complete) // 2])  # mid-write
    assert rows.count() == 345
    (tmp_path / "out" / "c.parquet").write_bytes(complete)
    assert rows.count() == 645


def test_the_line_says_rows_rate_and_time_left():
    assert progress_line(12_000, 48_000, 4.0, 2_000) == (
        "Scored 12,000 of 48,000 rows (25%), 2,500 rows/s, about 14 s left"
    )
    assert progress_line(700, None, 2.0, 0) == "Scored 700 rows, 350 rows/s"
