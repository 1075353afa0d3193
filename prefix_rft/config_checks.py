"""The checks of :func:`prefix_rft.config.validate_config`, one owner per check.

Choice fields are checked against their ``Literal`` types (``config.choice_fields``, passed in) and
``rollout.engine`` against the engine registry; options that a module implements are checked
by that module's own function (``LossSettings`` for the loss, ``prefix.check_prefix_options``,
``rollout.SamplingSettings``, ``data.check_data_options`` for the format and schema
registries, ``reward.check_reward_options``), with the error renamed to the config key; what
only the config knows (sentinels, cross-section rules, optimizer and run settings) is checked
here.
"""

from __future__ import annotations

from typing import Any

from .checks import check_choice, check_int, check_number
from .data import check_data_options
from .data.templates import check_template
from .loss.settings import CONFIG_KEYS as LOSS_CONFIG_KEYS
from .loss.settings import LossSettings, config_values
from .prefix import check_prefix_options
from .reward import check_reward_options
from .rollout import SamplingSettings, engine_names
from .runtime.precision import check_precision, stored_weights_dtype


def _checked(check, **fields: tuple[str, Any]) -> None:
    """Run a module's own option check on config values (``arg=(config key, value)``); its
    error, which starts with the argument's name, is renamed to the config key."""
    try:
        check(**{arg: value for arg, (_, value) in fields.items()})
    except ValueError as err:
        message = str(err)
        for arg, (key, _) in fields.items():
            if message.startswith(arg + " "):
                raise ValueError(key + message[len(arg):]) from None
        raise ValueError(message) from None


def _check_choices(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    for key, allowed in choices.items():
        section, name = key.split(".")
        check_choice(key, getattr(getattr(cfg, section), name), allowed)
    check_choice("rollout.engine", cfg.rollout.engine, engine_names())


def _check_module_options(cfg) -> None:
    """The options that prefix.py, loss/ and the rollout sampling settings implement."""
    p, r = cfg.prefix, cfg.rollout
    _checked(check_prefix_options, schedule=("prefix.schedule", p.schedule),
             start=("prefix.start", p.start), end=("prefix.end", p.end),
             high=("prefix.high", p.high),
             decay_steps=("prefix.decay_steps", p.decay_steps or cfg.train.steps),
             beta_alpha=("prefix.beta_alpha", p.beta_alpha),
             beta_beta=("prefix.beta_beta", p.beta_beta),
             min_prefix_tokens=("prefix.min_prefix_tokens", p.min_prefix_tokens))
    values = config_values(cfg)  # the loss settings, checked as LossSettings checks them
    _checked(LossSettings, **{name: (LOSS_CONFIG_KEYS[name], value)
                              for name, value in values.items()})
    for s in ("rollout", "eval"):
        section = getattr(cfg, s)
        _checked(SamplingSettings, temperature=(f"{s}.temperature", section.temperature),
                 top_p=(f"{s}.top_p", section.top_p),
                 max_new_tokens=(f"{s}.max_response_tokens",
                                 section.max_response_tokens or r.max_response_tokens))
    check_int("rollout.top_k", r.top_k, 0)
    _checked(check_data_options, format=("data.format", cfg.data.format),
             schema=("data.schema", cfg.data.schema))
    w = cfg.reward
    _checked(check_reward_options, fallback=("reward.fallback", w.fallback),
             timeout_s=("reward.timeout_s", w.timeout_s),
             num_workers=("reward.num_workers", w.num_workers))


def _check_finite(cfg) -> None:
    """NaN/Inf in any number field (also inside lists, e.g. ``optim.betas``) is refused."""
    import dataclasses
    import math

    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                if isinstance(item, float) and not math.isfinite(item):
                    key = f"{section.name}.{f.name}" + (f"[{i}]" if i is not None else "")
                    raise ValueError(f"{key} must be a finite number, got {item!r}")


def check_config(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    """Check every field of ``cfg`` (a resolved :class:`prefix_rft.config.Config`) and the
    ``choices`` of its ``Literal`` fields (``config.choice_fields()``); raise a one-line
    ValueError naming the first bad one. (The config is not imported here: it imports this
    module, and this module imports the packages whose options it checks.)"""
    _check_finite(cfg)
    _check_choices(cfg, choices)
    d, p, r, o, t = cfg.data, cfg.prefix, cfg.rollout, cfg.optim, cfg.train
    for key, value in [
        ("train.steps", t.steps), ("train.prompts_per_step", t.prompts_per_step),
        ("train.ppo_epochs", t.ppo_epochs), ("train.micro_batch_tokens", t.micro_batch_tokens),
        ("data.max_prompt_tokens", d.max_prompt_tokens), ("rollout.group_size", r.group_size),
        ("prefix.self_store_size", p.self_store_size),
        ("rollout.tensor_parallel_size", r.tensor_parallel_size), ("log.every", cfg.log.every),
        ("eval.k", cfg.eval.k),
    ]:
        check_int(key, value, 1)
    for key, value in [
        ("data.max_rows", d.max_rows), ("prefix.num_prefixed", p.num_prefixed),
        ("rollout.hf_batch_size", r.hf_batch_size), ("optim.warmup_steps", o.warmup_steps),
        ("train.mini_batch_size", t.mini_batch_size),
        ("train.max_steps_per_run", t.max_steps_per_run),
        ("checkpoint.every", cfg.checkpoint.every),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("eval.every", cfg.eval.every),
        ("train.max_bad_steps", t.max_bad_steps),
    ]:
        check_int(key, value, 0)
    _check_module_options(cfg)  # rollout.max_response_tokens, which eval's defaults to, first
    check_int("eval.max_response_tokens", cfg.eval.max_response_tokens, 0)
    if p.num_prefixed > r.group_size:
        raise ValueError(
            f"prefix.num_prefixed must be <= rollout.group_size ({r.group_size}), "
            f"got {p.num_prefixed}")
    check_number("rollout.gpu_memory_utilization", r.gpu_memory_utilization, 0.0, 1.0,
                 lo_open=True)
    check_number("optim.lr", o.lr, 0.0, lo_open=True)
    check_number("optim.eps", o.eps, 0.0, lo_open=True)
    check_number("optim.weight_decay", o.weight_decay, 0.0)
    check_number("optim.grad_clip", o.grad_clip, 0.0)
    check_number("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")
    check_int("train.head_chunk_mb", t.head_chunk_mb, 0)
    if t.mini_batch_size and t.prompts_per_step % t.mini_batch_size:
        raise ValueError(f"train.mini_batch_size must divide train.prompts_per_step "
                         f"({t.prompts_per_step}), got {t.mini_batch_size}")
    check_precision(cfg.model.dtype, stored_weights_dtype(cfg.model.weights_dtype, o.name),
                    o.name)
    check_template(d.prompt_template)
    official = cfg.loss.baseline == "official" and cfg.loss.algo != "sft"
    if official and p.num_prefixed >= r.group_size:
        raise ValueError(f"loss.baseline=official needs on-policy rollouts: prefix.num_prefixed "
                         f"must be < rollout.group_size ({r.group_size}), got {p.num_prefixed}")
    if p.when == "on_failure" and p.num_prefixed >= r.group_size:  # failure is judged on them
        raise ValueError(f"prefix.when=on_failure keeps on-policy rollouts in every group: "
                         f"prefix.num_prefixed must be < rollout.group_size ({r.group_size}), "
                         f"got {p.num_prefixed}")
    if t.packing and cfg.model.attn_implementation not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"train.packing needs model.attn_implementation sdpa or "
                         f"flash_attention_2, got {cfg.model.attn_implementation!r}; "
                         f"set train.packing=false")
    _check_limited_gpu_options(cfg)
    if cfg.model.path == "" and cfg.model.tokenizer_path:
        raise ValueError(f"model.path must be set when model.tokenizer_path is, "
                         f"got {cfg.model.path!r}")


def _check_limited_gpu_options(cfg) -> None:
    """LoRA, optimizer and offload settings (prefix_rft/runtime/lora.py, optim.py, offload.py)."""
    lora = cfg.model.lora
    check_int("model.lora.r", lora.r, 0)
    check_number("model.lora.alpha", lora.alpha, 0.0, lo_open=True)
    check_number("model.lora.dropout", lora.dropout, 0.0, 1.0, hi_open=True)
    if lora.r and not lora.target_modules:
        raise ValueError("model.lora.target_modules must name at least one module, got []")
    if lora.r and cfg.optim.name == "adamw_bf16_sr":
        raise ValueError("optim.name=adamw_bf16_sr updates bf16-stored weights; LoRA adapters "
                         "are fp32 (use adamw or adamw8bit with model.lora.r > 0)")
    if cfg.rollout.sleep_level not in (0, 1, 2):
        raise ValueError(f"rollout.sleep_level must be 0, 1 or 2, got {cfg.rollout.sleep_level!r}")
