"""avg@k / pass@k: the estimator against brute-force subset counting, scoring through a scripted
engine against hand computation, and a tiny-model `prefix-rft eval` run writing JSON + Markdown."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
from train_helpers import shared_assets

from prefix_rft.data import Question
from prefix_rft.errors import UserError
from prefix_rft.evaluate import evaluate_questions, main, pass_at_k, pass_ks, summarize
from prefix_rft.rollout import RolloutEngine, RolloutSample


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)



def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (c of them correct) holding at least one correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_counting(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_1_is_mean_accuracy_and_bad_inputs_raise():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32]
    assert pass_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must be"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n must be"):
        pass_at_k(-1, 0, 1)


def test_summarize_by_hand():
    # 3 questions, 4 samples: 0, 1 and 4 correct
    out = summarize([0, 1, 4], 4)
    assert out["avg@4"] == pytest.approx((0 + 1 + 4) / 12)
    assert out["pass@1"] == pytest.approx(out["avg@4"])
    # pass@2 for c=1, n=4: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert out["pass@2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["num_questions"] == 3


class ScriptedEngine(RolloutEngine):
    """Returns fixed response texts per question (cycled), encoded with the tokenizer."""

    name = "scripted"

    def __init__(self, tokenizer, answers_per_question):
        self.tokenizer, self.answers, self.calls = tokenizer, answers_per_question, 0

    def generate(self, requests):
        out = []
        for request in requests:
            texts = self.answers[self.calls]
            self.calls += 1
            ids = [self.tokenizer.encode(texts[j % len(texts)]) for j in range(request.n)]
            out.append([RolloutSample(response_ids=i, prefix_len=0, finish_reason="stop",
                                      logprobs=[0.0] * len(i)) for i in ids])
        return out

    def load_weights(self, named_tensors):
        pass


def test_evaluate_questions_scores_like_hand_computation(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["model"])
    questions = [Question(problem=p, answer=a, messages=[{"role": "user", "content": p}])
                 for p, a in (("What is 1 + 1?", "2"), ("What is 2 * 3?", "6"))]
    scripted = [["so \\boxed{2}", "\\boxed{3}", "no idea", "\\boxed{2.0}"],  # 2 correct of 4
                ["\\boxed{5}", "\\boxed{7}", "\\boxed{1}", "\\boxed{0}"]]  # 0 correct
    engine = ScriptedEngine(tok, scripted)
    out = evaluate_questions(None, tok, questions, 4, engine=engine, batch_questions=1)
    assert out["correct"] == [2, 0]
    assert out["avg@4"] == pytest.approx(2 / 8)
    assert out["pass@2"] == pytest.approx((1 - math.comb(2, 2) / math.comb(4, 2)) / 2)
    assert out["pass@4"] == pytest.approx(0.5)


def test_eval_cli_tiny_model_writes_json_and_markdown(tiny_assets, tmp_path):
    out_dir = tmp_path / "eval"
    code = main(["--model", tiny_assets["model"], "--data", tiny_assets["test"],
                 tiny_assets["train"], "--k", "2", "--max-tokens", "6", "--max-rows", "2",
                 "--out", str(out_dir), "--no-progress", "--device", "cpu"])
    assert code == 0
    report = json.loads((out_dir / "eval_results.json").read_text())
    assert set(report["results"]) == {"test", "train"}
    for result in report["results"].values():
        assert len(result["correct"]) == 2 and all(0 <= c <= 2 for c in result["correct"])
        assert result["avg@2"] == pytest.approx(sum(result["correct"]) / 4)
        assert result["mean_response_tokens"] <= 6
    table = (out_dir / "eval_results.md").read_text()
    assert "| test | 2 |" in table and "pass@2" in table


def test_eval_cli_reads_every_training_schema(tiny_assets, tmp_path):
    """The same questions as flat jsonl and as verl parquet (schema detected per file) give
    the same prompts, hence the same samples and scores."""
    import datasets

    from prefix_rft.data import read_rows

    flat = list(read_rows(tiny_assets["test"]))[:2]
    verl = [{"prompt": [{"role": "user", "content": r["problem"]}],
             "target": [{"role": "assistant", "content": r["solution"]}],
             "reward_model": {"ground_truth": r["answer"]}} for r in flat]
    verl_path = tmp_path / "verl_test.parquet"
    datasets.Dataset.from_list(verl).to_parquet(str(verl_path))
    out_dir = tmp_path / "eval"
    code = main(["--model", tiny_assets["model"], "--data", tiny_assets["test"], str(verl_path),
                 "--k", "2", "--max-tokens", "6", "--max-rows", "2", "--out", str(out_dir),
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    results = json.loads((out_dir / "eval_results.json").read_text())["results"]
    for key in ("correct", "mean_response_tokens", "avg@2"):
        assert results["test"][key] == results["verl_test"][key]


def test_eval_cli_rejects_missing_files(tiny_assets, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main(["--model", tiny_assets["model"], "--data", str(tmp_path / "nope.jsonl"), "--k", "1"])
