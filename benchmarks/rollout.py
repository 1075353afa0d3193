"""Rollout throughput: tokens/s of the HF engine and the vLLM engine, plus their log-prob
mismatch against the trainer.

Workload: ``--prompts`` random prompts of ``--prompt-len`` tokens, ``--n`` samples each, a
prefix of ``--prefix-len`` tokens on every other prompt (the hybrid rollouts), sampling at
temperature 1.0 with no stop ids, so every sample generates exactly
``--max-new-tokens - prefix`` tokens: the same token count for both engines. tokens/s =
generated (continuation) tokens / wall time of one ``engine.generate`` call, p50 over
``--repeats`` timed calls after one warm-up call; the engines' calls are interleaved so
that both see the same load on a shared machine. On CUDA, peak MB is
``torch.cuda.max_memory_allocated`` during a call; vLLM's pre-allocated KV cache and
sleep-mode weights live outside that counter, so its budget is ``gpu_memory_utilization``.
The engine's start-up is reported separately (``startup_s``).

Mismatch: after the timed calls, the last call's samples are re-scored by the "trainer"
(one unpadded forward per sample + ``linear_logprob_entropy`` at the sampling temperature)
and ``logprob_mismatch`` gives mean / max |engine - trainer| over continuation tokens.

Models (random init, never downloaded):
- default: a tiny fp32 Qwen2 on CPU (hidden 256, 4 layers, head_dim 64, vocab 4096);
- ``--gpu-shape``: a Qwen2.5-1.5B-shaped bf16 model on CUDA (hidden 1536, 28 layers,
  12/2 heads, vocab 151936, tied embeddings), saved to a temp dir for vLLM.

    python benchmarks/rollout.py                 # tiny model on CPU, both engines
    python benchmarks/rollout.py --smoke         # seconds; CI
    python benchmarks/rollout.py --gpu-shape     # on a GPU machine (vLLM if importable)

Rows append to ``benchmarks/results/rollout.csv`` and the CSV renders to ``rollout.md`` and
``rollout.png`` (:func:`benchmarks.results_io.write_results`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from benchmarks.results_io import (  # noqa: E402
    RESULTS_DIR,
    extra_value,
    make_row,
    write_results,
)

TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=2048, tie_word_embeddings=False)
QWEN25_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   head_dim=128, max_position_embeddings=32768, tie_word_embeddings=True,
                   rope_theta=1000000.0, rms_norm_eps=1e-6)


def build_model(gpu_shape: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_1P5B if gpu_shape else TINY
    dtype = torch.bfloat16 if gpu_shape else torch.float32
    device = "cuda" if gpu_shape else "cpu"
    config = Qwen2Config(**shape, eos_token_id=2, bos_token_id=1, pad_token_id=0,
                         initializer_range=0.05, torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    return model


def make_requests(args, vocab: int):
    from prefix_rft.rollout import RolloutRequest, SamplingSettings

    gen = torch.Generator().manual_seed(0)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens)
    requests = []
    for i in range(args.prompts):
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
        prefix_len = args.prefix_len if i % 2 == 1 else 0
        prefix = torch.randint(3, vocab, (prefix_len,), generator=gen).tolist()
        requests.append(RolloutRequest(prompt, prefix, n=args.n, sampling=sampling))
    return requests


def trainer_mismatch(model, requests, results, temperature: float) -> dict:
    """Re-score every sample with the trainer's path and compare (see module docstring)."""
    from prefix_rft.kernels import linear_logprob_entropy
    from prefix_rft.rollout import continuation_mask_for, logprob_mismatch

    samples = [s for per_request in results for s in per_request]
    owners = [r for r, per_request in zip(requests, results) for _ in per_request]
    width = max(len(s.response_ids) for s in samples)
    trainer = torch.zeros(len(samples), width, dtype=torch.float32)
    device = next(model.parameters()).device
    with torch.no_grad():
        for b, (request, sample) in enumerate(zip(owners, samples)):
            ids = torch.tensor([list(request.prompt_ids) + sample.response_ids], device=device)
            hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
            logprob, _ = linear_logprob_entropy(hidden, model.lm_head.weight, ids[0, 1:],
                                                temperature=temperature)
            first = len(request.prompt_ids) + sample.prefix_len - 1
            trainer[b, sample.prefix_len:len(sample.response_ids)] = logprob[first:].float().cpu()
    return logprob_mismatch([s.logprobs for s in samples], trainer,
                            continuation_mask_for(samples, width))


def build_engine(name: str, model, model_dir: str | None, args):
    from prefix_rft.rollout import make_engine

    if name == "hf":
        return make_engine("hf", model, None, eos_token_ids=(), max_batch_rows=args.max_batch_rows)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM sizes its share from the free memory it sees
    settings = dict(eos_token_ids=(), seed=0,
                    max_model_len=args.prompt_len + args.max_new_tokens + 16)
    if torch.cuda.is_available():
        settings.update(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
    else:
        settings.update(dtype="float32")
    return make_engine("vllm", model_dir, None, **settings)


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        print(f"skipping vllm: cannot import it ({err})")
        return False
    return True


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_engines(names, model, model_dir, requests, args) -> dict[str, dict]:
    """Time ``generate`` for every engine, interleaving the engines' calls so that both see
    the same machine load (this matters on a shared CPU machine)."""
    engines, startup_s = {}, {}
    for name in names:
        if name == "vllm" and not vllm_importable():
            continue
        start = time.perf_counter()
        engines[name] = build_engine(name, model, model_dir, args)
        startup_s[name] = time.perf_counter() - start
        engines[name].generate(requests[:2])  # warm-up (kernels, allocator)
    samples_ms = {name: [] for name in engines}
    results, peak_mb = {}, {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            results[name] = engine.generate(requests)
            _sync()
            samples_ms[name].append((time.perf_counter() - start) * 1e3)
            if torch.cuda.is_available():
                peak_mb[name] = torch.cuda.max_memory_allocated() / 2**20
    out = {}
    for name, engine in engines.items():
        tokens = sum(len(s.logprobs) for per_request in results[name] for s in per_request)
        p50_s = sorted(samples_ms[name])[len(samples_ms[name]) // 2] / 1e3
        stats = trainer_mismatch(model, requests, results[name], temperature=1.0)
        engine.close()
        out[name] = dict(samples_ms=samples_ms[name], tokens=tokens, tokens_per_s=tokens / p50_s,
                         startup_s=startup_s[name], peak_mb=peak_mb.get(name), **stats)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--gpu-shape", action="store_true",
                        help="Qwen2.5-1.5B-shaped bf16 model on CUDA")
    parser.add_argument("--smoke", action="store_true", help="tiny workload, no results saved")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--prefix-len", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-batch-rows", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both engines (1: robust on a shared "
                        "machine, where OpenMP spin-waits make 2+ threads up to 10x slower; "
                        "vLLM's CPU worker also serves with 1)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "rollout.csv"))
    args = parser.parse_args(argv)
    if args.gpu_shape:
        defaults = dict(prompts=32, n=8, prompt_len=256, prefix_len=128, max_new_tokens=512,
                        repeats=3)
    elif args.smoke:
        defaults = dict(prompts=2, n=2, prompt_len=8, prefix_len=4, max_new_tokens=8,
                        repeats=1)
    else:
        defaults = dict(prompts=16, n=4, prompt_len=32, prefix_len=16, max_new_tokens=64,
                        repeats=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu_shape and not torch.cuda.is_available():
        parser.error("--gpu-shape needs a CUDA device")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.gpu_shape)
    requests = make_requests(args, model.config.vocab_size)
    shape = (f"{'qwen2.5-1.5b-shape bf16' if args.gpu_shape else 'tiny-qwen2 fp32 h256 l4 v4096'}"
             f" prompts={args.prompts} n={args.n} prompt={args.prompt_len} "
             f"prefix={args.prefix_len}/2 new<={args.max_new_tokens} threads={args.threads}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rollout_bench_") as model_dir:
        if "vllm" in args.engines:
            model.save_pretrained(model_dir)
        for name, result in bench_engines(args.engines, model, model_dir, requests,
                                          args).items():
            extra = (f"tokens_per_s={result['tokens_per_s']:.1f};tokens={result['tokens']};"
                     f"startup_s={result['startup_s']:.1f};"
                     f"mismatch_mean={result['mismatch_mean']:.2e};"
                     f"mismatch_max={result['mismatch_max']:.2e}")
            print(f"{name:5s} {extra}", flush=True)
            rows.append(make_row("rollout", name, "generate", shape, result["samples_ms"],
                                 result["peak_mb"], extra))
    if not args.smoke and rows:
        panels = [("generated tokens/s (higher is better)",
                   lambda r: extra_value(r, "tokens_per_s")),
                  ("mean |log-prob mismatch| vs the trainer",
                   lambda r: extra_value(r, "mismatch_mean"))]
        write_results(rows, args.out, "Rollout engines: tokens/s and log-prob mismatch vs the "
                      "trainer", panels=panels)
    return rows


if __name__ == "__main__":
    main()
