"""Input files of messages: what ``--data`` and ``--input`` accept, and reading them.

A path is a Parquet file, a glob, a CSV/TSV file in UTF-8, compressed or not (the
chapter's splits, the UCI collection), or a folder of either kind (hive partitions become
columns), local or on any filesystem pyarrow opens (``s3://``, ``gs://``, ``file://``).
Files are read a batch at a time, so no file needs to fit in memory.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

TEXT_SUFFIXES = (".csv", ".tsv")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".lz4")  # what pyarrow's datasets and Ray Data open
# Files people hand over that are neither Parquet nor CSV/TSV, by suffix.
OTHER_FORMATS = {
    ".json": "JSON",
    ".jsonl": "JSON Lines",
    ".ndjson": "JSON Lines",
    ".xlsx": "an Excel workbook",
    ".xls": "an Excel workbook",
    ".avro": "Avro",
    ".orc": "ORC",
    ".feather": "Arrow IPC",
    ".arrow": "Arrow IPC",
}
READS = (
    "spam-gpt reads Parquet (files or folders) and CSV/TSV files (.csv, .tsv; also .gz, .bz2, .lz4)"
)
UCI_NAME = "SMSSpamCollection"
UCI_COLUMNS = ["Label", "Text"]
BATCH_ROWS = 8192


class DataError(ValueError):
    """Input data that cannot be used; the message says which input and what to change."""


class SourceFile(NamedTuple):
    """One input file, with the values of the hive partitions its path names."""

    path: str
    format: str  # parquet, csv or tsv
    partitions: dict


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path.removeprefix("file://")


def expand_glob(pattern: str) -> list[str]:
    """Files matching ``pattern``, locally or on any filesystem pyarrow opens."""
    if not is_remote(pattern):
        return sorted(glob.glob(local_path(pattern), recursive=True))
    filesystem, path = pa_fs.FileSystem.from_uri(pattern.split("*")[0].rsplit("/", 1)[0])
    scheme = pattern.split("://", 1)[0]
    base = pattern.split("://", 1)[1]
    selector = pa_fs.FileSelector(path, recursive=True)
    return sorted(
        f"{scheme}://{info.path}"
        for info in filesystem.get_file_info(selector)
        if info.type == pa_fs.FileType.File and fnmatch.fnmatch(info.path, base)
    )


def expand_inputs(inputs: list[str], option: str = "--input") -> tuple[list[str], str]:
    """Input paths (globs expanded) and their one format: parquet, csv or tsv."""
    paths: list[str] = []
    formats = set()
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matched = expand_glob(item)
            if not matched:
                raise DataError(f"{option} {item} matches no files")
            paths += matched
            formats |= {input_format(p) for p in matched}  # by name: a stat each costs
        else:
            if not is_remote(item) and not Path(local_path(item)).exists():
                raise DataError(f"{option} {item} does not exist")
            paths.append(item)
            formats.add(path_format(item))
    if len(formats) > 1:
        raise DataError(f"{option} mixes formats ({', '.join(sorted(formats))}); use one")
    return paths, formats.pop()


def input_format(path: str) -> str:
    """parquet, csv or tsv, by the path's name; other formats people name are refused."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    plain = name.removesuffix(next((s for s in COMPRESSED_SUFFIXES if name.endswith(s)), ""))
    if plain.endswith(TEXT_SUFFIXES):
        return plain.rsplit(".", 1)[1]
    if name == UCI_NAME.lower():
        return "tsv"
    suffix = "." + plain.rsplit(".", 1)[-1]
    if suffix in OTHER_FORMATS:
        hint = ""
        if "JSON" in OTHER_FORMATS[suffix]:
            lines = ", lines=True" if suffix != ".json" else ""
            hint = f" (pandas: pd.read_json({path!r}{lines}).to_parquet('messages.parquet'))"
        raise DataError(
            f"{path} is {OTHER_FORMATS[suffix]}; {READS}: convert it to Parquet first{hint}"
        )
    return "parquet"  # files by suffix, folders (hive partitions included) as Parquet


# Table formats whose folders also hold the Parquet files of older versions and deleted
# rows: read as plain Parquet they would give stale and repeated rows. By a marker inside.
TABLE_FORMATS = {"_delta_log": "a Delta Lake table", ".hoodie": "an Apache Hudi table"}


def refuse_table_format(path: str, names: list[str]) -> None:
    """Refuse a folder that is a Delta, Hudi or Iceberg table (``names``: its files and
    folders, relative), whose Parquet files are not its current rows."""
    tops = {name.split("/", 1)[0] for name in names}
    kind = next((TABLE_FORMATS[top] for top in TABLE_FORMATS if top in tops), None)
    if kind is None and any(
        n.startswith("metadata/") and n.endswith(".metadata.json") for n in names
    ):
        kind = "an Apache Iceberg table"
    if kind:
        raise DataError(
            f"{path} is {kind}: its folder also holds the Parquet files of older versions "
            "and of deleted rows, so read as Parquet it would give stale and repeated rows. "
            "Export its current version to Parquet (for example with Spark, DuckDB or the "
            "table's Python library) and give that"
        )


def path_format(path: str) -> str:
    """:func:`input_format` of a file, or of the data files in a folder (what pyarrow reads
    there: names starting with ``_`` or ``.`` aside), which must all be of one kind."""
    filesystem, where = filesystem_of(path)
    if filesystem.get_file_info(where).type != pa_fs.FileType.Directory:
        return input_format(path)
    listed = filesystem.get_file_info(pa_fs.FileSelector(where, recursive=True))
    refuse_table_format(path, [info.path[len(where) :].strip("/") for info in listed])
    kinds = {
        input_format(info.path)
        for info in listed
        if info.type == pa_fs.FileType.File
        and not any(p.startswith(("_", ".")) for p in info.path[len(where) :].split("/"))
    }
    if len(kinds) > 1:
        raise DataError(
            f"{path} holds files of several kinds ({', '.join(sorted(kinds))}); give one kind, "
            f"for example {path.rstrip('/')}/*.{min(kinds)}"
        )
    return kinds.pop() if kinds else "parquet"


def not_parquet(path: str, error: Exception) -> DataError:
    """What to say when a file read as Parquet is not one."""
    damaged = "magic bytes not found" in str(error)
    reason = "it has no Parquet footer" if damaged else str(error).splitlines()[0]
    return DataError(
        f"{path} is not a Parquet file ({reason}: damaged, or another format); {READS}"
    )


def not_utf8(path: str) -> DataError:
    """What to say when a CSV/TSV file is not UTF-8: the line of its first bad byte, and
    how to convert it (Excel on Windows writes cp1252)."""
    filesystem, where = filesystem_of(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with filesystem.open_input_stream(where) as stream:
        while chunk := stream.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                data, start = error.object, error.start  # with a character the last chunk cut
                line += data.count(b"\n", 0, start)
                first = max(data.rfind(b"\n", 0, start) + 1, start - 30)
                stop = data.find(b"\n", start)
                text = data[first : min(len(data) if stop < 0 else stop, start + 30)]
                return DataError(
                    f"{path} is not UTF-8: byte 0x{data[start]:02x} on line {line}, in "
                    f"`{text.decode('utf-8', 'backslashreplace')}`; spam-gpt reads CSV/TSV as "
                    'UTF-8: save the file as UTF-8 (Excel: "CSV UTF-8") or convert it, for '
                    f"example: iconv -f cp1252 -t utf-8 {path} > utf8.csv"
                )
            line += chunk.count(b"\n")
    return DataError(f"{path} is not UTF-8; save it as UTF-8")


def filesystem_of(path: str) -> tuple[pa_fs.FileSystem, str]:
    if is_remote(path):
        return pa_fs.FileSystem.from_uri(path)
    return pa_fs.LocalFileSystem(), str(Path(local_path(path)).resolve())


def is_headerless_uci(path: str) -> bool:
    """The UCI file has no header: its first line starts with a label."""
    filesystem, where = filesystem_of(path)
    with filesystem.open_input_stream(where) as stream:
        return stream.read(5).startswith((b"ham\t", b"spam\t"))


def csv_parse_options(fmt: str) -> pa_csv.ParseOptions:
    if fmt == "csv":
        return pa_csv.ParseOptions(newlines_in_values=True)
    return pa_csv.ParseOptions(delimiter="\t", quote_char=False)


def csv_read_options(fmt: str, path: str) -> pa_csv.ReadOptions:
    """Column names from the header, or the UCI file's two when it has none."""
    names = UCI_COLUMNS if fmt == "tsv" and is_headerless_uci(path) else None
    return pa_csv.ReadOptions(column_names=names, block_size=1 << 22)


def csv_column_names(path: str, fmt: str) -> list[str]:
    filesystem, where = filesystem_of(path)
    with filesystem.open_input_stream(where) as stream:
        reader = pa_csv.open_csv(
            stream, read_options=csv_read_options(fmt, path), parse_options=csv_parse_options(fmt)
        )
        return reader.schema.names


def csv_as_strings(path: str, fmt: str) -> pa_csv.ConvertOptions:
    """Every column read as text: a streamed reader guesses types from its first block,
    and a label column of digits that later says "spam" must not stop the job."""
    names = csv_column_names(path, fmt)
    return pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))


def read_files(
    paths: list[str],
    fmt: str,
    shuffle_seed: int | None = None,
    as_strings: bool = False,
    footers: ParquetFooters | None = None,
):
    """A Ray Dataset over Parquet or CSV/TSV paths; hive partitions become columns.
    ``shuffle_seed`` reads the files in a new seeded order on every pass; ``as_strings``
    reads every CSV column as text (see :func:`csv_as_strings`); ``footers``: the Parquet
    files' footers when the caller has read them already."""
    import ray.data

    shuffle = None if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed)
    if fmt == "parquet":
        schema = (footers or ParquetFooters.of(paths)).read_schema()
        extra = {} if schema is None else {"schema": schema}
        return ray.data.read_parquet(paths, shuffle=shuffle, **extra)
    convert = csv_as_strings(paths[0], fmt) if as_strings else None
    return ray.data.read_csv(
        paths,
        shuffle=shuffle,
        parse_options=csv_parse_options(fmt),
        read_options=csv_read_options(fmt, paths[0]),
        convert_options=convert,
    )


@dataclass(frozen=True)
class ParquetFooters:
    """The footers of a Parquet input's files, read once (on object storage each is a
    request): how many rows it holds, and the schema to read it with."""

    files: list[SourceFile]
    footers: list[pq.FileMetaData]

    @classmethod
    def of(cls, paths: list[str]) -> ParquetFooters:
        files = list_files(paths, "parquet")

        def footer(file: SourceFile) -> pq.FileMetaData:
            filesystem, where = filesystem_of(file.path)
            with filesystem.open_input_file(where) as stream:
                try:
                    return pq.read_metadata(stream)
                except pa.ArrowInvalid as error:
                    raise not_parquet(file.path, error) from None

        with ThreadPoolExecutor(16) as pool:
            return cls(files, list(pool.map(footer, files)))

    @property
    def rows(self) -> int:
        return sum(footer.num_rows for footer in self.footers)

    def read_schema(self) -> pa.Schema | None:
        """:meth:`unified_schema` for files that do not share one, or that hold Arrow's view
        types, which Ray cannot move between processes; None when the files agree already."""
        schemas = self.schemas()
        if not schemas or (
            all(schema.equals(schemas[0]) for schema in schemas)
            and not any(is_view(field.type) for field in schemas[0])
        ):
            return None
        return self.unified_schema()

    def schemas(self) -> list[pa.Schema]:
        return [footer.schema.to_arrow_schema().remove_metadata() for footer in self.footers]

    def unified_schema(self) -> pa.Schema:
        """One schema for all the files: the union of their columns, types widened where
        they differ (int32 against int64), view types as large_string/large_binary, and
        the hive partition columns as strings."""
        schemas = self.schemas()
        readable = [pa.schema([without_views(field) for field in schema]) for schema in schemas]
        unified = pa.unify_schemas(readable, promote_options="permissive")
        for name in self.files[0].partitions:  # hive partition columns, read as strings
            if name not in unified.names:
                unified = unified.append(pa.field(name, pa.string()))
        pandas = self.pandas_index()
        return unified if pandas is None else unified.with_metadata({b"pandas": pandas})

    def pandas_index(self) -> bytes | None:
        """pandas' metadata when every file stores the same index as columns (what a
        filtered frame's ``to_parquet`` writes, as ``__index_level_0__`` when unnamed), so
        that pandas reads it back as the index; None otherwise."""
        written = [
            (footer.schema.to_arrow_schema().metadata or {}).get(b"pandas")
            for footer in self.footers
        ]
        if not written or None in written:
            return None
        indexes = [json.loads(metadata)["index_columns"] for metadata in written]
        as_columns = indexes[0] and all(isinstance(column, str) for column in indexes[0])
        return written[0] if as_columns and all(i == indexes[0] for i in indexes) else None


def is_view(kind: pa.DataType) -> bool:
    return pa.types.is_string_view(kind) or pa.types.is_binary_view(kind)


def without_views(field: pa.Field) -> pa.Field:
    if pa.types.is_string_view(field.type):
        return field.with_type(pa.large_string())
    if pa.types.is_binary_view(field.type):
        return field.with_type(pa.large_binary())
    return field


def list_files(paths: list[str], fmt: str) -> list[SourceFile]:
    """Every file under ``paths`` (expanded by :func:`expand_inputs`), in a stable order,
    with its hive partition values (``region=eu/`` gives ``region``)."""
    files: list[SourceFile] = []
    for path in paths:
        filesystem, where = filesystem_of(path)
        try:
            dataset = pa_ds.dataset(
                where, filesystem=filesystem, format="csv" if fmt != "parquet" else "parquet"
            )
        except pa.ArrowInvalid as error:
            if fmt != "parquet":
                raise DataError(f"{path}: {str(error).splitlines()[0]}") from None
            raise not_parquet(path, error) from None
        scheme = path.split("://", 1)[0] + "://" if is_remote(path) else ""
        for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
            files.append(SourceFile(scheme + fragment.path, fmt, hive_partitions(fragment.path)))
    return files


def hive_partitions(path: str) -> dict:
    """``key=value`` folders of a path, as strings (the way Ray Data reads them)."""
    parts = path.replace("\\", "/").split("/")[:-1]
    return dict(part.split("=", 1) for part in parts if "=" in part and not part.startswith("="))


def file_batches(source: SourceFile, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The file's rows, a batch at a time, with its partition values as string columns."""
    filesystem, where = filesystem_of(source.path)
    wanted = None if columns is None else [c for c in columns if c not in source.partitions]
    if source.format == "parquet":
        with filesystem.open_input_file(where) as handle:
            reader = pq.ParquetFile(handle)
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                yield with_partitions(pa.Table.from_batches([batch]), source.partitions)
        return
    try:
        with filesystem.open_input_stream(where) as stream:
            reader = pa_csv.open_csv(
                stream,
                read_options=csv_read_options(source.format, source.path),
                parse_options=csv_parse_options(source.format),
                convert_options=csv_as_strings(source.path, source.format),
            )
            for batch in reader:
                table = pa.Table.from_batches([batch])
                if wanted is not None:
                    table = table.select([c for c in wanted if c in table.column_names])
                yield with_partitions(table, source.partitions)
    except pa.ArrowInvalid as error:
        if "invalid UTF8" in str(error):
            raise not_utf8(source.path) from None
        raise


def with_partitions(table: pa.Table, partitions: dict) -> pa.Table:
    for key, value in partitions.items():
        if key not in table.column_names:
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


def file_columns(source: SourceFile) -> list[str]:
    """Column names of one file, partition columns included, without reading its rows."""
    if source.format == "parquet":
        filesystem, where = filesystem_of(source.path)
        with filesystem.open_input_file(where) as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
    else:
        names = csv_column_names(source.path, source.format)
    return [*names, *(k for k in source.partitions if k not in names)]


def resolve_column(columns: list[str], requested: str | None, default: str, option: str) -> str:
    """``requested`` exactly, else the one column named ``default`` in any case (the
    chapter's files say ``Text`` and ``Label``)."""
    if requested is not None:
        if requested not in columns:
            raise DataError(
                f"the input has no column {requested!r} (columns: {', '.join(columns)}); "
                f"pass {option} with one of them"
            )
        return requested
    matches = [c for c in columns if c.lower() == default]
    if len(matches) != 1:
        raise DataError(
            f"the input has no column {default!r} (columns: {', '.join(columns)}); pass "
            f"{option} with the column that holds them"
        )
    return matches[0]
