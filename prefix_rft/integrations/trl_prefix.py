"""Hybrid prefix rollouts inside TRL, through ``GRPOTrainer(rollout_func=...)``.

:func:`make_prefix_rollout_func` returns a TRL ``rollout_func`` that, for each group of
``num_generations`` rows of one prompt, starts ``num_prefixed`` rollouts from a prefix of the
prompt's demonstration (Prefix-RFT's scheduled ratio: ``low_t`` from
:func:`prefix_rft.prefix.prefix_low_bound` at ``trainer.state.global_step``, ratio
``~ U(low_t, high)``, token-level cut) and samples the rest on-policy. Generation is this
project's HF engine (:class:`prefix_rft.rollout.hf.HFEngine`) on the live policy: the engine
continues ``prompt + prefix`` token ids, so the prefix the loss sees is exactly the one
generated from. Each completion is ``prefix + continuation``; its ``prefix_len`` goes to TRL as
an extra field, and :class:`~prefix_rft.integrations.trl.PrefixRFTGRPOTrainer` turns it into
the batch's ``prefix_mask``, on which the loss keeps the advantage of only the top
``entropy_top_fraction`` prefix tokens by entropy (per micro-batch, as in the authors' code).

Limits (each refused with a one-line ``ValueError``): plain-text prompts (apply the chat
template in the dataset), ``use_vllm=False`` (TRL's vLLM paths are not reachable from a
rollout function without TRL internals), sampling by ``temperature`` / ``top_p`` / ``top_k``
only. Single-process tested. TRL marks ``rollout_func`` experimental.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..prefix import cut_prefix, prefix_low_bound, step_ratios


def _check_trainer(trainer) -> None:
    args = trainer.args
    if trainer.use_vllm:
        raise ValueError("use_vllm=True: the prefix rollout function generates with the HF engine")
    if getattr(args, "min_p", None) not in (None, 0.0):
        raise ValueError(f"min_p={args.min_p}: the prefix rollout function samples with "
                         "temperature / top_p / top_k only")
    if getattr(args, "repetition_penalty", 1.0) != 1.0:
        raise ValueError(f"repetition_penalty={args.repetition_penalty} is not supported by the "
                         "prefix rollout function")


def make_prefix_rollout_func(
    demonstrations: Mapping[str, str],
    *,
    num_prefixed: int = 1,
    schedule: str = "cosine",
    start: float = 0.95,
    end: float = 0.05,
    decay_steps: int = 500,
    high: float = 0.95,
    min_prefix_tokens: int = 1,
    seed: int = 0,
    max_batch_rows: int = 64,
):
    """A TRL ``rollout_func`` for Prefix-RFT hybrid rollouts (see the module docstring).

    Args:
        demonstrations: prompt text -> demonstration text (e.g.
            ``dict(zip(ds["prompt"], ds["solution"]))``); prompts without one get on-policy
            rollouts only.
        num_prefixed: hybrid rollouts per group (< ``num_generations``).
        schedule, start, end, decay_steps: the prefix-ratio lower bound ``low_t``
            (:func:`prefix_rft.prefix.prefix_low_bound`; steps are optimizer steps);
            ``"step"`` holds the ratio itself at ``start`` then ``end`` (no draw), as
            ``prefix.schedule: step``.
        high: upper end of the ratio draw.
        min_prefix_tokens: shortest prefix, tokens.
        seed: seeds the ratio draws and the engine's sampling (offset by the step).
        max_batch_rows: generation batch rows of the HF engine.

    Returns:
        ``rollout_func(prompts, trainer) -> dict`` with ``prompt_ids``, ``completion_ids``,
        ``logprobs`` (None: same-process generation has no engine mismatch to correct) and
        ``prefix_len`` (one int per completion).
    """
    if not isinstance(demonstrations, Mapping):
        raise ValueError("demonstrations must map prompt text to demonstration text")
    if isinstance(num_prefixed, bool) or not isinstance(num_prefixed, int) or num_prefixed < 0:
        raise ValueError(f"num_prefixed must be an int >= 0, got {num_prefixed!r}")
    prefix_low_bound(0, schedule=schedule, start=start, end=end, decay_steps=decay_steps)
    demo_ids: dict[str, list[int]] = {}

    def rollout_func(prompts: list, trainer) -> dict:
        from ..rollout.base import RolloutRequest, SamplingSettings
        from ..rollout.hf import HFEngine

        _check_trainer(trainer)
        G = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if num_prefixed >= G:
            raise ValueError(f"num_prefixed={num_prefixed} must be < num_generations={G}")
        if len(prompts) % G:
            raise ValueError(f"rollout_func got {len(prompts)} prompts, not groups of {G}")
        tok, step = trainer.processing_class, int(trainer.state.global_step)
        low = prefix_low_bound(step, schedule=schedule, start=start, end=end,
                               decay_steps=decay_steps)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        sampling = SamplingSettings(temperature=float(trainer.temperature),
                                    top_p=float(trainer.args.top_p or 1.0),
                                    top_k=int(trainer.args.top_k or 0),
                                    max_new_tokens=int(trainer.max_completion_length))
        requests, prompt_ids = [], []
        for g0 in range(0, len(prompts), G):
            prompt = prompts[g0]
            if not isinstance(prompt, str):
                raise ValueError("the prefix rollout function needs plain-text prompts (apply the "
                                 "chat template in the dataset)")
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            demo = demonstrations.get(prompt)
            if demo is not None and prompt not in demo_ids:
                demo_ids[prompt] = tok(demo, add_special_tokens=False)["input_ids"]
            d_ids = demo_ids.get(prompt, [])
            k = num_prefixed if len(d_ids) > 1 else 0
            ratios = step_ratios(k, low, schedule, high=high, generator=gen) + [None] * (G - k)
            for ratio in ratios:
                prefix = []
                if ratio is not None:  # the engine needs room for >= 1 generated token
                    prefix = cut_prefix(d_ids, ratio, min_prefix_tokens=min_prefix_tokens)
                    prefix = prefix[: sampling.max_new_tokens - 1]
                requests.append(RolloutRequest(prompt_ids=ids, prefix_ids=prefix, n=1,
                                               sampling=sampling))
                prompt_ids.append(list(ids))
        model = trainer.accelerator.unwrap_model(trainer.model)
        engine = HFEngine(model, tok, max_batch_rows=max_batch_rows, seed=seed + step)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                samples = [s[0] for s in engine.generate(requests)]
        finally:
            model.train(was_training)
        return {"prompt_ids": prompt_ids,
                "completion_ids": [list(s.response_ids) for s in samples],
                "logprobs": None,
                "prefix_len": [int(s.prefix_len) for s in samples]}

    return rollout_func


def prefix_mask_from_lengths(prefix_len: list[int], width: int, device) -> torch.Tensor:
    """``[B, width]`` bool, True on the first ``prefix_len[i]`` positions of row i."""
    lens = torch.tensor([int(n) for n in prefix_len], device=device)
    return torch.arange(width, device=device)[None, :] < lens[:, None]
