"""The prefix-guided family's choices (prefix_rft/prefix_policy.py, prefix_store.py, prefix.py):
the ``step`` schedule, ``on_failure`` groups and their per-token advantages on a hand table,
``train_on_prefix: false`` (no gradient through prefix tokens, padded and packed) and the
``self`` store (bounded, seeded, fallback, checkpoint state)."""

from __future__ import annotations

import pytest
import torch

from prefix_rft.advantage import rollout_advantages
from prefix_rft.config import Config
from prefix_rft.prefix import prefix_low_bound, step_ratios
from prefix_rft.prefix_policy import (
    as_conditioning,
    failing_groups,
    prefix_source_ids,
    replace_failed_in_place,
    self_store_additions,
)
from prefix_rft.prefix_store import SelfPrefixStore
from prefix_rft.run.setup import Run, build_loss
from prefix_rft.train import policy_update
from prefix_rft.update.batch import Rollout, collate
from prefix_rft.update.varlen_attention import enable_packed_attention


# ---------------------------------------------------------------- step schedule
def test_step_schedule_holds_then_drops():
    values = [prefix_low_bound(t, schedule="step", start=0.5, end=0.25, decay_steps=3)
              for t in range(6)]
    assert values == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    # no draw: every hybrid gets the held ratio itself; other schedules still draw a range
    assert step_ratios(3, 0.5, "step", high=0.95, generator=0) == [0.5, 0.5, 0.5]
    drawn = step_ratios(3, 0.5, "cosine", high=0.95, generator=0)
    assert all(0.5 <= r <= 0.95 for r in drawn) and len(set(drawn)) == 3


# ---------------------------------------------------------------- on_failure: groups
def _row(group, reward, prefixed=False, prefix_len=0, n=4):
    return Rollout(prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)), group=group,
                   prefix_len=prefix_len, is_prefixed=prefixed, reward=reward)


def _on_failure_rows():
    """G = 4, num_prefixed = 1. Question 0 solves 2 of 4 (no hybrid); questions 1 and 2 fail
    every on-policy sample, so each gets one hybrid (2 prefix tokens of 4) in place of its last
    on-policy sample: question 1's hybrid succeeds, question 2's fails."""
    on_policy = ([_row(0, r) for r in (1.0, 0.0, 1.0, 0.0)] + [_row(1, 0.0) for _ in range(4)]
                 + [_row(2, 0.0) for _ in range(4)])
    failing = failing_groups(on_policy, [r.reward for r in on_policy])
    assert failing == {1, 2}
    hybrids = [_row(1, 1.0, True, 2), _row(2, 0.0, True, 2)]
    return replace_failed_in_place(on_policy, hybrids, failing, num_prefixed=1)


# per-token advantages (4 tokens each; the hybrids' first 2 are prefix tokens), by baseline
HAND_TABLE = {
    "group": [[.5] * 4, [-.5] * 4, [.5] * 4, [-.5] * 4,           # question 0: mean 0.5
              [-.25] * 4, [-.25] * 4, [-.25] * 4, [.75] * 4,       # question 1: mean 0.25
              [0.] * 4, [0.] * 4, [0.] * 4, [0.] * 4],             # question 2: all 0
    "on_policy": [[.5] * 4, [-.5] * 4, [.5] * 4, [-.5] * 4,       # mean of on-policy rows
                  [0.] * 4, [0.] * 4, [0.] * 4, [1.] * 4,
                  [0.] * 4, [0.] * 4, [0.] * 4, [0.] * 4],
    "official": [[.5] * 4, [-.5] * 4, [.5] * 4, [-.5] * 4,        # r - mu_on; hybrid prefix
                 [0.] * 4, [0.] * 4, [0.] * 4, [1.] * 4,          # r_h - mu_on = 1, its
                 [0.] * 4, [0.] * 4, [0.] * 4, [0.] * 4],         # continuation the raw r_h
}


def _token_advantages(rows, baseline):
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float64)
    groups = torch.tensor([r.group for r in rows])
    prefixed = torch.tensor([r.is_prefixed for r in rows])
    adv, prefix_adv = rollout_advantages(rewards, groups, baseline=baseline, is_prefixed=prefixed)
    for r, a, pa in zip(rows, adv.tolist(), prefix_adv.tolist()):
        r.advantage, r.prefix_advantage = a, (pa if pa != a else None)
    batch = collate(rows, range(len(rows)), pad_token_id=0)
    adv = batch.advantages
    return (adv if adv.dim() == 2 else adv[:, None].expand(-1, 4)).double()


@pytest.mark.parametrize("baseline", ["group", "on_policy", "official"])
def test_on_failure_groups_keep_size_and_match_hand_table(baseline):
    rows = _on_failure_rows()
    assert [r.group for r in rows] == [0] * 4 + [1] * 4 + [2] * 4  # every group keeps G
    assert [r.is_prefixed for r in rows].count(True) == 2
    expected = torch.tensor(HAND_TABLE[baseline], dtype=torch.float64)
    assert torch.allclose(_token_advantages(rows, baseline), expected, atol=1e-7)


def test_official_prefix_and_continuation_differ_when_on_policy_mean_is_not_zero():
    """A hybrid in a group with solved on-policy rows (``always``): official gives the prefix
    tokens r_h - mu_on and the continuation the raw r_h, per token."""
    rows = [_row(0, 1.0), _row(0, 0.0), _row(0, 1.0), _row(0, 1.0, True, 2)]
    table = _token_advantages(rows, "official")
    assert table[3].tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0])
    # untrained prefix (train_on_prefix false): the continuation alone, still the raw r_h
    rows = [as_conditioning(r) for r in rows]
    batch_adv = _token_advantages(rows, "official")
    assert batch_adv[3][:2].tolist() == pytest.approx([1.0, 1.0])


def test_replace_in_place_checks_the_hybrid_count():
    on_policy = [_row(0, 0.0) for _ in range(4)]
    with pytest.raises(ValueError, match="num_prefixed=1"):
        replace_failed_in_place(on_policy, [], {0}, num_prefixed=1)


# ---------------------------------------------------------------- train_on_prefix: false
def test_as_conditioning_moves_the_prefix_into_the_prompt():
    r = Rollout(prompt_ids=[1, 2], response_ids=[7, 8, 9, 10], prefix_len=2, is_prefixed=True,
                engine_logprobs=[-0.5, -0.25])
    c = as_conditioning(r)
    assert (c.prompt_ids, c.response_ids, c.prefix_len) == ([1, 2, 7, 8], [9, 10], 0)
    assert c.is_prefixed and c.engine_logprobs == [-0.5, -0.25]
    assert c.prompt_ids + c.response_ids == r.prompt_ids + r.response_ids  # same sequence
    assert as_conditioning(_row(0, 0.0)).response_ids == [3, 4, 5, 6]  # on-policy: unchanged
    with pytest.raises(ValueError, match="no continuation"):
        as_conditioning(Rollout(prompt_ids=[1], response_ids=[7, 8], prefix_len=2))


VOCAB, G, L_MAX = 53, 2, 16


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for p in self.param_groups[0]["params"]])
        return super().step(closure)


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).train()


def _hybrid_rollouts():
    g = torch.Generator().manual_seed(5)
    rows = []
    for i, (P, n, prefix) in enumerate([(4, 9, 0), (5, 11, 6), (3, 7, 0), (6, 10, 4)]):
        rows.append(Rollout(prompt_ids=torch.randint(1, VOCAB, (P,), generator=g).tolist(),
                            response_ids=torch.randint(1, VOCAB, (n,), generator=g).tolist(),
                            prefix_len=prefix, group=i // G, is_prefixed=prefix > 0,
                            advantage=float(torch.randn((), generator=g)),
                            engine_logprobs=[-1.0] * (n - prefix)))
    return rows


def _update_grads(tmp_path, rows, packing):
    cfg = Config()
    cfg.train.packing, cfg.train.micro_batch_tokens = packing, 4096
    cfg.train.prompts_per_step, cfg.train.mini_batch_size = 2, 2
    cfg.optim.grad_clip = 0.0
    cfg.rollout.group_size, cfg.rollout.max_response_tokens = G, L_MAX
    cfg.loss.kernel_impl, cfg.loss.entropy_top_fraction = "torch", 0.2
    model = _model()
    if packing:
        enable_packed_attention(model)
    optimizer = RecordingSGD(model.parameters())
    run = Run(cfg=cfg, model=model, tokenizer=None, engine=None, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0),
              loss_fn=build_loss(cfg), dataset=None, sampler=None,
              device=torch.device("cpu"), rank=0, world=1, run_dir=tmp_path, pad_id=0)
    policy_update(run, rows)  # exactly on-policy: one forward, rho = 1
    return optimizer.grads[0]


def _continuation_only_grads(rows):
    """By hand: d/dθ of -Σ_i A_i Σ_{t in continuation_i} log π(y_t) / (B · L_max)."""
    model = _model()
    total = 0.0
    for r in rows:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        token_lp = logp.gather(-1, targets[:, None])[:, 0]
        first = len(r.prompt_ids) - 1 + r.prefix_len  # the first continuation token
        total = total - r.advantage * token_lp[first:].sum()
    (total / (len(rows) * L_MAX)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("packing", [False, True])
def test_untrained_prefix_gets_no_gradient(tmp_path, packing):
    rows = _hybrid_rollouts()
    expected = _continuation_only_grads(rows)
    got = _update_grads(tmp_path, [as_conditioning(r) for r in rows], packing)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # the trained layout differs: its prefix tokens do carry gradient
    trained = _update_grads(tmp_path, rows, packing)
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(trained, expected))


# ---------------------------------------------------------------- source: self
def test_self_store_is_bounded_seeded_and_round_trips():
    store = SelfPrefixStore(capacity=2)
    for ids in ([1, 2], [3, 4], [5, 6], [3, 4]):
        store.add(7, ids)
    assert store.as_dict() == {7: [[5, 6], [3, 4]]}  # the newest 2, a repeat moved last
    assert len(store) == 2 and store.pick(8, seed=0) is None
    assert store.pick(7, seed=1) == store.pick(7, seed=1)
    assert {tuple(store.pick(7, seed=s)) for s in range(20)} == {(5, 6), (3, 4)}
    store.add(2, [8])
    copy = SelfPrefixStore(capacity=2)
    copy.load_state_dict(store.state_dict())
    assert copy.as_dict() == store.as_dict() == {2: [[8]], 7: [[5, 6], [3, 4]]}
    smaller = SelfPrefixStore(capacity=1)
    smaller.load_state_dict(store.state_dict())
    assert smaller.as_dict() == {2: [[8]], 7: [[3, 4]]}
    with pytest.raises(ValueError, match="capacity"):
        SelfPrefixStore(capacity=0)


def test_self_source_falls_back_to_demonstration_then_nothing():
    store = SelfPrefixStore(capacity=1)
    store.add(3, [9, 9, 9])
    assert prefix_source_ids("self", 3, [1, 2], store, seed=0) == ([9, 9, 9], "self")
    assert prefix_source_ids("self", 4, [1, 2], store, seed=0) == ([1, 2], "demonstration")
    assert prefix_source_ids("self", 4, None, store, seed=0) == ([], "")
    assert prefix_source_ids("demonstration", 3, [1, 2], store, seed=0) == (
        [1, 2], "demonstration")


def test_store_keeps_only_correct_on_policy_responses():
    rows = [_row(0, 1.0), _row(0, 0.0), _row(1, 1.0, True, 2), _row(1, 1.0)]
    rows[3].response_ids = [42]
    assert self_store_additions(rows, [10, 11]) == [(10, [3, 4, 5, 6]), (11, [42])]


# ---------------------------------------------------------------- config, recipes, CLI
@pytest.mark.parametrize("override,message", [
    ("--prefix.when=sometimes", "prefix.when must be one of always|on_failure"),
    ("--prefix.source=teacher", "prefix.source must be one of demonstration|self"),
    ("--prefix.self_store_size=0", "prefix.self_store_size must be"),
    ("--prefix.num_prefixed=8", "prefix.when=on_failure keeps on-policy rollouts"),
])
def test_family_options_are_validated(override, message):
    from prefix_rft.config import load_config

    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        load_config(None, ["--prefix.when=on_failure", override])


def test_self_source_keeps_rows_without_a_demonstration(tmp_path):
    """``source: self`` runs on data without demonstrations: such rows are kept (demo_ids
    None) and their hybrids fall back to no prefix; without it they are skipped as before."""
    import json

    from test_data import make_tokenizer

    from prefix_rft.config import DataConfig
    from prefix_rft.data import load_prompt_dataset
    from prefix_rft.train import build_requests

    path = tmp_path / "d.jsonl"
    rows = [{"problem": "What is 2+3?", "solution": "2+3=5. \\boxed{5}", "answer": "5"},
            {"problem": "What is 7*6?", "answer": "42"}]  # no demonstration
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(train_files=[str(path)])
    tok = make_tokenizer()
    assert len(load_prompt_dataset(cfg, tok, need_demo=True)) == 1
    kept = load_prompt_dataset(cfg, tok, need_demo=True, demo_optional=True)
    assert len(kept) == 2 and kept[0].demo_ids and kept[1].demo_ids is None
    train_cfg = Config()
    train_cfg.prefix.source, train_cfg.prefix.decay_steps, train_cfg.rollout.seed = "self", 10, 0
    requests, meta, _ = build_requests(train_cfg, [kept[0], kept[1]], 0, 0,
                                       SelfPrefixStore(capacity=1))
    hybrids = [(m, r) for m, r in zip(meta, requests) if r.n == 1]
    assert [(m[0], m[1], m[3]) for m, _ in hybrids] == [(0, True, "demonstration"), (1, False, "")]
    assert len(hybrids[1][1].prefix_ids) == 0
