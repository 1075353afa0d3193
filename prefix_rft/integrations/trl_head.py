"""TRL's fused-LM-head forward protocol, served by this project's fused kernel
(:func:`prefix_rft.kernels.linear_logprob_entropy`).

TRL (>= 1.15) patches the policy's ``forward`` so that
``model(input_ids, attention_mask, labels=labels, fused_lm_head=True)`` runs the backbone and
returns per-token ``log_probs`` / ``entropy`` (``[B, S-1]``, 0 where the shifted label is
-100) instead of ``[B, S, V]`` logits. :func:`add_prefix_rft_head` installs the same protocol
with this project's kernel: only the positions whose label is not -100 reach the kernel (TRL
1.16 scores every position, prompt included, on devices without Triton), and the
``[tokens x vocab]`` logits are never built, forward or backward.

Because the head runs inside ``model.forward``, it works wherever TRL's does: under DDP,
FSDP2 (a sharded lm_head weight is gathered with ``full_tensor()`` as TRL does), DeepSpeed
and PEFT (patch the base model), and gradients reach the lm_head weight through the module's
own forward.
"""

from __future__ import annotations

import functools
import types

import torch

from ..kernels import linear_logprob_entropy

# Config attributes that change the logits (soft-capping, scaling); the fused kernel computes
# plain ``hidden @ W.T / temperature`` and refuses models that set any of them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def check_model_supported(model) -> None:
    """Raise ``ValueError`` naming the setting if the fused head cannot reproduce ``model``."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        raise ValueError(
            f"model: vision-language models ({type(model).__name__}) are not supported by the "
            "prefix-rft fused head; use a text-only causal LM"
        )
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"model.config.{name}={value!r}: the prefix-rft fused head computes plain "
                "hidden @ lm_head.T / temperature and cannot apply it"
            )
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (lm_head)")


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2-sharded parameter) gathered to a plain tensor; others unchanged."""
    if t is not None and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


def fused_token_logprob_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    *,
    temperature: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy, mask)`` of ``labels [B, T]`` given ``hidden [B, T, H]``.

    ``mask = labels != -100``; both outputs are fp32 ``[B, T]``, 0 off-mask. Under autocast the
    kernel runs in the autocast dtype (as TRL's head does); otherwise ``hidden`` is cast to the
    lm_head weight's dtype (e.g. ``cast_lm_head_to_fp32``).
    """
    weight, bias = _full(lm_head.weight), _full(lm_head.bias)
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    mask = labels != -100
    rows = hidden[mask]
    dev_type = rows.device.type
    if torch.is_autocast_enabled(dev_type):
        dtype = torch.get_autocast_dtype(dev_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif rows.dtype != weight.dtype:
        rows = rows.to(weight.dtype)
    with torch.autocast(dev_type, enabled=False):
        logprob, entropy = linear_logprob_entropy(
            rows, weight, labels[mask], bias=bias, temperature=temperature, impl=impl
        )
    # masked_scatter (as TRL) keeps an all-masked micro-batch connected to the graph.
    log_probs = logprob.new_zeros(mask.shape).masked_scatter(mask, logprob)
    entropies = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
    return log_probs, entropies, mask


def add_prefix_rft_head(model, *, temperature: float = 1.0, impl: str = "auto") -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` use the prefix-rft fused kernel.

    Replaces (or adds) TRL's fused LM head on ``model`` (a ``PreTrainedModel`` causal LM; for
    PEFT pass ``peft_model.get_base_model()``). Calls without ``fused_lm_head=True`` (e.g.
    ``generate``) go to the previous forward unchanged.

    The fused call returns a ``trl.trainer.utils.FusedCausalLMOutput`` with ``log_probs``,
    ``entropy`` and ``label_mask`` (``[B, S-1]``, or ``[B, S]`` with ``shift_labels``) and
    ``loss`` = mean NLL over the labelled tokens (or ``/ num_items_in_batch``).

    Args:
        model: the causal LM whose ``forward`` TRL calls.
        temperature: the sampling temperature the logits are divided by (TRL's
            ``args.temperature``).
        impl: kernel implementation, ``"auto"`` (Triton on CUDA, chunked torch elsewhere),
            ``"torch"`` or ``"triton"``.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    check_model_supported(model)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be one of ('auto', 'torch', 'triton'), got {impl!r}")
    previous_forward = model.forward

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                       num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels,
                     "num_items_in_batch": num_items_in_batch}
            kwargs.update({k: v for k, v in extra.items() if v is not None})
            return previous_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits=True (MoE aux loss) is not supported by the "
                             "prefix-rft fused head")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        log_probs, entropy, mask = fused_token_logprob_entropy(
            hidden, targets, self.get_output_embeddings(), temperature=temperature, impl=impl
        )
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy, label_mask=mask
        )

    model.forward = types.MethodType(_fused_forward, model)
    model._prefix_rft_fused_head = {"temperature": float(temperature), "impl": impl}
