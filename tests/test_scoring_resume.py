"""A scoring job killed part way (SIGKILL to the driver and the Ray it started), then run
again with ``--resume``, as a user would: every input row once, the finished part kept."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spam_gpt.corpus import build_splits
from spam_gpt.scoring_units import unit_size

FILES, ROWS_PER_FILE = 8, 1000
UNIT = unit_size(FILES * ROWS_PER_FILE)  # rows per part: 250, four parts per file
PARTS = FILES * ROWS_PER_FILE // UNIT


def write_archive(folder: Path) -> int:
    """Eight files of corpus messages with a unique id per row."""
    folder.mkdir()
    texts = (build_splits()["test"]["Text"].tolist() * 4)[:ROWS_PER_FILE]
    for k in range(FILES):
        ids = pa.array(range(k * ROWS_PER_FILE, (k + 1) * ROWS_PER_FILE), pa.int64())
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"day-{k}.parquet")
    return FILES * ROWS_PER_FILE


def score_command(model: Path, archive: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spam_gpt.cli",
        "score",
        "--model",
        str(model),
        "--input",
        str(archive),
        "--output",
        str(output),
        *extra,
    ]


def processes_in_group(group: int) -> list[int]:
    """Live processes of a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # the dead wait for init to reap them
            found.append(int(stat.parent.name))
    return found


def test_a_killed_job_resumes_without_redoing_finished_parts(tiny_run, tmp_path):
    rows = write_archive(tmp_path / "archive")
    output, partial = tmp_path / "scored", tmp_path / ".scored.partial"
    command = score_command(tiny_run / "model", tmp_path / "archive", output)
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(partial.glob("part-*.parquet"))) < PARTS // 2 - 1:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job wrote no parts"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
        job.wait()
    time.sleep(1)
    assert processes_in_group(job.pid) == []
    kept = {p.name: p.stat() for p in partial.glob("part-*.parquet")}
    assert PARTS // 2 - 1 <= len(kept) < PARTS and not output.exists()

    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert f"of {PARTS} parts scored); add --resume to finish it" in refused.stderr

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ids = pq.read_table(output, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(rows))  # every row exactly once
    for name, before in kept.items():  # the finished parts were not scored again
        after = (output / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert f"Resuming: {len(kept)} of {PARTS} parts are scored" in resumed.stdout
    earlier = len(kept) * UNIT
    assert re.search(rf"Read {rows:,} rows, {earlier:,} of them before resuming", resumed.stdout)
    assert not [p for p in output.iterdir() if p.name.endswith(".writing")]
    assert (output / "_SUCCESS").is_file()


@pytest.mark.parametrize(
    ("sent", "to_group", "code"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stopped_job_says_what_is_saved_and_how_to_finish(
    tiny_run, tmp_path, sent, to_group, code
):
    """Ctrl-C reaches the terminal's whole process group; a scheduler's SIGTERM the driver."""
    write_archive(tmp_path / "archive")
    partial = tmp_path / ".scored.partial"
    command = score_command(tiny_run / "model", tmp_path / "archive", tmp_path / "scored")
    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(partial.glob("part-*.parquet"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, "the job wrote no parts"
            time.sleep(0.05)
        os.killpg(job.pid, sent) if to_group else job.send_signal(sent)
        _, err = job.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group left no one behind
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == code, err
    stopped = re.search(
        rf"Stopped: (\d+) of {PARTS} parts are saved in \S+\.scored\.partial: run", err
    )
    assert stopped and "--resume" in err, err
    assert int(stopped[1]) >= 2 and "Traceback" not in err
