"""Update-phase throughput and memory, padded vs packed micro-batches, on CPU.

    nice python -m benchmarks.packing            # wide + narrow spreads, ~10 min on 2 cores
    python -m benchmarks.packing --smoke         # seconds; for CI (writes nothing)
    prefix-rft bench packing

One case = one policy update (``prefix_rft.train.policy_update``: micro-batched Prefix-RFT
loss, backward, AdamW step) of a random-init Qwen2-shaped model (hidden 256, 4 layers, GQA
4/2 heads, intermediate 768, the real Qwen2.5 vocabulary of 151,936, gradient checkpointing
on as in the trainer's default) over one mini-batch of rollouts whose old log-probs are set.
``train.packing`` is the only difference between the two layouts of a spread:

* ``padded``: micro-batches cut in order under ``micro_batch_tokens`` charged
  ``len(mb) x longest``, right-padded ``[B, W]`` rows.
* ``packed``: first-fit-decreasing micro-batches of real tokens, one packed row each, attention
  per sequence (prefix_rft/update/varlen_attention.py).

Spreads (response lengths; prompts 100-300 tokens for ``wide``, the demo's 13-19 for
``narrow``): ``wide`` = 16 rollouts, log-normal (median 256, sigma 1.0) clipped to
[32, 2048] with 15% of the rollouts truncated at the 2,048 cap -- R1-style traces next to
short answers -- under the trainer's default ``micro_batch_tokens`` of 16,384; ``narrow`` =
64 rollouts of the demo task's shape (responses ~N(32, 8) in [8, 64], 10% at the 64 cap)
under the demo config's 8,192.

Each case runs in a fresh subprocess with one torch thread (``OMP_NUM_THREADS=1``) under
``nice``, after a warm-up update on 8 short rollouts. Time is the process's CPU time of the
whole update (``ms_p50``; one sample), since on a shared machine the wall clock mostly
measures the other jobs (the wall-clock rate is in ``extra`` too); tokens/s counts real
(prompt + response) tokens; peak memory is the process's peak RSS above its RSS after
building the model and the batch. Rows go to ``benchmarks/results/packing.csv`` (+ ``.md``,
``.png``) through ``benchmarks/results_io``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYOUTS = ("padded", "packed")
# name -> (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {"cpu-small": (256, 4, 4, 2, 768, 151936), "smoke": (32, 2, 4, 2, 64, 1003)}
# name -> (number of rollouts, micro_batch_tokens, max_response_tokens)
SPREADS = {"wide": (16, 16384, 2048), "narrow": (64, 8192, 64)}


def sample_lengths(spread: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, response) token counts of a spread (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if spread == "wide":
        prompts = rng.integers(100, 301, n)
        resp = np.clip(rng.lognormal(np.log(256), 1.0, n), 32, 2048).astype(int)
        resp[rng.random(n) < 0.15] = 2048  # truncated at the cap
    elif spread == "narrow":
        prompts = rng.integers(13, 20, n)
        resp = np.clip(rng.normal(32, 8, n), 8, 64).astype(int)
        resp[rng.random(n) < 0.10] = 64
    else:
        raise ValueError(f"spread must be one of {tuple(SPREADS)}, got {spread!r}")
    return [(int(p), int(r)) for p, r in zip(prompts, resp)]


def build_rollouts(spread: str, n: int, vocab: int, group_size: int = 8):
    """Rollouts of the spread: random ids, every ``group_size``-th one a hybrid with a prefix,
    random advantages and old log-probs near the current policy's."""
    import torch

    from prefix_rft.update import Rollout

    g = torch.Generator().manual_seed(1)
    rollouts = []
    for i, (P, R) in enumerate(sample_lengths(spread, n)):
        hybrid = i % group_size == 0
        rollouts.append(Rollout(
            prompt_ids=torch.randint(0, vocab, (P,), generator=g).tolist(),
            response_ids=torch.randint(0, vocab, (R,), generator=g).tolist(),
            prefix_len=R // 2 if hybrid else 0, group=i // group_size, is_prefixed=hybrid,
            advantage=float(torch.randn((), generator=g)),
            engine_logprobs=[-12.0] * (R - (R // 2 if hybrid else 0)),
            old_logprob=-torch.rand(R, generator=g) * 2 - 11.0,
            old_entropy=torch.rand(R, generator=g) * 5))
    return rollouts


def _config(spread: str, layout: str, n: int):
    from prefix_rft.config import Config

    _, budget, max_resp = SPREADS[spread]
    cfg = Config()
    cfg.train.packing = layout == "packed"
    cfg.train.micro_batch_tokens = budget
    cfg.rollout.group_size = 8
    cfg.train.prompts_per_step = cfg.train.mini_batch_size = max(1, n // 8)
    cfg.rollout.max_response_tokens = max_resp
    cfg.loss.kernel_impl = "torch"
    return cfg


def build_run(spread: str, layout: str, n: int, shape: str):
    """A :class:`prefix_rft.run.setup.Run` around a random-init Qwen2 (no engine, no data)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefix_rft.run.setup import Run, build_loss, build_optimizer
    from prefix_rft.update.varlen_attention import enable_packed_attention

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = _config(spread, layout, n)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.train.packing:
        enable_packed_attention(model)
    optimizer, scheduler = build_optimizer(cfg, model)
    return Run(cfg=cfg, model=model, tokenizer=None, engine=None, optimizer=optimizer,
               scheduler=scheduler, loss_fn=build_loss(cfg), dataset=None, sampler=None,
               device=torch.device("cpu"), rank=0, world=1, run_dir=None, pad_id=0)


def run_case(spread: str, layout: str, shape: str) -> dict:
    """Warm up on two short rollouts, then time the old-log-prob pass and the policy update
    over the whole mini-batch."""
    import torch

    from prefix_rft.train import old_logprobs, policy_update

    torch.set_num_threads(1)
    n = SPREADS[spread][0] if shape != "smoke" else 8
    run = build_run(spread, layout, n, shape)
    rollouts = build_rollouts(spread, n, SHAPES[shape][5])
    warm = sorted(rollouts, key=lambda r: r.num_tokens)[:8]
    for r in warm:
        r.group = 0
    old_logprobs(run, warm)
    policy_update(run, warm)
    rollouts = build_rollouts(spread, n, SHAPES[shape][5])
    rss_before = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    old_logprobs(run, rollouts)
    t1, c1 = time.perf_counter(), time.process_time()
    m = policy_update(run, rollouts)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"spread": spread, "layout": layout, "n": n, "old_s": t1 - t0, "update_s": t2 - t1,
            "old_cpu_s": c1 - c0, "update_cpu_s": c2 - c1,
            "tokens": m["update_tokens"], "padded_tokens": m["update_padded_tokens"],
            "padding_frac": m["update_padding_frac"],
            "padding_frac_if_padded": m["update_padding_frac_if_padded"],
            "response_tokens": sum(len(r.response_ids) for r in rollouts),
            "peak_mb": max(_peak_rss() - rss_before, 0) / 2**20, "loss": m["loss"]}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(spread: str, layout: str, shape: str) -> dict:
    """One case in a fresh subprocess, one thread, under ``nice``."""
    from benchmarks.results_io import run_case_in_subprocess

    return run_case_in_subprocess("benchmarks.packing", ["--worker", spread, layout, shape],
                                  threads=1, nice=True)


def to_rows(results: list[dict], shape: str) -> list[dict]:
    from benchmarks.results_io import make_row

    rows = []
    for r in results:
        base = next(x for x in results if x["spread"] == r["spread"] and x["layout"] == "padded")
        tps = r["tokens"] / r["update_cpu_s"]
        speedup = base["update_cpu_s"] / r["update_cpu_s"]
        extra = (f"update_tokens_per_cpu_s={tps:.1f};speedup_vs_padded={speedup:.2f};"
                 f"update_tokens_per_wall_s={r['tokens'] / r['update_s']:.1f};"
                 f"update_tokens={r['tokens']:.0f};padded_tokens={r['padded_tokens']:.0f};"
                 f"padding_frac={r['padding_frac']:.3f};"
                 f"old_logprob_tokens_per_cpu_s={r['tokens'] / r['old_cpu_s']:.1f}")
        label = f"{shape} {r['spread']} n={r['n']}"
        rows.append(make_row("policy_update", r["layout"], "fwd+bwd+adamw", label,
                             [r["update_cpu_s"] * 1e3], r["peak_mb"], extra))
    return rows


def write_results(rows: list[dict], csv_path: str) -> None:
    """CSV + Markdown + a two-panel PNG (update tokens per CPU second, peak RSS)."""
    from benchmarks.results_io import extra_value, write_results

    panels = [("update tokens per CPU second (higher is better)",
               lambda r: extra_value(r, "update_tokens_per_cpu_s")),
              ("peak RSS above baseline, MB", lambda r: float(r["peak_mb"]))]
    write_results(rows, csv_path, "Policy update: padded vs packed micro-batches (CPU)",
                  panels=panels)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="prefix-rft bench packing",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, in process; writes nothing unless --out is given")
    ap.add_argument("--spreads", nargs="+", default=list(SPREADS), choices=list(SPREADS))
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/packing.csv)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(*args.worker)))
        return []
    shape = "smoke" if args.smoke else "cpu-small"
    results = []
    for spread in args.spreads:
        for layout in LAYOUTS:
            r = run_case(spread, layout, shape) if args.smoke else measure(spread, layout, shape)
            results.append(r)
            print(f"{spread:7s} {layout:7s} update {r['update_cpu_s']:7.1f} CPU s "
                  f"({r['update_s']:7.1f} wall) {r['tokens'] / r['update_cpu_s']:7.1f} tok/CPU s"
                  f"  padding {r['padding_frac']:.3f}  old pass {r['old_cpu_s']:6.1f} CPU s"
                  f"  peak {r['peak_mb']:7.1f} MB", flush=True)
    rows = to_rows(results, shape)
    if args.out != "-" and (args.out or not args.smoke):
        write_results(rows, args.out or os.path.join(RESULTS, "packing.csv"))
    return rows


if __name__ == "__main__":
    main()
