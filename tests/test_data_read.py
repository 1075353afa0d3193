"""prefix_rft.data's one reader and its schema registry: every schema from jsonl and parquet,
schema detection, evaluation reading every training schema, reader errors."""

from __future__ import annotations

import json

import pytest

from prefix_rft.config import DataConfig
from prefix_rft.data import (
    SCHEMAS,
    Question,
    RowFields,
    check_schema,
    prompt_messages,
    read_questions,
    read_rows,
)

# The same two questions written in every registered schema (a new schema adds its rows).
QUESTIONS = [("What is 2+3?", "2+3=5. \\boxed{5}", "5"), ("Find y if 2y=8.", "y=4", "4")]
ROWS = {
    "flat": [{"problem": p, "solution": s, "answer": a} for p, s, a in QUESTIONS],
    "verl": [{"prompt": [{"role": "user", "content": p}],
              "target": [{"role": "assistant", "content": s}],
              "reward_model": {"style": "rule", "ground_truth": a}} for p, s, a in QUESTIONS],
}


def write(tmp_path, name: str, rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import datasets

        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_every_registered_schema_has_test_rows():
    assert set(ROWS) == set(SCHEMAS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
@pytest.mark.parametrize("given", [True, False], ids=["named", "auto"])
def test_each_schema_reads_from_each_format(tmp_path, schema, fmt, given):
    path = write(tmp_path, schema, ROWS[schema], fmt)
    cfg = DataConfig(schema=schema if given else "auto")
    questions = read_questions(path, cfg)
    assert [(q.problem, q.demo, q.answer) for q in questions] == QUESTIONS
    assert all(isinstance(q, Question) for q in questions)
    assert prompt_messages(questions[0].messages, "Be exact.", None) == [
        {"role": "user", "content": "What is 2+3? Be exact."}]


def test_evaluation_reads_every_training_schema_the_same(tmp_path):
    """Prompts built for evaluation do not depend on the file's schema or format."""
    seen = []
    for schema, rows in ROWS.items():
        for fmt in ("jsonl", "parquet"):
            questions = read_questions(write(tmp_path, f"{schema}_{fmt}", rows, fmt))
            seen.append([(prompt_messages(q.messages, "I.", None), q.answer) for q in questions])
    assert all(s == seen[0] for s in seen[1:])


def test_a_schema_is_one_registry_entry(tmp_path, monkeypatch):
    def qa_fields(row, cfg):
        return RowFields([{"role": "user", "content": row["q"]}], row.get("a"), None)

    monkeypatch.setitem(SCHEMAS, "qa", qa_fields)
    path = write(tmp_path, "qa", [{"q": "1+1?", "a": "2"}], "jsonl")
    assert check_schema("qa") == "qa"
    (question,) = read_questions(path, DataConfig(schema="qa"))
    assert (question.problem, question.answer, question.demo) == ("1+1?", "2", None)
    with pytest.raises(ValueError, match="data.schema must be one of auto|flat|verl|qa"):
        check_schema("nope")


def test_jsonl_reader_lines_arrays_limits_and_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n  \n{"x": 2}\n{"x": 3}\n', encoding="utf-8")
    assert read_rows(path) == [{"x": 1}, {"x": 2}, {"x": 3}]  # blank lines skipped
    assert read_rows(path, max_rows=2) == [{"x": 1}, {"x": 2}]
    array = tmp_path / "b.json"
    array.write_text(' \n[{"x": 1}, {"x": 2}]', encoding="utf-8")
    assert read_rows(array) == [{"x": 1}, {"x": 2}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{"x": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.train_files: .*bad.jsonl:2 is not valid JSON"):
        read_rows(bad)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"x": 1}\n[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"scalar.jsonl:2 must be a JSON object, got list"):
        read_rows(scalar)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="eval.files: .*empty.jsonl' holds no rows"):
        read_rows(empty, what="eval.files")
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="data.format must be one of"):
        read_rows(path, fmt="csv")


def test_parquet_max_rows_and_disk(tmp_path):
    import datasets

    rows = [{"problem": f"q{i}", "answer": str(i)} for i in range(5)]
    path = write(tmp_path, "p", rows, "parquet")
    assert list(read_rows(path, max_rows=3)) == rows[:3]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved"))
    assert [q.answer for q in read_questions(tmp_path / "saved")] == ["0", "1", "2", "3", "4"]


def test_eval_rows_without_question_or_answer_are_errors(tmp_path):
    path = write(tmp_path, "flat", [{"problem": "ok?", "answer": "1"}, {"problem": "no gold"}],
                 "jsonl")
    with pytest.raises(ValueError, match="row 1 of .* has no answer"):
        read_questions(path)
    other = write(tmp_path, "other", [{"question": "x", "gold": "1"}], "jsonl")
    with pytest.raises(ValueError, match="no schema"):
        read_questions(other)
