"""``baseline: official`` (the Prefix-RFT authors' verl advantage) against a hand-computed table,
against a line-by-line port of their loop on random batches, and the ``[B, T]`` expansion."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from prefix_rft.advantage import rollout_advantages, token_advantages

ON = [False] * 7 + [True]  # 7 on-policy + 1 hybrid, n = 1 (the authors' layout)

# (on-policy rewards, hybrid reward) -> (on-policy advantages, hybrid continuation, hybrid prefix)
# worked by hand: mu_on = mean of the 7 on-policy rewards.
TABLE = [
    # mixed: mu_on = 2/7
    ([1, 0, 0, 1, 0, 0, 0], 1, ([5 / 7, -2 / 7, -2 / 7, 5 / 7, -2 / 7, -2 / 7, -2 / 7],
                                1.0, 5 / 7)),
    ([1, 0, 0, 1, 0, 0, 0], 0, ([5 / 7, -2 / 7, -2 / 7, 5 / 7, -2 / 7, -2 / 7, -2 / 7],
                                0.0, -2 / 7)),
    # all on-policy fail: mu_on = 0
    ([0] * 7, 1, ([0.0] * 7, 1.0, 1.0)),
    ([0] * 7, 0, ([0.0] * 7, 0.0, 0.0)),
    # all on-policy succeed: mu_on = 1
    ([1] * 7, 1, ([0.0] * 7, 1.0, 0.0)),
    ([1] * 7, 0, ([0.0] * 7, 0.0, -1.0)),
]


@pytest.mark.parametrize("on_rewards,hybrid,expected", TABLE)
def test_official_matches_hand_computed_table(on_rewards, hybrid, expected):
    rewards = torch.tensor(on_rewards + [hybrid], dtype=torch.float32)
    adv, pre = rollout_advantages(rewards, torch.zeros(8, dtype=torch.long), baseline="official",
                                  is_prefixed=torch.tensor(ON))
    on_expected, cont_expected, prefix_expected = expected
    torch.testing.assert_close(adv[:7], torch.tensor(on_expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(pre[:7], torch.tensor(on_expected), rtol=0, atol=1e-7)
    assert adv[7].item() == pytest.approx(cont_expected, abs=1e-7)
    assert pre[7].item() == pytest.approx(prefix_expected, abs=1e-7)
    assert adv.dtype == torch.float32


def test_official_differs_from_the_one_scalar_baselines():
    """All on-policy fail, hybrid succeeds: group/on_policy give one scalar per rollout."""
    rewards = torch.tensor([0.0] * 7 + [1.0])
    ids, flags = torch.zeros(8, dtype=torch.long), torch.tensor(ON)
    g, g_pre = rollout_advantages(rewards, ids, baseline="group", is_prefixed=flags)
    assert torch.equal(g, g_pre) and g[7].item() == pytest.approx(7 / 8)
    o, o_pre = rollout_advantages(rewards, ids, baseline="on_policy", is_prefixed=flags)
    assert torch.equal(o, o_pre) and o[7].item() == 1.0 and o[:7].abs().max().item() == 0.0
    # all on-policy succeed, hybrid fails: on_policy pushes the whole hybrid down by 1,
    # official only its prefix (the continuation keeps the raw reward 0)
    rewards = torch.tensor([1.0] * 7 + [0.0])
    o, _ = rollout_advantages(rewards, ids, baseline="on_policy", is_prefixed=flags)
    f, f_pre = rollout_advantages(rewards, ids, baseline="official", is_prefixed=flags)
    assert o[7].item() == -1.0 and f[7].item() == 0.0 and f_pre[7].item() == -1.0


def _authors_loop(scores, index, prefix_index, n=1):
    """Transliteration of the authors' ``compute_dr_grpo_prefix_outcome_advantage`` on
    per-rollout scores (``prefix_index`` "0" marks on-policy): returns (continuation, prefix)."""
    buckets = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(scores):
        buckets[index[i]][prefix_index[i]].append(s)
    means = defaultdict(dict)
    for idx, by_prefix in buckets.items():
        for pid, vals in by_prefix.items():
            means[idx][pid] = 0.0 if len(vals) == 1 else sum(vals) / len(vals)
    cont = [s - means[index[i]][prefix_index[i]] for i, s in enumerate(scores)]
    pre = [c - means[index[i]]["0"] if prefix_index[i] != "0" else 0.0
           for i, c in enumerate(cont)]
    return cont, [p / n for p in pre]


def test_official_matches_the_authors_loop_on_random_batches():
    rng = random.Random(0)
    for _ in range(50):
        scores, index, prefix_index, flags = [], [], [], []
        for q in range(rng.randint(1, 5)):
            n_on, n_hyb = rng.randint(1, 7), rng.randint(0, 3)
            for j in range(n_on + n_hyb):
                scores.append(float(rng.random() < 0.4))
                index.append(q * 7 + 3)
                prefix_index.append("0" if j < n_on else f"p{q}.{j}")
                flags.append(j >= n_on)
        order = list(range(len(scores)))
        rng.shuffle(order)  # rows of a group need not be contiguous
        scores, index = [scores[i] for i in order], [index[i] for i in order]
        prefix_index, flags = [prefix_index[i] for i in order], [flags[i] for i in order]
        cont, pre = _authors_loop(scores, index, prefix_index)
        adv, pre_adv = rollout_advantages(
            torch.tensor(scores, dtype=torch.float64), torch.tensor(index), baseline="official",
            is_prefixed=torch.tensor(flags))
        expected_pre = [p if f else c for p, c, f in zip(pre, cont, flags)]
        torch.testing.assert_close(adv, torch.tensor(cont, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(pre_adv, torch.tensor(expected_pre, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_official_needs_an_on_policy_rollout_per_group():
    with pytest.raises(ValueError, match="on-policy rollout"):
        rollout_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]),
                           baseline="official", is_prefixed=torch.tensor([False, True, True]))
    with pytest.raises(ValueError, match="is_prefixed"):
        rollout_advantages(torch.tensor([1.0]), torch.tensor([0]), baseline="official")


def test_token_advantages_expand_by_prefix_mask():
    adv, pre = torch.tensor([0.5, 1.0]), torch.tensor([0.5, -0.25])
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = token_advantages(adv, pre, mask)
    assert torch.equal(out, torch.tensor([[0.5, 0.5, 0.5], [-0.25, -0.25, 1.0]]))
    with pytest.raises(ValueError, match="prefix_mask"):
        token_advantages(adv, pre, mask[:1])


def test_collate_carries_per_token_advantages_only_when_a_row_needs_them():
    from prefix_rft.update import Rollout, collate

    rows = [Rollout(prompt_ids=[1, 2], response_ids=[3, 4, 5], advantage=-2 / 7),
            Rollout(prompt_ids=[1], response_ids=[6, 7, 8, 9], prefix_len=2, is_prefixed=True,
                    advantage=1.0, prefix_advantage=5 / 7)]
    assert collate(rows, [0], pad_token_id=0).advantages.shape == (1,)
    batch = collate(rows, [0, 1], pad_token_id=0)
    expected = torch.tensor([[-2 / 7] * 4, [5 / 7, 5 / 7, 1.0, 1.0]])
    torch.testing.assert_close(batch.advantages, expected)
