"""The SMS collection and the chapter's splits: counts, rows, order, sources, errors."""

from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest

from spam_gpt.cli import main
from spam_gpt.corpus import (
    CORPUS_SHA256,
    CorpusError,
    build_splits,
    bundled_corpus_bytes,
    parse_collection,
    read_source_bytes,
    read_splits,
    sha256_hex,
)


def chapter_splits(raw: bytes) -> list[pd.DataFrame]:
    """The chapter's data steps, written out plainly as the reference to match."""
    df = pd.read_csv(io.BytesIO(raw), sep="\t", header=None, names=["Label", "Text"])
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"].sample(len(spam), random_state=123)
    balanced = pd.concat([ham, spam])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    a, b = int(len(shuffled) * 0.7), int(len(shuffled) * 0.7) + int(len(shuffled) * 0.1)
    return [shuffled[:a], shuffled[a:b], shuffled[b:]]


def test_bundled_collection_is_ucis_file_with_the_chapters_counts():
    raw = bundled_corpus_bytes()
    assert sha256_hex(raw) == CORPUS_SHA256
    counts = parse_collection(raw)["Label"].value_counts()
    assert counts["ham"] == 4825 and counts["spam"] == 747


def test_splits_are_the_chapters_rows_in_the_chapters_order():
    splits = build_splits()
    assert [len(f) for f in splits.values()] == [1045, 149, 300]
    balanced = pd.concat(splits.values())
    assert (balanced["Label"] == 1).sum() == 747 and (balanced["Label"] == 0).sum() == 747
    for ours, reference in zip(splits.values(), chapter_splits(bundled_corpus_bytes())):
        assert ours["Text"].tolist() == reference["Text"].tolist()
        assert ours["Label"].tolist() == reference["Label"].tolist()


def test_prepare_writes_csv_and_parquet_that_read_back(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path)]) == 0
    for name, rows in (("train", 1045), ("validation", 149), ("test", 300)):
        csv = pd.read_csv(tmp_path / f"{name}.csv")
        parquet = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert list(csv.columns) == ["Label", "Text"] and len(csv) == rows
        assert csv["Text"].tolist() == parquet["Text"].tolist()
        assert csv["Label"].tolist() == parquet["Label"].tolist()
    assert "train: 1045 rows" in capsys.readouterr().out
    assert [len(f) for f in read_splits(tmp_path).values()] == [1045, 149, 300]


def uci_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("SMSSpamCollection", bundled_corpus_bytes())
        archive.writestr("readme", "UCI's readme")
    return buffer.getvalue()


def test_source_accepts_a_local_file_and_a_uci_zip(tmp_path):
    plain = tmp_path / "SMSSpamCollection"
    plain.write_bytes(bundled_corpus_bytes())
    archive = tmp_path / "sms+spam+collection.zip"
    archive.write_bytes(uci_zip())
    assert read_source_bytes(str(plain)) == bundled_corpus_bytes()
    assert read_source_bytes(str(archive), CORPUS_SHA256) == bundled_corpus_bytes()


def test_source_url_is_downloaded_and_checked(tmp_path, http_folder):
    (tmp_path / "uci.zip").write_bytes(uci_zip())
    url = http_folder(tmp_path) + "/uci.zip"
    assert read_source_bytes(url) == bundled_corpus_bytes()
    out = tmp_path / "splits"
    assert main(["prepare", "--out", str(out), "--source", url]) == 0
    assert len(pd.read_csv(out / "test.csv")) == 300
    with pytest.raises(CorpusError, match="SHA-256"):
        read_source_bytes(url, sha256="0" * 64)


def test_offline_download_fails_with_one_line_naming_source(tmp_path, capsys):
    code = main(["prepare", "--out", str(tmp_path), "--source", "http://127.0.0.1:9/sms.zip"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--source" in err and "after 3 tries" in err


def test_malformed_rows_are_reported_with_their_line_numbers(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\thello\nspma\ttypo label\nspam\twin now\neggs\n")
    with pytest.raises(CorpusError, match=r"2 row\(s\).*rows 2, 4"):
        parse_collection(bad.read_bytes(), str(bad))


def test_missing_local_source_and_bad_split_folder_say_what_to_do(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_source_bytes(str(tmp_path / "nope.tsv"))
    with pytest.raises(CorpusError, match="spam-gpt prepare"):
        read_splits(tmp_path)
