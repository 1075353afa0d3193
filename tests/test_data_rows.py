"""Row-level data errors: malformed jsonl lines (truncated, not UTF-8, garbage, not an object)
and unreadable parquet row groups are skipped with file:line / row group in the report while
the valid rows are kept; an empty file or a file of only bad rows is a clear error."""

from __future__ import annotations

import json

import pytest
from test_data import make_tokenizer

from prefix_rft.config import DataConfig
from prefix_rft.data import load_prompt_dataset, read_rows

GOOD = {"problem": "What is 2+3?", "solution": "2+3=5. \\boxed{5}", "answer": "5"}


def _messy_jsonl(path):
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good                                   # line 1
                     + b'{"problem": "\xff\xfe broken"}\n'  # line 2: not UTF-8
                     + b"\n"                                # line 3: blank (ignored)
                     + b"garbage <html>\n"                  # line 4: not JSON
                     + b"[1, 2, 3]\n"                       # line 5: not an object
                     + good                                 # line 6
                     + b'{"problem": "What is 1+1?", "sol')  # line 7: truncated by a kill
    return path


def test_malformed_jsonl_lines_are_skipped_and_reported(tmp_path):
    path = _messy_jsonl(tmp_path / "messy.jsonl")
    bad: list[str] = []
    rows = read_rows(path, bad=bad)
    assert rows == [GOOD, GOOD]
    assert bad == [f"{path}:2: is not UTF-8 (byte 13)",
                   f"{path}:4: is not valid JSON (Expecting value)",
                   f"{path}:5: must be a JSON object, got list",
                   f"{path}:7: is not valid JSON (Unterminated string starting at)"]
    with pytest.raises(ValueError, match=rf"^data.train_files: {path}:2 is not UTF-8"):
        read_rows(path)  # strict (evaluation files): the first bad line is the error


def test_training_data_keeps_valid_rows_and_reports_the_rest(tmp_path):
    path = _messy_jsonl(tmp_path / "messy.jsonl")
    ds = load_prompt_dataset(DataConfig(train_files=[str(path)]), make_tokenizer(),
                             need_demo=True)
    assert len(ds) == 2 and len(ds.malformed) == 4
    summary = ds.summary()
    assert "\n" not in summary and f"malformed 4 ({path}:2: is not UTF-8" in summary
    assert f"{path}:7: is not valid JSON" in summary


def test_empty_and_all_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"'.*empty.jsonl' is empty"):
        load_prompt_dataset(DataConfig(train_files=[str(tmp_path / "empty.jsonl")]),
                            make_tokenizer(), need_demo=True)
    (tmp_path / "bad.jsonl").write_text("nope\n[1]\n")
    with pytest.raises(ValueError, match=r"holds no rows \(2 malformed, first .*bad.jsonl:1: "
                                         r"is not valid JSON"):
        load_prompt_dataset(DataConfig(train_files=[str(tmp_path / "bad.jsonl")]),
                            make_tokenizer(), need_demo=True)


def _parquet(path, groups: int = 3, per_group: int = 3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"What is {i}+{i}? " * 4, "solution": f"{2 * i} \\boxed{{{2 * i}}}",
             "answer": str(2 * i)} for i in range(groups * per_group)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=per_group,
                   compression="snappy")
    return rows


def test_unreadable_parquet_row_group_is_skipped(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    rows = _parquet(path)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 8:start + column.total_compressed_size - 2] = \
        b"\xab" * (column.total_compressed_size - 10)  # row group 1's first column: garbage
    path.write_bytes(bytes(data))
    bad: list[str] = []
    kept = read_rows(path, bad=bad)
    assert [r["answer"] for r in kept] == [r["answer"] for r in rows[:3] + rows[6:]]
    assert len(bad) == 1 and bad[0].startswith(f"{path} row group 1 (rows 3-5): cannot be read")


def test_broken_parquet_footer_is_a_clear_error(tmp_path):
    path = tmp_path / "rows.parquet"
    _parquet(path)
    path.write_bytes(path.read_bytes()[:-12])  # cut off the footer
    with pytest.raises(ValueError, match=r"'.*rows.parquet' is not a readable parquet file"):
        read_rows(path, bad=[])
