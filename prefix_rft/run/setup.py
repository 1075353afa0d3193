"""Everything a training run needs before its first step, one concern per function.

    run = start_run(cfg)        # process group, seed, model, data, optimizer, engine, resume
    with run.compute(): ...    # forward passes in the run's compute precision

:class:`Run` is the typed state of a run that :mod:`prefix_rft.train` reads and updates;
``start_run`` builds it from the pieces below (each usable on its own):

* :func:`load_policy` -- the policy and tokenizer from a local HF directory (+ LoRA).
* :func:`build_optimizer` -- ``optim.name`` (optionally offloaded to host RAM) and its
  per-optimizer-step LR schedule.
* :func:`build_engine` -- the rollout engine named by ``rollout.engine`` (the registry in
  :mod:`prefix_rft.rollout`).
* :func:`build_loss` -- the fused :class:`~prefix_rft.loss.PrefixRFTLoss` from ``loss.*``.
* :func:`precision` -- the run's precision policy, built once and held by :class:`Run`
  (:mod:`prefix_rft.runtime.precision`): ``model.dtype: bf16`` (or ``auto`` on CUDA) is bf16 compute
  over fp32 masters (FSDP2 ``MixedPrecisionPolicy`` under torchrun, ``torch.autocast`` in one
  process); bf16-stored weights only with ``model.weights_dtype: bf16`` + a stochastic-rounding
  optimizer.
* :func:`seed_everything`, :func:`reset_peak_memory`, :func:`peak_memory_gb`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, save_config
from ..data import PromptDataset, StatefulSampler, load_prompt_dataset
from ..errors import UserError
from ..finite import StepGuard, check_weights_finite
from ..loss import LossSettings, PrefixRFTLoss
from ..prefix_store import SelfPrefixStore
from ..rollout import RolloutEngine, engine_class
from ..runtime import distributed as D
from ..runtime.precision import PrecisionPolicy, precision_policy, stored_weights_dtype
from . import checkpoint as ckpt


@dataclass
class Run:
    """The state of one training run (built by :func:`start_run`)."""

    cfg: Config
    model: torch.nn.Module  # the policy (FSDP2-wrapped under torchrun)
    tokenizer: Any
    engine: RolloutEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: PrefixRFTLoss
    dataset: PromptDataset  # the training questions; dataset[i] is a data.Question
    sampler: StatefulSampler  # this rank's question order (seeded, resumable)
    device: torch.device
    rank: int
    world: int  # number of ranks
    run_dir: Path
    pad_id: int  # token id that fills padded positions of update batches
    start_step: int = 0  # steps already done when this process started (resume)
    resumed_from: str | None = None  # checkpoint directory, or None for a fresh run
    optimizer_stepped: bool = False  # the current step changed the weights (crash handling)
    guard: StepGuard = field(default_factory=StepGuard)  # skips non-finite optimizer steps
    precision: PrecisionPolicy | None = None  # compute / weight / reduce / export dtypes;
    #   None: built from cfg and device once, here (start_run passes the one it wrapped with)
    prefix_store: SelfPrefixStore | None = None  # prefix.source self: own correct responses

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = precision(self.cfg, self.device)

    def compute(self) -> contextlib.AbstractContextManager:
        """Forward passes in this run's compute dtype (:meth:`PrecisionPolicy.autocast`)."""
        return self.precision.autocast(self.model)


# ---------------------------------------------------------------------------- model
def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_policy(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The policy from ``model.path`` (``from_pretrained``, a local directory) and its tokenizer.

    Weights in ``model.weights_dtype`` (fp32 masters by default, whatever the compute dtype);
    SDPA attention (flash-attn only when requested
    and installed); Liger RMSNorm/SwiGLU/RoPE when installed and on CUDA; gradient checkpointing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model.path)
    if not cfg.model.path or not (path / "config.json").is_file():
        raise UserError(f"model.path must be a local HF model directory with a config.json, "
                         f"got {cfg.model.path!r}")
    attn = cfg.model.attn_implementation
    if attn == "flash_attention_2" and not (is_installed("flash_attn") and device.type == "cuda"):
        print("[prefix-rft] flash-attn not installed or not on CUDA: using sdpa attention",
              flush=True)
        attn = "sdpa"
    dtype = weight_dtype(cfg, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn,
        trust_remote_code=cfg.model.trust_remote_code).to(device)
    check_weights_finite(model, f"model.path {cfg.model.path!r} cannot be trained (use a model "
                                f"with finite weights)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or str(path),
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_liger(cfg, model, device)
    lora = cfg.model.lora
    if lora.r:
        from ..runtime.lora import apply_lora

        apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   target_modules=tuple(lora.target_modules))
    if cfg.train.packing:
        from ..update.varlen_attention import enable_packed_attention

        enable_packed_attention(model)  # sdpa -> its packed variant; flash-attn as is
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer


def weight_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """Stored weight dtype: the precision policy's (fp32 masters unless ``model.weights_dtype:
    bf16`` / ``optim.name: adamw_bf16_sr``, bf16 weights updated with stochastic rounding), or
    bf16 for a LoRA run on CUDA (the frozen base needs no masters; the adapters stay fp32)."""
    if cfg.model.lora.r and device.type == "cuda" and cfg.model.dtype == "auto":
        return torch.bfloat16
    return precision(cfg, device).weights


def apply_liger(cfg: Config, model: torch.nn.Module, device: torch.device) -> None:
    """Liger's RMSNorm/SwiGLU/RoPE kernels per ``model.liger`` (not its head: the head goes
    through our fused log-prob kernel instead)."""
    use_liger = cfg.model.liger == "true" or (
        cfg.model.liger == "auto" and device.type == "cuda" and is_installed("liger_kernel"))
    if not use_liger:
        return
    if not is_installed("liger_kernel"):
        raise UserError("model.liger=true but liger-kernel is not installed "
                         "(pip install liger-kernel)")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rms_norm=True, swiglu=True, rope=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


# ---------------------------------------------------------------------------- optimizer
def optimizer_steps_per_step(cfg: Config) -> int:
    return cfg.train.ppo_epochs * (cfg.train.prompts_per_step // cfg.train.mini_batch_size)


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """``optim.name`` (:func:`prefix_rft.runtime.optim.make_optimizer`) over the trainable
    parameters, in host RAM when ``train.offload: optimizer``
    (:class:`prefix_rft.runtime.offload.HostOptimizer`), + a per-optimizer-step LR schedule:
    linear warmup, then constant or cosine."""
    from ..runtime.offload import HostOptimizer
    from ..runtime.optim import make_optimizer

    o = cfg.optim

    def make(params):
        return make_optimizer(o.name, params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                              weight_decay=o.weight_decay)

    optimizer = (HostOptimizer(model.parameters(), make) if cfg.train.offload == "optimizer"
                 else make(model.parameters()))
    total = optimizer_steps_per_step(cfg) * cfg.train.steps

    def lr_factor(k: int) -> float:
        if k < o.warmup_steps:
            return (k + 1) / o.warmup_steps
        if o.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (k - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------------------- engine, loss
def build_engine(cfg: Config, model: torch.nn.Module, tokenizer, device: torch.device,
                 rank: int) -> RolloutEngine:
    """The engine registered as ``rollout.engine``, built from the config."""
    return engine_class(cfg.rollout.engine).from_config(cfg, model, tokenizer, device=device,
                                                        rank=rank)


def build_loss(cfg: Config) -> PrefixRFTLoss:
    """The fused policy loss over the config's :class:`~prefix_rft.loss.LossSettings` (``loss.*``
    at the rollout temperature, read once: :meth:`LossSettings.from_config`)."""
    return PrefixRFTLoss(LossSettings.from_config(cfg))


# ---------------------------------------------------------------------------- precision
def precision(cfg: Config, device: torch.device) -> PrecisionPolicy:
    """The run's compute / weight / reduce / export dtypes (:mod:`prefix_rft.runtime.precision`)."""
    weights = stored_weights_dtype(cfg.model.weights_dtype, cfg.optim.name)
    return precision_policy(cfg.model.dtype, weights, cfg.checkpoint.export_dtype, device,
                            cfg.optim.name)


# ---------------------------------------------------------------------------- seeds, memory
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; the CPU figure is the process peak RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


# ---------------------------------------------------------------------------- the run
def check_divisible(cfg: Config, world: int) -> None:
    for key, value in (("train.prompts_per_step", cfg.train.prompts_per_step),
                       ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if value % world:
            raise UserError(f"{key} must be divisible by the number of ranks ({world}), "
                             f"got {value}")


def start_run(cfg: Config) -> Run:
    """Process group, seed, data, model (+FSDP2), optimizer, resume, engine, loss."""
    rank, world, device = D.init_distributed(cfg.train.device)
    check_divisible(cfg, world)
    policy = precision(cfg, device)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    model, tokenizer = load_policy(cfg, device)
    try:
        dataset = load_prompt_dataset(cfg.data, tokenizer, need_demo=cfg.loss.algo != "rft",
                                      demo_optional=cfg.prefix.source == "self")
    except ValueError as err:  # the data's fault (missing file, no usable rows, ...)
        raise (err if isinstance(err, UserError) else UserError(str(err))) from err
    if D.is_main():
        print(f"[prefix-rft] {dataset.summary()}", flush=True)
    sampler = StatefulSampler(len(dataset), seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                              rank=rank, world_size=world)
    if world > 1 or cfg.train.offload == "params":
        if world == 1:
            D.init_one_rank_group(device)
        D.wrap_fsdp2(model, offload_params=cfg.train.offload == "params",
                     mp_policy=policy.fsdp_mixed_precision())
    optimizer, scheduler = build_optimizer(cfg, model)
    start = 0
    store = (SelfPrefixStore(cfg.prefix.self_store_size) if cfg.prefix.source == "self"
             and cfg.prefix.num_prefixed > 0 else None)
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        meta = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer,
                                    scheduler=scheduler)
        check_weights_finite(model, f"checkpoint {str(resume_from)!r} cannot be resumed "
                                    f"(resume from an earlier one)")
        start = int(meta["step"])
        sampler.load_state_dict(meta["sampler"])
        if store is not None and (resume_from / "prefix_store.pt").is_file():
            store.load_state_dict(torch.load(resume_from / "prefix_store.pt", weights_only=True))
    engine = build_engine(cfg, model, tokenizer, device, rank)
    if resume_from is not None:
        engine.sync_from(model)
    return Run(cfg=cfg, model=model, tokenizer=tokenizer, engine=engine, optimizer=optimizer,
               scheduler=scheduler, loss_fn=build_loss(cfg), dataset=dataset, sampler=sampler,
               device=device, rank=rank, world=world, run_dir=run_dir,
               pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
               start_step=start, resumed_from=str(resume_from) if resume_from else None,
               guard=StepGuard(max_bad_steps=cfg.train.max_bad_steps), precision=policy,
               prefix_store=store)
