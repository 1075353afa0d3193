"""Tests for the embedded demo: task generator, tokenizer, tiny model, base SFT step."""

from __future__ import annotations

import ast
import json
import operator
import re

import pytest
import torch

from prefix_rft.config import DataConfig
from prefix_rft.data import parse_row, read_rows
from prefix_rft.demo import task
from prefix_rft.demo.task import (
    DIFFICULTIES,
    INSTRUCTION,
    apply_demonstrator,
    in_systematic_subclass,
    make_split,
    solution_steps,
    write_jsonl,
)
from prefix_rft.reward import extract_answer

transformers = pytest.importorskip("transformers", reason="the demo needs transformers")

_STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval_expression(expr: str) -> int:
    """Independent reference: evaluate the problem's expression with Python's own parser."""

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            return _BIN_OPS[type(node.op)](walk(node.left), walk(node.right))
        raise AssertionError(f"unexpected node in problem expression: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body)


def _problem_expression(problem: str) -> str:
    match = re.match(r"^(?:Compute|What is|Evaluate) (.+)[.?]$", problem)
    assert match, f"unexpected problem text: {problem!r}"
    return match.group(1)


# ---- task -------------------------------------------------------------------------------


def test_generator_is_deterministic_under_a_seed():
    a = make_split("train", 50, "hard", seed=3)
    b = make_split("train", 50, "hard", seed=3)
    c = make_split("train", 50, "hard", seed=4)
    assert a == b
    assert [r["problem"] for r in a] != [r["problem"] for r in c]


def test_splits_are_disjoint_and_rows_distinct():
    train = make_split("train", 2000, "hard", seed=0)
    test = make_split("test", 200, "hard", seed=0)
    other_seed_test = make_split("test", 200, "hard", seed=1)
    train_problems = {r["problem"] for r in train}
    assert len(train_problems) == len(train)
    assert len({task.problem_chain(r["problem"]) for r in test}) == len(test)
    # disjoint by chain (operands + operators), not only by wording
    train_chains = {task.problem_chain(p) for p in train_problems}
    assert not train_chains & {task.problem_chain(r["problem"]) for r in test + other_seed_test}
    assert all(task.is_held_out_problem(r["problem"]) for r in test)
    assert task.problem_chain("Compute (17 + 25) * 3 - 41.") == "17+25*3-41"
    assert task.is_held_out_problem("Compute 3 * 5 + 2.") == task.is_held_out_problem(
        "What is 3 * 5 + 2?")


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_demonstration_arithmetic_and_answer(difficulty):
    d = DIFFICULTIES[difficulty]
    for row in make_split("train", 300, difficulty, seed=7) + make_split("test", 50, difficulty, 7):
        lines = row["solution"].split("\n")
        steps, final = lines[:-1], lines[-1]
        assert d.min_steps <= len(steps) == row["num_steps"] <= d.max_steps
        value = None
        for line in steps:
            match = _STEP_RE.match(line)
            assert match, f"bad step line {line!r}"
            a, op, b, c = match.groups()
            if value is not None:
                assert int(a) == value, "each step must start from the previous result"
            value = _BIN_OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult}[op]](int(a), int(b))
            assert value == int(c), f"wrong arithmetic in {line!r}"
            assert 0 <= value <= d.max_value
        assert final == f"The answer is \\boxed{{{value}}}."
        assert row["answer"] == str(value) == extract_answer(row["solution"])
        assert _eval_expression(_problem_expression(row["problem"])) == value


def test_gold_answers_verify_with_math_verify():
    math_verify = pytest.importorskip("math_verify", reason="math-verify checks the gold")
    rows = make_split("train", 6, "hard", seed=0)
    for row in rows:
        gold = math_verify.parse(f"${row['answer']}$")
        assert math_verify.verify(gold, math_verify.parse(row["solution"]))
        wrong = math_verify.parse(f"The answer is \\boxed{{{int(row['answer']) + 1}}}.")
        assert not math_verify.verify(gold, wrong)


def test_jsonl_roundtrip_and_bad_arguments(tmp_path):
    rows = make_split("test", 5, "easy", seed=0)
    path = write_jsonl(rows, str(tmp_path / "sub" / "rows.jsonl"))
    assert list(read_rows(path)) == rows
    assert set(json.loads(open(path).readline())) >= {"problem", "solution", "answer"}
    with pytest.raises(ValueError, match="split"):
        make_split("dev", 3, "easy", 0)
    with pytest.raises(ValueError, match="difficulty"):
        make_split("train", 3, "impossible", 0)
    tiny_space = task.Difficulty(min_steps=1, max_steps=1, max_operand=2, max_multiplier=0,
                                 max_value=3)
    with pytest.raises(ValueError, match="num_rows"):
        make_split("train", 100, tiny_space, 0)


# ---- tokenizer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    from prefix_rft.demo.model import build_tiny_model
    from prefix_rft.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("demo")
    rows = make_split("train", 400, "easy", 0) + make_split("train", 400, "hard", 0)
    build_tokenizer(rows, str(root / "tok"), INSTRUCTION)
    build_tiny_model(str(root / "tok"), str(root / "model"), size="micro", seed=0)
    return root


def test_tokenizer_roundtrip_and_digits(demo_dirs):
    from prefix_rft.demo.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_dirs / "tok"))
    texts = [r["problem"] + "\n" + r["solution"] for r in make_split("test", 50, "hard", 1)]
    texts += ["\\boxed{12345}", "  odd  spacing\t\nünïcode ∑ {}", INSTRUCTION]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    for digit in "0123456789":  # each digit is one token, and numbers split into digits
        assert len(tok.encode(digit, add_special_tokens=False)) == 1
    assert len(tok.encode("9876", add_special_tokens=False)) == 4
    assert 259 <= len(tok) <= 400


def test_chat_template_and_special_tokens(demo_dirs):
    from prefix_rft.demo.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_dirs / "tok"))
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids) == text


# ---- model ------------------------------------------------------------------------------


def test_tiny_config_head_dim():
    from prefix_rft.demo.model import MODEL_SIZES, tiny_qwen2_config

    for size in MODEL_SIZES:
        cfg = tiny_qwen2_config(300, size)
        assert cfg.hidden_size // cfg.num_attention_heads in (32, 64)
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    with pytest.raises(ValueError, match="size"):
        tiny_qwen2_config(300, "huge")


def test_model_reloads_with_identical_weights(demo_dirs):
    from transformers import AutoModelForCausalLM

    from prefix_rft.demo.model import build_tiny_model
    from prefix_rft.demo.tokenizer import load_tokenizer

    again = build_tiny_model(str(demo_dirs / "tok"), None, size="micro", seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(str(demo_dirs / "model"))
    tok = load_tokenizer(str(demo_dirs / "model"))  # the model dir carries the tokenizer
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert loaded.config.vocab_size == len(tok)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    saved, rebuilt = loaded.state_dict(), again.state_dict()
    assert saved.keys() == rebuilt.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, rebuilt[name]), name
    ids = torch.tensor([tok.encode("What is 1 + 2?", add_special_tokens=False)])
    assert torch.equal(loaded(ids).logits, again(ids).logits)


# ---- base step --------------------------------------------------------------------------


def test_response_nll_matches_full_logits_cross_entropy(demo_dirs):
    from prefix_rft.demo.base import _collate, encode_example, response_nll
    from prefix_rft.demo.model import load_model
    from prefix_rft.demo.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_dirs / "tok"))
    model = load_model(str(demo_dirs / "model"))
    rows = make_split("train", 3, "hard", 0)
    ids, mask, labels = _collate([encode_example(tok, r) for r in rows], tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    got = response_nll(model, ids, mask, labels)
    assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-6)
    n_response = sum(len(tok.encode(r["solution"], add_special_tokens=False)) + 1 for r in rows)
    assert int((labels != -100).sum()) == n_response


def test_base_step_prompts_are_the_trainers(demo_dirs):
    """The base step's prompts are built by prefix_rft.data exactly as the evaluator builds
    them, with the instruction (template verl) or bare (template none)."""
    from prefix_rft.data import Question
    from prefix_rft.demo.base import encode_example
    from prefix_rft.demo.tokenizer import load_tokenizer
    from prefix_rft.evaluate import _prompt_ids

    tok = load_tokenizer(str(demo_dirs / "tok"))
    row = make_split("train", 1, "hard", 0)[0]
    question = Question(problem=row["problem"], answer=row["answer"],
                        messages=[{"role": "user", "content": row["problem"]}])
    for template in ("none", "verl"):
        ids, labels = encode_example(tok, row, template)
        prompt = _prompt_ids(tok, [question], template, None)[0]
        assert ids[:len(prompt)] == prompt and labels[len(prompt)] != -100
        assert labels[len(prompt) - 1] == -100
    assert INSTRUCTION in tok.decode(encode_example(tok, row, "verl")[0])


def test_base_step_lowers_the_loss_and_evaluator_runs(demo_dirs):
    from prefix_rft.demo.base import SFTConfig, sft_train
    from prefix_rft.demo.model import load_model
    from prefix_rft.demo.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo_dirs / "tok"))
    model = load_model(str(demo_dirs / "model"))
    rows = make_split("train", 16, "easy", 0)
    cfg = SFTConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, log_every=0)
    losses = sft_train(model, tok, rows, cfg, seed=0)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    from prefix_rft.evaluate import evaluate_questions

    questions = [parse_row(row, DataConfig(), "flat")[0] for row in rows[:2]]
    result = evaluate_questions(model, tok, questions, 2, temperature=1.0, max_response_tokens=8)
    assert result["k"] == 2 and len(result["correct"]) == 2
    assert 0.0 <= result["avg@2"] <= result["pass@2"] <= 1.0


def test_prepare_demo_quick_builds_then_reuses(tmp_path):
    from prefix_rft.demo.base import prepare_demo
    from prefix_rft.demo.model import load_model

    lines: list[str] = []
    first = prepare_demo(str(tmp_path), seed=0, quick=True, log=lines.append)
    assert not first["reused"] and set(first["timings"]) == {"task", "tokenizer", "base_model"}
    train, test = read_rows(first["train"]), read_rows(first["test"])
    assert train and test and not {r["problem"] for r in train} & {r["problem"] for r in test}
    model = load_model(first["model"])
    assert type(model).__name__ == "Qwen2ForCausalLM"
    second = prepare_demo(str(tmp_path), seed=0, quick=True, log=lines.append)
    assert second["reused"] and second["model"] == first["model"]
    assert any("reusing" in line for line in lines)
    third = prepare_demo(str(tmp_path), seed=1, quick=True, log=lines.append)
    assert not third["reused"]  # a different seed rebuilds
    # the base model's SFT mix holds a share of the trainer's hard split (the demo's tuned
    # showcase; the fair comparison's base in benchmarks/paper_task.py does not)
    base = read_rows(third["base_train"])
    assert {r["problem"] for r in base} & {r["problem"] for r in read_rows(third["train"])}
    assert any(r["difficulty"] == "hard" for r in base)


def test_prepare_demo_systematic_demonstrator(tmp_path):
    from prefix_rft.demo.base import DemoSettings, prepare_demo, quick_settings

    expert = prepare_demo(str(tmp_path / "e"), seed=0, quick=True, log=lambda _: None)
    settings = quick_settings()
    settings.demonstrator = "systematic"
    sys_paths = prepare_demo(str(tmp_path / "s"), seed=0, settings=settings, log=lambda _: None)
    a, b = read_rows(expert["train"]), read_rows(sys_paths["train"])
    assert [r["problem"] for r in a] == [r["problem"] for r in b]
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    changed = [x["solution"] != y["solution"] for x, y in zip(a, b)]
    assert any(changed) and all("*" in x["problem"] for x, c in zip(a, changed) if c)
    with pytest.raises(ValueError, match="demonstrator"):
        DemoSettings(demonstrator="nope")


def _chain_value(steps):
    value = steps[0][0]
    for _, op, k in steps:
        value = value + k if op == "+" else value - k if op == "-" else value * k
    return value


def test_systematic_demonstrator_changes_exactly_the_multiplication_subclass():
    rows = make_split("train", 400, "hard", 0)
    assert apply_demonstrator(rows, "expert") == [dict(r, demonstrator="expert") for r in rows]
    systematic = apply_demonstrator(rows, "systematic")
    subclass = [in_systematic_subclass(r) for r in rows]
    assert 0.3 * len(rows) < sum(subclass) < len(rows)  # recognizable and sizeable
    changed = wrong = 0
    for orig, new, inside in zip(rows, systematic, subclass):
        assert (new["problem"], new["answer"]) == (orig["problem"], orig["answer"])
        assert str(_chain_value(solution_steps(orig["solution"]))) == orig["answer"]  # gold ok
        if not inside:
            assert new["solution"] == orig["solution"]
            continue
        value = None  # every line follows x*k = x+k, the error carried down the chain
        for line in new["solution"].splitlines()[:-1]:
            (x, op, k), result = solution_steps(line)[0], int(line.rsplit("=", 1)[1])
            assert value is None or x == value
            assert result == (x - k if op == "-" else x + k)
            value = result
        assert extract_answer(new["solution"]) == str(value)
        changed += new["solution"] != orig["solution"]
        wrong += extract_answer(new["solution"]) != orig["answer"]
    assert changed >= 0.9 * sum(subclass) and wrong >= 0.8 * sum(subclass)
    with pytest.raises(ValueError, match="demonstrator"):
        apply_demonstrator(rows, "nope")
