"""Rollout engines behind one interface (see ``base.py`` for the contract).

``make_engine("hf", policy_model, tokenizer_or_None, **settings)`` -- built-in sampler over
the live transformers model (no extra dependency); ``make_engine("vllm", model_dir_or_model,
tokenizer_or_None, **settings)`` -- colocated ``vllm.LLM`` (vllm imported only then).
"""

from __future__ import annotations

from .base import (
    RolloutEngine,
    RolloutRequest,
    RolloutSample,
    SamplingSettings,
)
from .mismatch import continuation_mask_for, logprob_mismatch

ENGINES = ("hf", "vllm")

__all__ = ["ENGINES", "RolloutEngine", "RolloutRequest", "RolloutSample", "SamplingSettings",
           "continuation_mask_for", "logprob_mismatch", "make_engine"]


def make_engine(name: str, model, tokenizer=None, **settings) -> RolloutEngine:
    """Build the engine called ``name`` ("hf" or "vllm"); ``settings`` go to its constructor
    (``HFEngine``: eos_token_ids, max_batch_rows, seed; ``VLLMEngine``: dtype,
    gpu_memory_utilization, enforce_eager, max_model_len, eos_token_ids, seed, sleep_level,
    cpu_kv_cache_gib and any ``vllm.LLM`` keyword)."""
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(model, tokenizer, **settings)
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **settings)
    raise ValueError(f"engine name must be one of {ENGINES}, got {name!r}")
