"""TRL's GRPOTrainer policy update: TRL's own head, Liger's GRPO loss, this project's drop-in,
and this project's trainer -- same model, batch and thread count, each in a fresh process.

    nice python -m benchmarks.trl                     # all cases, writes benchmarks/results/trl.*
    nice python -m benchmarks.trl --cases trl trl_prefix_rft --repeats 3 --out -
    python -m benchmarks.trl --smoke                  # tiny model, seconds, nothing written

**One run, interleaved.** ``--repeats`` N (default 3) rounds; each round runs every case once,
in a fresh process (one warm-up step, then ``--steps`` timed steps, default 1), the order
rotated by one case per round, so a slow spell of a shared machine hits every case alike. Each
case's row holds its N x steps timings: ``ms_p20/p50/p80`` and ``tokens_per_s = tokens /
ms_p50`` (one statistic for both). The ratios between cases (``benchmarks/trl_report.py``:
drop-in vs TRL, trainer vs TRL, end to end, generation) are computed from the rows of this run
only (``run=<id>`` in ``extra``), printed and written under the table in ``trl.md``; none is
stated with fewer than 3 repeats.

Cases (policy update = forward + loss + backward over the micro-batches of one batch, then
AdamW; on-policy, ``num_iterations=1``, so no old-log-prob pass unless the case says so):

* ``trl`` -- a stock ``trl.GRPOTrainer`` (``loss_type="dr_grpo"``, ``beta=0``): TRL's fused
  chunked log-prob/entropy head and TRL's loss (``trainer.compute_loss``).
* ``trl_liger`` -- the same trainer computing the loss with Liger-Kernel's
  ``LigerFusedLinearGRPOLoss`` over the last hidden states, as TRL <= 1.12 did with
  ``use_liger_loss=True`` (``compiled=True``, its default; no entropy).
* ``trl_prefix_rft`` -- :class:`prefix_rft.integrations.trl.PrefixRFTGRPOTrainer`.
* ``prefix_rft_trainer`` -- this project's trainer (``prefix_rft.train.policy_rows`` +
  ``policy_update``) on the same token ids, as rollouts: one optimizer step per rollout batch,
  so it skips the old-log-prob pass (``is_exactly_on_policy``); ``prefix_rft_trainer+old``
  forces that pass (``prefix_rft.train.old_logprobs``), as the trainer ran before it skipped it.

Every case uses fp32 weights and compute, no gradient checkpointing, ``torch.set_num_threads(1)``,
AdamW (lr 1e-6). Time: wall clock of each timed step after one warm-up step (Liger's
``torch.compile`` happens in the warm-up). Tokens/s counts prompt + completion tokens of the
batch. Memory: ``peak_mb`` = the process's peak RSS minus its RSS after building the model,
the trainer and the inputs (the step's own memory), the median over the case's processes;
``rss_peak_mb`` in ``extra`` is the whole process's peak (TRL imports vLLM when installed,
which adds to it). ``update_path`` in ``extra`` (trainer cases) is what the trainer's update
reported about the path it took, when its metrics say.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from benchmarks.trl_e2e import E2E_CASES, GEN_CASES
from benchmarks.trl_report import MIN_REPEATS, render_ratios, run_ratios, tokens_per_s

UPDATE_CASES = ("trl", "trl_liger", "trl_prefix_rft", "prefix_rft_trainer",
                "prefix_rft_trainer+old")
CASES = UPDATE_CASES + E2E_CASES + GEN_CASES
TRL_CASES = ("trl", "trl_liger", "trl_prefix_rft")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (hidden, layers, heads, kv heads, intermediate, vocab): Qwen2-shaped, the Qwen2.5 vocabulary
SHAPES = {"cpu": (256, 4, 4, 2, 768, 151936), "smoke": (64, 2, 2, 1, 128, 5003)}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model(shape: str, use_cache: bool = False):
    """A random Qwen2-shaped fp32 model. ``use_cache=True`` as a real checkpoint's config.json
    (its generation config then caches K/V); False for the update-only cases."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, tie_word_embeddings=False, use_cache=use_cache,
                      pad_token_id=0, eos_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).float().train()


def make_batch(vocab: int, sequences: int, prompt: int, completion: int) -> dict:
    """Random token ids (ids >= 2), full masks, Dr. GRPO advantages (zero-mean per group of 8)."""
    import torch

    g = torch.Generator().manual_seed(1)
    adv = torch.randn(sequences, generator=g)
    adv = adv - adv.view(-1, min(8, sequences)).mean(1, keepdim=True).repeat_interleave(
        min(8, sequences), 1).view(-1)
    return {
        "prompt_ids": torch.randint(2, vocab, (sequences, prompt), generator=g),
        "prompt_mask": torch.ones(sequences, prompt, dtype=torch.long),
        "completion_ids": torch.randint(2, vocab, (sequences, completion), generator=g),
        "completion_mask": torch.ones(sequences, completion, dtype=torch.long),
        "advantages": adv,
    }


# ---------------------------------------------------------------------------- TRL cases
def _liger_trainer_class():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from trl import GRPOTrainer

    class LigerGRPOTrainer(GRPOTrainer):
        """TRL <= 1.12's ``use_liger_loss`` path: hidden states -> Liger's fused GRPO loss."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.liger_loss = LigerFusedLinearGRPOLoss(
                beta=0.0, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                temperature=self.temperature, use_ref_model=False, loss_type="dr_grpo",
                max_completion_length=self.max_completion_length)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            T = inputs["completion_ids"].size(1)
            hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
            hidden = hidden[:, :-1][:, -T:]
            loss, metrics = self.liger_loss(
                _input=hidden, lin_weight=model.lm_head.weight,
                selected_token_ids=inputs["completion_ids"],
                attention_mask=inputs["completion_mask"],
                advantages=inputs["advantages"], bias=model.lm_head.bias,
                old_per_token_logps=inputs.get("old_per_token_logps"))
            self._metrics["train"]["clip_ratio"].append(metrics[-1].mean().item())
            return loss / self.current_gradient_accumulation_steps

    return LigerGRPOTrainer


def build_trl_trainer(case: str, model, micro: int, accumulation: int, completion: int, tmp: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from prefix_rft.demo.tokenizer import train_tokenizer

    tok = train_tokenizer(["what is 1 + 2 ? the answer is 3"] * 10, vocab_size=300)
    args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=micro,
                      gradient_accumulation_steps=accumulation, num_generations=8,
                      max_completion_length=completion, loss_type="dr_grpo", beta=0.0,
                      scale_rewards="none", bf16=False, gradient_checkpointing=False,
                      use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    if case == "trl":
        cls = GRPOTrainer
    elif case == "trl_liger":
        cls = _liger_trainer_class()
    else:
        from prefix_rft.integrations.trl import PrefixRFTGRPOTrainer as cls
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                  args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
                  processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    return trainer


def trl_step(trainer, micro_batches: list[dict]) -> None:
    for mb in micro_batches:
        loss = trainer.compute_loss(trainer.model, mb)
        loss.backward()


# ---------------------------------------------------------------------------- our trainer
def build_trainer_case(model, batch: dict, micro: int):
    """Config + rollouts for ``prefix_rft.train.update`` on the batch's token ids."""
    from prefix_rft.config import Config, resolve_config
    from prefix_rft.loss import PrefixRFTLoss
    from prefix_rft.update import Rollout

    B, P = batch["prompt_ids"].shape
    T = batch["completion_ids"].shape[1]
    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.max_response_tokens = 8, T
    cfg.train.prompts_per_step = cfg.train.mini_batch_size = B // 8
    cfg.train.micro_batch_tokens = micro * (P + T)
    cfg.model.gradient_checkpointing = False
    cfg = resolve_config(cfg)
    rollouts = [Rollout(prompt_ids=batch["prompt_ids"][i].tolist(),
                        response_ids=batch["completion_ids"][i].tolist(), group=i // 8,
                        advantage=float(batch["advantages"][i]),
                        engine_logprobs=[0.0] * T) for i in range(B)]
    loss_fn = PrefixRFTLoss(max_response_tokens=T, impl="torch",
                            entropy_top_fraction=cfg.loss.entropy_top_fraction)
    return cfg, rollouts, loss_fn


def build_run(model, cfg, loss_fn, tmp: str):
    """A :class:`prefix_rft.run.setup.Run` around the benchmark's model (no engine, no data)."""
    from pathlib import Path

    import torch

    from prefix_rft.run.setup import Run

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Run(cfg=cfg, model=model, tokenizer=None, engine=None, optimizer=optimizer,
               scheduler=scheduler, loss_fn=loss_fn, dataset=None, sampler=None,
               device=torch.device("cpu"), rank=0, world=1, run_dir=Path(tmp), pad_id=0)


def trainer_step(run, rollouts, with_old: bool) -> dict:
    """What ``prefix_rft.train.train_step`` runs after scoring: ``policy_rows`` (the old-log-prob
    pass, skipped when exactly on-policy) and ``policy_update``, the trainer's own update with
    whatever path it takes; returns its metrics. ``with_old`` forces the pass (the trainer
    before it learned to skip it)."""
    import prefix_rft.train as T

    if with_old:
        T.is_exactly_on_policy = lambda cfg: False
    rows, _ = T.policy_rows(run, [], rollouts)
    return T.policy_update(run, rows) or {}


def update_path(metrics: dict) -> str:
    """What the trainer's update metrics say about the path it ran (keys naming a path or the
    fused head / loss), e.g. ``"fused_loss:1.0"``; "" when they say nothing."""
    keys = sorted(k for k in metrics if "path" in k or "fused" in k)
    return ",".join(f"{k}:{metrics[k]}" for k in keys)


# ---------------------------------------------------------------------------- one case
def run_case(case: str, shape: str, sequences: int, prompt: int, completion: int, micro: int,
             steps: int) -> dict:
    """One process's measurement of ``case``: a warm-up step, then ``steps`` timed steps."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    model = build_model(shape, use_cache=case in E2E_CASES + GEN_CASES)
    if case in E2E_CASES + GEN_CASES:
        from benchmarks import trl_e2e

        rss_setup = _rss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            times, tokens = trl_e2e.run_case(case, model, sequences, prompt, completion, micro,
                                             steps, tmp)
        return _result(case, times, tokens, rss_setup, "")
    batch = make_batch(SHAPES[shape][5], sequences, prompt, completion)
    accumulation = sequences // micro
    with tempfile.TemporaryDirectory() as tmp:
        if case in TRL_CASES:
            trainer = build_trl_trainer(case, model, micro, accumulation, completion, tmp)
            model = trainer.model
            mbs = [{k: v[i:i + micro] for k, v in batch.items()}
                   for i in range(0, sequences, micro)]

            def step():
                trl_step(trainer, mbs)
                return {}

            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        else:
            cfg, rollouts, loss_fn = build_trainer_case(model, batch, micro)
            run = build_run(model, cfg, loss_fn, tmp)
            with_old = case.endswith("+old")

            def step():
                return trainer_step(run, rollouts, with_old)
        rss_setup = _rss_mb()
        times, path = [], ""
        for i in range(steps + 1):
            t0 = time.perf_counter()
            path = update_path(step())
            if case in TRL_CASES:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
    return _result(case, times, sequences * (prompt + completion), rss_setup, path)


def _result(case: str, times: list[float], tokens: int, rss_setup: float, path: str) -> dict:
    return {"case": case, "times_ms": [t * 1e3 for t in times], "tokens": tokens,
            "peak_mb": max(_peak_rss_mb() - rss_setup, 0.0), "rss_peak_mb": _peak_rss_mb(),
            "versions": versions(), "update_path": path}


def op_of(case: str, completion: int) -> tuple[str, str]:
    """(op, mode) columns of a case: the policy update, a whole step, or generation alone."""
    if case in E2E_CASES:
        return "grpo_step", "generate+reward+update"
    if case in GEN_CASES:
        return "generate", f"{completion} new tokens/seq (tokens_per_s: generated)"
    return "grpo_update", "fwd+bwd+adamw"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "transformers", "trl", "liger-kernel"):
        try:
            out.append(f"{dist}={version(dist)}")
        except PackageNotFoundError:
            pass
    return " ".join(out)


def measure(case, shape, sequences, prompt, completion, micro, steps) -> dict:
    """One case in a fresh subprocess (its own peak RSS, its own imports): a warm-up step, then
    ``steps`` timed steps."""
    from benchmarks.results_io import run_case_in_subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    return run_case_in_subprocess(
        "benchmarks.trl", ["--worker", case, shape, str(sequences), str(prompt),
                           str(completion), str(micro), str(steps)], env=env)


def measure_interleaved(cases: list[str], shape: str, args) -> dict[str, list[dict]]:
    """``args.repeats`` rounds; each round measures every case once (a fresh process each), the
    order rotated by one case per round. Returns each case's per-process results."""
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for r in range(args.repeats):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            res = measure(case, shape, args.sequences, args.prompt, args.completion, args.micro,
                          args.steps)
            results[case].append(res)
            print(f"round {r + 1}/{args.repeats} {case:24s} step "
                  + ", ".join(f"{t / 1e3:.2f} s" for t in res["times_ms"]), flush=True)
    return results


def case_row(case: str, runs: list[dict], args, label: str, run_id: str, load: str) -> dict:
    """The results row of ``case`` from its processes' timings: ms percentiles over every timed
    step, ``tokens_per_s`` at ms_p50 (the same statistic), the median step peak."""
    import statistics

    from benchmarks.results_io import make_row, percentiles

    times = [t for r in runs for t in r["times_ms"]]
    rate = tokens_per_s(runs[0]["tokens"], percentiles(times)[1])
    path = runs[-1].get("update_path", "")
    extra = (f"tokens_per_s={rate:.1f};rss_peak_mb={max(r['rss_peak_mb'] for r in runs):.0f};"
             f"repeats={len(runs)};steps={args.steps};run={run_id};load={load};"
             + (f"update_path={path};" if path else "") + runs[-1]["versions"])
    op, mode = op_of(case, args.completion)
    return make_row(op, case, mode, label, times,
                    statistics.median(r["peak_mb"] for r in runs), extra)


# ---------------------------------------------------------------------------- results
def write_results(rows: list[dict], csv_path: str) -> None:
    from benchmarks.results_io import render_markdown
    from benchmarks.results_io import write_results as write

    title = "TRL GRPOTrainer policy update: TRL, Liger, prefix-rft"
    write(rows, csv_path, title,
          markdown=lambda every: render_markdown(every, title) + render_ratios(every),
          render=render_png)


def render_png(rows: list[dict], png_path: str) -> None:
    """Tokens/s and step peak RSS of the latest row per case (same shape as the last row),
    one row of panels per op (policy update, whole step, generation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.results_io import extra_value

    shape = rows[-1]["shape"]
    latest = {r["impl"]: r for r in rows if r["shape"] == shape}
    ops = [op for op in ("grpo_update", "grpo_step", "generate")
           if any(r["op"] == op for r in latest.values())]
    fig, axes = plt.subplots(len(ops), 2, figsize=(10, 2.2 + 1.6 * len(ops)), squeeze=False)
    for row_axes, op in zip(axes, ops):
        names = [c for c in CASES if c in latest and latest[c]["op"] == op]
        tps = [extra_value(latest[c], "tokens_per_s") for c in names]
        mem = [float(latest[c]["peak_mb"] or 0) for c in names]
        for ax, ys, label in ((row_axes[0], tps, f"{op}: tokens/s (higher is better)"),
                              (row_axes[1], mem, f"{op}: peak RSS, MB (lower is better)")):
            ax.barh(names, ys, color="tab:blue")
            ax.set_xlabel(label, fontsize=8)
            ax.invert_yaxis()
            for y, v in enumerate(ys):
                ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    fig.suptitle(f"GRPO with TRL and prefix-rft, {shape}, 1 thread, {rows[-1]['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--sequences", type=int, default=32, help="rollouts in the batch (x8 groups)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per rollout")
    ap.add_argument("--completion", type=int, default=192, help="completion tokens per rollout")
    ap.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--repeats", type=int, default=3,
                    help=f"interleaved rounds, a fresh process per case each (ratios need "
                         f">= {MIN_REPEATS})")
    ap.add_argument("--steps", type=int, default=1,
                    help="timed steps per process, after its warm-up step")
    ap.add_argument("--smoke", action="store_true", help="tiny model and batch, nothing written")
    ap.add_argument("--out", default=os.path.join(RESULTS, "trl.csv"), help="CSV; '-' = none")
    ap.add_argument("--profile", action="store_true",
                    help="print the top ops of TRL's generate and the hf engine's; nothing else")
    ap.add_argument("--no-cache", action="store_true",
                    help="with --profile: config.use_cache=False, as the update cases' model")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        case, shape, *nums = args.worker
        seqs, prompt, completion, micro, steps = map(int, nums)
        print(json.dumps(run_case(case, shape, seqs, prompt, completion, micro, steps)))
        return []
    shape = "smoke" if args.smoke else "cpu"
    if args.smoke:
        args.sequences, args.prompt, args.completion, args.micro = 16, 8, 8, 8
    if args.profile:
        import torch

        from benchmarks.trl_e2e import profile

        torch.set_num_threads(1)
        model = build_model(shape, use_cache=not args.no_cache)
        profile(model, args.sequences, args.prompt, args.completion)
        return []
    if args.sequences % 8 or args.sequences % args.micro:
        raise SystemExit("--sequences must be a multiple of 8 and of --micro")
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit("--repeats and --steps must be >= 1")
    return run_all(args, shape)


def run_all(args, shape: str) -> list[dict]:
    """Measure every case interleaved, print the rows and this run's ratios, write them."""
    h, layers, _, _, _, vocab = SHAPES[shape]
    label = (f"qwen2 h{h} l{layers} V{vocab} {args.sequences}x({args.prompt}+{args.completion}) "
             f"micro {args.micro}")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    load_before = os.getloadavg()[0]
    results = measure_interleaved(list(dict.fromkeys(args.cases)), shape, args)
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    rows = [case_row(case, runs, args, label, run_id, load) for case, runs in results.items()]
    for row in rows:
        print(f"{row['impl']:24s} {row['extra'].split(';')[0]:>22s}  ms_p50 {row['ms_p50']:>12s}"
              f"  step peak {float(row['peak_mb']):7.0f} MB", flush=True)
    for r in run_ratios(rows):
        print(f"{r['what']}: {r['speed']:.2f}x tokens/s, {r['memory']:.2f}x step peak "
              f"({r['num']} / {r['den']}, {r['repeats']} interleaved repeats)", flush=True)
    if len(rows) > 1 and args.repeats < MIN_REPEATS:
        print(f"no ratios: they need --repeats >= {MIN_REPEATS}", flush=True)
    if not args.smoke and args.out != "-":
        write_results(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
