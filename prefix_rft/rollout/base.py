"""The rollout-engine interface: requests, samples, and the methods every engine provides.

A request asks for ``n`` samples that continue ``prompt_ids + prefix_ids``; every sample
comes back as ``response_ids = prefix_ids + continuation`` with ``prefix_len =
len(prefix_ids)``, so the loss sees exactly the prefix that was generated from (ids are
never decoded and re-encoded).

Length budget. ``SamplingSettings.max_new_tokens`` is the maximum *response* length, and
the response counts the prefix: a request with a prefix of L tokens gets at most
``max_new_tokens - L`` continuation tokens. A prefix must leave room for at least one
continuation token (``L < max_new_tokens``), else the request is rejected.

Stopping. A continuation ends at the first token in ``sampling.stop_token_ids`` or in the
engine's EOS ids (the stop token is kept in the response and gets a log-prob), with
``finish_reason="stop"``; otherwise it runs to the budget, ``finish_reason="length"``.

Log-prob convention (both engines; what vLLM calls ``logprobs_mode="processed_logprobs"``).
``logprobs[t]`` is the log-probability of continuation token t under the distribution it
was sampled from: ``log_softmax(filter(logits / temperature))`` where ``filter`` is top-k
then top-p masking exactly as vLLM applies them (masked logits -> -inf, so top-k / top-p
*renormalize* the kept tokens). With the RL defaults ``top_p=1.0, top_k=0`` this is the plain
temperature-scaled log-prob, i.e. what the trainer computes with
``linear_logprob_entropy(hidden, weight, labels, temperature=T)``. Greedy requests
(``temperature=0``) report the unfiltered ``log_softmax(logits)`` of the argmax token, as
vLLM does. Only continuation tokens have log-probs (prefix tokens were not sampled).

Typical use by a trainer (one engine per rank under torchrun; data parallel)::

    engine = engine_class(cfg.rollout.engine).from_config(cfg, policy, tokenizer,
                                                          device=device, rank=rank)
    with engine.generation_context(policy):   # e.g. FSDP2 weights gathered for the HF engine
        samples = engine.generate([RolloutRequest(prompt, prefix, n=8, sampling=s), ...])
    engine.sleep()                      # vLLM on GPU: free its memory for the update
    ...optimizer step on the policy...
    engine.sync_from(policy)            # wake + load the new weights (no-op for the HF engine)

Adding an engine: subclass :class:`RolloutEngine` in a new file (``generate``,
``load_weights``, ``from_config``; override ``sync_from`` / ``generation_context`` /
``from_pretrained`` / ``sleep`` / ``wake`` where the defaults do not fit) and add one line to
``ENGINES`` in ``prefix_rft/rollout/__init__.py``; the config, the loop and ``prefix-rft
eval --engine`` pick it up from there.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_REASONS = ("stop", "length")
#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``; both engines use it).
GREEDY_TEMPERATURE = 1e-5


def _as_token_ids(values: Sequence[int], name: str) -> tuple[int, ...]:
    """Validate a token-id sequence (ints >= 0) and return it as a tuple of Python ints."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape "
                             f"{tuple(values.shape)}")
        values = values.tolist()
    ids = tuple(values)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{name} must hold non-negative int token ids, got {token!r}")
    return ids


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample. ``top_k`` 0 or -1 and ``top_p`` 1.0 switch that filter off;
    ``temperature`` 0 (below 1e-5) means greedy; ``max_new_tokens`` is the max response length
    (prefix + continuation); ``seed`` None draws from the engine's own random stream."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 = off), got {self.top_k!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids",
                           _as_token_ids(self.stop_token_ids, "stop_token_ids"))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0


@dataclass(frozen=True)
class RolloutRequest:
    """``n`` samples continuing ``prompt_ids + prefix_ids`` (prefix may be empty)."""

    prompt_ids: Sequence[int]
    prefix_ids: Sequence[int] = ()
    n: int = 1
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def __post_init__(self):
        prompt = _as_token_ids(self.prompt_ids, "prompt_ids")
        prefix = _as_token_ids(self.prefix_ids, "prefix_ids")
        if not prompt:
            raise ValueError("prompt_ids must be non-empty")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.sampling, SamplingSettings):
            raise ValueError(f"sampling must be a SamplingSettings, got {type(self.sampling)}")
        if len(prefix) >= self.sampling.max_new_tokens:
            raise ValueError(
                f"prefix_ids has {len(prefix)} tokens but the max response length "
                f"(sampling.max_new_tokens, prefix included) is {self.sampling.max_new_tokens}; "
                "the prefix must be shorter so that at least one token is generated")
        object.__setattr__(self, "prompt_ids", prompt)
        object.__setattr__(self, "prefix_ids", prefix)

    @property
    def context_ids(self) -> list[int]:
        """What the engine continues from: prompt followed by prefix."""
        return list(self.prompt_ids) + list(self.prefix_ids)

    @property
    def continuation_budget(self) -> int:
        """Max number of sampled tokens: the response budget minus the prefix."""
        return self.sampling.max_new_tokens - len(self.prefix_ids)


@dataclass
class RolloutSample:
    """One sample. ``response_ids = prefix + continuation``; ``logprobs`` has one entry per
    continuation token (``len(logprobs) == len(response_ids) - prefix_len``)."""

    response_ids: list[int]
    prefix_len: int
    finish_reason: str
    logprobs: list[float]

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, "
                             f"got {self.finish_reason!r}")
        if len(self.logprobs) != len(self.response_ids) - self.prefix_len:
            raise ValueError("logprobs must have one entry per continuation token: "
                             f"{len(self.logprobs)} != {len(self.response_ids)} - "
                             f"{self.prefix_len}")

    @property
    def continuation_ids(self) -> list[int]:
        return self.response_ids[self.prefix_len:]


def finish_reason_for(continuation: Sequence[int], stop_ids: set[int]) -> str:
    """The shared rule: "stop" when the last token is a stop/EOS id, else "length"."""
    return "stop" if continuation and continuation[-1] in stop_ids else "length"


def validate_requests(requests: Sequence[RolloutRequest]) -> list[RolloutRequest]:
    requests = list(requests)
    for i, request in enumerate(requests):
        if not isinstance(request, RolloutRequest):
            raise ValueError(f"requests[{i}] must be a RolloutRequest, got {type(request)}")
    return requests


def eos_ids_from(*values) -> tuple[int, ...]:
    """Collect EOS ids from config values that may be None, an int or a list of ints."""
    ids: list[int] = []
    for value in values:
        if value is None:
            continue
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


class RolloutEngine(ABC):
    """What the trainer codes against. Engines are not thread-safe."""

    name: str = "base"
    #: EOS ids every request stops at, in addition to its ``sampling.stop_token_ids``.
    eos_token_ids: tuple[int, ...] = ()

    def stop_ids_for(self, request: RolloutRequest) -> set[int]:
        return set(self.eos_token_ids) | set(request.sampling.stop_token_ids)

    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[RolloutSample]]:
        """One inner list of ``request.n`` samples per request, in request order."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bring the engine's weights up to date with the policy (HF-style names)."""

    def sleep(self) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Release accelerator memory before the policy update (no-op where not needed)."""

    def wake(self) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Reclaim what :meth:`sleep` released; call before ``load_weights``/``generate``."""

    def close(self) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Free the engine's resources (optional)."""

    # ------------------------------------------------------------ what the loop asks for
    @classmethod
    def from_config(cls, cfg: Any, model: torch.nn.Module, tokenizer: Any, *,
                    device: torch.device, rank: int) -> RolloutEngine:
        """The engine of a training run: ``cfg`` is the run's
        :class:`prefix_rft.config.Config`, ``model`` the (possibly FSDP2-wrapped) policy on
        ``device``, ``rank`` this process's rank (one engine per rank)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a training config")

    @classmethod
    def from_pretrained(cls, model_dir: str, tokenizer: Any, *, device: torch.device,
                        seed: int = 0, gpu_memory_utilization: float = 0.85) -> RolloutEngine:
        """An engine over a saved HF model directory (``prefix-rft eval``);
        ``gpu_memory_utilization`` applies to engines that reserve GPU memory."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a model directory")

    def sync_from(self, model: torch.nn.Module) -> None:
        """Bring the engine's weights up to the policy's after an optimizer step.

        Default, for engines holding their own copy: gather the full state dict (every rank
        has its own engine, so every rank gathers; LoRA adapters merged into their base
        weights), :meth:`wake`, :meth:`load_weights`."""
        from ..runtime.distributed import gather_merged_state_dict

        state = gather_merged_state_dict(model, rank0_only=False)  # LoRA merged into W
        self.wake()
        self.load_weights(state.items())

    @classmethod
    def memory_terms(cls, shape: Any, inp: Any, eng: Any, gpu_bytes: float) -> dict[str, float]:
        """What this engine holds per rank, in bytes, for ``prefix-rft plan``: ``rollout``
        (while it generates), ``update`` (while the policy updates), ``weights``,
        ``kv_cache`` and ``kv_tokens``. ``shape``: a ``memory_model.ModelShape``; ``inp``:
        its ``PlanInputs``; ``eng``: ``plan.EngineInputs``. Default: nothing held."""
        return {"rollout": 0.0, "update": 0.0, "weights": 0.0, "kv_cache": 0.0,
                "kv_tokens": 0.0}

    def generation_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Entered around every :meth:`generate` call of the loop (default: nothing; an
        engine that runs the live policy module gathers its FSDP2 shards here)."""
        return contextlib.nullcontext()
