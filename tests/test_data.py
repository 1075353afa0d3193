"""prefix_rft.data: reading jsonl / parquet / saved datasets in both schemas, prompt and
demonstration tokenization, skip accounting, the resumable rank-sharded sampler."""

from __future__ import annotations

import json
import logging

import pytest

from prefix_rft.config import DEFAULT_INSTRUCTION, DataConfig
from prefix_rft.data import PromptDataset, StatefulSampler, load_prompt_dataset, read_rows

CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def make_tokenizer(chat_template: bool = True):
    """Byte-level tokenizer without merges: every byte is a token, specials on top."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tok.chat_template = CHATML
    return tok


FLAT_ROWS = [
    {"problem": "What is 2+3?", "solution": "2+3=5. \\boxed{5}", "answer": "5"},
    {"problem": "", "solution": "x", "answer": "1"},                   # no problem
    {"problem": "What is 7*6?", "solution": "42 \\boxed{42}", "answer": 42},  # int answer
    {"problem": "Compute 1+1.", "solution": None, "answer": "2"},      # no demonstration
    {"problem": "Compute 9-4.", "solution": "5 \\boxed{5}"},           # no answer
]

VERL_ROWS = [
    {"data_source": "openr1", "prompt": [{"role": "system", "content": "Think hard."},
                                         {"role": "user", "content": "Find x if x+1=3."}],
     "target": [{"role": "assistant", "content": "<think>\nx=2</think>\n\\boxed{2}"}],
     "reward_model": {"style": "rule", "ground_truth": "2"}},
    {"data_source": "openr1", "prompt": [{"role": "user", "content": "Find y if 2y=8."}],
     "target": [{"role": "assistant", "content": "y=4 \\boxed{4}"}],
     "reward_model": {"style": "rule", "ground_truth": "4"}},
    {"data_source": "openr1", "prompt": [{"role": "user", "content": "No gold answer."}],
     "target": [{"role": "assistant", "content": "?"}],
     "reward_model": {"style": "rule", "ground_truth": ""}},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_flat_jsonl_prompts_demos_and_skips(tmp_path, caplog):
    tok = make_tokenizer()
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "a.jsonl", FLAT_ROWS)])
    with caplog.at_level(logging.INFO, logger="prefix_rft.data"):
        ds = load_prompt_dataset(cfg, tok, need_demo=True)
    assert len(ds) == 2
    assert ds.skipped == {"no problem": 1, "no answer": 1, "no demonstration": 1,
                          "prompt too long": 0}
    assert ds.skipped_rows["no problem"] == [1] and ds.skipped_rows["no demonstration"] == [3]
    assert "5 rows" in ds.summary() and "2 usable" in ds.summary() and "rows 4" in ds.summary()
    assert ds.summary() in caplog.text

    item = ds[0]
    expected_prompt = (f"<|im_start|>user\nWhat is 2+3? {DEFAULT_INSTRUCTION}<|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert item.prompt_ids == encode(tok, expected_prompt)
    assert item.demo_ids == encode(tok, "2+3=5. \\boxed{5}") + [tok.eos_token_id]
    assert item.answer == "5" and item.problem == "What is 2+3?" and item.index == 0
    # the demonstration is exactly what follows the prompt in the templated conversation
    full = tok.apply_chat_template(
        [{"role": "user", "content": f"What is 2+3? {DEFAULT_INSTRUCTION}"},
         {"role": "assistant", "content": "2+3=5. \\boxed{5}"}], tokenize=False)
    assert encode(tok, full)[:len(item.prompt_ids) + len(item.demo_ids)] == \
        item.prompt_ids + item.demo_ids
    assert ds[1].answer == "42"
    assert ds.demo_ids(0) is ds.demo_ids(0)  # cached, not re-tokenized


def test_rft_keeps_rows_without_demonstration(tmp_path):
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "a.jsonl", FLAT_ROWS)])
    ds = load_prompt_dataset(cfg, make_tokenizer(), need_demo=False)
    assert len(ds) == 3 and ds[2].demo_ids is None and ds.skipped["no demonstration"] == 0


def test_verl_parquet_schema_and_system_prompt(tmp_path):
    import datasets

    path = tmp_path / "openr1.parquet"
    datasets.Dataset.from_list(VERL_ROWS).to_parquet(str(path))
    tok = make_tokenizer()
    cfg = DataConfig(train_files=[str(path)], schema="verl")
    ds = load_prompt_dataset(cfg, tok, need_demo=True)
    assert len(ds) == 2 and ds.skipped["no answer"] == 1
    first = ds[0]
    assert first.problem == "Find x if x+1=3." and first.answer == "2"
    assert first.prompt_ids == encode(tok, (
        "<|im_start|>system\nThink hard.<|im_end|>\n"
        "<|im_start|>user\nFind x if x+1=3. "
        f"{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"))
    assert first.demo_ids == encode(tok, "<think>\nx=2</think>\n\\boxed{2}") + [tok.eos_token_id]
    # system_prompt "" drops the dataset's system message; other text replaces it
    dropped = load_prompt_dataset(DataConfig(train_files=[str(path)], schema="verl",
                                             system_prompt="", instruction=""), tok, need_demo=True)
    assert dropped[0].prompt_ids == encode(
        tok, "<|im_start|>user\nFind x if x+1=3.<|im_end|>\n<|im_start|>assistant\n")
    replaced = load_prompt_dataset(DataConfig(train_files=[str(path)], schema="verl",
                                              system_prompt="Be brief."), tok, need_demo=True)
    assert replaced[1].prompt_ids[:len(encode(tok, "<|im_start|>system\nBe brief."))] == \
        encode(tok, "<|im_start|>system\nBe brief.")


def test_saved_to_disk_and_plain_template(tmp_path):
    import datasets

    datasets.Dataset.from_list(FLAT_ROWS[:1]).save_to_disk(str(tmp_path / "saved"))
    tok = make_tokenizer(chat_template=False)
    cfg = DataConfig(train_files=[str(tmp_path / "saved")], system_prompt="You are careful.")
    ds = load_prompt_dataset(cfg, tok, need_demo=True)
    assert ds[0].prompt_ids == encode(
        tok, f"You are careful.\n\nWhat is 2+3? {DEFAULT_INSTRUCTION}\n")


def test_custom_keys_and_overlong_prompts(tmp_path):
    rows = [{"q": "short?", "sol": "a", "gold": {"value": "1"}},
            {"q": "long " * 50, "sol": "b", "gold": {"value": "2"}}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(train_files=[path], problem_key="q", solution_key="sol",
                     answer_key="gold.value", instruction="", max_prompt_tokens=100)
    ds = load_prompt_dataset(cfg, make_tokenizer(), need_demo=True)
    assert len(ds) == 1 and ds.skipped["prompt too long"] == 1 and ds[0].answer == "1"
    cfg.overlong_prompts = "error"
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        load_prompt_dataset(cfg, make_tokenizer(), need_demo=True)


def test_bad_inputs(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="train_files"):
        load_prompt_dataset(DataConfig(), tok, need_demo=True)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_dataset(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]), tok,
                            need_demo=True)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="data.format"):
        read_rows(tmp_path / "data.txt")
    path = write_jsonl(tmp_path / "v.jsonl", VERL_ROWS)  # verl rows read as flat: nothing usable
    with pytest.raises(ValueError, match="no usable rows"):
        load_prompt_dataset(DataConfig(train_files=[path]), tok, need_demo=True)
    with pytest.raises(IndexError):
        PromptDataset([read_rows(write_jsonl(tmp_path / "f.jsonl", FLAT_ROWS))],
                      tok, DataConfig(), need_demo=True)[5]


def test_sampler_epochs_are_permutations_and_seeded():
    sampler = StatefulSampler(7, seed=3)
    drawn = [sampler.next_global_batch(3) for _ in range(7)]  # 21 = 3 epochs
    flat = [i for batch in drawn for i in batch]
    for epoch in range(3):
        assert sorted(flat[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert flat[:7] != flat[7:14]  # reshuffled each epoch
    again = StatefulSampler(7, seed=3)
    assert [again.next_global_batch(3) for _ in range(7)] == drawn
    in_order = StatefulSampler(7, seed=3, shuffle=False)
    assert in_order.next_global_batch(9) == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_sampler_resume_continues_the_same_sequence():
    sampler = StatefulSampler(10, seed=1)
    sampler.next_global_batch(4), sampler.next_global_batch(8)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives the JSON checkpoint
    expected = [sampler.next_global_batch(5) for _ in range(3)]
    resumed = StatefulSampler(10, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_global_batch(5) for _ in range(3)] == expected
    with pytest.raises(ValueError, match="items"):
        StatefulSampler(11).load_state_dict(state)


def test_sampler_shards_global_batch_across_ranks():
    world = 3
    samplers = [StatefulSampler(20, seed=5, rank=r, world_size=world) for r in range(world)]
    reference = StatefulSampler(20, seed=5)
    for _ in range(4):
        shares = [s.next_batch(8) for s in samplers]
        assert [i for share in shares for i in share] == reference.next_global_batch(8)
        assert sorted(map(len, shares)) == [2, 3, 3]
    with pytest.raises(ValueError, match="rank"):
        StatefulSampler(5, rank=2, world_size=2)
