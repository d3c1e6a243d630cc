"""Your own labelled messages, in process: columns, labels, splits and every bad-data error."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spam_gpt.cli import main
from spam_gpt.corpus import build_splits
from spam_gpt.labelled import (
    DataSpec,
    labelled_inputs,
    load_in_process,
    ordered_labels,
    parse_fractions,
    split_sizes,
)
from spam_gpt.predictor import Predictor
from spam_gpt.sources import DataError
from spam_gpt.tokenizer import encode_text

from .conftest import THREE_LABELS, three_class_frame


def load(*paths, **options):
    return load_in_process(labelled_inputs(DataSpec(paths=[str(p) for p in paths], **options)))


def test_three_classes_are_read_and_split_exactly_per_class(three_class_data):
    plan, frames = load(three_class_data)
    assert plan.labels == THREE_LABELS  # sorted
    train, validation, test = split_sizes(240, (0.7, 0.1))
    for label in THREE_LABELS:
        assert plan.counts["train"][label] == train
        assert plan.counts["validation"][label] == validation
        assert plan.counts["test"][label] == test
    for split, frame in frames.items():
        assert Counter(frame["Label"]) == {
            k: plan.counts[split][name] for k, name in enumerate(plan.labels)
        }
    texts = {split: set(frame["Text"]) for split, frame in frames.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert plan.longest == max(len(encode_text(t)) for t in frames["train"]["Text"])
    again, _ = load(three_class_data)
    assert again.bounds == plan.bounds  # seeded: the same split every time
    _, other_frames = load(three_class_data, split_seed=7)
    assert set(other_frames["test"]["Text"]) != texts["test"]


def test_copies_of_a_message_never_straddle_splits(tmp_path):
    frame = pd.DataFrame(
        {
            "text": [f"message {i % 40}" for i in range(400)],
            "label": ["a" if i % 40 < 20 else "b" for i in range(400)],
        }
    )
    frame.to_parquet(tmp_path / "dupes.parquet")
    _, frames = load(tmp_path / "dupes.parquet")
    seen = [set(frames[split]["Text"]) for split in ("train", "validation", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_labels_fixed_in_order_and_integers_sorted_as_numbers(tmp_path):
    frame = three_class_frame()
    frame.to_parquet(tmp_path / "m.parquet")
    plan, frames = load(tmp_path / "m.parquet", labels=["ham", "other spam", "call a number"])
    assert plan.labels == ["ham", "other spam", "call a number"]
    first_ham = frames["train"]["Label"][
        frames["train"]["Text"].isin(frame[frame["label"] == "ham"]["text"])
    ]
    assert set(first_ham) == {0}
    assert ordered_labels(["10", "9", "2"]) == ["2", "9", "10"]
    numbers = {name: 10 - 4 * i for i, name in enumerate(THREE_LABELS)}
    codes = frame.assign(label=frame["label"].map(numbers))
    codes.to_parquet(tmp_path / "ints.parquet")
    plan, _ = load(tmp_path / "ints.parquet")
    assert plan.labels == ["2", "6", "10"]


def test_csv_columns_in_any_case_and_a_split_column(tmp_path):
    frame = three_class_frame()
    frame["Fold"] = ["train"] * 500 + ["validation"] * 100 + ["TEST"] * (len(frame) - 600)
    frame.rename(columns={"text": "Body", "label": "Category"}).to_csv(
        tmp_path / "m.csv", index=False
    )
    _, frames = load(
        tmp_path / "m.csv", text_column="Body", label_column="Category", split_column="Fold"
    )
    assert [len(frames[s]) for s in ("train", "validation", "test")] == [500, 100, len(frame) - 600]
    assert frames["test"]["Text"].tolist() == frame["text"][600:].tolist()


@pytest.mark.parametrize(("suffix", "codec"), [("gz", "gzip"), ("bz2", "bz2"), ("lz4", "lz4")])
def test_a_compressed_csv_reads_as_the_plain_one(tmp_path, suffix, codec):
    frame = three_class_frame()
    frame.to_csv(tmp_path / "m.csv", index=False)
    with pa.CompressedOutputStream(str(tmp_path / f"m.csv.{suffix}"), codec) as packed:
        packed.write((tmp_path / "m.csv").read_bytes())
    plain, plain_frames = load(tmp_path / "m.csv")
    packed, packed_frames = load(tmp_path / f"m.csv.{suffix}")
    assert packed.counts == plain.counts and packed.bounds == plain.bounds
    assert packed_frames["test"]["Text"].tolist() == plain_frames["test"]["Text"].tolist()


def test_a_folder_of_csv_files_reads_as_csv_and_a_mixed_one_is_refused(tmp_path):
    frame = three_class_frame()
    frame.to_csv(tmp_path / "all.csv", index=False)
    folder = tmp_path / "exports"
    for day in ("day=1", "day=2"):
        (folder / day).mkdir(parents=True)
    half = len(frame) // 2
    frame[:half].to_csv(folder / "day=1" / "a.csv", index=False)
    frame[half:].to_csv(folder / "day=2" / "b.csv.gz", index=False)
    (folder / "_SUCCESS").write_text("")  # what Spark leaves beside its files: not data
    plan, frames = load(folder)
    whole, whole_frames = load(tmp_path / "all.csv")
    assert plan.counts == whole.counts
    assert sorted(frames["test"]["Text"]) == sorted(whole_frames["test"]["Text"])
    frame.to_parquet(folder / "c.parquet")
    with pytest.raises(DataError, match=r"exports holds files of several kinds \(csv, parquet\)"):
        load(folder)


def test_a_csv_that_is_not_utf8_names_the_line_and_the_fix(tmp_path, capsys):
    """What Excel on Windows saves as "CSV" is cp1252: the first byte UTF-8 cannot read is
    found and shown, with how to convert the file, in process and on the command line."""
    frame = three_class_frame()
    frame["text"] = frame["text"].str.encode("ascii", "ignore").str.decode("ascii")
    frame.loc[41, "text"] = "Caf\u00e9 offer \u00a35, reply now"
    frame.to_csv(tmp_path / "m.csv", index=False, encoding="cp1252")
    written = (tmp_path / "m.csv").read_bytes()
    line = written[: written.index(b"Caf")].count(b"\n") + 1
    expected = rf'byte 0xe9 on line {line}, in `"Caf\\xe9 offer \\xa35, reply now",'
    with pytest.raises(DataError, match=expected):
        load(tmp_path / "m.csv")
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "m.csv")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8" in err and "iconv -f cp1252 -t utf-8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("m.jsonl", r"is JSON Lines; .*pd.read_json\('.*m.jsonl', lines=True\)"),
        ("m.json", r"is JSON; .*pd.read_json\('.*m.json'\)"),
        ("m.xlsx", "is an Excel workbook; spam-gpt reads Parquet"),
        ("m.data", "is not a Parquet file .it has no Parquet footer: damaged, or another format"),
    ],
)
def test_a_file_in_another_format_is_named_with_what_spam_gpt_reads(tmp_path, name, message):
    three_class_frame().to_json(tmp_path / name, orient="records", lines=True)
    with pytest.raises(DataError, match=message):
        load(tmp_path / name)


def test_a_hive_partition_can_be_the_split_column(tmp_path):
    frame = three_class_frame()
    for split, rows in (
        ("train", frame[:500]),
        ("validation", frame[500:600]),
        ("test", frame[600:]),
    ):
        (tmp_path / f"split={split}").mkdir()
        rows.to_parquet(tmp_path / f"split={split}" / "part-0.parquet")
    plan, frames = load(tmp_path, split_column="split")
    assert plan.split_rows("validation") == 100 and len(frames["test"]) == len(frame) - 600


def test_separate_validation_and_test_inputs(tmp_path):
    frame = three_class_frame()
    frame[:500].to_parquet(tmp_path / "train.parquet")
    frame[500:600].to_parquet(tmp_path / "val.parquet")
    frame[600:].to_csv(tmp_path / "test.csv", index=False)
    plan, frames = load(
        tmp_path / "train.parquet",
        validation_data=[str(tmp_path / "val.parquet")],
        test_data=[str(tmp_path / "test.csv")],
    )
    assert [plan.split_rows(s) for s in ("train", "validation", "test")] == [500, 100, 120]
    assert frames["validation"]["Text"].tolist() == frame["text"][500:600].tolist()


def test_the_prepare_folder_and_no_data_are_the_chapters_splits(tmp_path):
    assert main(["prepare", "--out", str(tmp_path)]) == 0
    chapter = build_splits()
    for plan, frames in (load(tmp_path), load_in_process(labelled_inputs(None))):
        assert plan.labels == ["not spam", "spam"]
        for split in ("train", "validation", "test"):
            assert frames[split]["Text"].tolist() == chapter[split]["Text"].tolist()
            assert frames[split]["Label"].tolist() == chapter[split]["Label"].tolist()


def test_skipped_rows_are_counted_and_named_in_one_line(tmp_path):
    frame = three_class_frame()
    texts, labels = frame["text"].tolist(), frame["label"].tolist()
    texts[3], texts[10], labels[20] = None, "   ", None
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "m.parquet")
    plan, frames = load(tmp_path / "m.parquet")
    assert plan.skipped == 3 and sum(len(f) for f in frames.values()) == len(frame) - 3
    line = plan.skipped_line()
    assert line.startswith(f"Skipped 3 of {len(frame):,} rows")
    assert "m.parquet row 4 (text is null)" in line and "row 11 (text is blank)" in line
    assert "row 21 (label is null)" in line
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "m.csv", index=False)
    plan, _ = load(tmp_path / "m.csv")
    assert "m.csv line 5 (text is blank)" in plan.skipped_line()  # CSV: empty, not null


BAD_DATA = {
    "no text column": (
        {"body": ["hi"] * 30, "label": ["a", "b"] * 15},
        {},
        r"no column 'text' \(columns: body, label\).*--text-column",
    ),
    "no label column": (
        {"text": ["hi"] * 30, "category": ["a", "b"] * 15},
        {},
        r"no column 'label' \(columns: text, category\).*--label-column",
    ),
    "one class only": (
        {"text": [f"m{i}" for i in range(30)], "label": ["spam"] * 30},
        {},
        r"training split has 1 label\(s\) \('spam'\).*two or more",
    ),
    "a class too small for the split": (
        {"text": [f"m{i}" for i in range(39)], "label": ["a"] * 30 + ["rare"] * 9},
        {},
        r"label 'rare' has 9 row\(s\); a 0.7/0.1/0.2 split needs at least 10 rows",
    ),
    "a label outside --labels": (
        {"text": [f"m{i}" for i in range(60)], "label": ["a", "b", "c"] * 20},
        {"labels": ["a", "b"]},
        r"label\(s\) 'c' \(20 rows\) are not among --labels \(a, b\)",
    ),
    "an unknown split value": (
        {"text": ["m"] * 30, "label": ["a", "b"] * 15, "split": ["train", "dev", "test"] * 10},
        {"split_column": "split"},
        r"holds 'dev'.*train, validation or test",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_before_any_work_and_says_what_to_change(tmp_path, case, capsys):
    columns, options, message = BAD_DATA[case]
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=message):
        load(tmp_path / "m.parquet", **options)
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "m.parquet")]
    args += [
        f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}"
        for k, v in options.items()
    ]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spam-gpt train: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.8,0.3", "does not add up"),
        ("0.7,0.1,0.1", "add up to 0.9, not 1"),
        ("0.7", "TRAIN,VALIDATION"),
        ("seventy", "expected fractions"),
        ("0.9,0.1", "leave some rows for test"),
    ],
)
def test_split_fractions_that_do_not_add_up_are_refused(text, message, capsys):
    with pytest.raises(DataError, match=message):
        parse_fractions(text)
    assert main(["train", "--data", "x.parquet", "--split", text, "--output", "o"]) == 2
    assert message in capsys.readouterr().err


def test_data_options_need_data_and_validation_needs_test(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--label-column", "y", "--output", "o"]) == 2
    assert "--label-column describe(s) --data" in capsys.readouterr().err
    with pytest.raises(DataError, match="go together"):
        DataSpec(paths=["a"], validation_data=["b"])


def test_three_classes_train_in_process_and_classify(three_class_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--epochs", "3", "--data", str(three_class_data)]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Data: 3 labels (call a number, ham, other spam)" in printed
    assert "Macro F1:" in printed and "Spam precision" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == THREE_LABELS and len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 3 * 48
    assert set(metrics["per_class"]) == set(THREE_LABELS) and "spam_precision" not in metrics
    assert metrics["test_accuracy"] > 0.6 and metrics["macro_f1"] > 0.5
    meta = json.loads((out / "model" / "spam_gpt.json").read_text())
    assert meta["labels"] == THREE_LABELS
    assert (out / "confusion-matrix.png").is_file()
    message = "URGENT! Call 09061701461 now to claim your prize"
    assert main(["classify", "--json", "--model", str(out / "model"), message]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["probabilities"]) == set(THREE_LABELS) and "spam_probability" not in record
    assert record["label"] in THREE_LABELS
    assert record["probability"] == max(record["probabilities"].values())
    assert main(["evaluate", "--model", str(out / "model"), "--data", str(three_class_data)]) == 0
    assert f"Test accuracy: {metrics['test_accuracy'] * 100:.2f}%" in capsys.readouterr().out
    other = three_class_frame().replace({"label": {"ham": "newsletter"}})
    other.to_parquet(tmp_path / "other.parquet")
    assert (
        main(["evaluate", "--model", str(out / "model"), "--data", str(tmp_path / "other.parquet")])
        == 2
    )
    err = capsys.readouterr().err
    assert "label(s) 'newsletter' (240 rows) are not among the model's labels" in err
    assert "remove those rows, or train a model on them" in err

    # A newly labelled batch, all of one label, with a row that has no text: every row
    # counts (no split), the row without text is named.
    batch = three_class_frame().query("label == 'other spam'")
    batch = pd.concat([batch, pd.DataFrame({"text": [None], "label": ["other spam"]})])
    batch.to_parquet(tmp_path / "batch.parquet")
    args = ["evaluate", "--model", str(out / "model"), "--data", str(tmp_path / "batch.parquet")]
    assert main([*args, "--every-row"]) == 0
    printed = capsys.readouterr().out
    texts = batch["text"].dropna().tolist()
    predicted = [p.label for p in Predictor.from_checkpoint(out / "model").predict(texts)]
    right = sum(label == "other spam" for label in predicted) / len(texts)
    assert f"Data: {len(texts)} rows, evaluated as one set" in printed
    assert f"Skipped 1 of {len(batch)} rows" in printed and "(text is null)" in printed
    assert f"Accuracy: {right:.2%}" in printed


def test_what_ray_datas_processes_import_pulls_in_no_torch():
    """Every process that runs or plans the streamed split's map (Ray Data's tasks, each
    split's coordinator) imports ``spam_gpt.labelled``; torch, matplotlib and MLflow there
    made every Ray Train job start about 10 s slower on two cores."""
    probe = (
        "import sys, spam_gpt.labelled; "
        "print(sorted({'torch', 'matplotlib', 'mlflow'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
