"""Bulk scoring on a local Ray: awkward Parquet in, every row out exactly once."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spam_gpt.cli import main
from spam_gpt.corpus import build_splits
from spam_gpt.model_ref import load_predictor
from spam_gpt.scoring import ADDED_COLUMNS, ScoringError, run_scoring
from spam_gpt.scoring_units import Manifest

from .conftest import CHAPTER_HAM, CHAPTER_SPAM

pytestmark = pytest.mark.usefixtures("local_ray")

AWKWARD = [
    None,
    "",
    "   ",
    "🎉🎉 WIN a FREE cruise 🚢 txt YES now!!",
    "x" * 10_000,
    CHAPTER_SPAM,
    CHAPTER_HAM,
]


def messages() -> list[str | None]:
    texts: list[str | None] = build_splits()["test"]["Text"].tolist()[:120]
    return AWKWARD + texts


def write_archive(folder: Path) -> pa.Table:
    """Several files in two hive partitions, with columns of several types."""
    texts = messages()
    n = len(texts)
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "received": pa.array(
                [
                    dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=i)
                    for i in range(n)
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "tags": pa.array(
                [[f"t{i % 3}", "sms"][: 1 + i % 2] for i in range(n)], pa.list_(pa.string())
            ),
            "carrier": pa.array(
                [["acme", "globex", "initech"][i % 3] for i in range(n)]
            ).dictionary_encode(),
            "score_hint": pa.array([i / 7 if i % 5 else None for i in range(n)], pa.float32()),
        }
    )
    half = n // 2
    for region, part in (("eu", table.slice(0, half)), ("us", table.slice(half))):
        target = folder / f"region={region}"
        target.mkdir(parents=True)
        third = part.num_rows // 3 + 1
        for k in range(3):
            pq.write_table(part.slice(k * third, third), target / f"part-{k}.parquet")
    return table


@pytest.fixture(scope="module")
def scored(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    original = write_archive(folder / "in")
    out = folder / "out"
    summary = run_scoring(str(tiny_run / "model"), [str(folder / "in")], str(out), batch_size=32)
    return original, pq.read_table(out).sort_by("id"), summary, out


def test_every_row_comes_out_once_with_its_columns_unchanged(scored):
    original, result, summary, _ = scored
    assert result.num_rows == original.num_rows == summary.rows
    assert result.column("id").to_pylist() == list(range(original.num_rows))
    for name in original.column_names:
        assert result.column(name).type == original.column(name).type, name
        assert result.column(name).to_pylist() == original.column(name).to_pylist(), name
    halves = ["eu"] * (original.num_rows // 2) + ["us"] * (
        original.num_rows - original.num_rows // 2
    )
    assert [str(r) for r in result.column("region").to_pylist()] == halves


def test_unscorable_rows_are_kept_and_explained(scored):
    _, result, summary, _ = scored
    rows = result.to_pylist()
    assert rows[0]["label"] is None and rows[0]["score_error"] == "text is null"
    assert rows[1]["label"] is None and rows[1]["score_error"] == "text is empty"
    assert rows[2]["score_error"] == "text is empty"
    assert all(r["score_error"] is None and r["label"] in ("spam", "not spam") for r in rows[3:])
    assert summary.errored == 3 and summary.scored == len(rows) - 3
    assert rows[5]["label"] == "spam" and rows[6]["label"] == "not spam"
    assert all(0.0 <= r["spam_probability"] <= 1.0 for r in rows[3:])


def test_predictions_equal_classify(scored, tiny_run, capsys):
    _, result, _, _ = scored
    rows = [r for r in result.to_pylist() if r["score_error"] is None]
    predictor = load_predictor(str(tiny_run / "model"))
    expected = predictor.predict([r["text"] for r in rows])
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert [r["spam_probability"] for r in rows] == pytest.approx(
        [p.spam_probability for p in expected], abs=1e-5
    )
    assert main(["classify", "--model", str(tiny_run / "model"), rows[0]["text"]]) == 0
    assert capsys.readouterr().out.split("\t")[0] == rows[0]["label"]
    assert {r["model"] for r in result.to_pylist()} == {str((tiny_run / "model").resolve())}


def test_output_is_marked_complete_with_its_summary(scored):
    _, result, _, out = scored
    marker = json.loads((out / "_SUCCESS").read_text())
    assert marker["rows"] == result.num_rows and marker["errored"] == 3
    assert not (out.parent / ".out.partial").exists()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        f"part-{k:05d}.parquet" for k in range(6)
    ]  # one unit per input file


def test_missing_text_column_stops_before_any_work(tiny_run, tmp_path):
    pq.write_table(pa.table({"id": [1], "body": ["hello"]}), tmp_path / "in.parquet")
    with pytest.raises(ScoringError, match=r"no column 'text'.*body.*--text-column"):
        run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_globs_several_paths_and_the_chapters_csv(tiny_run, tmp_path, capsys):
    pq.write_table(pa.table({"text": ["hi there", None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [CHAPTER_SPAM]}), tmp_path / "b.parquet")
    summary = run_scoring(
        str(tiny_run / "model"), [str(tmp_path / "*.parquet")], str(tmp_path / "o1")
    )
    assert (summary.rows, summary.errored) == (3, 1)
    uri = f"file://{tmp_path / 'a.parquet'}"
    summary = run_scoring(str(tiny_run / "model"), [uri], f"file://{tmp_path / 'o3'}")
    assert (summary.rows, summary.errored) == (2, 1) and (tmp_path / "o3" / "_SUCCESS").is_file()
    assert main(["prepare", "--out", str(tmp_path / "splits")]) == 0
    inputs = [str(tmp_path / "splits" / "validation.csv"), str(tmp_path / "splits" / "test.csv")]
    summary = run_scoring(str(tiny_run / "model"), inputs, str(tmp_path / "o2"))
    assert (summary.rows, summary.errored) == (449, 0)
    assert set(pq.read_table(tmp_path / "o2").column_names) >= {"Label", "Text", "label"}


def test_a_failed_job_leaves_nothing_that_looks_complete_and_resumes(tiny_run, tmp_path):
    """The model breaks inside the actors, after the job has started writing; once it is
    mended, the same job with ``resume`` finishes."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "model", broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(b"not tensors")
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    job = (str(broken), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    with pytest.raises(ScoringError, match=r"0 of 1 parts are saved in .*--resume"):
        run_scoring(*job)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial" / "_SUCCESS").exists()
    with pytest.raises(ScoringError, match="add --resume to finish it, or --overwrite"):
        run_scoring(*job)
    (broken / "model.safetensors").write_bytes(weights)
    assert run_scoring(*job, resume=True).scored == 1
    assert (tmp_path / "out" / "_SUCCESS").is_file() and not (tmp_path / ".out.partial").exists()


def test_a_csv_that_is_not_utf8_stops_the_job_with_its_line_and_resumes_once_converted(
    tiny_run, tmp_path
):
    """The job says what its actor met (not Ray's wrapper around it); once the file is
    saved as UTF-8, the same job with ``resume`` finishes."""
    path = tmp_path / "excel.csv"
    path.write_bytes("text,id\nsee you at 6,1\nCaf\u00e9 offer \u00a35,2\n".encode("cp1252"))
    job = (str(tiny_run / "model"), [str(path)], str(tmp_path / "out"))
    stopped = r"the job stopped \(DataError: .*excel.csv is not UTF-8: byte 0xe9 on line 3"
    with pytest.raises(ScoringError, match=rf"{stopped}.*\); 0 of 1 parts are saved .*--resume"):
        run_scoring(*job)
    path.write_bytes(path.read_bytes().decode("cp1252").encode())
    summary = run_scoring(*job, resume=True)
    assert (summary.rows, summary.scored) == (2, 2)
    assert (
        pq.read_table(tmp_path / "out").column("text").to_pylist()[1] == "Caf\u00e9 offer \u00a35"
    )


def test_resume_refuses_a_changed_job(tiny_run, tmp_path, capsys):
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    job = (str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    Manifest("elsewhere/model", "text", "fp32", []).save(str(tmp_path / ".out.partial"))
    with pytest.raises(ScoringError, match="it ran with model 'elsewhere/model'"):
        run_scoring(*job, resume=True)
    with pytest.raises(ScoringError, match="pick one"):
        run_scoring(*job, resume=True, overwrite=True)
    assert run_scoring(*job, overwrite=True).rows == 1
    fresh = (*job[:2], str(tmp_path / "fresh"))
    assert run_scoring(*fresh, resume=True).rows == 1  # as a retrying scheduler runs it
    assert "Nothing to resume at" in capsys.readouterr().out


def test_existing_output_is_not_overwritten_by_accident(tiny_run, tmp_path):
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    with pytest.raises(ScoringError, match="exists"):
        run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))


def test_score_command_prints_a_summary(tiny_run, tmp_path, capsys, monkeypatch):
    """In int8, which labels these two as fp32 does; the log file where SPAM_GPT_LOG_DIR
    says."""
    monkeypatch.setenv("SPAM_GPT_LOG_DIR", str(tmp_path / "logs"))
    pq.write_table(pa.table({"text": [CHAPTER_SPAM, CHAPTER_HAM, ""]}), tmp_path / "in.parquet")
    args = [
        "score",
        "--precision",
        "int8",
        "--model",
        str(tiny_run / "model"),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    *_, line, logs = capsys.readouterr().out.strip().splitlines()
    assert logs.startswith("Logs: ") and ".log" in logs  # Ray's and MLflow's output went there
    (log_file,) = (tmp_path / "logs").glob("score-*.log")
    assert logs.startswith(f"Logs: {log_file}") and log_file.stat().st_size > 0
    assert "Read 3 rows: 2 scored, 1 errored; labels: " in line
    assert "spam 50.0%" in line and "not spam 50.0%" in line
    assert "rows/s" in line and str(tmp_path / "out") in line
    assert main(args) == 2  # the output exists now
    assert "--overwrite" in capsys.readouterr().err


def test_a_job_the_cluster_cannot_schedule_is_refused(tiny_run, tmp_path):
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    with pytest.raises(ScoringError, match="needs 5 CPUs; the Ray cluster has 2"):
        run_scoring(
            str(tiny_run / "model"),
            [str(tmp_path / "in.parquet")],
            str(tmp_path / "out"),
            concurrency=5,
        )


@pytest.mark.parametrize("name", ["scored.csv", "scored.jsonl", "scored.csv.gz"])
def test_an_output_named_as_a_file_of_another_format_is_refused(tiny_run, tmp_path, name):
    """The output is a folder of Parquet parts; under a .csv name no CSV reader opens it."""
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    with pytest.raises(ScoringError, match=r"is a folder of Parquet files .* such as \S+/scored"):
        run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / name))
    assert [p.name for p in tmp_path.iterdir()] == ["in.parquet"]


def scored_rows(output: Path) -> list[dict]:
    return sorted(pq.read_table(output).to_pylist(), key=lambda row: row["id"])


@pytest.mark.parametrize("kind", ["large_string", "string_view", "dictionary", "binary"])
def test_every_writers_text_type_is_read(tiny_run, tmp_path, kind):
    texts = [CHAPTER_SPAM, CHAPTER_HAM, None]
    column = {
        "large_string": pa.array(texts, pa.large_string()),
        "string_view": pa.array(texts, pa.string_view()),
        "dictionary": pa.array(texts).dictionary_encode(),
        "binary": pa.array([t and t.encode() for t in texts], pa.binary()),
    }[kind]
    pq.write_table(pa.table({"id": [0, 1, 2], "text": column}), tmp_path / "in.parquet")
    run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    rows = scored_rows(tmp_path / "out")
    assert [row["label"] for row in rows] == ["spam", "not spam", None]
    assert [row["score_error"] for row in rows] == [None, None, "text is null"]


def test_a_message_in_a_struct_column_is_scored_and_the_struct_kept(tiny_run, tmp_path):
    """JSON events landed in Parquet: the message is a field of a struct column."""
    events = [
        {"body": {"text": CHAPTER_SPAM}, "lang": "en"},
        None,
        {"body": None, "lang": "en"},
        {"body": {"text": CHAPTER_HAM}, "lang": "en"},
    ]
    table = pa.table({"id": [0, 1, 2, 3], "event": pa.array(events)})
    pq.write_table(table, tmp_path / "in.parquet")
    model, inputs = str(tiny_run / "model"), [str(tmp_path / "in.parquet")]
    with pytest.raises(ScoringError, match=r"such as --text-column event\.body\.text, a field"):
        run_scoring(model, inputs, str(tmp_path / "refused"))
    with pytest.raises(ScoringError, match=r"event\.body has no field 'txt' \(its fields: text\)"):
        run_scoring(model, inputs, str(tmp_path / "refused"), text_column="event.body.txt")
    run_scoring(model, inputs, str(tmp_path / "out"), text_column="event.body.text")
    rows = scored_rows(tmp_path / "out")
    assert [row["label"] for row in rows] == ["spam", None, None, "not spam"]
    assert [row["score_error"] for row in rows] == [None, "text is null", "text is null", None]
    assert [row["event"] for row in rows] == events  # the input column as it was


@pytest.mark.parametrize(
    ("marker", "kind"),
    [
        ("_delta_log/00000000000000000000.json", "a Delta Lake table"),
        (".hoodie/hoodie.properties", "an Apache Hudi table"),
        ("metadata/v1.metadata.json", "an Apache Iceberg table"),
    ],
)
def test_a_table_format_folder_is_refused_not_read_stale(tiny_run, tmp_path, capsys, marker, kind):
    """Its folder also holds older versions' files: read as Parquet, rows would repeat."""
    table = tmp_path / "table"
    (table / marker).parent.mkdir(parents=True)
    (table / marker).write_text("{}")
    for version in (0, 1):  # the same rows, rewritten by an update
        pq.write_table(pa.table({"text": [CHAPTER_SPAM]}), table / f"part-{version}.parquet")
    with pytest.raises(ScoringError, match=f"is {kind}: its folder also holds"):
        run_scoring(str(tiny_run / "model"), [str(table)], str(tmp_path / "out"))
    assert main(["train", "--preset", "tiny", "--data", str(table), "--output", "x"]) == 2
    assert f"is {kind}: its folder also holds" in capsys.readouterr().err


def test_bytes_that_are_not_utf8_are_flagged(tiny_run, tmp_path):
    column = pa.array([CHAPTER_SPAM.encode(), b"\xff\xfe caf\xe9"], pa.binary())
    pq.write_table(pa.table({"id": [0, 1], "text": column}), tmp_path / "in.parquet")
    run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    rows = scored_rows(tmp_path / "out")
    assert rows[0]["label"] == "spam" and rows[1]["label"] is None
    assert rows[1]["score_error"] == "text is not valid UTF-8"


def test_an_input_without_rows_gives_an_empty_output_with_every_column(tiny_run, tmp_path):
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "in.parquet")
    summary = run_scoring(
        str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out")
    )
    assert summary.rows == 0
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 0
    assert table.schema.names == ["id", "text", *ADDED_COLUMNS]
    assert table.schema.field("probabilities").type.names == ["not spam", "spam"]
    assert (tmp_path / "out" / "_SUCCESS").is_file()


def test_files_whose_schemas_differ_are_scored_with_the_union_of_columns(tiny_run, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    first = pa.table({"id": pa.array([0, 1], pa.int32()), "text": [CHAPTER_SPAM, CHAPTER_HAM]})
    second = pa.table(
        {"id": pa.array([2], pa.int64()), "text": [CHAPTER_HAM], "sender": ["+4470000"]}
    )
    pq.write_table(first, folder / "a.parquet")
    pq.write_table(second, folder / "b.parquet")
    run_scoring(str(tiny_run / "model"), [str(folder)], str(tmp_path / "out"))
    rows = scored_rows(tmp_path / "out")
    assert [row["id"] for row in rows] == [0, 1, 2]
    assert [row["label"] for row in rows] == ["spam", "not spam", "not spam"]
    assert [row["sender"] for row in rows] == [None, None, "+4470000"]


@pytest.mark.parametrize("name", [None, "message_id"])
def test_the_index_pandas_wrote_reads_back_as_the_index(tiny_run, tmp_path, name):
    """A filtered frame's `to_parquet` stores its index as a column (``__index_level_0__``
    when unnamed); `pd.read_parquet` of the output gives it back as the index."""
    import pandas as pd

    texts = [CHAPTER_SPAM, "dropped", CHAPTER_HAM, "dropped", "dropped", CHAPTER_HAM]
    frame = pd.DataFrame({"text": texts, "n": range(6)})
    kept = frame[frame["text"] != "dropped"].rename_axis(name)  # rows 0, 2, 5: not a range
    kept.to_parquet(tmp_path / "in.parquet")
    run_scoring(str(tiny_run / "model"), [str(tmp_path / "in.parquet")], str(tmp_path / "out"))
    scored = pd.read_parquet(tmp_path / "out")
    assert list(scored.index) == [0, 2, 5] and scored.index.name == name
    assert [c for c in scored.columns if c not in ADDED_COLUMNS] == ["text", "n"]
    assert list(scored["label"]) == ["spam", "not spam", "not spam"]


def test_an_actors_torch_work_stays_on_one_thread_of_its_own():
    """Ray builds a scoring actor on one thread and calls it on others; torch's OpenMP keeps
    a team of workers per calling thread, so the actor hands every call to one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from spam_gpt.torch_thread import TorchThread

    worker = TorchThread(2)
    here = {worker.run(threading.get_ident) for _ in range(3)}
    with ThreadPoolExecutor(1) as other:
        there = other.submit(worker.run, threading.get_ident).result()
    assert here == {there} and threading.get_ident() not in here
    assert worker.run(torch.get_num_threads) == 2
    with pytest.raises(ZeroDivisionError):
        worker.run(divmod, 1, 0)
