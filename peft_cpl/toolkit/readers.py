"""Tables of records from the files users have, read with the `datasets` library: JSONL, JSON, CSV, Parquet, a folder
saved with `save_to_disk`, a folder of such files (`load_dataset` on it), or a `datasets.Dataset` itself.

`read_records` gives each record with the place it came from ("line 3" of a JSONL file, "row 3" otherwise), so that
every error can name the file and the row; data.py turns the records into items. Whatever goes wrong while the
library reads a file is reported as a ValueError naming the file: a user's file, not a bug.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
FIELD_FLAGS = {"question": "--question-field", "answer": "--answer-field"}


def _quiet_datasets():
    """`datasets`, with its progress bars and info logs off: reading a small file is not worth a bar."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors about a bad file: ours name the row
    return datasets


def _reason(error: BaseException) -> str:
    """The most telling line of a library error: its cause's, when it wraps one (DatasetGenerationError does)."""
    inner = error.__cause__ or error.__context__ or error
    text = str(inner).strip() or str(error).strip() or type(inner).__name__
    return text.splitlines()[0]


def _first_bad_json_line(text: str) -> str | None:
    """'line N: ...' for the first line of a JSONL text that is not a JSON object, or None.

    Checked before the library sees the file, for two reasons: its error names no line, and pyarrow's JSON reader
    can crash the process (a segmentation fault, seen with pyarrow 26 on a line `null`) on lines that are not
    objects."""
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may stand in a string
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: not valid JSON ({error.msg} at column {error.colno}); one JSON object a line"
        if not isinstance(value, dict):
            return f"line {number}: each line must be a JSON object, got {type(value).__name__}"
    return None


def _check_json(path: Path, text: str) -> None:
    """Refuse JSON(L) that is not objects before the library reads it (see _first_bad_json_line)."""
    if path.suffix.lower() != ".json":
        line = _first_bad_json_line(text)
        if line:
            raise ValueError(f"{path}, {line}")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    rows = value if isinstance(value, list) else [value]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {number}: expected a JSON object (or a list of objects), got "
                             f"{type(row).__name__}")


def _load_file(path: Path, kind: str):
    """The `datasets.Dataset` of one file; text is checked to be UTF-8 first (the library would drop or garble it)."""
    datasets = _quiet_datasets()
    text = None
    if kind in ("json", "csv"):
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
                             ) from None
        if not text.strip():
            raise ValueError(f"{path} is empty: it holds no items")
        if kind == "json":
            _check_json(path, text)
    options: dict = {}
    if kind == "csv":  # every cell a string: answers like 1945 or 1.50 must stay as written, ids too
        options = {"keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig",
                   "sep": "\t" if path.suffix.lower() == ".tsv" else ","}
    with tempfile.TemporaryDirectory(prefix="peft-cpl-read-") as cache:  # the library's cache, not the user's disk
        try:
            dataset = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                            keep_in_memory=True, **options)
            if kind == "csv" and any(getattr(f, "dtype", None) not in ("string", "large_string")
                                     for f in dataset.features.values()):
                strings = datasets.Features({name: datasets.Value("string") for name in dataset.column_names})
                dataset = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                                keep_in_memory=True, features=strings, **options)
        except Exception as error:  # any failure to read a user's file is that file's fault, reported as such
            if kind == "csv" and len(text.strip().splitlines()) < 2:
                raise ValueError(f"{path} has a header but no rows: it holds no items") from None
            raise ValueError(f"{path}: cannot be read as {kind.upper()} ({_reason(error)})") from None
    return dataset, text


def _load_folder(path: Path):
    """A folder saved by `save_to_disk` (a Dataset, or a DatasetDict of one split), or data files for load_dataset."""
    datasets = _quiet_datasets()
    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        if saved:
            dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:
            with tempfile.TemporaryDirectory(prefix="peft-cpl-read-") as cache:
                dataset = datasets.load_dataset(str(path), cache_dir=cache, keep_in_memory=True)
    except Exception as error:
        how = "a dataset saved with save_to_disk" if saved else "a folder of data files"
        raise ValueError(f"{path}: cannot be read as {how} ({_reason(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise ValueError(f"{path} holds the splits {', '.join(dataset)}: give the folder of one split "
                             f"(e.g. {path / next(iter(dataset))}), or save one with dataset[split].save_to_disk")
        dataset = next(iter(dataset.values()))
    return dataset


def open_dataset(source) -> tuple[object, str, list[str] | None]:
    """(dataset, its name for messages, the places of its rows or None for 'row N').

    `source` is a path (file or folder) or a `datasets.Dataset`."""
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
            return source, "the dataset", None
        raise TypeError(f"expected a file path or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return _load_folder(path), str(path), None
    if not path.is_file():
        raise FileNotFoundError(f"no such question file: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix or '(none)'!r}; give a .jsonl, .json, .csv, .tsv or "
                         ".parquet file, or a folder saved with datasets' save_to_disk")
    dataset, text = _load_file(path, kind)
    places = None
    if path.suffix.lower() in (".jsonl", ".ndjson") and text is not None:
        lines = [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if len(lines) == len(dataset):
            places = [f"line {number}" for number in lines]
    return dataset, str(path), places


def map_columns(dataset, name: str, fields: dict[str, str | None]):
    """`dataset` with the user's columns renamed to the item keys (`fields`: item key -> column, None: as is)."""
    for key, column in fields.items():
        if column is None or column == key:
            continue
        if column not in dataset.column_names:
            flag = FIELD_FLAGS.get(key, key)
            raise ValueError(f"{name}: {flag} {column!r}: no such column; the columns are "
                             f"{', '.join(map(repr, dataset.column_names))}")
        if key in dataset.column_names:
            dataset = dataset.remove_columns(key)
        dataset = dataset.rename_column(column, key)
    return dataset


def read_records(source, fields: dict[str, str | None] | None = None) -> Iterator[tuple[str, int, dict]]:
    """(place, row number from 1, record) for every row of `source` (see open_dataset). Empty cells are left out of
    the record: a CSV has no other way to leave a value out."""
    dataset, name, places = open_dataset(source)
    dataset = map_columns(dataset, name, fields or {})
    for index, row in enumerate(dataset):
        place = places[index] if places else f"row {index + 1}"
        number = int(place.split()[1])
        yield f"{name}, {place}", number, {key: value for key, value in row.items() if value not in (None, "")}


def source_stem(source) -> str:
    """The default id prefix of a source's items: the file or folder name without its extension."""
    return Path(source).stem if isinstance(source, (str, os.PathLike)) else "item"
