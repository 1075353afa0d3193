"""Prefix-RFT's fused loss inside TRL's ``GRPOTrainer`` (``pip install "prefix-rft[trl]"``).

Two drop-ins, for ``trl>=1.15,<1.17`` (checked on import, see
:mod:`prefix_rft.integrations.trl_compat`):

* :class:`PrefixRFTGRPOTrainer` -- a ``GRPOTrainer`` whose per-token log-probs and entropies
  come from the fused kernel over hidden states (no ``[tokens x vocab]`` logits) and whose
  Dr. GRPO loss is :func:`prefix_rft.loss.prefix_rft_loss`. Same constructor as
  ``GRPOTrainer`` plus ``entropy_top_fraction``, ``clip_c``, ``impl`` and
  ``train_on_prefix`` (``False``: hybrid prefixes condition the continuation but get no
  loss, as ``prefix.train_on_prefix: false`` in this project's trainer); keeps TRL's
  metrics (``entropy``, ``clip_ratio/*``) and adds ``prefix/*`` ones when the batch carries a
  ``prefix_mask``::

      from trl import GRPOConfig
      from prefix_rft.integrations.trl import PrefixRFTGRPOTrainer

      args = GRPOConfig(output_dir="out", loss_type="dr_grpo", beta=0.0, scale_rewards="none")
      trainer = PrefixRFTGRPOTrainer(model="Qwen/Qwen2.5-Math-1.5B", reward_funcs=reward_fn,
                                     args=args, train_dataset=dataset)
      trainer.train()

* :func:`use_fused_head` -- a one-call patch for a stock ``GRPOTrainer`` (any ``loss_type``,
  KL included): only TRL's log-prob/entropy head is replaced; TRL computes the loss.

**What the trainer honours.** ``loss_type="dr_grpo"`` with ``beta=0``: the loss is
``Σ ℓ_t·m_t / (B_micro · G · max_completion_length)`` with ``G`` the gradient accumulation
steps -- exactly TRL's ``Σ ℓ_t·m_t / (B_micro · max_completion_length) / G`` -- through
``num_sequences = B_micro × G``; on-policy steps (TRL's ``old_per_token_logps`` absent) use the
detached current log-probs; ``num_iterations > 1`` uses TRL's old log-probs; the vLLM
importance-sampling correction (any ``vllm_importance_sampling_mode``) multiplies the token
losses as in TRL; ``tool_mask`` / ``env_mask`` multiply the mask. Settings it cannot honour are
refused at construction with one line naming them (:func:`check_grpo_settings`).

**Where TRL internals are touched** -- all in :class:`PrefixRFTGRPOTrainer`, and the reason
the TRL versions are pinned: its ``_compute_loss`` (TRL's private loss hook, same in 1.15 and
1.16), its ``_generate_and_score_completions`` (only to add ``prefix_mask`` to TRL's batch for
hybrid rollouts) and the fused-head forward protocol (:mod:`prefix_rft.integrations.trl_head`).

**Hybrid prefix rollouts** (Prefix-RFT inside TRL): pass
``rollout_func=make_prefix_rollout_func(dict(zip(prompts, demonstrations)))`` to
:class:`PrefixRFTGRPOTrainer`; see :mod:`prefix_rft.integrations.trl_prefix`.
"""

from __future__ import annotations

from .trl_compat import SUPPORTED_TRL, check_trl_version

TRL_VERSION = check_trl_version()

import torch  # noqa: E402  (after the version check, which must fail before TRL imports)
from trl import GRPOTrainer  # noqa: E402

from ..loss import prefix_rft_loss  # noqa: E402
from .trl_head import add_prefix_rft_head  # noqa: E402
from .trl_prefix import (  # noqa: E402
    make_prefix_rollout_func,
    prefix_mask_from_lengths,
)

__all__ = ["PrefixRFTGRPOTrainer", "use_fused_head", "check_grpo_settings", "SUPPORTED_TRL",
           "TRL_VERSION", "add_prefix_rft_head", "make_prefix_rollout_func"]


def check_grpo_settings(args) -> None:
    """Raise ``ValueError`` naming every ``GRPOConfig`` setting the drop-in loss cannot honour."""
    refused = []
    if args.loss_type != "dr_grpo":
        refused.append(f"loss_type={args.loss_type!r} (only 'dr_grpo')")
    if args.beta != 0.0:
        refused.append(f"beta={args.beta} (no KL term: use beta=0, or use_fused_head() on a "
                       "stock GRPOTrainer)")
    if args.importance_sampling_level != "token":
        refused.append(f"importance_sampling_level={args.importance_sampling_level!r}")
    if args.delta is not None:
        refused.append(f"delta={args.delta} (two-sided clipping)")
    if args.off_policy_mask_threshold is not None:
        refused.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold}")
    if args.top_entropy_quantile != 1.0:
        refused.append(f"top_entropy_quantile={args.top_entropy_quantile} (the Prefix-RFT entropy "
                       "mask is entropy_top_fraction, on prefix tokens)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        refused.append("entropy_coef / use_adaptive_entropy (entropy bonus)")
    if refused:
        raise ValueError("PrefixRFTGRPOTrainer cannot honour: " + "; ".join(refused))


def _patch_target(model):
    """The module whose forward TRL calls: the PEFT base model, else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_fused_head(trainer, *, impl: str = "auto"):
    """Replace TRL's log-prob/entropy head of ``trainer`` (policy and reference model) with the
    prefix-rft fused kernel; TRL's own loss, metrics and settings are untouched.

    Call it after constructing the ``GRPOTrainer`` and before ``train()``. Returns ``trainer``.
    Refuses (``ValueError``) models whose logits the kernel cannot reproduce (soft-capping,
    logit scaling, vision-language models) and MoE router aux losses.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("router_aux_loss_coef != 0 (MoE aux loss) is not supported by the fused "
                         "head")
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            add_prefix_rft_head(_patch_target(model), temperature=trainer.temperature, impl=impl)
    return trainer


class PrefixRFTGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the fused head and the Prefix-RFT Dr. GRPO loss (see module doc).

    Args (besides ``GRPOTrainer``'s):
        entropy_top_fraction: share of *prefix* tokens (``inputs["prefix_mask"]``, present
            only with hybrid prefix rollouts) that keep their advantage, by entropy; the others
            get advantage 0. Without a prefix mask it has no effect.
        clip_c: dual-clip constant (> 1) or None.
        impl: kernel implementation (``"auto"``, ``"torch"``, ``"triton"``).
    """

    def __init__(self, *args, entropy_top_fraction: float = 0.2, clip_c: float | None = None,
                 impl: str = "auto", train_on_prefix: bool = True, **kwargs):
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if grpo_args is None:
            raise ValueError("args: PrefixRFTGRPOTrainer needs an explicit GRPOConfig with "
                             "loss_type='dr_grpo' and beta=0")
        check_grpo_settings(grpo_args)
        if not isinstance(train_on_prefix, bool):
            raise ValueError(f"train_on_prefix must be True or False, got {train_on_prefix!r}")
        super().__init__(*args, **kwargs)
        self.entropy_top_fraction, self.clip_c = entropy_top_fraction, clip_c
        self.train_on_prefix = train_on_prefix
        use_fused_head(self, impl=impl)

    # TRL-internal hooks (trl 1.15-1.16): the batch builder and the loss.
    def _generate_and_score_completions(self, inputs):
        """TRL's batch, plus ``prefix_mask`` when the rollout function returned ``prefix_len``
        (TRL merges a rollout function's extra fields into ``inputs``, row by row)."""
        output = super()._generate_and_score_completions(inputs)
        if inputs and "prefix_len" in inputs[0]:
            completion_ids = output["completion_ids"]
            output["prefix_mask"] = prefix_mask_from_lengths(
                [row["prefix_len"] for row in inputs], completion_ids.size(1),
                completion_ids.device)
        return output

    def _compute_loss(self, model, inputs):
        if any(k in inputs for k in ("pixel_values", "image_grid_thw", "token_type_ids")):
            raise ValueError("multimodal inputs are not supported by PrefixRFTGRPOTrainer")
        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T = completion_ids.size(1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-T] = -100
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        fused_lm_head=True)
        logprob, entropy = out.log_probs[:, -T:], out.entropy[:, -T:]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        prefix_mask = inputs.get("prefix_mask")
        has_prefix = prefix_mask is not None and self.train_on_prefix
        if prefix_mask is not None and not self.train_on_prefix:
            # QuestA / PrefixRL: the prefix conditions the continuation, gets no loss and no
            # entropy-mask work; the continuation keeps the sequence's advantage
            mask = mask * (~prefix_mask).to(mask.dtype)
            prefix_mask = None
        if prefix_mask is None:
            prefix_mask = torch.zeros_like(completion_ids, dtype=torch.bool)
        weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss, metrics = prefix_rft_loss(
            logprob, inputs.get("old_per_token_logps"), inputs["advantages"], mask, prefix_mask,
            entropy, max_response_tokens=self.max_completion_length, clip_low=self.epsilon_low,
            clip_high=self.epsilon_high, clip_c=self.clip_c,
            entropy_top_fraction=self.entropy_top_fraction,
            num_sequences=completion_ids.size(0) * accumulation, importance_weights=weights,
        )
        self._log_loss_metrics(mode, logprob, inputs, mask, entropy, metrics,
                               has_prefix=has_prefix)
        return loss

    @torch.no_grad()
    def _log_loss_metrics(self, mode, logprob, inputs, mask, entropy, metrics, has_prefix):
        """TRL's loss metrics (same names and reductions as ``GRPOTrainer``), plus prefix ones."""
        from trl.trainer.utils import nanmax, nanmin

        mask = mask.float()
        log = self._metrics[mode]

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]),
                                             reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        old = inputs.get("old_per_token_logps")
        ratio = torch.exp(logprob - old) if old is not None else torch.ones_like(logprob)
        adv = inputs["advantages"]
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        log["entropy"].append(global_masked_mean(entropy))
        log["clip_ratio/low_mean"].append(global_masked_mean(low))
        log["clip_ratio/high_mean"].append(global_masked_mean(high))
        log["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
        if has_prefix:
            keys = ("prefix_token_frac", "kept_prefix_frac", "entropy_prefix",
                    "entropy_continuation")
            local = torch.tensor([float(metrics[k]) for k in keys], device=mask.device)
            values = self.accelerator.gather(local[None]).mean(0).tolist()
            for key, value in zip(keys, values):
                log[f"prefix/{key}"].append(value)
