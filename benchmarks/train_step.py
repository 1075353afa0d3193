"""One policy-update step (forward + backward + AdamW) of a random-init Qwen2: fused vs full
logits.

    python -m benchmarks.train_step          # CPU: small Qwen2, vocab 151,936, 2 x 512 tokens
    python -m benchmarks.train_step --gpu            # Qwen2.5-1.5B shape, bf16, 8k/16k/32k tokens
    python -m benchmarks.train_step --smoke          # seconds; for CI (writes nothing)
    prefix-rft bench train_step [--gpu]

Both paths compute the same Prefix-RFT loss (``prefix_rft.loss.prefix_rft_loss``: PPO ratio,
prefix entropy mask, Dr. GRPO normalizer) on the same tokens:

* ``fused``: ``model.model(...)`` -> last hidden states -> ``PrefixRFTLoss`` (one
  ``linear_logprob_entropy`` call over the response tokens; no ``[tokens, V]`` tensor) --
  what ``prefix_rft.train`` runs.
* ``full_logits``: ``model(...).logits`` -> ``log_softmax(logits.float())`` -> gather +
  entropy ``-(p * log p).sum(-1)`` -> the same loss -- what a plain HF trainer does.

Precision mirrors the trainer: fp32 on CPU; on CUDA fp32 weights (AdamW masters) with bf16
autocast compute, gradient checkpointing on. Time: wall clock per step after one warm-up
step (CUDA synchronized). Memory: CUDA ``max_memory_allocated`` over the step (weights,
gradients and Adam states included, so the difference between paths is the loss's); CPU:
each case runs in a fresh subprocess and reports ``peak RSS - RSS after building the model
and inputs``. A case that runs out of memory is reported as ``OOM`` (the largest size that
fits for the full-logits path is printed); a worker that fails otherwise becomes a
``failed: <reason>`` row and the other cases still run. Rows go to ``--out`` (+ ``.md``,
``.png``) through ``benchmarks/results_io``; without ``--out`` to a temporary directory
(printed), never into the source tree: pass ``--out benchmarks/results/train_step.csv`` to
update the committed table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # so an
    # installed prefix_rft still wins over the source checkout (whose prefix_rft/ lacks kernels)

IMPLS = ("fused", "full_logits")
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "prefix-rft-bench", "train_step.csv")
# name -> (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "cpu-small": (256, 4, 4, 2, 768, 151936),  # small body, the real Qwen2.5 vocabulary
    "smoke": (64, 2, 2, 1, 128, 5003),
}


def build_model(shape: str, device: str, checkpointing: bool):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=65536, tie_word_embeddings=False,
                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_inputs(vocab: int, batch: int, seq: int, device: str):
    """Prompt = first quarter of each row, response = the rest; every 4th row has a prefix."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    P = max(1, seq // 4)
    T = seq - P
    response_mask = torch.ones(batch, T, dtype=torch.bool)
    prefix_mask = torch.zeros(batch, T, dtype=torch.bool)
    prefix_mask[::4, : T // 3] = True
    old_logprob = -torch.rand(batch, T, generator=g) * 5
    advantages = torch.randn(batch, generator=g)
    tensors = dict(ids=ids, response_mask=response_mask, prefix_mask=prefix_mask,
                   old_logprob=old_logprob, advantages=advantages)
    return {k: v.to(device) for k, v in tensors.items()}, P, T


def loss_of(model, impl: str, x: dict, P: int, T: int, kernel_impl: str):
    """The Prefix-RFT loss of the batch through ``impl`` (see the module docstring)."""
    import torch

    from prefix_rft.loss import PrefixRFTLoss, prefix_rft_loss
    from prefix_rft.update import head_inputs

    labels = x["ids"][:, P:]
    if impl == "fused":
        hidden = model.model(input_ids=x["ids"]).last_hidden_state[:, P - 1 : P - 1 + T]
        loss_fn = PrefixRFTLoss(max_response_tokens=T, impl=kernel_impl)
        hidden, weight, _ = head_inputs(hidden, model.lm_head.weight, None)  # the trainer's dtypes
        loss, _ = loss_fn(hidden, weight, labels, x["old_logprob"], x["advantages"],
                          x["response_mask"], x["prefix_mask"])
        return loss
    logits = model(input_ids=x["ids"]).logits[:, P - 1 : P - 1 + T]
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprob = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss, _ = prefix_rft_loss(logprob, x["old_logprob"], x["advantages"], x["response_mask"],
                              x["prefix_mask"], entropy, max_response_tokens=T)
    return loss


def run_case(impl: str, shape: str, batch: int, seq: int, repeats: int, device: str) -> dict:
    """Build the model + inputs, run ``repeats + 1`` steps (first = warm-up); return stats."""
    import contextlib

    import torch

    cuda = device == "cuda"
    model = build_model(shape, device, checkpointing=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x, P, T = make_inputs(SHAPES[shape][5], batch, seq, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    rss_before = _rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast:
                loss = loss_of(model, impl, x, P, T, "triton" if cuda else "torch")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
    except torch.OutOfMemoryError:
        return {"impl": impl, "oom": True, "tokens": batch * seq}
    peak_mb = (torch.cuda.max_memory_allocated() if cuda
               else max(_peak_rss() - rss_before, 0)) / 2**20
    tokens_per_s = batch * seq / (sorted(times)[len(times) // 2] / 1e3)
    return {"impl": impl, "oom": False, "tokens": batch * seq, "times_ms": times,
            "peak_mb": peak_mb, "tokens_per_s": tokens_per_s, "loss": float(loss.detach())}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(impl, shape, batch, seq, repeats, device, subprocess_isolation: bool) -> dict:
    """One case, normally in a fresh subprocess (peak memory is this case's alone, and an OOM
    leaves nothing behind for the next case)."""
    if not subprocess_isolation:
        return run_case(impl, shape, batch, seq, repeats, device)
    # By path, from the caller's directory: `-m` from the repository root would put the
    # source checkout ahead of an installed prefix_rft.
    from benchmarks.results_io import run_case_in_subprocess

    r = run_case_in_subprocess(os.path.abspath(__file__),
                               ["--worker", impl, shape, str(batch), str(seq), str(repeats),
                                device], cwd=None, check=False)
    if r.get("failed"):
        return {"impl": impl, "oom": False, "failed": r["failed"], "tokens": batch * seq}
    return r


def write_results(rows: list[dict], csv_path: str) -> None:
    from benchmarks.results_io import write_results as write

    write(rows, csv_path, "Policy-update step: fused hidden-state loss vs full logits",
          png_title="train step (fwd+bwd+AdamW), p50 ms",
          png_rows=lambda every: [r for r in every if r["ms_p50"] not in ("", "nan")])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="prefix-rft bench train_step",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true",
                    help="Qwen2.5-1.5B shape on CUDA at 8k/16k/32k tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step, nothing written")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="tokens per micro-batch (CPU default 1024 as 2 x 512; "
                         "GPU 8192 16384 32768)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    ap.add_argument("--out", default=None,
                    help=f"CSV to append to (default {DEFAULT_OUT}; '-' = none; --smoke writes "
                         "only when --out is given)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, shape, batch, seq, repeats, device = args.worker
        print(json.dumps(run_case(impl, shape, int(batch), int(seq), int(repeats), device)))
        return []
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("prefix-rft bench train_step --gpu: no CUDA device")
        shape, device, repeats = "qwen2.5-1.5b", "cuda", args.repeats or 3
        sizes = [(1, n) for n in (args.tokens or [8192, 16384, 32768])]
    elif args.smoke:
        shape, device, repeats, sizes = "smoke", "cpu", 1, [(2, 64)]
    else:
        shape, device, repeats = "cpu-small", "cpu", args.repeats or 2
        sizes = [(2, n // 2) for n in (args.tokens or [1024])]
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    print(f"train step benchmark: {shape} (hidden {hidden}, {layers} layers, vocab {vocab}) on "
          f"{device}, {repeats} timed steps per case", flush=True)
    from benchmarks.results_io import make_row

    rows, fits = [], {impl: [] for impl in IMPLS}
    for batch, seq in sizes:
        for impl in IMPLS:
            r = measure(impl, shape, batch, seq, repeats, device,
                        subprocess_isolation=not args.smoke)
            label = f"{shape} tokens={batch * seq} ({batch}x{seq})"
            if r.get("failed"):
                print(f"  {batch * seq:6d} tokens  {impl:11s}  failed", flush=True)
                rows.append(make_row("train_step", impl, "fwd+bwd+adamw", label, None, None,
                                     f"failed: {r['failed']}"))
                continue
            if r["oom"]:
                print(f"  {batch * seq:6d} tokens  {impl:11s}  OOM", flush=True)
                rows.append(make_row("train_step", impl, "fwd+bwd+adamw", label, None, None, "OOM"))
                continue
            fits[impl].append(batch * seq)
            p50 = sorted(r["times_ms"])[len(r["times_ms"]) // 2]
            print(f"  {batch * seq:6d} tokens  {impl:11s}  p50 {p50:9.1f} ms  "
                  f"{r['tokens_per_s']:9.1f} tok/s  peak {r['peak_mb']:9.1f} MB", flush=True)
            rows.append(make_row("train_step", impl, "fwd+bwd+adamw", label, r["times_ms"],
                                 r["peak_mb"], f"tokens_per_s={r['tokens_per_s']:.1f}"))
    for impl in IMPLS:
        largest = max(fits[impl]) if fits[impl] else None
        print(f"largest micro-batch that fits, {impl}: {largest if largest else 'none'} tokens")
    if args.out != "-" and (args.out or not args.smoke):
        write_results(rows, args.out or DEFAULT_OUT)
    return rows


if __name__ == "__main__":
    main()
