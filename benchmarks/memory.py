"""Peak memory of one policy-update step per memory mode, measured beside the planner's figure.

    nice python -m benchmarks.memory                       # Qwen2 ~0.5B shape, 4 cases, CPU
    python -m benchmarks.memory --cases adamw --shape validate-256 --out -   # one case, no files
    prefix-rft bench memory

Model: a Qwen2-shaped decoder built locally with random init (``qwen2-0.5b``: hidden 896,
24 layers, 14 heads / 2 KV heads, intermediate 4864, V = 151,936, tied embeddings -- the
Qwen2.5-0.5B shape). Cases (``CASES``): full AdamW with fp32 weights, torchao AdamW 8-bit,
bf16-stored weights with stochastic-rounding AdamW, LoRA r = 16 on every linear of the
decoder (fp32 frozen base on CPU). Each case runs in a **fresh process**, sequentially:
build model + optimizer + inputs, one warm-up step (allocates optimizer state; torchao
compiles its step), then the Linux peak-RSS counter is reset (``/proc/self/clear_refs``) and
one measured step runs (the trainer's fused path: ``model.model`` -> ``PrefixRFTLoss`` on the
hidden states -> backward -> optimizer step). Measured training-side peak = peak RSS of
that step - process overhead (RSS after the warm-up step minus the bytes of the weights and
the optimizer state: imports, lazily imported modeling code, torchao's compiled steps).
glibc is told to ``mmap`` every allocation >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so RSS
follows live tensors instead of heap pages the allocator keeps. The prediction is
``prefix_rft.memory_model`` for the same shape and settings on ``device=cpu`` (no CUDA
context, allocator slack or rollout engine).

Rows go to ``benchmarks/results/memory.csv`` (+ ``.md`` with measured vs predicted and the
relative error, ``.png``) through ``benchmarks/results_io``. On CUDA (``--gpu``) the same
cases run with ``torch.cuda.max_memory_allocated`` as the measure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
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


def predict(shape: str, case: str, tokens: int, device: str = "cpu") -> dict:
    """The planner's update-phase figure (bytes) for one case; no CUDA context/slack."""
    from prefix_rft.memory_model import ModelShape, PlanInputs, component_bytes

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    ms = ModelShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                    head_dim=hidden // heads, intermediate=inter, vocab=vocab, tied=tied,
                    qkv_bias=True)
    optim, dtype, r = CASES[case]
    inp = PlanInputs(micro_batch_tokens=tokens, device=device, optim=optim, lora_r=r,
                     weight_bytes=2 if dtype == "bf16" else 4,
                     compute_bf16=dtype == "bf16" or device == "cuda")
    return component_bytes(ms, inp)


def build(shape: str, case: str, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefix_rft.lora import apply_lora
    from prefix_rft.optim import make_optimizer

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    optim, dtype, r = CASES[case]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, tie_word_embeddings=tied, use_cache=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device,
                                     dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if r:
        apply_lora(model, r=r, alpha=2 * r, dropout=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = make_optimizer(optim, model.parameters(), lr=1e-5)
    return model, opt


def run_case(shape: str, case: str, batch: int, seq: int, device: str) -> dict:
    """Warm-up step, reset the peak counter, one measured step; the worker's JSON result."""
    import contextlib
    import gc

    import torch

    from benchmarks.train_step import loss_of, make_inputs
    from prefix_rft.optim import state_bytes
    cuda = device == "cuda"
    rss0 = 0
    model, opt = build(shape, case, device)
    x, P, T = make_inputs(SHAPES[shape][5], batch, seq, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and CASES[case][1] == "fp32"
                else contextlib.nullcontext())
    times = []
    for i in range(2):
        gc.collect()
        if i == 1:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
                # process overhead = RSS now minus the tensors the trainer holds between steps
                # (weights + optimizer state): imports, lazily imported modeling code, torchao's
                # compiled step functions -- not training memory, and absent from GPU memory
                tensors = [*model.parameters(), *model.buffers()]
                held = sum(t.numel() * t.element_size() for t in tensors) + state_bytes(opt)
                rss0 = _rss_kib() * 1024 - held
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(model, "fused", x, P, T, "triton" if cuda else "torch")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024 - rss0)
    return {"case": case, "shape": shape, "tokens": batch * seq, "peak_bytes": peak,
            "rss0_bytes": rss0, "step_s": times[1], "tokens_per_s": batch * seq / times[1],
            "first_step_s": times[0], "loss": float(loss.detach())}


def measure(shape: str, case: str, batch: int, seq: int, device: str = "cpu") -> dict:
    """One case in a fresh subprocess (so its peak is its own); adds the prediction."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", shape, case, str(batch),
           str(seq), device]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory benchmark worker failed ({case}, {shape}):\n"
                           f"{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    pred = predict(shape, case, batch * seq, device)
    result["predicted_bytes"] = pred["update_peak"]
    result["rel_error"] = pred["update_peak"] / result["peak_bytes"] - 1.0
    return result


def write_results(results: list[dict], csv_path: str, device_note: str) -> None:
    from benchmarks.results_io import append_rows, make_row, read_rows

    rows = []
    for r in results:
        extra = (f"predicted_mb={r['predicted_bytes'] / 2**20:.1f};rel_error={r['rel_error']:+.3f};"
                 f"tokens_per_s={r['tokens_per_s']:.1f};rss0_mb={r['rss0_bytes'] / 2**20:.1f};"
                 f"first_step_s={r['first_step_s']:.1f}")
        rows.append(make_row("update_step_memory", r["case"], "fwd+bwd+step",
                             f"{r['shape']} T={r['tokens']}", [r["step_s"] * 1e3],
                             r["peak_bytes"] / 2**20, extra))
    append_rows(csv_path, rows)
    every = read_rows(csv_path)
    stem = os.path.splitext(csv_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(every, device_note))
    render_png(every, stem + ".png")
    print(f"appended {len(rows)} rows to {csv_path}")


def _extra(row: dict) -> dict:
    return dict(kv.split("=", 1) for kv in row["extra"].split(";") if "=" in kv)


def render_markdown(rows: list[dict], device_note: str) -> str:
    head = ["case", "shape", "measured peak MB", "planner MB", "error", "tokens/s", "step ms",
            "device", "commit", "date"]
    lines = ["# Update-step peak memory: measured vs `prefix-rft plan`", "", device_note, "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        e = _extra(r)
        err = float(e.get("rel_error", "nan")) * 100
        lines.append("| " + " | ".join([
            r["impl"], r["shape"], r["peak_mb"], e.get("predicted_mb", ""), f"{err:+.1f}%",
            e.get("tokens_per_s", ""), r["ms_p50"], r["device"], r["commit"], r["date"]]) + " |")
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
    ap.add_argument("--gpu", action="store_true", help="measure on CUDA (max_memory_allocated)")
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/memory.csv; "
                                                "'-' = print only)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape, case, batch, seq, device = args.worker
        print(json.dumps(run_case(shape, case, int(batch), int(seq), device)))
        return []
    device = "cuda" if args.gpu else "cpu"
    import platform

    note = (f"Machine: {platform.machine()} x{os.cpu_count()} CPUs, shared with other jobs, "
            f"OMP_NUM_THREADS=1, fresh process per case, peak RSS (CPU) or "
            f"max_memory_allocated (CUDA); "
            f"`{' '.join(['python -m benchmarks.memory'] + list(argv or sys.argv[1:]))}`")
    results = []
    for case in args.cases:
        r = measure(args.shape, case, 1, args.tokens, device)
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
