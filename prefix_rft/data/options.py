"""The ``data`` section of the config, owned by the package that reads it.

:class:`DataConfig` lives here (not in :mod:`prefix_rft.config`, which re-exports it) so that the
data package never imports the config: the config's checks import the data package's
registries, and an arrow back would close a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # local .jsonl/.parquet / saved dirs
    format: str = "auto"  # auto (by extension / directory) or a name in prefix_rft.data.FORMATS
    # flat: problem/solution/answer fields; verl: prompt/target/reward_model
    schema: str = "flat"  # row layout: a name in prefix_rft.data.SCHEMAS, or auto (per file)
    problem_key: str = "problem"  # flat: question text
    solution_key: str = "solution"  # flat: demonstration text (the expert's response)
    answer_key: str = "answer"  # flat: gold final answer
    prompt_key: str = "prompt"  # verl: list of chat messages; the last user message is the question
    target_key: str = "target"  # verl: list of demonstration messages (assistant content)
    ground_truth_key: str = "reward_model.ground_truth"  # verl: dotted path to the gold answer
    prompt_template: str = "verl"  # authors | luffy | verl | none | a custom "...{question}..."
    # string (prompts.py: each template's source); data.system_prompt overrides its system part
    system_prompt: str | None = None  # None = the dataset's own (verl) / none (flat); "" = none
    max_prompt_tokens: int = 1024  # templated prompt length limit, tokens
    overlong_prompts: Literal["skip", "error"] = "skip"  # skip (counted in the summary) | error
    max_rows: int = 0  # read at most this many rows per file; 0 = all
    shuffle: bool = True  # reshuffle the sampler every epoch
    seed: int | None = None  # sampler seed; None = train.seed
