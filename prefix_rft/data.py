"""Training data: local jsonl / parquet / saved HF datasets -> tokenized prompts + demonstrations.

Two row schemas (field names configurable in ``DataConfig``):

- ``flat``: ``{"problem": str, "solution": str, "answer": str}``; the solution is the
  demonstration (the expert's full response).
- ``verl`` (LUFFY's / Prefix-RFT's OpenR1-Math-46k-8192): ``{"prompt": [{"role": "system",
  ...}, {"role": "user", "content": question}], "target": [{"role": "assistant", "content":
  demonstration}], "reward_model": {"ground_truth": answer}, ...}``.

The prompt goes through the tokenizer's chat template (``add_generation_prompt=True``), or a
plain ``system\\n\\nquestion\\n`` text when the tokenizer has none, with ``data.instruction``
appended to the question. The demonstration token ids are the assistant response that
follows that prompt: ``encode(demo) + [eos]``, tokenized once per row and cached.

    ds = load_prompt_dataset(cfg.data, tokenizer, need_demo=cfg.loss.algo != "rft")
    sampler = StatefulSampler(len(ds), seed=cfg.data.seed, rank=rank, world_size=world)
    items = [ds[i] for i in sampler.next_batch(cfg.train.prompts_per_step)]   # this rank's
    # item: {"index", "prompt_ids": list[int], "demo_ids": list[int] | None, "answer", "problem"}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig

logger = logging.getLogger(__name__)

SKIP_REASONS = ("no problem", "no answer", "no demonstration", "prompt too long")
_SHOW_ROWS = 5  # row indices listed per skip reason in the summary


# ---------------------------------------------------------------- reading files
def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """``auto`` -> ``jsonl`` (.jsonl/.json), ``parquet`` (.parquet) or ``disk`` (a directory)."""
    if fmt != "auto":
        if fmt not in ("jsonl", "parquet", "disk"):
            raise ValueError(f"data.format must be one of auto|jsonl|parquet|disk, got {fmt!r}")
        return fmt
    path = Path(path)
    if path.is_dir():
        return "disk"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"data.format: cannot tell the format of {str(path)!r} from its name; "
                     f"set data.format to jsonl|parquet|disk")


def read_rows(path: str | Path, fmt: str = "auto", max_rows: int = 0):
    """One file (or saved dataset directory) as a ``datasets.Dataset`` (memory-mapped)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ValueError(f"data.train_files: {str(path)!r} does not exist")
    kind = detect_format(path, fmt)
    if kind == "disk":
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise ValueError(f"data.train_files: {str(path)!r} is a DatasetDict without a "
                                 f"'train' split (has {list(table)})")
            table = table["train"]
    else:
        builder = "json" if kind == "jsonl" else "parquet"
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    if max_rows and len(table) > max_rows:
        table = table.select(range(max_rows))
    return table


# ---------------------------------------------------------------- one row -> texts
def _lookup(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _text(value: Any) -> str | None:
    """A non-empty string (numbers become strings), else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, str):
        return value if value.strip() else None
    return None


def _messages(value: Any) -> list[dict] | None:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    return [dict(m) for m in value if isinstance(m, dict) and "content" in m]


def with_instruction(question: str, instruction: str) -> str:
    """The question with the instruction appended after a space (unless empty or already there)."""
    if not instruction or question.rstrip().endswith(instruction):
        return question
    return f"{question.rstrip()} {instruction}"


def row_fields(row: dict, cfg: DataConfig) -> dict[str, Any]:
    """Extract ``{"problem", "messages", "answer", "demo"}`` from a row (None when missing).

    ``messages`` are the chat messages of the prompt: the instruction is appended to the
    last user message; the system message follows ``cfg.system_prompt`` (None keeps the
    dataset's, "" removes it, other text replaces it).
    """
    if cfg.schema == "flat":
        problem = _text(row.get(cfg.problem_key))
        messages = [{"role": "user", "content": problem}] if problem else None
        answer = _text(_lookup(row, cfg.answer_key))
        demo = _text(row.get(cfg.solution_key))
    else:
        messages = _messages(row.get(cfg.prompt_key))
        if messages is None and _text(row.get(cfg.prompt_key)):  # a plain-string prompt
            messages = [{"role": "user", "content": row[cfg.prompt_key]}]
        users = [m for m in messages or [] if m.get("role") == "user"]
        problem = _text(users[-1]["content"]) if users else None
        answer = _text(_lookup(row, cfg.ground_truth_key))
        target = row.get(cfg.target_key)
        target_messages = _messages(target)
        if target_messages is not None:
            replies = [m["content"] for m in target_messages if m.get("role", "assistant") == "assistant"]
            demo = _text(replies[0]) if replies else None
        else:
            demo = _text(target)
    if problem is None:
        return {"problem": None, "messages": None, "answer": answer, "demo": demo}
    messages = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last_user]["content"] = with_instruction(messages[last_user]["content"], cfg.instruction)
    if cfg.system_prompt is not None:
        messages = [m for m in messages if m.get("role") != "system"]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return {"problem": problem, "messages": messages, "answer": answer, "demo": demo}


def prompt_text(tokenizer: Any, messages: list[dict]) -> str:
    """The templated prompt ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No chat template (e.g. a base model's tokenizer): system text, blank line, question.
    parts = [m["content"] for m in messages if m.get("role") in ("system", "user")]
    return "\n\n".join(parts) + "\n"


def demo_token_ids(tokenizer: Any, demo: str) -> list[int]:
    """Assistant response ids for a demonstration: ``encode(demo) + [eos_token_id]``."""
    ids = list(tokenizer.encode(demo, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer must define eos_token_id (demonstrations end with EOS)")
    return ids + [int(eos)]


def _iter_rows(table: Any, batch_size: int):
    """Rows as dicts, read a slice at a time (much faster than ``table[i]`` per row)."""
    for start in range(0, len(table), batch_size):
        columns = table[start:start + batch_size]
        names = list(columns)
        for j in range(len(columns[names[0]]) if names else 0):
            yield {name: columns[name][j] for name in names}


# ---------------------------------------------------------------- the dataset
class PromptDataset:
    """Usable rows of the training files, prompts tokenized, demonstrations cached lazily.

    ``ds[i]`` -> ``{"index": i, "prompt_ids": list[int], "demo_ids": list[int] | None,
    "answer": str, "problem": str}``. ``skipped`` maps each reason to its count and
    ``skipped_rows`` to the first few global row indices (rows numbered across files).
    """

    def __init__(self, tables: Sequence[Any], tokenizer: Any, cfg: DataConfig, *,
                 need_demo: bool, sources: Sequence[str] | None = None,
                 batch_size: int = 1024):
        self.tokenizer, self.cfg, self.need_demo = tokenizer, cfg, need_demo
        self.tables = list(tables)
        self.sources = list(sources) if sources is not None else [f"table{i}" for i in range(len(tables))]
        self.skipped = {reason: 0 for reason in SKIP_REASONS}
        self.skipped_rows: dict[str, list[int]] = {reason: [] for reason in SKIP_REASONS}
        self.num_rows = 0
        self._locations: list[tuple[int, int]] = []  # (table, row) of each usable item
        self._prompt_ids: list[list[int]] = []
        self._answers: list[str] = []
        self._problems: list[str] = []
        self._demo_cache: dict[int, list[int]] = {}
        for table_index, table in enumerate(self.tables):
            self._scan(table_index, table, batch_size)
        if not self._locations:
            raise ValueError(f"data.train_files: no usable rows in {self.sources} ({self.summary()}); "
                             f"check data.schema ({cfg.schema}) and the *_key fields")
        logger.info(self.summary())

    def _skip(self, reason: str, global_row: int) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_rows[reason]) < _SHOW_ROWS:
            self.skipped_rows[reason].append(global_row)

    def _scan(self, table_index: int, table: Any, batch_size: int) -> None:
        pending: list[tuple[int, int, str, str, str]] = []  # (row, global row, text, answer, problem)
        for row_index, row in enumerate(_iter_rows(table, batch_size)):
            global_row = self.num_rows + row_index
            fields = row_fields(row, self.cfg)
            if fields["problem"] is None:
                self._skip("no problem", global_row)
            elif fields["answer"] is None:
                self._skip("no answer", global_row)
            elif self.need_demo and fields["demo"] is None:
                self._skip("no demonstration", global_row)
            else:
                text = prompt_text(self.tokenizer, fields["messages"])
                pending.append((row_index, global_row, text, fields["answer"], fields["problem"]))
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            encoded = self.tokenizer([c[2] for c in chunk], add_special_tokens=False)["input_ids"]
            for (row_index, global_row, _, answer, problem), ids in zip(chunk, encoded):
                if len(ids) > self.cfg.max_prompt_tokens:
                    if self.cfg.overlong_prompts == "error":
                        raise ValueError(
                            f"data.max_prompt_tokens: row {global_row} of {self.sources[table_index]} "
                            f"has a {len(ids)}-token prompt (limit {self.cfg.max_prompt_tokens})")
                    self._skip("prompt too long", global_row)
                    continue
                self._locations.append((table_index, row_index))
                self._prompt_ids.append(list(ids))
                self._answers.append(answer)
                self._problems.append(problem)
        self.num_rows += len(table)

    def summary(self) -> str:
        """One line: rows read, usable, and each skip reason with its first row indices."""
        parts = [f"{reason} {count} (rows {', '.join(map(str, self.skipped_rows[reason]))}"
                 f"{', ...' if count > len(self.skipped_rows[reason]) else ''})"
                 for reason, count in self.skipped.items() if count]
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
            table_index, row_index = self._locations[index]
            demo = row_fields(self.tables[table_index][row_index], self.cfg)["demo"]
            cached = self._demo_cache[index] = demo_token_ids(self.tokenizer, demo)
        return cached

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return {"index": index, "prompt_ids": list(self._prompt_ids[index]),
                "demo_ids": self.demo_ids(index), "answer": self._answers[index],
                "problem": self._problems[index]}


def load_prompt_dataset(cfg: DataConfig, tokenizer: Any, *, need_demo: bool) -> PromptDataset:
    """Read every file of ``cfg.train_files`` and build the ``PromptDataset``.

    ``need_demo``: rows without a demonstration are skipped (True for sft / prefix_rft).
    """
    if not cfg.train_files:
        raise ValueError("data.train_files must list at least one file, got []")
    tables = [read_rows(path, cfg.format, cfg.max_rows) for path in cfg.train_files]
    return PromptDataset(tables, tokenizer, cfg, need_demo=need_demo, sources=cfg.train_files)


# ---------------------------------------------------------------- sampling
class StatefulSampler:
    """Seeded, resumable, rank-sharded sampling of dataset indices.

    All ranks walk the same global order: a permutation per epoch seeded by
    ``(seed, epoch)`` (identity when ``shuffle`` is False). ``next_batch(n)`` takes the next
    ``n`` global indices (crossing into the next epoch when needed) and returns this rank's
    contiguous share (``distributed.shard_range``), so the ranks together cover the global
    batch exactly once. ``state_dict()`` is ``{"epoch", "position", ...}`` (JSON-able).
    """

    def __init__(self, num_items: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_items)
            else:
                self._order = np.arange(self.num_items)
        return self._order

    def next_global_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices of the global order (same on every rank)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            order = self._epoch_order()
            take = min(batch_size - len(out), self.num_items - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def next_batch(self, batch_size: int) -> list[int]:
        """This rank's share of the next global batch of ``batch_size`` indices."""
        from .distributed import shard_range

        batch = self.next_global_batch(batch_size)
        share = shard_range(len(batch), self.rank, self.world_size)
        return batch[share.start:share.stop]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_items", self.num_items) != self.num_items:
            raise ValueError(f"sampler state is for {state['num_items']} items, the dataset has "
                             f"{self.num_items} (did data.train_files change?)")
        if not 0 <= state["position"] < self.num_items:
            raise ValueError(f"sampler position must be in [0, {self.num_items}), got {state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None
