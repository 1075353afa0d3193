"""Question data: one reader, one schema registry, prompt building, the training sampler.

- ``read.py``: ``read_rows`` reads jsonl / parquet / saved HF datasets (``FORMATS``).
- ``schemas.py``: ``SCHEMAS`` turns a row into a :class:`Question` (``flat``, ``verl``;
  ``auto`` picks one per file). Adding a schema is one function and one entry there.
- ``prompts.py``: instruction + system prompt + chat template, demonstration token ids.
- ``dataset.py``: ``load_prompt_dataset`` (training: tokenized, skip-counted) and
  ``read_questions`` (evaluation, the demo, benchmarks).
- ``sampler.py``: ``StatefulSampler``, seeded, resumable and rank-sharded.

    ds = load_prompt_dataset(cfg.data, tokenizer, need_demo=cfg.loss.algo != "rft")
    sampler = StatefulSampler(len(ds), seed=cfg.data.seed, rank=rank, world_size=world)
    questions = [ds[i] for i in sampler.next_batch(cfg.train.prompts_per_step)]  # this rank's
"""

from .dataset import SKIP_REASONS, PromptDataset, load_prompt_dataset, read_questions
from .prompts import demo_token_ids, prompt_messages, prompt_text, with_instruction
from .read import FORMATS, check_format, detect_format, iter_rows, read_rows
from .sampler import StatefulSampler
from .schemas import SCHEMAS, Question, RowFields, check_schema, detect_schema, parse_row

__all__ = [
    "FORMATS", "SCHEMAS", "SKIP_REASONS", "PromptDataset", "Question", "RowFields",
    "StatefulSampler", "check_data_options", "check_format", "check_schema", "demo_token_ids",
    "detect_format", "detect_schema", "iter_rows", "load_prompt_dataset", "parse_row",
    "prompt_messages", "prompt_text", "read_questions", "read_rows", "with_instruction",
]


def check_data_options(*, format: str = "auto", schema: str = "flat") -> None:
    """The reader's options: ``format`` (``auto`` or a ``FORMATS`` name) and ``schema``
    (``auto`` or a ``SCHEMAS`` name); ValueError naming the argument otherwise."""
    check_format(format, "format")
    check_schema(schema, "schema")
