"""A progress line for scoring jobs: rows written, rows per second, time left.

Ray Data's own progress display describes its operators; a person watching a job wants to
know how far the output is. The rows are counted from the footers of the Parquet files the
job has finished writing, so the count is what is safely on storage.
"""

from __future__ import annotations

import sys
import threading
import time

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from spam_gpt.sources import filesystem_of


class WrittenRows:
    """Rows in the finished Parquet files under a folder; each footer is read once."""

    def __init__(self, folder: str):
        self.filesystem, self.where = filesystem_of(folder)
        self.counted: dict[str, int] = {}

    def count(self) -> int:
        selector = pa_fs.FileSelector(self.where, recursive=True, allow_not_found=True)
        for info in self.filesystem.get_file_info(selector):
            if info.path.endswith(".parquet") and info.path not in self.counted:
                try:
                    with self.filesystem.open_input_file(info.path) as stream:
                        self.counted[info.path] = pq.read_metadata(stream).num_rows
                except (OSError, pa.ArrowInvalid):
                    pass  # still being written
        return sum(self.counted.values())


def progress_line(done: int, total: int | None, seconds: float, start: int) -> str:
    rate = (done - start) / seconds if seconds > 0 else 0.0
    line = f"Scored {done:,} rows"
    if total:
        line = f"Scored {done:,} of {total:,} rows ({done / total:.0%})"
    line += f", {rate:,.0f} rows/s"
    if total and rate > 0:
        line += f", about {max(total - done, 0) / rate:,.0f} s left"
    return line


class ScoringProgress:
    """Prints :func:`progress_line` while a job writes ``folder``: redrawn in place on a
    terminal, otherwise a line every ``every_s`` seconds."""

    def __init__(self, folder: str, total: int | None, every_s: float = 15.0):
        self.rows = WrittenRows(folder)
        self.total = total
        self.terminal = sys.stdout.isatty()
        self.every_s = 0.5 if self.terminal else every_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        started, start = time.monotonic(), self.rows.count()
        while not self.stopping.wait(self.every_s):
            line = progress_line(self.rows.count(), self.total, time.monotonic() - started, start)
            if self.terminal:
                print(f"\r{line}\033[K", end="", flush=True)
            else:
                print(line, flush=True)
        if self.terminal:
            print("\r\033[K", end="", flush=True)

    def __enter__(self) -> ScoringProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
