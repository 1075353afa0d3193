"""A small byte-level BPE tokenizer for the demo task, saved as a HF tokenizer directory.

Trained locally with ``tokenizers`` on the task's own text (problems, demonstrations,
the instruction). Like Qwen2's tokenizer it is byte-level (any string round-trips
exactly, including ``\\boxed{...}`` and text the task never produced) and every digit
is its own token (why: the model then sees numbers digit by digit, which makes the
arithmetic learnable). Special tokens follow Qwen2.5-Instruct:

- ``<|endoftext|>``: pad token (and the BOS-less document end)
- ``<|im_start|>`` / ``<|im_end|>``: chat turns; ``<|im_end|>`` is the EOS token, since
  generation must stop at the end of the assistant turn.

The chat template is Qwen-style ChatML without a default system message::

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# 256 byte tokens + 3 specials + learned merges; small so the embedding stays tiny.
DEFAULT_VOCAB_SIZE = 384


def _build_untrained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train the byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 256 byte tokens and the 3 special tokens, so it must be
    at least 259 (more adds merges of frequent words such as "answer").
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = _build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="left",  # why: generation batches are left-padded
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def task_corpus(rows: Iterable[dict], instruction: str) -> list[str]:
    """Texts the tokenizer is trained on: each problem, its demonstration, and the prompt
    scaffolding (instruction, role names) repeated about as often as a problem appears,
    so its frequent words get merged tokens too."""
    texts = []
    for row in rows:
        texts.append(row["problem"])
        texts.append(row["solution"])
    scaffolding = [instruction, "system\n", "user\n", "assistant\n"]
    return texts + scaffolding * max(1, len(texts) // 20)


def build_tokenizer(rows: Iterable[dict], out_dir: str, instruction: str,
                    vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train on the task rows and ``save_pretrained`` to ``out_dir``; returns the tokenizer."""
    tok = train_tokenizer(task_corpus(rows, instruction), vocab_size=vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(tokenizer_dir: str):
    """Load a saved demo tokenizer (``AutoTokenizer.from_pretrained`` on a local dir)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer_dir: expected an existing directory, got {tokenizer_dir!r}")
    return AutoTokenizer.from_pretrained(tokenizer_dir)
