"""Question files -> questions: the training dataset (tokenized, skip-counted) and eval lists.

    ds = load_prompt_dataset(cfg.data, tokenizer, need_demo=cfg.loss.algo != "rft")
    q = ds[i]          # Question: problem, answer, messages, demo, index, prompt_ids, demo_ids
    questions = read_questions("aime24.jsonl", DataConfig(schema="auto"), what="--data")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import DataConfig
from .prompts import demo_token_ids, prompt_messages, prompt_text
from .read import iter_rows, read_rows
from .schemas import Question, detect_schema, parse_row

__all__ = ["SKIP_REASONS", "PromptDataset", "load_prompt_dataset", "read_questions"]

logger = logging.getLogger(__name__)

SKIP_REASONS = ("no problem", "no answer", "no demonstration", "prompt too long")
_SHOW_ROWS = 5  # row indices listed per skip reason in the summary


class PromptDataset:
    """Usable rows of the training files, prompts tokenized, demonstrations cached lazily.

    ``ds[i]`` -> :class:`Question` with ``index = i``, ``prompt_ids`` and ``demo_ids`` (None
    unless ``need_demo``). ``skipped`` maps each reason to its count and ``skipped_rows`` to
    the first few global row indices (rows numbered across files).
    """

    def __init__(self, tables: Sequence[Sequence[dict]], tokenizer: Any, cfg: DataConfig, *,
                 need_demo: bool, sources: Sequence[str] | None = None,
                 batch_size: int = 1024, malformed: Sequence[str] = (),
                 demo_optional: bool = False):
        self.tokenizer, self.cfg, self.need_demo = tokenizer, cfg, need_demo
        self.demo_optional = demo_optional  # keep rows without a demonstration (demo_ids None)
        self.malformed = list(malformed)  # rows the reader skipped: "file:line: problem"
        self.tables = list(tables)
        self.sources = (list(sources) if sources is not None
                        else [f"table{i}" for i in range(len(tables))])
        self.schemas = [detect_schema(table, cfg, source)
                        for table, source in zip(self.tables, self.sources)]
        self.skipped = {reason: 0 for reason in SKIP_REASONS}
        self.skipped_rows: dict[str, list[int]] = {reason: [] for reason in SKIP_REASONS}
        self.num_rows = 0
        self._locations: list[tuple[int, int]] = []  # (table, row) of each usable item
        self._prompt_ids: list[list[int]] = []
        self._demo_cache: dict[int, list[int]] = {}
        for table_index in range(len(self.tables)):
            self._scan(table_index, batch_size)
        if not self._locations:
            raise ValueError(f"data.train_files: no usable rows in {self.sources} "
                             f"({self.summary()}); check data.schema ({cfg.schema}) and the "
                             f"*_key fields")
        logger.info(self.summary())

    def _skip(self, reason: str, global_row: int) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_rows[reason]) < _SHOW_ROWS:
            self.skipped_rows[reason].append(global_row)

    def _question(self, table_index: int, row_index: int) -> Question:
        question, _ = parse_row(self.tables[table_index][row_index], self.cfg,
                                self.schemas[table_index])
        return question

    def _scan(self, table_index: int, batch_size: int) -> None:
        table, schema = self.tables[table_index], self.schemas[table_index]
        pending: list[tuple[int, int, str]] = []  # (row, global row, prompt text)
        for row_index, row in enumerate(iter_rows(table, batch_size)):
            global_row = self.num_rows + row_index
            question, reason = parse_row(row, self.cfg, schema)
            if (question is not None and self.need_demo and not self.demo_optional
                    and question.demo is None):
                reason = "no demonstration"
            if reason is not None:
                self._skip(reason, global_row)
                continue
            messages = prompt_messages(question.messages, self.cfg.prompt_template,
                                       self.cfg.system_prompt)
            pending.append((row_index, global_row, prompt_text(self.tokenizer, messages)))
        limit = self.cfg.max_prompt_tokens
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            encoded = self.tokenizer([c[2] for c in chunk], add_special_tokens=False)["input_ids"]
            for (row_index, global_row, _), ids in zip(chunk, encoded):
                if len(ids) > limit:
                    if self.cfg.overlong_prompts == "error":
                        raise ValueError(
                            f"data.max_prompt_tokens: row {global_row} of "
                            f"{self.sources[table_index]} has a {len(ids)}-token prompt "
                            f"(limit {limit})")
                    self._skip("prompt too long", global_row)
                    continue
                self._locations.append((table_index, row_index))
                self._prompt_ids.append(list(ids))
        self.num_rows += len(table)

    def summary(self) -> str:
        """One line: rows read, usable, and each skip reason with its first row indices."""
        parts = [f"{reason} {count} (rows {', '.join(map(str, self.skipped_rows[reason]))}"
                 f"{', ...' if count > len(self.skipped_rows[reason]) else ''})"
                 for reason, count in self.skipped.items() if count]
        if self.malformed:
            shown = ", ".join(self.malformed[:_SHOW_ROWS])
            more = ", ..." if len(self.malformed) > _SHOW_ROWS else ""
            parts.append(f"malformed {len(self.malformed)} ({shown}{more})")
        skipped = "; skipped: " + "; ".join(parts) if parts else ""
        return (f"data: {self.num_rows} rows from {len(self.tables)} file(s), "
                f"{len(self._locations)} usable{skipped}")

    def __len__(self) -> int:
        return len(self._locations)

    def demo_ids(self, index: int) -> list[int] | None:
        """Demonstration response ids (ending with EOS), tokenized on first use and cached."""
        if not self.need_demo:
            return None
        cached = self._demo_cache.get(index)
        if cached is None:
            demo = self._question(*self._locations[index]).demo
            if demo is None:  # demo_optional: a row kept without one
                return None
            cached = self._demo_cache[index] = demo_token_ids(self.tokenizer, demo)
        return cached

    def __getitem__(self, index: int) -> Question:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        question = self._question(*self._locations[index])
        question.index = index
        question.prompt_ids = list(self._prompt_ids[index])
        question.demo_ids = self.demo_ids(index)
        return question


def load_prompt_dataset(cfg: DataConfig, tokenizer: Any, *, need_demo: bool,
                        demo_optional: bool = False) -> PromptDataset:
    """Read every file of ``cfg.train_files`` and build the ``PromptDataset``.

    ``need_demo``: rows without a demonstration are skipped (True for sft / prefix_rft),
    unless ``demo_optional`` (``prefix.source: self``): such rows are kept, demo_ids None.
    """
    if not cfg.train_files:
        raise ValueError("data.train_files must list at least one file, got []")
    bad: list[str] = []  # malformed rows, skipped: "file:line: problem"
    tables = [read_rows(path, cfg.format, cfg.max_rows, bad=bad) for path in cfg.train_files]
    return PromptDataset(tables, tokenizer, cfg, need_demo=need_demo, sources=cfg.train_files,
                         malformed=bad, demo_optional=demo_optional)


def read_questions(path: str | Path, cfg: DataConfig | None = None, *,
                   what: str = "eval.files") -> list[Question]:
    """Every row of one file as a :class:`Question` (for evaluation: nothing is tokenized).

    ``cfg`` gives the format, schema (default ``"auto"``), field names and ``max_rows``;
    ``what`` names the setting the path came from in errors. A row without a question or
    an answer is a ValueError naming it (an evaluation must not silently shrink).
    """
    cfg = cfg if cfg is not None else DataConfig(schema="auto")
    rows = read_rows(path, cfg.format, cfg.max_rows, what=what)
    schema = detect_schema(rows, cfg, str(path))
    questions = []
    for index, row in enumerate(iter_rows(rows)):
        question, reason = parse_row(row, cfg, schema)
        if question is None:
            raise ValueError(f"{what}: row {index} of {str(path)!r} has {reason} "
                             f"(schema {schema}; see the data *_key fields)")
        questions.append(question)
    return questions
