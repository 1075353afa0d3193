"""The one reader of question files: jsonl (or a .json array), parquet, saved HF datasets.

``read_rows(path)`` returns the rows of one file as a sequence of dicts (``len``,
``rows[i]``, iteration in file order), whatever the format:

- ``jsonl``: read line by line with ``json.loads`` into a list (a ``.json`` file holding one
  JSON array is read whole); blank lines are skipped; a malformed line (truncated, not
  UTF-8, not JSON, not an object) is a ``ValueError`` naming ``file:line``, or, when the
  caller passes a ``bad`` list (training data), skipped and recorded there;
- ``parquet`` and ``disk`` (a ``save_to_disk`` directory, its ``train`` split if it is a
  ``DatasetDict``): a memory-mapped ``datasets.Dataset``, so large training sets are not
  loaded into Python objects. A parquet file with unreadable row groups gives the
  readable ones (the others recorded by row group, as far as parquet allows).

The format comes from the name (``detect_format``) unless given. What a row *means* (which
field is the question, the answer, the demonstration) is the schema's business
(``schemas.py``), not the reader's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..checks import check_choice

__all__ = ["FORMATS", "check_format", "detect_format", "iter_rows", "read_rows"]

_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def check_format(fmt: str, key: str = "data.format") -> str:
    """``fmt`` if it is ``"auto"`` or a name in ``FORMATS``, else a ValueError naming ``key``."""
    check_choice(key, fmt, ("auto", *FORMATS))
    return fmt


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """``auto`` -> ``jsonl`` (.jsonl/.json), ``parquet`` (.parquet) or ``disk`` (a directory)."""
    if check_format(fmt) != "auto":
        return fmt
    path = Path(path)
    if path.is_dir():
        return "disk"
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"data.format: cannot tell the format of {str(path)!r} from its name; "
                         f"set data.format to {'|'.join(FORMATS)}")
    return kind


def _skip_or_raise(bad: list[str] | None, where: str, problem: str, what: str) -> None:
    """A malformed row: recorded in ``bad`` (``"file:line: problem"``) and skipped, or a
    ValueError when the caller reads strictly (``bad is None``)."""
    if bad is None:
        raise ValueError(f"{what}: {where} {problem}")
    bad.append(f"{where}: {problem}")


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    """One jsonl line -> (row, "") or (None, what is wrong with it)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"is not UTF-8 (byte {err.start})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err.msg})"
    if not isinstance(row, dict):
        return None, f"must be a JSON object, got {type(row).__name__}"
    return row, ""


def _read_json_array(path: Path, max_rows: int, what: str, bad: list[str] | None) -> list:
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON "
                         f"({getattr(err, 'msg', None) or err.reason})") from None
    rows = []
    for i, item in enumerate(items[: max_rows or None]):
        if isinstance(item, dict):
            rows.append(item)
        else:
            _skip_or_raise(bad, f"{path} item {i}",
                           f"must be a JSON object, got {type(item).__name__}", what)
    return rows


def _read_jsonl(path: Path, max_rows: int, what: str, bad: list[str] | None = None
                ) -> list[dict]:
    """Rows of a jsonl file, one ``json.loads`` per non-blank line (``.json``: one array).
    A truncated, non-UTF-8, non-JSON or non-object line is skipped into ``bad`` (or raises
    when ``bad`` is None)."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):  # a .json file holding one array of objects
        return _read_json_array(path, max_rows, what, bad)
    rows: list[dict] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            row, problem = _parse_line(raw)
            if row is None:
                _skip_or_raise(bad, f"{path}:{line_number}", problem, what)
                continue
            rows.append(row)
            if max_rows and len(rows) >= max_rows:
                break
    return rows


def _read_parquet(path: Path, max_rows: int, what: str, bad: list[str] | None = None) -> Any:
    """A memory-mapped ``datasets.Dataset``; when the file has unreadable row groups, the
    readable ones (read with pyarrow), the others skipped into ``bad`` by row group."""
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 -- retried row group by row group below
        first_error = err
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
    except Exception as err:  # noqa: BLE001 -- a broken footer: nothing can be read
        raise ValueError(f"{what}: {str(path)!r} is not a readable parquet file "
                         f"({' '.join(str(err).split())})") from None
    tables, first_row = [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        try:
            tables.append(parquet.read_row_group(group))
        except Exception as err:  # noqa: BLE001 -- this row group is skipped
            reason = " ".join(str(err).split())
            _skip_or_raise(bad, f"{path} row group {group} (rows {first_row}-"
                           f"{first_row + size - 1})", f"cannot be read ({reason})", what)
        first_row += size
    if not tables:
        raise ValueError(f"{what}: {str(path)!r} has no readable row group "
                         f"({' '.join(str(first_error).split())[:200]})")
    return datasets.Dataset(pa.concat_tables(tables))


def _read_disk(path: Path, max_rows: int, what: str, bad: list[str] | None = None) -> Any:
    import datasets

    table = datasets.load_from_disk(str(path))
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise ValueError(f"{what}: {str(path)!r} is a DatasetDict without a 'train' split "
                             f"(has {list(table)})")
        table = table["train"]
    return table


# format name -> reader(path, max_rows, what, bad) -> rows (a list or a datasets.Dataset)
FORMATS: dict[str, Callable[[Path, int, str, list[str] | None], Any]] = {
    "jsonl": _read_jsonl, "parquet": _read_parquet, "disk": _read_disk,
}


def read_rows(path: str | Path, fmt: str = "auto", max_rows: int = 0, *,
              what: str = "data.train_files", bad: list[str] | None = None) -> Sequence[dict]:
    """The rows of one file (or saved dataset directory), at most ``max_rows`` (0 = all).

    ``what`` names the setting the path came from in error messages. A missing path, an
    empty file and a file without rows are ``ValueError``. A malformed row (a jsonl line
    that is truncated, not UTF-8, not JSON or not an object; an unreadable parquet row
    group) is a ``ValueError`` too, unless ``bad`` is a list: then it is skipped and
    ``"file:line: problem"`` appended to ``bad``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what}: {str(path)!r} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{what}: {str(path)!r} is empty: give a file with rows")
    skipped: list[str] = []
    rows = FORMATS[detect_format(path, fmt)](path, max_rows, what,
                                             skipped if bad is not None else None)
    if bad is not None:
        bad.extend(skipped)
    if max_rows and len(rows) > max_rows:
        rows = rows.select(range(max_rows))  # a datasets.Dataset (jsonl stops reading early)
    if len(rows) == 0:
        detail = (f" ({len(skipped)} malformed, first {skipped[0]})" if skipped else "")
        raise ValueError(f"{what}: {str(path)!r} holds no rows{detail}")
    return rows


def iter_rows(rows: Sequence[dict], batch_size: int = 1024) -> Iterator[dict]:
    """Rows as dicts in order; a ``datasets.Dataset`` is read a slice at a time (much
    faster than ``rows[i]`` per row)."""
    if isinstance(rows, list):
        yield from rows
        return
    for start in range(0, len(rows), batch_size):
        columns = rows[start:start + batch_size]
        names = list(columns)
        for j in range(len(columns[names[0]]) if names else 0):
            yield {name: columns[name][j] for name in names}
