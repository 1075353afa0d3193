"""The one reader of question files: jsonl (or a .json array), parquet, saved HF datasets.

``read_rows(path)`` returns the rows of one file as a sequence of dicts (``len``,
``rows[i]``, iteration in file order), whatever the format:

- ``jsonl``: read line by line with ``json.loads`` into a list (a ``.json`` file holding one
  JSON array is read whole); blank lines are skipped, a bad line is a ``ValueError`` naming
  ``file:line``;
- ``parquet`` and ``disk`` (a ``save_to_disk`` directory, its ``train`` split if it is a
  ``DatasetDict``): a memory-mapped ``datasets.Dataset``, so large training sets are not
  loaded into Python objects.

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


def _object(row: Any, where: str, what: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{what}: {where} must be a JSON object, got {type(row).__name__}")
    return row


def _read_jsonl(path: Path, max_rows: int, what: str) -> list[dict]:
    """Rows of a jsonl file, one ``json.loads`` per non-blank line (``.json``: one array)."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":  # a .json file holding one array of objects
            try:
                items = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({err.msg})") from None
            return [_object(item, f"{path} item {i}", what)
                    for i, item in enumerate(items[: max_rows or None])]
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{what}: {where} is not valid JSON ({err.msg})") from None
            rows.append(_object(row, where, what))
            if max_rows and len(rows) >= max_rows:
                break
    return rows


def _read_parquet(path: Path, max_rows: int, what: str) -> Any:
    import datasets

    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _read_disk(path: Path, max_rows: int, what: str) -> Any:
    import datasets

    table = datasets.load_from_disk(str(path))
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise ValueError(f"{what}: {str(path)!r} is a DatasetDict without a 'train' split "
                             f"(has {list(table)})")
        table = table["train"]
    return table


# format name -> reader(path, max_rows, what) -> rows (a list or a datasets.Dataset)
FORMATS: dict[str, Callable[[Path, int, str], Any]] = {
    "jsonl": _read_jsonl, "parquet": _read_parquet, "disk": _read_disk,
}


def read_rows(path: str | Path, fmt: str = "auto", max_rows: int = 0, *,
              what: str = "data.train_files") -> Sequence[dict]:
    """The rows of one file (or saved dataset directory), at most ``max_rows`` (0 = all).

    ``what`` names the setting the path came from in error messages. A missing path, an
    unreadable line and a file without rows are ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what}: {str(path)!r} does not exist")
    rows = FORMATS[detect_format(path, fmt)](path, max_rows, what)
    if max_rows and len(rows) > max_rows:
        rows = rows.select(range(max_rows))  # a datasets.Dataset (jsonl stops reading early)
    if len(rows) == 0:
        raise ValueError(f"{what}: {str(path)!r} holds no rows")
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
