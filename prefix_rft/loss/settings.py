"""The policy loss's settings as one frozen object, validated once where it is built.

    settings = LossSettings(max_response_tokens=1024, clip_c=3.0, entropy_top_fraction=0.2)
    loss, metrics = prefix_rft_loss(logprob, old, adv, response_mask, prefix_mask, entropy,
                                    settings=settings, num_sequences=B)

The trainer builds it once from the config (:meth:`LossSettings.from_config`, which reads
the config keys in :data:`CONFIG_KEYS`; the config's checks validate through it too) and every
micro-batch's loss call takes it whole; what changes per call (``num_sequences``,
``loss_scale``, ``keep_prefix_mask``, ...) stays an argument of the call. A new loss option is a
field here with its check in :func:`check_loss_options` and its config key in
:data:`CONFIG_KEYS`, its field in ``config.LossConfig``, and its use in
:func:`prefix_rft.loss.prefix_rft_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..checks import check_choice, check_int, check_number
from .entropy_mask import EntropyMask, EntropyMaskScope, check_entropy_mask_options

KernelImpl = Literal["auto", "torch", "triton"]  # fused log-prob/entropy kernel

# where each setting comes from in the trainer's config (section.field)
CONFIG_KEYS = {
    "max_response_tokens": "rollout.max_response_tokens", "clip_low": "loss.clip_low",
    "clip_high": "loss.clip_high", "clip_c": "loss.clip_c",
    "entropy_top_fraction": "loss.entropy_top_fraction", "entropy_coef": "loss.entropy_coef",
    "temperature": "rollout.temperature", "impl": "loss.kernel_impl",
    "entropy_mask_scope": "loss.entropy_mask_scope", "entropy_norm": "loss.entropy_norm",
}
# normalizer of the entropy bonus: Dr. GRPO's constant B·L_max, or the continuation-token count
EntropyNorm = Literal["dr_grpo", "token_mean"]


def check_loss_options(
    *,
    max_response_tokens: int,
    clip_low: float,
    clip_high: float,
    clip_c: float | None,
    entropy_top_fraction: float,
    entropy_coef: float,
    temperature: float = 1.0,
    impl: str = "auto",
    entropy_mask_scope: str = "micro_batch",
    entropy_norm: str = "dr_grpo",
) -> None:
    """Validate the policy-loss options (:class:`LossSettings` and the config use it); the
    error names the argument."""
    check_int("max_response_tokens", max_response_tokens)
    check_number("clip_low", clip_low, 0.0, 1.0, hi_open=True)
    check_number("clip_high", clip_high, 0.0)
    check_number("clip_c", clip_c, 1.0, lo_open=True, allow_none=True)
    check_entropy_mask_options(entropy_top_fraction=entropy_top_fraction,
                               entropy_mask_scope=entropy_mask_scope)
    check_number("entropy_coef", entropy_coef)
    check_number("temperature", temperature, 0.0, lo_open=True)
    check_choice("impl", impl, KernelImpl)
    check_choice("entropy_norm", entropy_norm, EntropyNorm)


@dataclass(frozen=True)
class LossSettings:
    """Everything the Prefix-RFT policy loss is configured with (formulas in
    :mod:`prefix_rft.loss`). Frozen: built once, shared by every call."""

    max_response_tokens: int  # L_max of the Dr. GRPO normalizer (a constant, not a count)
    clip_low: float = 0.2  # PPO clip range [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    clip_c: float | None = None  # dual clip (> 1) for A < 0; None = off
    entropy_top_fraction: float = 0.2  # share of prefix tokens (by entropy) that keep their A
    entropy_mask_scope: EntropyMaskScope = "micro_batch"  # rank per micro- or per mini-batch
    entropy_coef: float = 0.0  # entropy bonus on continuation tokens; 0 = off
    entropy_norm: EntropyNorm = "dr_grpo"  # bonus normalizer: B·L_max or continuation tokens
    temperature: float = 1.0  # log-probs / entropies of logits / temperature (the rollout's)
    impl: KernelImpl = "auto"  # fused kernel: auto | torch | triton
    entropy_mask: EntropyMask = field(init=False, repr=False, compare=False)  # the rule object

    def __post_init__(self) -> None:
        check_loss_options(
            max_response_tokens=self.max_response_tokens, clip_low=self.clip_low,
            clip_high=self.clip_high, clip_c=self.clip_c,
            entropy_top_fraction=self.entropy_top_fraction, entropy_coef=self.entropy_coef,
            temperature=self.temperature, impl=self.impl,
            entropy_mask_scope=self.entropy_mask_scope, entropy_norm=self.entropy_norm)
        object.__setattr__(self, "entropy_mask", EntropyMask(self.entropy_top_fraction,
                                                             self.entropy_mask_scope))

    @classmethod
    def from_config(cls, cfg) -> LossSettings:
        """Built from a resolved :class:`prefix_rft.config.Config` by :data:`CONFIG_KEYS` (the
        config is read, not imported: it imports this module)."""
        return cls(**config_values(cfg))

    @classmethod
    def resolve(cls, settings: LossSettings | None, options: dict) -> LossSettings:
        """``settings``, or one built from keyword ``options`` (the shorthand of the loss's
        callers outside the trainer); both at once is an error."""
        if settings is None:
            return cls(**options)
        if options:
            raise ValueError(f"give settings or loss options, not both (got settings and "
                             f"{sorted(options)})")
        if not isinstance(settings, cls):
            raise ValueError(f"settings must be a LossSettings, got {type(settings).__name__}")
        return settings


def config_values(cfg) -> dict:
    """``{setting: value}`` read from ``cfg`` at :data:`CONFIG_KEYS`."""
    out = {}
    for name, key in CONFIG_KEYS.items():
        section, field_name = key.split(".")
        out[name] = getattr(getattr(cfg, section), field_name)
    return out
