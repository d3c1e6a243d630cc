"""The UCI SMS Spam Collection: reading it, and splitting it exactly as chapter 6 does.

The collection ships inside the package (see ``assets/README.md`` for its licence), so
training works offline and on air-gapped Ray workers; ``--source`` still reads a local
file, a UCI-style zip or a URL.
"""

from __future__ import annotations

import hashlib
import io
import time
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

import pandas as pd

UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
MEMBER_NAME = "SMSSpamCollection"
CORPUS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABELS = {"ham": 0, "spam": 1}
LABEL_NAMES = ("not spam", "spam")  # what the chapter calls labels 0 and 1
SPLIT_NAMES = ("train", "validation", "test")


class CorpusError(ValueError):
    """The message collection could not be read; the text says which input and why."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundled_corpus_bytes() -> bytes:
    """The packaged collection, refused if it is not byte-identical to UCI's."""
    data = resources.files("spam_gpt").joinpath("assets", "sms_spam_collection", MEMBER_NAME)
    raw = data.read_bytes()
    if sha256_hex(raw) != CORPUS_SHA256:
        raise CorpusError(
            f"the bundled {MEMBER_NAME} is damaged (SHA-256 {sha256_hex(raw)[:12]}…, expected "
            f"{CORPUS_SHA256[:12]}…); reinstall spam-gpt"
        )
    return raw


def download(url: str, tries: int = 3, timeout: float = 30.0) -> bytes:
    """Fetch ``url``, retrying with back-off; the error names ``--source`` for offline users."""
    last_error: Exception | None = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except OSError as error:  # URLError, timeouts and resets are all OSErrors
            last_error = error
            if attempt + 1 < tries:
                time.sleep(2**attempt)
    raise CorpusError(
        f"could not download {url} after {tries} tries ({last_error}); offline, pass "
        f"--source with a local copy of {MEMBER_NAME} or the UCI zip, or leave --source out "
        "to use the copy bundled with spam-gpt"
    )


def extract_member(raw: bytes, origin: str) -> bytes:
    """The ``SMSSpamCollection`` file from a zip laid out like UCI's, or ``raw`` itself."""
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return raw
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        members = [n for n in archive.namelist() if Path(n).name == MEMBER_NAME]
        if not members:
            raise CorpusError(f"{origin} is a zip without a file named {MEMBER_NAME}")
        return archive.read(members[0])


def read_source_bytes(source: str | None, sha256: str | None = None) -> bytes:
    """The raw collection from the bundle, a local file or zip, or a URL.

    Downloads are always checked: against ``sha256`` when given, else against the digest
    of UCI's own file. Local files are checked only when ``sha256`` is given, so a team
    can bring its own messages in the same format.
    """
    if source is None:
        return bundled_corpus_bytes()
    is_url = "://" in source and not source.startswith("file://")
    if is_url:
        raw = extract_member(download(source), source)
    else:
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise CorpusError(f"--source {source}: no such file")
        raw = extract_member(path.read_bytes(), source)
    expected = sha256 or (CORPUS_SHA256 if is_url else None)
    if expected and sha256_hex(raw) != expected:
        raise CorpusError(
            f"--source {source}: SHA-256 is {sha256_hex(raw)}, expected {expected}; pass "
            "--sha256 with the right digest if this is the file you meant"
        )
    return raw


def parse_collection(raw: bytes, origin: str = "the collection") -> pd.DataFrame:
    """Read ``label<TAB>text`` lines the way the chapter does, refusing unknown labels.

    pandas' default quoting merges two quoted lines of UCI's file, which is why the
    chapter (and this function) see 5,572 messages rather than 5,574 lines.
    """
    try:
        frame = pd.read_csv(
            io.BytesIO(raw), sep="\t", header=None, names=["Label", "Text"], dtype=str
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CorpusError(f"{origin} is not tab-separated label/text lines: {error}") from error
    bad = frame[~frame["Label"].isin(list(LABELS)) | frame["Text"].isna()]
    if len(bad):
        rows = ", ".join(str(i + 1) for i in bad.index[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CorpusError(
            f"{origin}: {len(bad)} row(s) without a 'ham'/'spam' label and a text "
            f"(rows {rows}{more}); every line must be 'ham<TAB>text' or 'spam<TAB>text'"
        )
    return frame


def create_balanced_dataset(df: pd.DataFrame) -> pd.DataFrame:
    """Undersample "ham" to the number of "spam" messages (the chapter's function)."""
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    return pd.concat([ham_subset, df[df["Label"] == "spam"]])


def random_split(
    df: pd.DataFrame, train_frac: float, validation_frac: float
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle with ``random_state=123`` and cut into train/validation/test (the chapter's)."""
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def build_splits(raw: bytes | None = None) -> dict[str, pd.DataFrame]:
    """Balanced, label-encoded 70/10/20 splits: 1045/149/300 rows on UCI's collection."""
    df = parse_collection(bundled_corpus_bytes() if raw is None else raw)
    balanced = create_balanced_dataset(df)
    balanced["Label"] = balanced["Label"].map(LABELS)
    frames = random_split(balanced, 0.7, 0.1)
    return {name: frame.reset_index(drop=True) for name, frame in zip(SPLIT_NAMES, frames)}


def write_splits(splits: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each split as the chapter's CSV (``Label,Text``) and as Parquet."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in splits.items():
        frame.to_csv(out / f"{name}.csv", index=None)
        frame.to_parquet(out / f"{name}.parquet", index=False)
        written += [out / f"{name}.csv", out / f"{name}.parquet"]
    return written


def read_splits(data_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Splits written by ``spam-gpt prepare`` (CSV preferred, as the chapter reads them)."""
    folder = Path(data_dir)
    splits = {}
    for name in SPLIT_NAMES:
        csv, parquet = folder / f"{name}.csv", folder / f"{name}.parquet"
        if csv.is_file():
            frame = pd.read_csv(csv, dtype={"Text": str})
        elif parquet.is_file():
            frame = pd.read_parquet(parquet)
        else:
            raise CorpusError(
                f"{folder} has no {name}.csv or {name}.parquet; create the splits with "
                f"`spam-gpt prepare --out {folder}`"
            )
        if list(frame.columns[:2]) != ["Label", "Text"] or not frame["Label"].isin([0, 1]).all():
            raise CorpusError(
                f"{csv if csv.is_file() else parquet}: expected columns Label (0/1), Text"
            )
        splits[name] = frame
    return splits


def splits_checksum(splits: dict[str, pd.DataFrame]) -> str:
    """One digest over the three splits, so runs on different data never look alike."""
    digest = hashlib.sha256()
    for name in SPLIT_NAMES:
        digest.update(splits[name].to_csv(index=None).encode())
    return digest.hexdigest()
