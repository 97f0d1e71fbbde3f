"""Reading users' local dataset files row by row, each row tagged with where it came from.

Supported formats, chosen by file extension (anything else is rejected, never guessed):

* ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are skipped. Rows are "line N" (1-based).
* ``.json``: a JSON array of objects ("item N", 0-based), or, when the file does not start with ``[``,
  JSON lines as above (several hubs export JSON lines under ``.json``).
* ``.parquet``: any schema pyarrow reads; nested list/struct columns become lists/dicts ("row N", 0-based).

Every problem with a file raises ``ValueError`` naming the file and, when it concerns one row, the row.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

JSON_LINES_EXTENSIONS = (".jsonl", ".ndjson")
JSON_EXTENSIONS = (".json",)
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = JSON_LINES_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS

# Rows are read from parquet in batches: whole-table reads would hold a large file (DAPO-Math-17k's
# ~1.8M rows) in memory twice, as Arrow and as Python objects.
_PARQUET_BATCH_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class Record:
    """One row of a source file: its fields and its place, for ids and error messages."""

    path: str
    index: int  # 0-based position among the file's rows
    where: str  # "line 12" / "row 11" / "item 11": what a user finds in the file
    data: Mapping[str, Any]

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self.path}, {self.where}, field {field!r}: {message}")


def _file_error(path: str, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def read_records(path: str) -> Iterator[Record]:
    """The rows of one file, in file order."""
    ext = _extension(path)
    if ext in JSON_LINES_EXTENSIONS:
        yield from _read_json_lines(path)
    elif ext in JSON_EXTENSIONS:
        yield from (_read_json_array(path) if _starts_with_bracket(path) else _read_json_lines(path))
    elif ext in PARQUET_EXTENSIONS:
        yield from _read_parquet(path)
    else:
        raise _file_error(path, f"unsupported file format {ext or '(no extension)'!r}; "
                                f"expected one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 BOM or whitespace may come first
    return head.startswith(b"[")


def _read_json_lines(path: str) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _file_error(path, f"{where}: not UTF-8 ({e})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _file_error(path, f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _file_error(path, f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield Record(path, index, where, obj)
            index += 1


def _read_json_array(path: str) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
    except UnicodeDecodeError as e:
        raise _file_error(path, f"not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise _file_error(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(items, list):
        raise _file_error(path, f"expected a JSON array of objects, got {type(items).__name__}")
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise _file_error(path, f"item {i}: expected a JSON object, got {type(obj).__name__}")
        yield Record(path, i, f"item {i}", obj)


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # pyarrow's own messages ("Parquet magic bytes not found", thrift errors) say what is wrong but not
    # which file; a truncated or non-parquet file fails here or while reading batches.
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _file_error(path, f"not a readable parquet file ({e})") from None
    index = 0
    try:
        for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield Record(path, index, f"row {index}", row)
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise _file_error(path, f"row {index}: unreadable parquet data ({e})") from None


def resolve_splits(manual_dir: str, splits: Mapping[str, Sequence[str]] | None,
                   default_splits: Sequence[str]) -> dict[str, list[str]]:
    """{split: files} from the user's patterns (paths or globs relative to ``manual_dir``), or, with no
    patterns, every file in ``manual_dir`` whose name starts with a default split's name ("train*",
    "test*"). Each split's files are sorted so a build never depends on directory listing order."""
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual directory {manual_dir} does not exist")
    out: dict[str, list[str]] = {}
    if splits is None:
        names = sorted(os.listdir(manual_dir))
        for split in default_splits:
            found = [os.path.join(manual_dir, n) for n in names
                     if n.startswith(split) and os.path.isfile(os.path.join(manual_dir, n))]
            if found:
                out[split] = found
        if not out:
            raise FileNotFoundError(f"no files named {' or '.join(s + '*' for s in default_splits)} in "
                                    f"{manual_dir}; name the files of each split in the builder config")
        return out
    if not splits:
        raise ValueError("the builder config names no splits")
    for split, patterns in splits.items():
        if isinstance(patterns, str):  # a lone pattern instead of a list of them
            patterns = [patterns]
        found: list[str] = []
        for pattern in patterns:
            matches = sorted(p for p in glob.glob(os.path.join(manual_dir, pattern)) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"split {split!r}: no file matches {pattern!r} in {manual_dir}")
            found += [m for m in matches if m not in found]
        out[split] = found
    return out


def fingerprint(files: Mapping[str, Sequence[str]], manual_dir: str) -> dict[str, list[dict[str, Any]]]:
    """{split: [{file, bytes, sha256}]}: recorded with a built dataset so that a later build of the same
    name notices changed inputs instead of silently reusing stale data."""
    out: dict[str, list[dict[str, Any]]] = {}
    for split, paths in files.items():
        entries = []
        for p in paths:
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            entries.append({"file": os.path.relpath(p, manual_dir), "bytes": os.path.getsize(p),
                            "sha256": digest.hexdigest()})
        out[split] = entries
    return out
