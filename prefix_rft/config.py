"""Run configuration: one dataclass per area, YAML file + dotted CLI overrides.

    cfg = load_config("configs/demo.yaml", ["--loss.clip_high=0.28", "--train.steps=3"])
    save_config(cfg, run_dir / "config.yaml")      # the resolved config of the run

Every field carries a comment with its unit or sentinel. ``load_config`` type-converts
overrides from the field types (lists and nulls in YAML syntax: ``--data.train_files=[a,b]``,
``--loss.clip_c=null``), rejects unknown keys naming close matches, fills the sentinels
(``resolve_config``) and validates: a bad value is a one-line ``ValueError`` naming the
field and what is allowed. Defaults are the paper's settings.

One owner per choice and per check: a choice field is typed ``Literal[...]`` and its allowed
values are read from that type (the type lives in the module that implements the choice,
e.g. ``advantage.Baseline``); ``rollout.engine`` is checked against the engine registry
(``prefix_rft.rollout.ENGINES``); options that a module implements are checked by that
module's own check (``loss_settings.LossSettings``, ``prefix.check_prefix_options``, the
sampling settings), with the error renamed to the config key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .advantage import Baseline
from .checks import choices, is_choice_type
from .data.options import DataConfig
from .loss.entropy_mask import EntropyMaskScope
from .loss.fused import HeadPath
from .loss.settings import EntropyNorm, KernelImpl
from .prefix import Schedule
from .prefix_policy import Source, When
from .reward.extract import Fallback
from .runtime.distributed import Device
from .runtime.lora import DEFAULT_TARGETS
from .runtime.offload import Offload
from .runtime.optim import OptimizerName
from .runtime.precision import ComputeDtype, ExportDtype, WeightsDtype

Algo = Literal["sft", "rft", "prefix_rft"]  # the update: SFT, plain RFT, Prefix-RFT
Switch = Literal["auto", "true", "false"]  # auto = when installed / where it applies



@dataclass
class LoraConfig:
    r: int = 0  # LoRA rank; 0 = off (full fine-tuning)
    alpha: float = 32.0  # LoRA scale numerator: updates are scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input, [0, 1)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # linears


@dataclass
class ModelConfig:
    path: str = ""  # local HF model directory (required to train); never a hub name
    tokenizer_path: str = ""  # local tokenizer directory; "" = model.path
    dtype: ComputeDtype = "auto"  # compute dtype (bf16 = bf16 compute, fp32 masters/state/reduce);
    # auto: bf16 on CUDA, fp32 on CPU
    weights_dtype: WeightsDtype = "fp32"  # stored + updated weights; bf16 needs
    # optim.name=adamw_bf16_sr (stochastic rounding); plain AdamW on bf16 weights is refused
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"  # sdpa |
    # flash_attention_2 (when installed and on CUDA, else sdpa) | eager
    gradient_checkpointing: bool = True  # recompute decoder layers in backward
    liger: Switch = "auto"  # auto (when liger-kernel is installed and on CUDA) | true | false
    trust_remote_code: bool = False  # passed to from_pretrained; keep off unless needed
    lora: LoraConfig = field(default_factory=LoraConfig)  # {r, alpha, dropout, target_modules}


@dataclass
class PrefixConfig:
    schedule: Schedule = "cosine"  # cosine | linear | constant (= uniform: low stays at end) |
    # step (ratio = start for decay_steps steps, then end; no draw: QuestA's held hint share)
    start: float = 0.95  # low bound of the prefix ratio at step 0, fraction of the demonstration
    end: float = 0.05  # low bound after decay_steps, fraction
    high: float = 0.95  # upper bound of the prefix ratio, fraction
    decay_steps: int = 0  # T of the schedule, steps; 0 = train.steps
    beta_alpha: float = 1.0  # ratio ~ low + (high - low) * Beta(alpha, beta); (1, 1) = uniform
    beta_beta: float = 1.0
    min_prefix_tokens: int = 1  # lower clamp of the prefix length, tokens
    num_prefixed: int = 1  # hybrid rollouts per group; forced to 0 for loss.algo = rft
    when: When = "always"  # always (every question, the paper) | on_failure (BREAD: only
    # questions whose G on-policy rollouts all failed; their last num_prefixed failed samples
    # are replaced in place by hybrids, so every group keeps G rows and the same normalizer)
    train_on_prefix: bool = True  # false (QuestA, PrefixRL): the prefix conditions the
    # continuation as part of the prompt; no loss, entropy mask or old log-prob on it
    source: Source = "demonstration"  # demonstration | self (PrefixRL: a correct response of
    # the policy from an earlier step; none yet -> the demonstration, else no prefix)
    self_store_size: int = 4  # source self: newest correct responses kept per question, >= 1


@dataclass
class RolloutConfig:
    engine: str = "hf"  # a name in prefix_rft.rollout.ENGINES: hf (built-in generate) | vllm
    group_size: int = 8  # rollouts per question (G), hybrids included
    temperature: float = 1.0  # sampling temperature; the loss uses the same value
    top_p: float = 1.0  # nucleus sampling, (0, 1]; 1.0 = off
    top_k: int = 0  # 0 = off
    max_response_tokens: int = 8192  # response cap incl. prefix, tokens; also Dr. GRPO's L_max
    gpu_memory_utilization: float = 0.4  # vllm: share of GPU memory for weights + KV cache
    sleep_level: int = 1  # vllm on GPU, during the update: 0 = stay awake | 1 = free the KV
    # cache, weights to CPU RAM | 2 = free KV cache and weights (all re-sent at the sync)
    enforce_eager: bool = False  # vllm: no CUDA graphs (slower, less memory, faster start)
    tensor_parallel_size: int = 1  # vllm: GPUs per engine
    hf_batch_size: int = 0  # hf engine: sequences generated together; 0 = all at once
    seed: int | None = None  # sampling seed; None = train.seed


@dataclass
class LossConfig:
    algo: Algo = "prefix_rft"  # sft | rft | prefix_rft
    clip_low: float = 0.2  # PPO ratio clip 1 - clip_low
    clip_high: float = 0.2  # PPO ratio clip 1 + clip_high (clip-higher allowed)
    clip_c: float | None = None  # dual clip constant (> 1, e.g. 3.0); None = off
    entropy_top_fraction: float = 0.2  # prefix tokens kept by entropy, fraction in (0, 1]
    entropy_mask_scope: EntropyMaskScope = "micro_batch"  # micro_batch (official code) | mini_batch
    entropy_coef: float = 0.0  # entropy bonus on continuation tokens; 0 = off
    baseline: Baseline = "group"  # group: r - mean of all G; on_policy: r - mean of the
    # on-policy ones, every token; official: the authors' per-token advantage (advantage.py)
    entropy_norm: EntropyNorm = "dr_grpo"  # entropy bonus / (B * L_max) | token_mean (authors')
    kernel_impl: KernelImpl = "auto"  # fused logprob/entropy kernel; auto = triton on CUDA


@dataclass
class OptimConfig:
    # adamw (torch) | adamw8bit (torchao, 8-bit moments) | adamw_bf16_sr (torchao, bf16-stored
    # weights + stochastic rounding)
    name: OptimizerName = "adamw"  # see prefix_rft/runtime/optim.py
    lr: float = 1e-6  # AdamW peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warmup from 0, optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to min_lr_ratio at the end
    min_lr_ratio: float = 0.0  # cosine floor, fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class TrainConfig:
    steps: int = 500  # training steps (one rollout batch each)
    prompts_per_step: int = 64  # questions per step, global (each gives group_size rollouts)
    mini_batch_size: int = 0  # questions per optimizer step, global; 0 = prompts_per_step
    micro_batch_tokens: int = 16384  # token budget of one forward/backward per rank
    packing: bool = True  # one packed row per micro-batch, no padding; false: padded rows
    # lm_head + loss of the update: fused_loss = the loss's gradient computed in the head's
    # forward (6NHV, prefix_rft/loss/fused.py); autograd = per-token log-probs/entropies with
    # a recomputing backward (8NHV); auto = fused_loss wherever it applies (every update today)
    head_path: HeadPath = "auto"  # auto | fused_loss | autograd
    head_chunk_mb: int = 0  # fused_loss: a token chunk's [C, V] fp32 logit buffer, MiB;
    #   0 = 128 on CPU, 1024 on CUDA
    ppo_epochs: int = 1  # passes over each step's rollouts
    seed: int = 0  # global seed (model init, sampling, data order)
    device: Device = "auto"  # auto (cuda when available) | cpu | cuda
    run_dir: str = "runs/prefix-rft"  # config, metrics, checkpoints, plots go here
    max_steps_per_run: int = 0  # stop (after checkpointing) after this many steps; 0 = no limit
    max_bad_steps: int = 3  # stop after this many optimizer steps in a row with a non-finite
    #   loss or grad norm (each is skipped); 0 = never stop
    # none | optimizer (state + step in host RAM) | params (FSDP2 CPUOffloadPolicy: params,
    # grads and state in host RAM)
    offload: Offload = "none"  # see prefix_rft/runtime/offload.py


@dataclass
class LogConfig:
    every: int = 1  # log metrics every N steps
    tensorboard: Switch = "auto"  # auto (when installed) | true | false
    plots: bool = True  # PNG plots in the run directory at the end
    progress: bool = True  # progress bar with ETA


@dataclass
class CheckpointConfig:
    every: int = 50  # save every N steps; 0 = only at the end / on a signal
    keep_last: int = 2  # keep the newest K checkpoints; 0 = keep all
    resume: str = "none"  # none | auto (latest in train.run_dir) | a checkpoint directory
    save_final: bool = True  # final model as a plain HF directory (run_dir/final)
    export_dtype: ExportDtype = "auto"  # dtype of the final HF weights; auto = the compute dtype


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)  # benchmark files, any schema (auto per file)
    every: int = 0  # evaluate during training every N steps; 0 = never
    k: int = 1  # samples per question during training (prefix-rft eval uses --k)
    temperature: float = 0.6  # sampling temperature
    top_p: float = 0.95  # nucleus sampling
    max_response_tokens: int = 0  # tokens; 0 = rollout.max_response_tokens


@dataclass
class RewardConfig:
    # where the answer comes from when a response has no \boxed{}
    fallback: Fallback = "none"  # none = no answer (reward 0)
    timeout_s: float = 5.0  # seconds per verification (enforced in a helper process)
    num_workers: int = 1  # helper processes verifying a batch in parallel
    non_finite: Literal["zero", "error"] = "zero"  # NaN/Inf rewards or advantages: zero
    #   (counted in non_finite_rewards / non_finite_advantages, set to 0) | error (stop)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


# section name -> its dataclass, e.g. "loss" -> LossConfig
SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


def choice_fields() -> dict[str, tuple[str, ...]]:
    """``{"loss.algo": ("sft", "rft", "prefix_rft"), ...}``: every ``Literal`` field and its
    allowed values, read from the field types."""
    out = {}
    for section, cls in SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            if is_choice_type(tp):
                out[f"{section}.{name}"] = choices(tp)
    return out


# ---------------------------------------------------------------- conversion
def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``"loss.clip_high"`` (and ``"model.lora.r"``)."""
    keys = []
    for s, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = _field_type(s, f.name)
            if dataclasses.is_dataclass(tp):
                keys += [f"{s}.{f.name}.{g.name}" for g in dataclasses.fields(tp)]
            else:
                keys.append(f"{s}.{f.name}")
    return keys


def _unknown_key_error(key: str) -> ValueError:
    candidates = all_keys() if "." in key else list(SECTIONS)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close and "." in key:  # a right field name under the wrong section
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in candidates if k.rsplit(".", 1)[-1] == leaf]
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def _bad(key: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{key} must be {expected}, got {value!r}")


def _coerce_scalar(key: str, tp: Any, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise _bad(key, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:  # "1e3" or 1000.0 are fine as long as they are whole numbers
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise _bad(key, "an integer", value)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _bad(key, "a number", value)
        if not math.isfinite(number):
            raise _bad(key, "a finite number", number)
        return number
    if tp is str or is_choice_type(tp):
        if isinstance(value, bool):  # `liger: true` in YAML is a bool; the field is a choice
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise _bad(key, "a string", value)
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def coerce_value(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (parsed YAML) to the field type ``tp``; ValueError names ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce_value(key, inner[0], value)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single file name is a one-element list
        if not isinstance(value, (list, tuple)):
            raise _bad(key, "a list", value)
        return [coerce_value(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if value is None:
        raise _bad(key, f"a {getattr(tp, '__name__', tp)} (not null)", value)
    return _coerce_scalar(key, tp, value)


def _set_nested(obj: Any, key: str, sub: str, value: Any) -> None:
    """Set ``obj``'s field ``sub`` (``key`` = its dotted config name) from ``value``; a
    mapping value sets several fields (``model.lora: {r: 16, alpha: 32}``)."""
    if not sub:
        if not isinstance(value, dict):
            raise _bad(key, "a mapping of its fields", value)
        for name, v in value.items():
            _set_nested(obj, key, str(name), v)
        return
    names = {f.name for f in dataclasses.fields(obj)}
    if sub not in names:
        raise _unknown_key_error(f"{key}.{sub}")
    tp = typing.get_type_hints(type(obj))[sub]
    setattr(obj, sub, coerce_value(f"{key}.{sub}", tp, value))


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown_key_error(key)
    name, _, sub = name.partition(".")
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if name not in names:
        raise _unknown_key_error(key)
    tp = _field_type(section, name)
    if dataclasses.is_dataclass(tp):  # a nested group of fields, e.g. model.lora
        _set_nested(getattr(getattr(cfg, section), name), f"{section}.{name}", sub, value)
        return
    if sub:
        raise _unknown_key_error(key)
    setattr(getattr(cfg, section), name, coerce_value(key, tp, value))


def config_from_dict(raw: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from ``{section: {field: value}}``, starting from ``base`` (defaults)."""
    cfg = base if base is not None else Config()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_key_error(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with plain Python values (YAML/JSON serializable)."""
    return dataclasses.asdict(cfg)


def _is_text_field(key: str) -> bool:
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in {f.name for f in
                                               dataclasses.fields(SECTIONS[section])}:
        return False
    tp = _field_type(section, name)
    return tp is str or tp == (str | None)


def parse_override(text: str) -> tuple[str, Any]:
    """``"--loss.clip_high=0.28"`` -> ``("loss.clip_high", 0.28)``.

    The value is read as YAML (``[a, b]`` lists, ``null``), except for text fields, which
    take the text literally (an instruction may contain ``:`` or ``{}``); ``null``/``none``
    clear an optional text field (``str | None``) only: in a plain ``str`` field ``none`` is
    a value (``data.prompt_template=none``). Matching outer quotes are removed.
    """
    import yaml

    body = text[2:] if text.startswith("--") else text
    key, sep, raw = body.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ValueError(f"override must look like --section.field=value, got {text!r}")
    if _is_text_field(key):
        optional = _field_type(*key.split(".", 1)) is not str
        if optional and raw.lower() in ("null", "none", "~"):
            return key, None
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {key}: cannot parse value {raw!r} ({err.problem})") from None
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``--section.field=value`` strings in order (a later one wins)."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return cfg


# ---------------------------------------------------------------- resolve + validate
def split_overrides(extra: Sequence[str]) -> list[str]:
    """Command-line overrides as :func:`apply_overrides` takes them: ``["--a.b=1", "--c.d",
    "2"]`` -> ``["--a.b=1", "--c.d=2"]``; other tokens are a
    :class:`~prefix_rft.errors.UserError` (the ``train``, ``plan`` and ``demo`` commands)."""
    from .errors import UserError

    overrides, i = [], 0
    while i < len(extra):
        token = extra[i]
        key = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if "." not in key:
            raise UserError(f"unexpected argument {token!r} "
                            f"(overrides look like --section.field=value)")
        if "=" not in token:
            if i + 1 >= len(extra):
                raise UserError(f"{token} needs a value")
            token, i = f"{token}={extra[i + 1]}", i + 1
        overrides.append(token)
        i += 1
    return overrides


def resolve_config(cfg: Config) -> Config:
    """Fill the sentinels that point at other fields, so the saved config says what ran."""
    if cfg.data.seed is None:
        cfg.data.seed = cfg.train.seed
    if cfg.rollout.seed is None:
        cfg.rollout.seed = cfg.train.seed
    if cfg.prefix.decay_steps == 0:
        cfg.prefix.decay_steps = cfg.train.steps
    if cfg.train.mini_batch_size == 0:
        cfg.train.mini_batch_size = cfg.train.prompts_per_step
    if cfg.eval.max_response_tokens == 0:
        cfg.eval.max_response_tokens = cfg.rollout.max_response_tokens
    if not cfg.model.tokenizer_path:
        cfg.model.tokenizer_path = cfg.model.path
    if cfg.loss.algo in ("rft", "sft"):  # RFT has no demonstration prefixes by definition;
        cfg.prefix.num_prefixed = 0  # SFT's rollouts only measure the policy (on-policy)
    return cfg


def validate_config(cfg: Config) -> Config:
    """Check every field; raise a one-line ValueError naming the first bad one (the checks
    live in :mod:`prefix_rft.config_checks`)."""
    from .config_checks import check_config

    check_config(cfg, choice_fields())
    return cfg


# ---------------------------------------------------------------- load / save
def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file(s) ``path`` (optional; a list is applied in order, so a recipe
    overlay such as ``configs/recipes/bread.yaml`` after a base config sets only its own
    fields) <- ``--section.field=value`` overrides; then sentinels are resolved and every
    field validated."""
    cfg = Config()
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for one in paths:
        config_from_dict(_read_yaml(Path(one)), cfg)
    apply_overrides(cfg, list(overrides or []))
    return validate_config(resolve_config(cfg))


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where} ({problem}): "
                         f"fix the file") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text") from None


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the config as YAML (sections in dataclass order); returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path
