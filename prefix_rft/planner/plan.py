"""``prefix-rft plan``: will this run fit on these GPUs? Peak memory per component, before launch.

    prefix-rft plan --config configs/qwen2.5-math-1.5b-24gb.yaml --gpu-memory 24GiB
    prefix-rft plan --config configs/qwen2.5-math-7b.yaml --gpus 8 --train.micro_batch_tokens=8192

Reads the resolved run config and the model's ``config.json`` only (no weights, no GPU) and
predicts, per rank, the two phases of a step that compete for the card:

* **update**: stored params (fp32 masters or bf16), gradients, optimizer state (per
  ``optim.name``), bf16 compute copies, activations under gradient checkpointing at
  ``train.micro_batch_tokens``, the fused head's workspace, optimizer-step temporaries
  (``prefix_rft.planner.memory_model``), plus what the rollout engine keeps while the update runs
  (each engine reports its own terms, ``RolloutEngine.memory_terms``: vLLM asleep keeps
  ``VLLMEngine.ASLEEP_GIB``, with ``rollout.sleep_level: 0`` its whole budget);
* **rollout**: params + optimizer state (they stay), plus the engine: vLLM's
  ``gpu_memory_utilization x GPU memory`` (its weights, KV cache, CUDA graphs), or the HF
  engine's KV cache and logits for ``hf_batch_size`` sequences.

Peak = max(update, rollout) + CUDA context + allocator slack (``SLACK`` of the peak). Under
FSDP2 (``--gpus N``) params, gradients and optimizer state are divided by N; offload moves
them to host RAM (also reported). When the peak exceeds the GPU, each single change that
would make it fit is listed with its figure. The update-phase model is validated against
measured peaks (``benchmarks/memory.py``, ``tests/test_plan.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.lora import DEFAULT_TARGETS
from .memory_model import (
    GiB,
    ModelShape,
    PlanInputs,
    component_bytes,
)

CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspaces per process
SLACK = 0.08  # caching-allocator fragmentation, fraction of the peak
# Terms no CPU run can measure; `plan` says so until benchmarks/gpu_check.sh's train-step row
# has measured them on a GPU and the figure here cites it (term -> "GPU, date, error").
GPU_MEASURED: dict[str, str] = {}
GPU_ONLY_TERMS = ("activations (bf16 under autocast)", "compute copies", "CUDA context",
                  "allocator slack")
VLLM_TERMS = ("vLLM asleep", "vLLM overhead")


@dataclass
class EngineInputs:
    engine: str = "hf"  # hf | vllm
    gpu_memory_utilization: float = 0.4
    sleep_level: int = 1  # 0 = stay awake during the update
    rows: int = 64  # sequences generated at once per rank
    seq_tokens: int = 9216  # prompt + response tokens per sequence


def _lora_settings(cfg) -> tuple[int, tuple[str, ...], float]:
    lora = getattr(cfg.model, "lora", None)
    if lora is None:
        return 0, DEFAULT_TARGETS, 0.0
    get = (lambda k, d: lora.get(k, d)) if isinstance(lora, dict) else (
        lambda k, d: getattr(lora, k, d))
    r = int(get("r", 0) or 0)
    return r, tuple(get("target_modules", None) or DEFAULT_TARGETS), float(get("dropout", 0.0))


def inputs_from_config(cfg, gpus: int = 1, model_config: str | None = None
                       ) -> tuple[ModelShape, PlanInputs, EngineInputs]:
    """The planner's inputs from a resolved run config (``prefix_rft.config.Config``);
    ``model_config``: a config.json to read instead of ``model.path/config.json``."""
    if model_config:
        try:
            raw = json.loads(open(model_config, encoding="utf-8").read())
        except (OSError, ValueError) as err:
            raise ValueError(f"--model-config {model_config!r}: cannot read ({err})") from None
        shape = ModelShape.from_dict(raw)
    else:
        shape = ModelShape.from_model_dir(cfg.model.path)
    device = "cpu" if cfg.train.device == "cpu" else "cuda"
    optim = getattr(cfg.optim, "name", "adamw")
    offload = getattr(cfg.train, "offload", "none")
    r, targets, dropout = _lora_settings(cfg)
    compute_bf16 = device == "cuda" and cfg.model.dtype in ("auto", "bf16")
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    # Padded micro-batches hold a [B, 1, T, T] bool mask; packed ones (train.packing) build
    # none: their attention runs per sequence group (prefix_rft/varlen_attention.py).
    per_mb = 0 if getattr(cfg.train, "packing", False) else max(
        1, cfg.train.micro_batch_tokens // seq)
    inp = PlanInputs(micro_batch_tokens=cfg.train.micro_batch_tokens, world=gpus, device=device,
                     weight_bytes=2 if optim == "adamw_bf16_sr" else 4,
                     compute_bf16=compute_bf16, optim=optim, lora_r=r, lora_targets=targets,
                     lora_dropout=dropout, offload=offload,
                     gradient_checkpointing=cfg.model.gradient_checkpointing,
                     attention_mask_bytes=per_mb * min(seq, cfg.train.micro_batch_tokens) ** 2,
                     fsdp=gpus > 1 or offload == "params")
    rows = cfg.train.prompts_per_step // max(1, gpus) * cfg.rollout.group_size
    if cfg.rollout.engine == "hf" and cfg.rollout.hf_batch_size:
        rows = min(rows, cfg.rollout.hf_batch_size)
    eng = EngineInputs(engine=cfg.rollout.engine,
                       gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                       sleep_level=int(getattr(cfg.rollout, "sleep_level", 1)), rows=rows,
                       seq_tokens=seq)
    return shape, inp, eng


def _engine(shape: ModelShape, inp: PlanInputs, eng: EngineInputs, gpu_bytes: float) -> dict:
    """The rollout engine's own memory terms (``RolloutEngine.memory_terms``)."""
    from ..rollout import engine_class

    return engine_class(eng.engine).memory_terms(shape, inp, eng, gpu_bytes)


def estimate(shape: ModelShape, inp: PlanInputs, eng: EngineInputs, gpu_bytes: float) -> dict:
    """Every figure of the plan, bytes per rank; ``peak`` and ``fits`` included."""
    upd = component_bytes(shape, inp)
    e = _engine(shape, inp, eng, gpu_bytes)
    update = upd["update_peak"] + e["update"]
    rollout = upd["resident"] + e["rollout"]
    context = CUDA_CONTEXT_GIB * GiB if inp.device == "cuda" else 0.0
    base = max(update, rollout)
    slack = SLACK * base if inp.device == "cuda" else 0.0
    peak = base + context + slack
    return {**upd, "engine_rollout": e["rollout"], "engine_during_update": e["update"],
            "engine_weights": e["weights"], "kv_cache": e["kv_cache"], "kv_tokens": e["kv_tokens"],
            "update_phase": update, "rollout_phase": rollout, "cuda_context": context,
            "allocator_slack": slack, "peak": peak, "gpu_bytes": gpu_bytes,
            "fits": peak <= gpu_bytes}


def suggestions(shape: ModelShape, inp: PlanInputs, eng: EngineInputs, gpu_bytes: float,
                gpus: int) -> list[tuple[str, float, bool]]:
    """Single-setting changes and their peak: ``[(override, peak bytes, fits)]``."""
    def rep(obj, **kw):
        return dataclasses.replace(obj, **kw)

    cands: list[tuple[str, PlanInputs, EngineInputs]] = []
    if inp.optim == "adamw" and not inp.lora_r:
        cands.append(("--optim.name=adamw8bit", rep(inp, optim="adamw8bit"), eng))
        if inp.compute_bf16:
            cands.append(("--optim.name=adamw_bf16_sr",
                          rep(inp, optim="adamw_bf16_sr", weight_bytes=2), eng))
    if inp.offload == "none":
        cands.append(("--train.offload=optimizer", rep(inp, offload="optimizer"), eng))
    if inp.offload != "params":
        cands.append(("--train.offload=params", rep(inp, offload="params", fsdp=True), eng))
    if not inp.lora_r:
        cands.append(("--model.lora.r=16", rep(inp, lora_r=16), eng))
    if inp.micro_batch_tokens >= 2048:
        half = inp.micro_batch_tokens // 2
        cands.append((f"--train.micro_batch_tokens={half}",
                      rep(inp, micro_batch_tokens=half,
                          attention_mask_bytes=inp.attention_mask_bytes // 2), eng))
    if eng.engine == "vllm" and eng.sleep_level == 0:
        cands.append(("--rollout.sleep_level=1", inp, rep(eng, sleep_level=1)))
    if eng.engine == "vllm":
        for util in (0.3, 0.25, 0.2, 0.15, 0.1):
            if util < eng.gpu_memory_utilization:
                cands.append((f"--rollout.gpu_memory_utilization={util}", inp,
                              rep(eng, gpu_memory_utilization=util)))
    cands.append((f"--gpus {gpus * 2} (FSDP2)", rep(inp, world=gpus * 2, fsdp=True),
                  rep(eng, rows=max(1, eng.rows // 2))))
    out = []
    for text, i2, e2 in cands:
        est = estimate(shape, i2, e2, gpu_bytes)
        if e2.engine == "vllm" and est["kv_tokens"] < e2.seq_tokens:
            continue  # the engine would not hold one full sequence
        out.append((text, est["peak"], est["fits"]))
    return out


def parse_memory(text: str) -> float:
    """``"24GiB"``, ``"80GB"``, ``"24"`` (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb)?\s*", text.lower())
    if not m:
        raise ValueError(f"--gpu-memory must look like 24GiB or 80GB, got {text!r}")
    unit = {"gib": GiB, "g": GiB, None: GiB, "gb": 1e9, "mib": 2**20, "mb": 1e6}[m.group(2)]
    return float(m.group(1)) * unit


def _row(label: str, value: float, indent: int = 2) -> str:
    return f"{' ' * indent}{label:{44 - indent}s}{value / GiB:7.2f}"


def format_plan(shape: ModelShape, inp: PlanInputs, eng: EngineInputs, est: dict,
                sugg: list[tuple[str, float, bool]], gpus: int) -> str:
    w = "bf16" if inp.weight_bytes == 2 else "fp32"
    stored = ("bf16 frozen base" if inp.compute_bf16 else "fp32 frozen base") if inp.lora_r else w
    lines = [
        f"model: {est['total_params'] / 1e9:.2f} B params (hidden {shape.hidden}, {shape.layers} "
        f"layers, vocab {shape.vocab:,}, {'tied' if shape.tied else 'untied'} embeddings); "
        f"trainable {est['trainable_params'] / 1e6:,.1f} M",
        f"run: {gpus} x {est['gpu_bytes'] / GiB:.1f} GiB, optim {inp.optim}, weights {stored}"
        f"{' + bf16 compute' if inp.compute_bf16 else ''}, LoRA "
        f"{'r=' + str(inp.lora_r) if inp.lora_r else 'off'}, offload {inp.offload}, "
        f"micro_batch_tokens {inp.micro_batch_tokens}, engine {eng.engine}",
        "", f"{'update phase, per rank':42s}    GiB",
        _row("params (frozen base + fp32 adapters)" if inp.lora_r else
             f"params (stored{', fp32 masters' if w == 'fp32' and inp.compute_bf16 else ''})",
             est["params"]),
        _row("gradients", est["grads"]),
        _row(f"optimizer state ({inp.optim})", est["optimizer_state"]),
        _row("compute copies (bf16 casts / FSDP gather)", est["compute_copies"]),
        _row(f"activations (checkpointed, {inp.micro_batch_tokens} tokens)", est["activations"]),
        _row("fused head workspace", est["head_workspace"]),
        _row("optimizer-step temporaries", est["step_temporaries"]),
        _row("rollout engine while updating", est["engine_during_update"]),
        _row("= update phase peak", est["update_phase"], 0),
        "rollout phase, per rank",
        _row("params + optimizer state (kept)", est["resident"]),
    ]
    if eng.engine == "vllm":
        lines.append(_row(f"vLLM budget ({eng.gpu_memory_utilization} x GPU)",
                          est["engine_rollout"]))
        lines.append(f"    of which weights {est['engine_weights'] / GiB:.2f}, KV cache "
                     f"{est['kv_cache'] / GiB:.2f} GiB = {est['kv_tokens']:,.0f} tokens "
                     f"(one sequence: {eng.seq_tokens:,}; all {eng.rows}: "
                     f"{eng.rows * eng.seq_tokens:,})")
    else:
        lines.append(_row(f"HF engine: KV cache + logits ({eng.rows} x {eng.seq_tokens} tok)",
                          est["engine_rollout"]))
    lines += [_row("= rollout phase peak", est["rollout_phase"], 0),
              _row("CUDA context", est["cuda_context"], 0),
              _row(f"allocator slack ({SLACK:.0%} of the larger phase)", est["allocator_slack"], 0),
              _row(f"PEAK per GPU (of {est['gpu_bytes'] / GiB:.1f} GiB)", est["peak"], 0)]
    if est["host_params"] or est["host_optimizer"]:
        host = est["host_params"] + est["host_optimizer"]
        lines.append(f"host RAM per rank (offload): {host / GiB:.2f} GiB")
    if eng.engine == "vllm" and est["kv_tokens"] < eng.seq_tokens:
        lines.append("WARNING: vLLM's KV cache cannot hold one full sequence: raise "
                     "rollout.gpu_memory_utilization")
    verdict = "FITS" if est["fits"] else "DOES NOT FIT"
    margin = est["gpu_bytes"] - est["peak"]
    lines.append(f"verdict: {verdict} ({'headroom' if margin >= 0 else 'over by'} "
                 f"{abs(margin) / GiB:.2f} GiB)")
    if not est["fits"]:
        fitting = [s for s in sugg if s[2]]
        lines.append("single changes that fit:" if fitting else
                     "no single change fits; combine these (peak after each alone):")
        for text, peak, _ in sorted(fitting or sugg, key=lambda s: s[1])[:6]:
            lines.append(f"  {text:42s} -> {peak / GiB:6.2f} GiB")
    return "\n".join(lines)


def shipped_model_config(cfg, config_paths: list[str] | None) -> str | None:
    """A shipped ``model_configs/<name>.json`` for ``model.path`` when that directory has no
    config.json (a fresh clone, weights not downloaded): ``<name>`` is the path's last part,
    lower-cased, looked up beside each run config (a base and its overlays) and in this
    checkout's ``configs/``."""
    if (Path(cfg.model.path) / "config.json").is_file():
        return None
    name = Path(str(cfg.model.path).rstrip("/")).name.lower() + ".json"
    roots = [Path(path).resolve().parent for path in config_paths or []] + [
        Path(__file__).resolve().parents[2] / "configs"]
    for root in roots:
        candidate = root / "model_configs" / name
        if candidate.is_file():
            return str(candidate)
    return None


def gpu_terms_line(inp: PlanInputs, eng: EngineInputs) -> str:
    """Which figures only a GPU can measure and none has yet (empty once all have)."""
    if inp.device != "cuda":
        return ""
    terms = GPU_ONLY_TERMS + (VLLM_TERMS if eng.engine == "vllm" else ())
    left = [t for t in terms if t not in GPU_MEASURED]
    if not left:
        return ""
    return ("not yet measured on a GPU (CPU-validated model; benchmarks/gpu_check.sh measures "
            "them): " + ", ".join(left))


def plan_config(cfg, gpu_bytes: float, gpus: int = 1, model_config: str | None = None
                ) -> tuple[str, dict]:
    """The plan's text and figures for a resolved run config."""
    shape, inp, eng = inputs_from_config(cfg, gpus, model_config)
    est = estimate(shape, inp, eng, gpu_bytes)
    sugg = [] if est["fits"] else suggestions(shape, inp, eng, gpu_bytes, gpus)
    text = format_plan(shape, inp, eng, est, sugg, gpus)
    note = gpu_terms_line(inp, eng)
    est["gpu_unmeasured"] = note
    return text + (f"\n{note}" if note else ""), est


def _default_gpu_bytes() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 -- planning must not need a working GPU stack
        pass
    return 80.0 * GiB


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="prefix-rft plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, action="append",
                    help="run config YAML; repeat it to overlay a recipe (applied in order)")
    ap.add_argument("--gpu-memory", default=None,
                    help="memory per GPU, e.g. 24GiB / 80GB (default: this GPU's, else 80GiB)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (FSDP2 ranks), default 1")
    ap.add_argument("--model-config", default=None,
                    help="a config.json to read instead of model.path's (e.g. "
                         "configs/model_configs/qwen2.5-math-1.5b.json)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args, extra = ap.parse_known_args(argv)
    from ..config import load_config, split_overrides
    from ..errors import UserError

    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    try:
        cfg = load_config(args.config, split_overrides(extra))
        gpu_bytes = parse_memory(args.gpu_memory) if args.gpu_memory else _default_gpu_bytes()
        model_config = args.model_config or shipped_model_config(cfg, args.config)
        text, est = plan_config(copy.deepcopy(cfg), gpu_bytes, args.gpus, model_config)
    except ValueError as err:  # a config / argument mistake: one clean line, exit status 2
        raise UserError(str(err)) from err
    if model_config and not args.model_config:
        est["model_config"] = model_config
        rel = os.path.relpath(model_config)
        shown = model_config if rel.startswith("..") else rel
        text = (f"model.path {cfg.model.path!r} has no config.json: using the shipped "
                f"{shown} (same architecture; pass --model-config "
                f"to choose another)\n" + text)
    print(json.dumps(est, indent=1) if args.json else text)
    return est


def cli(argv: list[str] | None = None) -> int:
    """``prefix-rft plan``: exit status 0 when the run fits, 1 when it does not (a user
    mistake raises :class:`~prefix_rft.errors.UserError`: status 2 from the CLI)."""
    return 0 if main(argv)["fits"] else 1
