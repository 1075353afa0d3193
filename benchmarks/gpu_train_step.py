"""One training step per 1.5B preset on the GPU, beside `prefix-rft plan`'s figures for it.

    python3 benchmarks/gpu_train_step.py --out-dir OUT            # CUDA
    python3 benchmarks/gpu_train_step.py --out-dir OUT --dry-run  # CPU, tiny model, fp32

Per preset in ``PRESETS`` (random-init Qwen2.5-Math-1.5B shape from
``configs/model_configs/qwen2.5-math-1.5b.json``, built on the GPU): the preset's precision
(stored weights, bf16 autocast), optimizer (``prefix_rft.runtime.optim.make_optimizer``) and
gradient checkpointing, one packed micro-batch of ``--tokens`` (8 sequences, the trainer's
``packing.pack`` / ``run_packed_head`` path and the fused head), one warm-up step then
``--repeats`` timed steps. Measured (``torch.cuda``): the step's ``max_memory_allocated``,
what stays allocated between steps, the allocator's slack (``max_memory_reserved -
max_memory_allocated``) and the CUDA context (device memory in use outside the allocator);
planned: ``prefix_rft.planner.plan`` for that exact config (``train.micro_batch_tokens`` = the
tokens; no rollout engine in this process, so its update-phase figure less the engine's).
Each row goes to ``OUT/train_step.csv`` at once (``extra`` holds both sides and the error);
a preset whose optimizer cannot be built here (torchao absent) is a ``skipped`` row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.results_io import append_rows, make_row  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("qwen2.5-math-1.5b.yaml", "qwen2.5-math-1.5b-24gb.yaml")
MODEL_JSON = os.path.join(ROOT, "configs", "model_configs", "qwen2.5-math-1.5b.json")
DRY_MODEL = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
             "vocab_size": 5003, "tie_word_embeddings": False}
GiB = 2 ** 30


def build_model(raw: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefix_rft.update.varlen_attention import enable_packed_attention

    cfg = Qwen2Config(**{k: v for k, v in raw.items() if k != "model_type"},
                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_packed_attention(model)
    model.train()
    return model


def packed_batch(vocab: int, tokens: int, device: str, sequences: int = 8):
    from prefix_rft.update.batch import Rollout
    from prefix_rft.update.packed import pack

    g = torch.Generator().manual_seed(1)
    per = tokens // sequences
    prompt = per // 4
    rollouts = [Rollout(prompt_ids=torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                        response_ids=torch.randint(0, vocab, (per - prompt,), generator=g).tolist(),
                        prefix_len=(per - prompt) // 3 if i % 4 == 0 else 0,
                        advantage=float(torch.randn(1, generator=g)))
                for i in range(sequences)]
    return pack(rollouts, range(sequences), device=device)


def step_parts(model, optimizer, batch):
    """``(forward() -> loss, backward(loss), step())`` of one update on a packed batch: the
    trainer's packed forward and fused head (log-prob + entropy), a policy-gradient loss."""
    from prefix_rft.kernels import linear_logprob_entropy
    from prefix_rft.update.head import run_head

    adv = batch.advantages[batch.seq_index] if batch.advantages.numel() != len(
        batch.response_ids) else batch.advantages

    def head(hidden, weight, bias):
        return linear_logprob_entropy(hidden, weight, batch.response_ids, bias=bias)

    def forward():
        lp, ent = run_head(model, batch, head)
        return -(lp * adv).mean() - 1e-3 * ent.mean()

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return forward, lambda loss: loss.backward(), step


def step_fn(model, optimizer, batch, autocast: bool):
    forward, backward, step = step_parts(model, optimizer, batch)

    def run():
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward()
        backward(loss)
        step()
    return run


def planned(preset: str, tokens: int, model_json: str, dry_run: bool, gpu_bytes: float) -> dict:
    """``prefix_rft.planner.plan``'s figures for the preset at ``tokens`` (bytes)."""
    from prefix_rft.config import load_config
    from prefix_rft.planner.plan import plan_config

    over = [f"--train.micro_batch_tokens={tokens}"] + (["--train.device=cpu"] if dry_run else [])
    cfg = load_config(os.path.join(ROOT, "configs", preset), over)
    _, est = plan_config(cfg, gpu_bytes, 1, model_json)
    est["_optim"], est["_weights"] = cfg.optim.name, getattr(cfg.model, "weights_dtype", "fp32")
    return est


def measure(raw: dict, est: dict, tokens: int, repeats: int, device: str) -> dict:
    from prefix_rft.runtime.optim import make_optimizer
    from prefix_rft.runtime.precision import stored_weights_dtype

    cuda = device == "cuda"
    stored = stored_weights_dtype(est["_weights"], est["_optim"])
    model = build_model(raw, device, torch.bfloat16 if stored == "bf16" else torch.float32)
    optimizer = make_optimizer(est["_optim"], model.parameters(), lr=1e-6)
    step = step_fn(model, optimizer, packed_batch(raw["vocab_size"], tokens, device), cuda)
    step()  # warm-up: optimizer state, Triton / torch.compile caches
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"times": times, "tokens_per_s": tokens / (sorted(times)[len(times) // 2] / 1e3)}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak=torch.cuda.max_memory_allocated(), resident=resident,
                   slack=torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated(),
                   context=total - free - torch.cuda.memory_reserved())
    return out


def row_for(preset: str, tokens: int, est: dict, got: dict) -> dict:
    plan_update = est["update_phase"] - est["engine_during_update"]
    extra = [f"tokens_per_s={got['tokens_per_s']:.0f}", f"optim={est['_optim']}",
             f"plan_update_gib={plan_update / GiB:.2f}",
             f"plan_resident_gib={est['resident'] / GiB:.2f}",
             f"plan_activations_gib={est['activations'] / GiB:.2f}",
             f"plan_copies_gib={est['compute_copies'] / GiB:.2f}",
             f"plan_context_gib={est['cuda_context'] / GiB:.2f}",
             f"plan_slack_gib={est['allocator_slack'] / GiB:.2f}"]
    if "peak" in got:
        extra += [f"peak_gib={got['peak'] / GiB:.2f}", f"resident_gib={got['resident'] / GiB:.2f}",
                  f"context_gib={got['context'] / GiB:.2f}", f"slack_gib={got['slack'] / GiB:.2f}",
                  f"update_err={plan_update / got['peak'] - 1:+.3f}"]
    peak_mb = got["peak"] / 2 ** 20 if "peak" in got else None
    return make_row("train_step", preset.removesuffix(".yaml"), "fwd+bwd+optim",
                    f"packed {tokens} tokens, ckpt", got["times"], peak_mb, ";".join(extra))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one timed step")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "train_step.csv")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, tokens, repeats, raw = "cpu", 256, 1, dict(DRY_MODEL)
        model_json = os.path.join(args.out_dir, "dry_model.json")
        with open(model_json, "w") as f:
            json.dump(raw, f)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_train_step.py: needs CUDA (or --dry-run)")
        device, tokens, repeats, model_json = "cuda", args.tokens, args.repeats, MODEL_JSON
        raw = json.load(open(model_json))
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 80 * GiB
    failed = 0
    for preset in PRESETS:
        try:
            est = planned(preset, tokens, model_json, args.dry_run, gpu_bytes)
            r = row_for(preset, tokens, est, measure(raw, est, tokens, repeats, device))
        except Exception as err:  # noqa: BLE001 -- record it, go on with the next preset
            reason = f"{type(err).__name__}: {err}".splitlines()[0].replace(";", ",")[:160]
            absent = isinstance(err, ImportError) or "need torchao" in str(err)
            kind = "skipped" if absent else "failed"
            failed += kind == "failed"
            r = make_row("train_step", preset.removesuffix(".yaml"), "fwd+bwd+optim",
                         f"packed {tokens} tokens, ckpt", None, None, f"{kind}: {reason}")
        append_rows(csv_path, [r])
        print(r["impl"], r["ms_p50"], r["peak_mb"], r["extra"], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
