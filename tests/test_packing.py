"""Packed micro-batches (prefix_rft/packing.py, prefix_rft/varlen_attention.py).

References are independent of the implementation: attention is checked against one fp64
SDPA call per sequence and against transformers' own packed-sequence support (a dense
block-diagonal mask built from ``position_ids``); the packed model forward against the
padded layout of prefix_rft/batching.py, one sequence per row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_rft.update import (
    Rollout,
    collate,
    gather_per_token,
    make_micro_batches,
    pack,
    response_hidden,
    split_micro_batches,
    split_rows,
)
from prefix_rft.update.varlen_attention import (
    VARLEN_SDPA,
    enable_packed_attention,
    packed_forward,
    plan_groups,
    varlen_sdpa,
)


def _rollouts(lengths, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j, (P, n) in enumerate(lengths):
        out.append(Rollout(prompt_ids=torch.randint(1, vocab, (P,), generator=g).tolist(),
                           response_ids=torch.randint(1, vocab, (n,), generator=g).tolist(),
                           prefix_len=n // 2 if j % 2 else 0, group=j // 2, advantage=0.5 - j))
    return out


# ---------------------------------------------------------------------------- layout
def test_pack_layout():
    rs = _rollouts([(3, 4), (2, 1), (5, 6)])
    p = pack(rs, [2, 0])
    assert p.rows == [2, 0]
    assert p.input_ids[0].tolist() == rs[2].prompt_ids + rs[2].response_ids \
        + rs[0].prompt_ids + rs[0].response_ids
    assert p.position_ids[0].tolist() == list(range(11)) + list(range(7))
    assert p.cu_seq_lens.tolist() == [0, 11, 18] and p.cu_seq_lens.dtype == torch.int32
    assert p.max_length == 11 and p.num_tokens == 18 and p.num_response_tokens == 10
    # the state at response_index predicts the next token of the row: response_ids
    assert p.input_ids[0, p.response_index + 1].tolist() == p.response_ids.tolist()
    assert p.response_lens == [6, 4]
    assert p.seq_index.tolist() == [0] * 6 + [1] * 4
    assert p.prefix_mask.tolist() == [False] * 10  # rollout 2 and 0: prefix_len 0
    assert p.advantages.tolist() == [rs[2].advantage, rs[0].advantage]
    q = pack(rs, [1])
    assert q.prefix_mask.tolist() == [False]  # prefix_len 1 // 2 = 0
    r = pack(_rollouts([(2, 2), (2, 6)]), [1])
    assert r.prefix_mask.tolist() == [True] * 3 + [False] * 3


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="rows"):
        pack(_rollouts([(2, 2)]), [])
    bad = [Rollout(prompt_ids=[1], response_ids=[])]
    with pytest.raises(ValueError, match="non-empty"):
        pack(bad, [0])


def test_gather_per_token():
    rs = _rollouts([(1, 2), (1, 3)])
    vals = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])]
    assert gather_per_token(vals, pack(rs, [1, 0])).tolist() == [3, 4, 5, 1, 2]
    with pytest.raises(ValueError, match="values\\[0\\]"):
        gather_per_token([torch.zeros(1), vals[1]], pack(rs, [0]))


# ---------------------------------------------------------------------------- splitting
def balanced_micro_batches(counts, budget):
    return split_micro_batches(counts, max_tokens=budget, count="tokens", order="balanced")


def in_order_micro_batches(counts, budget):
    return split_micro_batches(counts, max_tokens=budget, count="tokens", order="in_order")


def padding_stats(rollouts, micro_batches, *, packed):
    """Real and computed tokens of a pass over ``micro_batches``, from the batches themselves."""
    batches = [make_micro_batches(rollouts, mb, 10**9, packing=packed, balanced=False,
                                  pad_token_id=0) for mb in micro_batches]
    real = sum(b.num_tokens for part in batches for b in part)
    padded = sum(b.num_padded_tokens for part in batches for b in part)
    return {"tokens": float(real), "padded_tokens": float(padded),
            "padding_frac": 1.0 - real / padded if padded else 0.0}


counts_st = st.lists(st.integers(0, 300), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(counts_st, st.integers(1, 400))
def test_balanced_split_properties(counts, budget):
    bins = balanced_micro_batches(counts, budget)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(counts)))
    for b in bins:
        assert b == sorted(b)
        assert sum(counts[i] for i in b) <= budget or len(b) == 1
    assert [b[0] for b in bins] == sorted(b[0] for b in bins)
    # first fit: a later bin was opened because its first item fitted no earlier bin
    loads = [sum(counts[i] for i in b) for b in bins]
    for a in range(len(loads)):
        for b in range(a + 1, len(loads)):
            assert loads[a] + loads[b] > budget


@settings(max_examples=200, deadline=None)
@given(counts_st, st.integers(1, 400))
def test_in_order_split_properties(counts, budget):
    runs = in_order_micro_batches(counts, budget)
    assert [i for r in runs for i in r] == list(range(len(counts)))
    for k, r in enumerate(runs):
        assert sum(counts[i] for i in r) <= budget or len(r) == 1
        if k + 1 < len(runs):  # greedy: the next sequence did not fit
            assert sum(counts[i] for i in r) + counts[runs[k + 1][0]] > budget


def test_balanced_split_example():
    # FFD: 7 -> bin0, 6 -> bin1, 4 -> bin1 (6+4=10), 3 -> bin0 (7+3=10), 3 -> new bin2
    assert balanced_micro_batches([3, 7, 4, 6, 3], 10) == [[0, 1], [2, 3], [4]]
    assert balanced_micro_batches([20, 1], 10) == [[0], [1]]
    with pytest.raises(ValueError, match="max_tokens"):
        balanced_micro_batches([1], 0)
    with pytest.raises(ValueError, match="token_counts"):
        in_order_micro_batches([-1], 4)


def test_split_rows_and_padding_stats():
    rs = _rollouts([(2, 8), (2, 1), (2, 7), (2, 2)])  # 10, 3, 9, 4 tokens
    assert split_rows(rs, [0, 1, 2, 3], 13, packing=True, balanced=True) == [[0, 1], [2, 3]]
    assert split_rows(rs, [0, 1, 2, 3], 13, packing=True, balanced=False) == [[0, 1], [2, 3]]
    assert split_rows(rs, [3, 2, 1, 0], 13, packing=True, balanced=False) == [[3, 2], [1, 0]]
    s = padding_stats(rs, [[0, 1], [2, 3]], packed=False)
    assert s == {"tokens": 26.0, "padded_tokens": 38.0, "padding_frac": 1 - 26 / 38}
    assert padding_stats(rs, [[0, 1], [2, 3]], packed=True)["padding_frac"] == 0.0


# ---------------------------------------------------------------------------- attention
def _reference_attention(q, k, v, lengths):
    """One fp64 SDPA call per sequence (GQA by repeating the KV heads)."""
    rep = q.shape[1] // k.shape[1]
    outs, s = [], 0
    for n in lengths:
        qs, ks, vs = (t[:, :, s:s + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        s += n
    return torch.cat(outs, 2).transpose(1, 2)


def test_plan_groups():
    assert plan_groups((4, 4, 4), 1.0) == [[0, 1, 2]]
    assert plan_groups((1, 5, 2), 1.0) == [[1], [2], [0]]
    assert plan_groups((1, 5, 2), 100.0) == [[1, 2, 0]]
    with pytest.raises(ValueError, match="max_waste"):
        plan_groups((1,), 0.5)


@pytest.mark.parametrize("max_waste", [1.0, 1.5, 1000.0])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_varlen_sdpa_matches_per_sequence(max_waste, heads):
    torch.manual_seed(0)
    lengths = [7, 1, 13, 7, 3, 20]
    N, d = sum(lengths), 16
    q = torch.randn(1, heads[0], N, d, requires_grad=True)
    k = torch.randn(1, heads[1], N, d, requires_grad=True)
    v = torch.randn(1, heads[1], N, d, requires_grad=True)
    cu = torch.tensor([0, 7, 8, 21, 28, 31, 51], dtype=torch.int32)
    out = varlen_sdpa(q, k, v, cu, max_waste=max_waste)
    ref = _reference_attention(q, k, v, lengths)
    assert out.shape == (1, N, heads[0], d)
    assert (out.double() - ref).abs().max() < 1e-5
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() < 1e-5


def test_varlen_sdpa_rejects_bad_boundaries():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        varlen_sdpa(q, q, q, torch.tensor([0, 3, 3, 5]))
    with pytest.raises(ValueError, match="cu_seq_lens"):
        varlen_sdpa(q, q, q, torch.tensor([0, 4]))


# ---------------------------------------------------------------------------- model
def _tiny_qwen2(attn="sdpa", seed=0, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return Qwen2ForCausalLM(cfg)


LENGTHS = [(3, 9), (5, 2), (2, 14), (4, 6), (6, 1)]


def _packed_hidden(model, p):
    with packed_forward(model):
        out = model.model(input_ids=p.input_ids, use_cache=False, **p.model_kwargs())
    return out.last_hidden_state[0, p.response_index]


def _padded_hidden(model, rs, rows):
    b = collate(rs, rows, pad_token_id=0)
    h = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                    use_cache=False).last_hidden_state
    return response_hidden(h, b.response_index)[b.response_mask]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_forward_and_grads_match_padded(checkpointing):
    """Same hidden states and parameter gradients as the padded layout; with gradient
    checkpointing the backward recomputes the layers outside the packed forward."""
    model = _tiny_qwen2("sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rs, rows = _rollouts(LENGTHS), [3, 0, 4, 2, 1]
    p = pack(rs, rows)
    weights = torch.randn(p.num_response_tokens, 32)

    def grads(hidden):
        model.zero_grad()
        (hidden * weights).sum().backward()
        return {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}

    packed = _packed_hidden(model, p)
    padded = _padded_hidden(model, rs, rows)
    assert model.config._attn_implementation == VARLEN_SDPA
    assert packed.shape == padded.shape == (p.num_response_tokens, 32)
    assert (packed - padded).abs().max() < 1e-5
    gp, gq = grads(packed), grads(padded)
    assert gp.keys() == gq.keys() and len(gp) > 0
    for name in gp:
        err = ((gp[name] - gq[name]).norm() / gq[name].norm().clamp_min(1e-12)).item()
        assert err < 1e-5, (name, err)


def test_packed_forward_matches_transformers_block_mask():
    """transformers' own packed-sequence support (attention_mask=None, packed position_ids ->
    dense block-diagonal SDPA mask) is an independent reference for the varlen path."""
    model = _tiny_qwen2("sdpa").eval()
    p = pack(_rollouts(LENGTHS), range(len(LENGTHS)))
    with torch.no_grad():
        ours = _packed_hidden(model, p)
        lib = model.model(input_ids=p.input_ids, position_ids=p.position_ids,
                          use_cache=False).last_hidden_state[0, p.response_index]
        unpacked = model.model(input_ids=p.input_ids, use_cache=False).last_hidden_state
    assert (ours - lib).abs().max() < 1e-5
    assert (unpacked[0, p.response_index] - lib).abs().max() > 1e-3  # the mask matters


def test_enabled_model_unpacked_calls_equal_sdpa():
    """After enable_packed_attention, padded (masked) and plain calls are transformers' SDPA."""
    ref, model = _tiny_qwen2("sdpa").eval(), _tiny_qwen2("sdpa").eval()
    assert enable_packed_attention(model) == VARLEN_SDPA == enable_packed_attention(model)
    rs = _rollouts(LENGTHS)
    b = collate(rs, range(len(LENGTHS)), pad_token_id=0)
    with torch.no_grad():
        for kwargs in ({"attention_mask": b.attention_mask}, {}):
            out = model.model(input_ids=b.input_ids, use_cache=False, **kwargs).last_hidden_state
            exp = ref.model(input_ids=b.input_ids, use_cache=False, **kwargs).last_hidden_state
            assert (out - exp).abs().max() < 1e-6
        gen = model.generate(b.input_ids[:2, :3], max_new_tokens=4, do_sample=False)
        assert gen.tolist() == ref.generate(b.input_ids[:2, :3], max_new_tokens=4,
                                            do_sample=False).tolist()


def test_enable_packed_attention_rejects_other_implementations():
    for attn in ("eager", "flex_attention"):
        model = _tiny_qwen2("sdpa")
        model.config._attn_implementation = attn
        with pytest.raises(ValueError, match="packing=false"):
            enable_packed_attention(model)
