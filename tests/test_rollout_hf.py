"""HF rollout engine: exact prefix continuation, batching/padding, stops, seeds, log-probs.

References are independent and straightforward: a cache-free greedy loop over the growing
unpadded sequence, and full-logits fp64 log-probs of the finished responses. The helpers at
the top are also used by tests/test_rollout_vllm.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF engine needs transformers")

from prefix_rft.kernels import linear_logprob_entropy  # noqa: E402
from prefix_rft.rollout import (  # noqa: E402
    RolloutRequest,
    SamplingSettings,
    continuation_mask_for,
    logprob_mismatch,
    make_engine,
)
from prefix_rft.rollout.hf import apply_top_k_top_p  # noqa: E402

EOS = 3


def tiny_qwen2(seed: int = 0, vocab: int = 128) -> torch.nn.Module:
    """fp32 2-layer Qwen2 with head_dim 32 (a size vLLM's CPU attention supports)."""
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=EOS,
        bos_token_id=1, pad_token_id=0, initializer_range=0.1, torch_dtype="float32")
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).float().eval()


def trainer_logprobs(model, request: RolloutRequest, sample, temperature: float,
                     fp64_reference: bool = False) -> list[float]:
    """The trainer's log-probs of a sample's continuation tokens: one unpadded forward of
    prompt + response, then the fused kernel (or fp64 full logits) at ``temperature``."""
    ids = torch.tensor([list(request.prompt_ids) + sample.response_ids])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
        labels = ids[0, 1:]
        if fp64_reference:
            logits = hidden.double() @ model.lm_head.weight.double().T
            logprob = (logits / temperature).log_softmax(-1).gather(1, labels[:, None])[:, 0]
        else:
            logprob, _ = linear_logprob_entropy(hidden, model.lm_head.weight, labels,
                                                temperature=temperature, impl="torch")
    first = len(request.prompt_ids) + sample.prefix_len - 1  # predicts the 1st continuation
    return logprob[first:].tolist()


def greedy_reference(model, context: list[int], steps: int, stop_ids=()) -> list[int]:
    """Cache-free greedy decoding of one unpadded sequence."""
    ids = list(context)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token in stop_ids:
                break
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on 1 thread; on a busy 2-core machine OpenMP spin-waits make
    2 threads up to 10x slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2()


def _requests(sampling, n=1):
    return [RolloutRequest([5, 6, 7, 8, 9], [10, 11, 12], n=n, sampling=sampling),
            RolloutRequest([20, 21], [], n=n, sampling=sampling),
            RolloutRequest([30, 31, 32], [40, 41, 42, 43, 44, 45, 46], n=n, sampling=sampling)]


def test_continues_after_prefix_with_mixed_lengths(model):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=1)
    requests = _requests(sampling, n=3)
    engine = make_engine("hf", model, None, eos_token_ids=())
    results = engine.generate(requests)
    assert [len(r) for r in results] == [3, 3, 3]
    for request, samples in zip(requests, results):
        for sample in samples:
            assert sample.prefix_len == len(request.prefix_ids)
            assert sample.response_ids[:sample.prefix_len] == list(request.prefix_ids)
            # no stop ids: every continuation runs to the response budget (prefix included)
            assert len(sample.response_ids) == sampling.max_new_tokens
            assert len(sample.logprobs) == sampling.max_new_tokens - sample.prefix_len
            assert sample.finish_reason == "length"
        assert len({tuple(s.continuation_ids) for s in samples}) > 1  # n samples differ


def test_greedy_batched_matches_cache_free_reference(model):
    """Left padding + KV cache + mixed prefix lengths change nothing: each row equals a
    cache-free greedy loop over its own unpadded context."""
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=14)
    requests = _requests(sampling)
    engine = make_engine("hf", model, None, eos_token_ids=())
    for request, (sample,) in zip(requests, engine.generate(requests)):
        expected = greedy_reference(model, request.context_ids, request.continuation_budget)
        assert sample.continuation_ids == expected
        reference = trainer_logprobs(model, request, sample, 1.0, fp64_reference=True)
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64),
                                   torch.tensor(reference, dtype=torch.float64), atol=1e-5,
                                   rtol=0)


def test_sampled_logprobs_match_trainer(model):
    """Sampled continuations' engine log-probs == trainer log-probs at the same temperature
    (the mismatch metric the trainer logs)."""
    temperature = 0.7
    sampling = SamplingSettings(temperature=temperature, max_new_tokens=16, seed=3)
    requests = _requests(sampling, n=2)
    engine = make_engine("hf", model, None, eos_token_ids=())
    results = engine.generate(requests)
    samples = [s for samples in results for s in samples]
    flat_requests = [r for r in requests for _ in range(r.n)]
    width = max(len(s.response_ids) for s in samples)
    trainer = torch.zeros(len(samples), width)
    for b, (request, sample) in enumerate(zip(flat_requests, samples)):
        values = trainer_logprobs(model, request, sample, temperature)
        trainer[b, sample.prefix_len:len(sample.response_ids)] = torch.tensor(values)
    stats = logprob_mismatch([s.logprobs for s in samples], trainer,
                             continuation_mask_for(samples, width))
    assert stats["num_tokens"] == sum(len(s.logprobs) for s in samples)
    assert stats["mismatch_max"] < 1e-4, stats


def test_stop_token_ends_with_stop_reason(model):
    engine = make_engine("hf", model, None, eos_token_ids=())
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
    request = RolloutRequest([5, 6, 7], [8], sampling=greedy)
    free_run = engine.generate([request])[0][0].continuation_ids
    stop_token = free_run[3]
    first = free_run.index(stop_token)
    stopped = RolloutRequest([5, 6, 7], [8], sampling=SamplingSettings(
        temperature=0.0, max_new_tokens=10, stop_token_ids=(stop_token,)))
    # Same stop id as the engine's EOS instead of the request's stop ids.
    eos_engine = make_engine("hf", model, None, eos_token_ids=(stop_token,))
    for eng, req in ((engine, stopped), (eos_engine, request)):
        sample = eng.generate([req, RolloutRequest([9, 9], sampling=greedy)])[0][0]
        assert sample.finish_reason == "stop"
        assert sample.continuation_ids == free_run[:first + 1]
        assert len(sample.logprobs) == first + 1


def test_default_eos_comes_from_model_config(model):
    engine = make_engine("hf", model, None)
    assert engine.eos_token_ids == (EOS,)


def test_seed_determinism_and_batch_independence(model):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=10, seed=7)
    request = RolloutRequest([5, 6, 7], [8, 9], n=2, sampling=sampling)
    engine = make_engine("hf", model, None, eos_token_ids=())
    alone = engine.generate([request])[0]
    other = RolloutRequest([50, 51, 52, 53, 54, 55], n=3,
                           sampling=SamplingSettings(temperature=1.0, max_new_tokens=10))
    in_batch = engine.generate([other, request])[1]
    again = make_engine("hf", model, None, eos_token_ids=(), seed=123).generate([request])[0]
    ids = [[s.response_ids for s in samples] for samples in (alone, in_batch, again)]
    assert ids[0] == ids[1] == ids[2]
    reseeded = RolloutRequest([5, 6, 7], [8, 9], n=2, sampling=SamplingSettings(
        temperature=1.0, max_new_tokens=10, seed=8))
    assert [s.response_ids for s in engine.generate([reseeded])[0]] != ids[0]


def test_sampling_follows_the_filtered_distribution(model):
    """First-token frequencies over many samples follow softmax(filter(logits / T)); tokens
    outside top-k never appear; reported log-probs are of the renormalized distribution."""
    temperature, top_k = 0.8, 5
    context = [5, 6, 7]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
    scaled = logits / temperature
    kept = scaled >= scaled.topk(top_k).values[-1]
    expected = torch.where(kept, scaled, torch.tensor(float("-inf"))).softmax(-1)
    sampling = SamplingSettings(temperature=temperature, top_k=top_k, max_new_tokens=1, seed=0)
    engine = make_engine("hf", model, None, eos_token_ids=(), max_batch_rows=4000)
    samples = engine.generate([RolloutRequest(context, n=4000, sampling=sampling)])[0]
    tokens = torch.tensor([s.continuation_ids[0] for s in samples])
    assert bool(kept[tokens].all())
    counts = torch.bincount(tokens, minlength=logits.numel()).double() / tokens.numel()
    assert 0.5 * (counts - expected).abs().sum() < 0.05  # total variation
    reported = torch.tensor([s.logprobs[0] for s in samples], dtype=torch.float64)
    torch.testing.assert_close(reported, expected.log()[tokens], atol=1e-5, rtol=0)


def test_top_p_matches_independent_nucleus_rule():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 2
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99, 1.0, 0.3])
    out = apply_top_k_top_p(logits, torch.zeros(6, dtype=torch.long), top_p)
    for row in range(6):
        probs = logits[row].double().softmax(-1)
        ranked = probs.sort(descending=True)
        mass_before = ranked.values.cumsum(0) - ranked.values  # of strictly better tokens
        keep = torch.zeros(50, dtype=torch.bool)
        keep[ranked.indices[mass_before < top_p[row].double() - 1e-9]] = True
        assert torch.equal(torch.isfinite(out[row]), keep), row


def test_train_mode_restored_and_no_grad(model):
    model.train()
    try:
        engine = make_engine("hf", model, None)
        engine.load_weights([])  # no-op by contract: the engine uses the live module
        engine.sleep()
        engine.wake()
        engine.generate([RolloutRequest([1, 2], sampling=SamplingSettings(max_new_tokens=3))])
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs", [
    dict(prompt_ids=[]),
    dict(prompt_ids=[1], n=0),
    dict(prompt_ids=[1], prefix_ids=[2, 3, 4], sampling=SamplingSettings(max_new_tokens=3)),
    dict(prompt_ids=[1], prefix_ids=[2, 3, 4, 5], sampling=SamplingSettings(max_new_tokens=3)),
    dict(prompt_ids=[1, -2]),
    dict(prompt_ids=[1], sampling="greedy"),
])
def test_bad_requests_raise(kwargs):
    with pytest.raises(ValueError):
        RolloutRequest(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(max_new_tokens=0), dict(seed=-1)])
def test_bad_sampling_settings_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingSettings(**kwargs)


def test_make_engine_rejects_unknown_name(model):
    with pytest.raises(ValueError, match="engine name"):
        make_engine("sglang", model, None)


def test_logprob_mismatch_against_direct_computation():
    engine = [[-1.0, -2.0], [-0.5]]
    trainer = torch.tensor([[9.0, -1.5, -2.0], [9.0, -0.25, 9.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    stats = logprob_mismatch(engine, trainer, mask)
    assert stats["mismatch_mean"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert stats["mismatch_max"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="row 1"):
        logprob_mismatch([[-1.0, -2.0], [-0.5, -0.1]], trainer, mask)
    with pytest.raises(ValueError):
        logprob_mismatch(engine, trainer, mask.float())


def test_benchmark_smoke_runs_hf_engine():
    """benchmarks/rollout.py --smoke (HF engine only here; the vLLM file covers vLLM)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.rollout import main

    (row,) = main(["--smoke", "--engines", "hf"])
    extra = dict(item.split("=") for item in row["extra"].split(";"))
    assert float(extra["tokens_per_s"]) > 0
    assert float(extra["mismatch_max"]) < 1e-4


# ---------------------------------------------------------------- inverse-CDF sampler
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_inverse_cdf_sampler_follows_the_distribution_chi_square():
    """60,000 draws over a 7-token vocabulary with two masked tokens (fixed seed): the
    chi-square statistic against softmax(processed) stays below the 0.1% critical value of
    chi2(4 dof) = 18.47, masked tokens never appear, and a sampler biased by one token's
    probability times 1.1 would fail the same check (the check can fail)."""
    from prefix_rft.rollout.hf import sample_inverse_cdf

    processed = torch.tensor([[0.3, -1.2, float("-inf"), 2.0, 0.0, float("-inf"), -0.4]])
    probs = processed[0].double().softmax(-1)
    draws = 60_000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(11))
    tokens, logprobs = sample_inverse_cdf(processed.expand(draws, -1).contiguous(), uniforms)
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[2] == 0 and counts[5] == 0
    assert _chi_square(counts, probs) < 18.47
    biased = probs.clone()
    biased[3] *= 1.1
    assert _chi_square(counts, biased / biased.sum()) > 18.47
    # log-probs exact: equal to log_softmax of the processed row at the drawn token
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], atol=1e-6, rtol=0)


def test_inverse_cdf_edge_uniforms_never_draw_a_masked_token():
    from prefix_rft.rollout.hf import sample_inverse_cdf

    processed = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.5, float("-inf")]] * 3)
    almost_one = torch.tensor(1.0).nextafter(torch.tensor(0.0))
    tokens, logprobs = sample_inverse_cdf(processed, torch.stack(
        [torch.tensor(0.0), almost_one, torch.tensor(0.5)]))
    assert tokens.tolist()[0] == 3 and tokens.tolist()[1] == 1
    assert torch.isfinite(logprobs).all()


def test_engine_logprobs_equal_log_softmax_for_every_setting():
    """The engine's one-logsumexp log-probs equal ``log_softmax(filter(logits / T))`` at the
    drawn token (greedy rows: of the raw logits), for mixed settings in one batch."""
    from prefix_rft.rollout.hf import HFEngine

    engine = HFEngine(tiny_qwen2(), eos_token_ids=(), seed=3)
    torch.manual_seed(5)
    logits = torch.randn(4, 128) * 3
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3])
    top_k = torch.tensor([0, 10, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8])
    tokens, logprobs = engine._sample(logits, temperature, top_k, top_p, [None] * 4)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    processed = apply_top_k_top_p(logits / safe_t[:, None], top_k, top_p)
    expected = processed.double().log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=0)
    assert tokens[2] == logits[2].argmax()
