"""``prefix-rft`` console script: train | eval | demo | plan | bench.

    prefix-rft train --config configs/qwen2.5-math-1.5b.yaml --train.steps=100 --resume auto
    torchrun --nproc_per_node 8 -m prefix_rft.cli train --config configs/qwen2.5-math-7b.yaml
    prefix-rft eval --model runs/x/final --data aime24.jsonl math500.jsonl --k 32
    prefix-rft demo
    prefix-rft bench [kernels]

The subcommands import their implementations lazily (train needs transformers, eval may
need vLLM), so ``prefix-rft --help`` is instant and works on a bare install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from . import __version__

TRAIN_EPILOG = """\
overrides:
  Any config field can be set as --section.field=value (or --section.field value);
  values are YAML: --data.train_files=[a.jsonl,b.parquet] --loss.clip_c=null.
  Sections: model data prefix rollout loss optim train log checkpoint eval reward
  (see prefix_rft/config.py for every field, its unit and default).

examples:
  prefix-rft train --config configs/demo.yaml --train.steps=3
  prefix-rft train --config configs/qwen2.5-math-1.5b.yaml --model.path=/models/q15 --resume auto
  prefix-rft train --config configs/qwen2.5-math-1.5b.yaml --config configs/recipes/bread.yaml
  torchrun --nproc_per_node 8 -m prefix_rft.cli train --config configs/qwen2.5-math-7b.yaml
"""

# `prefix-rft bench NAME` -> module with main(argv) (benchmarks/ lives in the source tree).
BENCHMARKS = {
    "kernels": "benchmarks.cpu_kernels",  # CPU: chunked torch path vs full logits (default)
    "gpu_kernels": "benchmarks.kernels",  # CUDA: triton/torch vs naive, compile, Liger, CCE
    "rollout": "benchmarks.rollout",  # HF vs vLLM engine tokens/s and log-prob mismatch
    "train_step": "benchmarks.train_step",  # one policy update: fused vs full-logits path
    "packing": "benchmarks.packing",  # policy update: padded vs packed micro-batches
    "memory": "benchmarks.memory",  # update-step peak memory per optimizer/LoRA vs the planner
}


def _split_overrides(extra: Sequence[str]) -> list[str]:
    """``["--a.b=1", "--c.d", "2"]`` -> ``["--a.b=1", "--c.d=2"]``; other tokens are errors."""
    overrides, i = [], 0
    while i < len(extra):
        token = extra[i]
        key = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if "." not in key:
            raise SystemExit(f"prefix-rft train: unexpected argument {token!r} "
                             f"(overrides look like --section.field=value)")
        if "=" not in token:
            if i + 1 >= len(extra):
                raise SystemExit(f"prefix-rft train: {token} needs a value")
            token, i = f"{token}={extra[i + 1]}", i + 1
        overrides.append(token)
        i += 1
    return overrides


def _cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """A user mistake (config, paths, data, device, resume, NaN, disk full, a locked run
    directory) prints one line and exits with 2; ``--debug`` adds its traceback."""
    from .errors import report_user_errors

    overrides = _split_overrides(extra)
    return report_user_errors("prefix-rft train", lambda: _train(args, overrides),
                              debug=args.debug)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config, save_config
    from .errors import UserError

    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:  # a config mistake (YAML syntax, key, value)
        raise UserError(str(err)) from err
    if args.print_config:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            print(save_config(cfg, Path(tmp) / "config.yaml").read_text(), end="")
        return 0
    from .preflight import preflight

    preflight(cfg)  # paths, data, resume, device: before transformers is even imported
    from .train import train

    result = train(cfg)
    return result if isinstance(result, int) else 0


def _delegate(module: str, function: str, argv: Sequence[str], what: str) -> int:
    try:
        target: Callable = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise SystemExit(f"prefix-rft {what}: {module} is not available ({err})") from None
        raise  # a dependency of the module is missing: show the real error
    result = target(list(argv))
    return result if isinstance(result, int) else 0


def _cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    name = args.name or "kernels"
    if name not in BENCHMARKS:
        raise SystemExit(f"prefix-rft bench: unknown benchmark {name!r}; choose from "
                         f"{sorted(BENCHMARKS)}")
    module = BENCHMARKS[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name in ("benchmarks", module):
            raise SystemExit(
                f"prefix-rft bench: cannot import {module}. The benchmarks live in the source "
                f"tree, not in the installed package: run from a checkout, e.g.\n"
                f"  git clone <repo> && cd prefix-rft && pip install -e '.[train,test]' && "
                f"prefix-rft bench {name}\n  (or: python -m {module})") from None
        raise
    return _delegate(module, "main", list(extra), f"bench {name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-rft",
        description="Prefix-RFT: RL fine-tuning on verifiable math with demonstration-prefix "
                    "rollouts (SFT + RFT blend), FSDP2 + fused log-prob/entropy kernels.")
    parser.add_argument("--version", action="version", version=f"prefix-rft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,demo,plan,bench}")

    train = sub.add_parser(
        "train", help="train a model (Prefix-RFT, RFT or SFT) from a YAML config",
        description="Train from a YAML config plus --section.field=value overrides. Under "
                    "torchrun every rank runs this command; rank 0 logs and writes files.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # --c.x=1 must stay an override, not become --config
    train.add_argument("--config", "-c", action="append", default=None, metavar="FILE.yaml",
                       help="YAML config (default: built-in defaults, see prefix_rft/config.py); "
                            "repeat it to overlay, in order: --config base.yaml --config "
                            "configs/recipes/bread.yaml")
    train.add_argument("--resume", default=None, metavar="auto|none|PATH",
                       help="auto: continue from the latest checkpoint in train.run_dir (or start "
                            "fresh); PATH: a checkpoint or run directory (= --checkpoint.resume)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML and exit (validates it)")
    train.add_argument("--debug", action="store_true",
                       help="show the traceback of a user error too (bugs always show one)")
    train.set_defaults(handler=_cmd_train)

    for name, target, helptext in (
        ("eval", ("prefix_rft.evaluate", "main"),
         "avg@k / pass@k of a model on benchmark files (run `prefix-rft eval --help`)"),
        ("demo", ("prefix_rft.demo.run", "main"),
         "end-to-end Prefix-RFT on an embedded task with a tiny model, on CPU (`demo --help`)"),
        ("plan", ("prefix_rft.plan", "cli"),
         "predict a run's peak GPU memory per component and whether it fits (`plan --help`)"),
    ):
        cmd = sub.add_parser(name, help=helptext, add_help=False,
                             description=helptext + "; arguments are passed through.")
        cmd.set_defaults(handler=lambda args, extra, t=target, n=name: _delegate(*t, extra, n))

    bench = sub.add_parser(
        "bench", help="benchmarks: kernels (default, CPU), gpu_kernels, rollout, train_step, "
                      "memory, packing",
        description="Run a benchmark from the source tree's benchmarks/ folder; further "
                    "arguments go to it (e.g. `prefix-rft bench kernels --help`).")
    bench.add_argument("name", nargs="?", default=None, metavar="{" + ",".join(BENCHMARKS) + "}",
                       help="which benchmark (default: kernels, the CPU kernel benchmark)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # eval/demo/plan own their argument parsing: hand them everything after the command name.
    if argv and argv[0] in ("eval", "demo", "plan"):
        args, extra = parser.parse_args(argv[:1]), argv[1:]
    else:
        args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    return args.handler(args, extra)


if __name__ == "__main__":
    sys.exit(main())
