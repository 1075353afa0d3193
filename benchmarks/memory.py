"""Peak memory of one policy-update step, phase by phase, measured beside the planner's figure.

    nice python -m benchmarks.memory                       # Qwen2 ~0.5B shape, 4 cases, CPU
    python -m benchmarks.memory --shape act-8L-448 --cases adamw_fp32 --tokens 4096 --out -
    python -m benchmarks.memory --shape act-8L-448 --tokens 4096 --no-checkpointing --out -
    prefix-rft bench memory

Model: a Qwen2-shaped decoder built locally with random init (``SHAPES``: ``qwen2-0.5b`` is
the Qwen2.5-0.5B shape; the ``act-*`` shapes, 8-12 layers and a small vocabulary, are where
activations dominate at 4,096 tokens). Cases (``CASES``): full AdamW with fp32 weights,
torchao AdamW 8-bit, bf16-stored weights with stochastic-rounding AdamW, LoRA r = 16. Each
case runs in a **fresh process**, sequentially: build model + optimizer, one packed
micro-batch (4 sequences; the trainer's ``packing.pack`` / ``run_packed_head`` path, fused
head), one warm-up step (allocates optimizer state; torchao compiles its step), then one
step measured phase by phase: the Linux peak-RSS counter is reset
(``/proc/self/clear_refs``) before the forward, the backward and the optimizer step, and each
phase's figure is its peak RSS minus the RSS after the warm-up step (weights, optimizer
state, imports: what stays between steps). Nothing computed is added to the measured side.
glibc is told to ``mmap`` every allocation >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so RSS
follows live tensors instead of heap pages the allocator keeps. The prediction is
``prefix_rft.planner.memory_model``'s ``phase_forward`` / ``phase_backward`` / ``grads`` /
``phase_step`` for the same shape and settings on ``device=cpu`` (each above its
``resident``: no CUDA context, allocator slack or rollout engine).

Rows go to ``benchmarks/results/memory.csv`` (+ ``.md`` with measured vs predicted and the
relative error per phase, ``.png``) through ``benchmarks/results_io``. On CUDA (``--gpu``) the
same phases are measured with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name -> (hidden, layers, heads, kv heads, intermediate, vocab, tied)
SHAPES = {
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "validate-256": (256, 2, 4, 2, 768, 151936, True),
    "validate-512": (512, 2, 8, 2, 1536, 151936, True),
    "validate-896": (896, 2, 14, 2, 4864, 151936, True),
    "validate-256-untied": (256, 2, 4, 2, 768, 151936, False),
    "smoke": (64, 2, 2, 1, 128, 5003, True),
    # activations dominate (small vocabulary, 8+ layers; run at 4096 packed tokens). The
    # first fits the activation constants; the other two are held out (Qwen's I/H ~ 5.5).
    "act-8L-256": (256, 8, 4, 2, 768, 8192, False),
    "act-12L-320": (320, 12, 5, 1, 1728, 8192, False),
    "act-8L-448": (448, 8, 7, 1, 2432, 16384, True),
    "act-10L-384": (384, 10, 6, 2, 2048, 8192, False),
}
# case -> (optim.name, weights dtype, LoRA rank)
CASES = {
    "adamw_fp32": ("adamw", "fp32", 0),
    "adamw8bit": ("adamw8bit", "fp32", 0),
    "adamw_bf16_sr": ("adamw_bf16_sr", "bf16", 0),
    "lora_r16": ("adamw", "fp32", 16),
}


def _rss_kib(field: str = "VmRSS") -> int:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def predict(shape: str, case: str, tokens: int, device: str = "cpu",
            checkpointing: bool = True) -> dict:
    """The planner's figures (bytes) for one case; no CUDA context/slack."""
    from prefix_rft.planner.memory_model import ModelShape, PlanInputs, component_bytes

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    ms = ModelShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                    head_dim=hidden // heads, intermediate=inter, vocab=vocab, tied=tied,
                    qkv_bias=True)
    optim, dtype, r = CASES[case]
    inp = PlanInputs(micro_batch_tokens=tokens, device=device, optim=optim, lora_r=r,
                     weight_bytes=2 if dtype == "bf16" else 4,
                     compute_bf16=dtype == "bf16" or device == "cuda",
                     gradient_checkpointing=checkpointing)
    return component_bytes(ms, inp)


def build(shape: str, case: str, device: str, checkpointing: bool = True):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefix_rft.runtime.lora import apply_lora
    from prefix_rft.runtime.optim import make_optimizer
    from prefix_rft.update.varlen_attention import enable_packed_attention

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    optim, dtype, r = CASES[case]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=8192, tie_word_embeddings=tied, use_cache=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device,
                                     dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if r:
        apply_lora(model, r=r, alpha=2 * r, dropout=0.0)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_packed_attention(model)
    model.train()
    opt = make_optimizer(optim, model.parameters(), lr=1e-5)
    return model, opt


class PeakMeter:
    """Rise of the peak over a base, per phase: peak RSS (``/proc/self/clear_refs`` resets
    VmHWM) on CPU, ``max_memory_allocated`` on CUDA. Nothing computed is added."""

    def __init__(self, cuda: bool):
        import gc

        import torch

        self.cuda, self.torch = cuda, torch
        gc.collect()
        self.base = self.now()

    def now(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.memory_allocated()
        return _rss_kib() * 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS

    def peak_rise(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def run_case(shape: str, case: str, tokens: int, device: str, checkpointing: bool = True) -> dict:
    """Warm-up step, then one step measured phase by phase against the RSS after warm-up
    (weights, optimizer state, imports: what stays between steps); the worker's JSON."""
    import contextlib

    import torch

    from benchmarks.gpu_train_step import packed_batch, step_parts

    cuda = device == "cuda"
    model, opt = build(shape, case, device, checkpointing)
    batch = packed_batch(SHAPES[shape][5], tokens, device, sequences=4)
    forward, backward, step = step_parts(model, opt, batch)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and CASES[case][1] == "fp32"
                else contextlib.nullcontext())
    with autocast:
        loss = forward()
    backward(loss)
    step()
    del loss
    meter = PeakMeter(cuda)
    t0 = time.perf_counter()
    meter.reset()
    with autocast:
        loss = forward()
    fwd = meter.peak_rise()
    meter.reset()
    backward(loss)
    del loss
    bwd, grads = meter.peak_rise(), meter.now() - meter.base
    meter.reset()
    step()
    stp = meter.peak_rise()
    secs = time.perf_counter() - t0
    return {"case": case, "shape": shape, "tokens": tokens, "checkpointing": checkpointing,
            "forward": fwd, "backward": bwd, "grads": grads, "step": stp,
            "peak_bytes": max(fwd, bwd, stp), "resident_rss": meter.base, "step_s": secs,
            "tokens_per_s": tokens / secs}


def measure(shape: str, case: str, tokens: int, device: str = "cpu",
            checkpointing: bool = True) -> dict:
    """One case in a fresh subprocess (so its peak is its own); adds the prediction and the
    error of each phase (``err_<phase>`` = predicted / measured - 1)."""
    from benchmarks.results_io import run_case_in_subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = run_case_in_subprocess(
        "benchmarks.memory", ["--worker", shape, case, str(tokens), device,
                              "1" if checkpointing else "0"], env=env, cwd=root)
    pred = predict(shape, case, tokens, device, checkpointing)
    result["predicted"] = {"forward": pred["phase_forward"], "backward": pred["phase_backward"],
                           "grads": pred["grads"], "step": pred["phase_step"],
                           "activations": pred["activations"], "resident": pred["resident"]}
    result["predicted_bytes"] = max(pred["phase_forward"], pred["phase_backward"],
                                    pred["phase_step"])
    result["rel_error"] = result["predicted_bytes"] / result["peak_bytes"] - 1.0
    for k in ("forward", "backward", "grads", "step"):
        result[f"err_{k}"] = result["predicted"][k] / max(result[k], 1) - 1.0
    return result


def write_results(results: list[dict], csv_path: str, device_note: str) -> None:
    from benchmarks.results_io import make_row
    from benchmarks.results_io import write_results as write

    rows = []
    for r in results:
        mb = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
        phases = ";".join(f"{k}_mb={mb(r[k])};{k}_pred_mb={mb(r['predicted'][k])};"
                          f"{k}_err={r[f'err_{k}']:+.3f}"
                          for k in ("forward", "backward", "grads", "step"))
        extra = (f"predicted_mb={mb(r['predicted_bytes'])};rel_error={r['rel_error']:+.3f};"
                 f"checkpointing={int(r['checkpointing'])};{phases};"
                 f"activations_pred_mb={mb(r['predicted']['activations'])};"
                 f"resident_rss_mb={mb(r['resident_rss'])};tokens_per_s={r['tokens_per_s']:.1f}")
        rows.append(make_row("update_step_memory", r["case"], "fwd+bwd+step",
                             f"{r['shape']} T={r['tokens']}", [r["step_s"] * 1e3],
                             r["peak_bytes"] / 2**20, extra))
    write(rows, csv_path, "Update-step peak memory",
          markdown=lambda every: render_markdown(every, device_note), render=render_png)


def _extra(row: dict) -> dict:
    return dict(kv.split("=", 1) for kv in row["extra"].split(";") if "=" in kv)


def render_markdown(rows: list[dict], device_note: str) -> str:
    head = ["case", "shape", "ckpt", "measured rise MB", "planner MB", "error", "forward err",
            "backward err", "grads err", "step err", "device", "commit", "date"]
    lines = ["# Update-step peak memory: measured rise of peak RSS vs `prefix-rft plan`", "",
             "Measured: the rise of the peak over what stays between steps (weights, optimizer "
             "state), per phase, nothing computed added; planner: the same phases above its "
             "`resident` figure. Rows before this format measured the whole peak.", "",
             device_note, "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        e = _extra(r)
        err = float(e.get("rel_error", "nan")) * 100
        phase = [f"{float(e[k]) * 100:+.1f}%" if k in e else "" for k in (
            "forward_err", "backward_err", "grads_err", "step_err")]
        lines.append("| " + " | ".join([
            r["impl"], r["shape"], e.get("checkpointing", "1"), r["peak_mb"],
            e.get("predicted_mb", ""), f"{err:+.1f}%", *phase, r["device"], r["commit"],
            r["date"]]) + " |")
    return "\n".join(lines) + "\n"


def render_png(rows: list[dict], png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {}
    for r in rows:  # the newest row per (case, shape)
        latest[(r["impl"], r["shape"])] = r
    keys = sorted(latest, key=lambda k: (k[1], list(CASES).index(k[0]) if k[0] in CASES else 9))
    measured = [float(latest[k]["peak_mb"]) / 1024 for k in keys]
    predicted = [float(_extra(latest[k])["predicted_mb"]) / 1024 for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured peak")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, label="planner")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{c}\n{s}" for c, s in keys], fontsize=7)
    ax.set_ylabel("GiB (training side)")
    ax.set_title("one update step: measured vs predicted peak memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="prefix-rft bench memory", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (1 x tokens)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="gradient checkpointing off (every layer's activations kept)")
    ap.add_argument("--gpu", action="store_true", help="measure on CUDA (max_memory_allocated)")
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/memory.csv; "
                                                "'-' = print only)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape, case, tokens, device, ckpt = args.worker
        print(json.dumps(run_case(shape, case, int(tokens), device, ckpt == "1")))
        return []
    device = "cuda" if args.gpu else "cpu"
    import platform

    note = (f"Machine: {platform.machine()} x{os.cpu_count()} CPUs, shared with other jobs, "
            f"OMP_NUM_THREADS=1, fresh process per case, peak RSS (CPU) or "
            f"max_memory_allocated (CUDA); "
            f"`{' '.join(['python -m benchmarks.memory'] + list(argv or sys.argv[1:]))}`")
    results = []
    for case in args.cases:
        r = measure(args.shape, case, args.tokens, device, not args.no_checkpointing)
        print(f"{case:14s} {args.shape} T={args.tokens}: "
              f"measured {r['peak_bytes'] / 2**30:6.2f} GiB"
              f"  planner {r['predicted_bytes'] / 2**30:6.2f} GiB ({r['rel_error']:+.1%})"
              f"  {r['tokens_per_s']:7.1f} tok/s", flush=True)
        results.append(r)
        if args.out != "-":  # each case as it finishes (a long run keeps what it measured)
            write_results([r], args.out or os.path.join(RESULTS, "memory.csv"), note)
    return results


if __name__ == "__main__":
    main()
