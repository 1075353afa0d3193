"""Rollout engines behind one interface (see ``base.py`` for the contract).

``ENGINES`` is the registry and the only list of engine names: the config's
``rollout.engine``, the training loop and ``prefix-rft eval --engine`` all read it. An entry
maps a name to ``"module:Class"`` (imported only when that engine is used, so vLLM stays
optional). Adding an engine is one file plus one line here (or ``register_engine`` at run
time, e.g. from a plugin or a test).

``make_engine("hf", policy_model, tokenizer_or_None, **settings)`` -- built-in sampler over
the live transformers model (no extra dependency); ``make_engine("vllm", model_dir_or_model,
tokenizer_or_None, **settings)`` -- colocated ``vllm.LLM`` (vllm imported only then).
"""

from __future__ import annotations

import importlib

from .base import (
    RolloutEngine,
    RolloutRequest,
    RolloutSample,
    SamplingSettings,
)
from .mismatch import continuation_mask_for, logprob_mismatch

ENGINES: dict[str, str | type[RolloutEngine]] = {
    "hf": "prefix_rft.rollout.hf:HFEngine",  # built-in sampler over the live policy module
    "vllm": "prefix_rft.rollout.vllm:VLLMEngine",  # colocated vllm.LLM, weights synced in
}
#: The engine used when none is given (it needs no extra dependency).
DEFAULT_ENGINE = "hf"

__all__ = ["DEFAULT_ENGINE", "ENGINES", "RolloutEngine", "RolloutRequest", "RolloutSample",
           "SamplingSettings", "continuation_mask_for", "engine_class", "engine_names",
           "logprob_mismatch", "make_engine", "register_engine"]


def engine_names() -> tuple[str, ...]:
    """The registered engine names, e.g. ``("hf", "vllm")``."""
    return tuple(ENGINES)


def register_engine(name: str, engine: str | type[RolloutEngine]) -> None:
    """Add (or replace) the engine called ``name``: a RolloutEngine subclass or
    ``"module:Class"``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(engine, str) and ":" not in engine:
        raise ValueError(f"engine must be a RolloutEngine subclass or 'module:Class', "
                         f"got {engine!r}")
    if not isinstance(engine, str) and not (isinstance(engine, type)
                                            and issubclass(engine, RolloutEngine)):
        raise ValueError(f"engine must be a RolloutEngine subclass, got {engine!r}")
    ENGINES[name] = engine


def engine_class(name: str) -> type[RolloutEngine]:
    """The class registered as ``name`` (imported on first use)."""
    if name not in ENGINES:
        raise ValueError(f"engine name must be one of {'|'.join(ENGINES)}, got {name!r}")
    target = ENGINES[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def make_engine(name: str, model, tokenizer=None, **settings) -> RolloutEngine:
    """Build the engine called ``name`` with its constructor; ``settings`` go to it
    (``HFEngine``: eos_token_ids, max_batch_rows, seed; ``VLLMEngine``: dtype,
    gpu_memory_utilization, enforce_eager, max_model_len, eos_token_ids, seed, sleep_level,
    cpu_kv_cache_gib and any ``vllm.LLM`` keyword)."""
    return engine_class(name)(model, tokenizer, **settings)
