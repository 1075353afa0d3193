"""``prefix-rft`` console script: train | eval | demo | plan | bench.

    prefix-rft train --config configs/qwen2.5-math-1.5b.yaml --train.steps=100 --resume auto
    torchrun --nproc_per_node 8 -m prefix_rft.cli train --config configs/qwen2.5-math-7b.yaml
    prefix-rft eval --model runs/x/final --data aime24.jsonl math500.jsonl --k 32
    prefix-rft demo
    prefix-rft bench [kernels]

The subcommands import their implementations lazily (train needs transformers, eval may
need vLLM), so ``prefix-rft --help`` is instant and works on a bare install.

Every subcommand reports a user mistake (a bad argument, config value, path or data file, a
full disk) as one line, ``prefix-rft <command>: error: ...``, and exits with status 2;
``--debug`` adds the traceback. ``plan`` exits with 1 only for "does not fit".
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
    "fused_head": "benchmarks.cpu_fused_head",  # CPU: fused head+loss (6NHV) vs GEMMs vs 8NHV
}


def _cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """A user mistake (config, paths, data, device, resume, NaN, disk full, a locked run
    directory) prints one line and exits with 2; ``--debug`` adds its traceback."""
    from .errors import report_user_errors

    return report_user_errors("prefix-rft train", lambda: _train(args, extra), debug=args.debug)


def _train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .config import load_config, save_config, split_overrides
    from .errors import UserError

    overrides = split_overrides(extra)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:  # a config mistake (YAML syntax, key, value)
        raise UserError(str(err)) from err
    from .runtime.backends import quiet_unused_backends

    quiet_unused_backends(cfg.optim.name)  # before transformers (and through it torchao) loads
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
    from .errors import UserError

    try:
        target: Callable = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise UserError(f"{module} is not available ({err})") from None
        raise  # a dependency of the module is missing: show the real error
    try:
        result = target(list(argv))
    except SystemExit as err:  # a module's own `raise SystemExit("message")`: a user mistake
        if isinstance(err.code, str):
            raise UserError(err.code) from err
        raise
    return result if isinstance(result, int) else 0


def _cmd_passthrough(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """eval | demo | plan: the module parses ``extra`` itself; its user mistakes (raised as
    UserError / ValueError-derived errors) become one line and exit status 2."""
    from .errors import report_user_errors

    module, function = PASSTHROUGH[args.command][:2]
    return report_user_errors(f"prefix-rft {args.command}",
                              lambda: _delegate(module, function, extra, args.command),
                              debug=args.debug)


def _cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .errors import report_user_errors

    name = args.name or "kernels"
    return report_user_errors(f"prefix-rft bench {name}", lambda: _bench(name, extra),
                              debug=args.debug)


def _bench(name: str, extra: Sequence[str]) -> int:
    from .errors import UserError

    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    module = BENCHMARKS[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name in ("benchmarks", module):
            raise UserError(
                f"cannot import {module}. The benchmarks live in the source tree, not in the "
                f"installed package: run from a checkout (git clone <repo> && cd prefix-rft && "
                f"pip install -e '.[train,test]' && prefix-rft bench {name}), or "
                f"python -m {module}") from None
        raise
    return _delegate(module, "main", list(extra), f"bench {name}")


# eval | demo | plan -> (module, function, help); they own their argument parsing
PASSTHROUGH = {
    "eval": ("prefix_rft.evaluate", "main",
             "avg@k / pass@k of a model on benchmark files (run `prefix-rft eval --help`)"),
    "demo": ("prefix_rft.demo.run", "main",
             "end-to-end Prefix-RFT on an embedded task with a tiny model, on CPU (`demo --help`)"),
    "plan": ("prefix_rft.planner.plan", "cli",
             "predict a run's peak GPU memory per component and whether it fits (`plan --help`)"),
}


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

    for name, (_, _, helptext) in PASSTHROUGH.items():
        cmd = sub.add_parser(name, help=helptext, add_help=False,
                             description=helptext + "; arguments are passed through (plus "
                                         "--debug: show a user error's traceback too).")
        cmd.set_defaults(handler=_cmd_passthrough, debug=False)

    bench = sub.add_parser(
        "bench", help="benchmarks: kernels (default, CPU), gpu_kernels, rollout, train_step, "
                      "memory, packing, fused_head",
        description="Run a benchmark from the source tree's benchmarks/ folder; further "
                    "arguments go to it (e.g. `prefix-rft bench kernels --help`).")
    bench.add_argument("name", nargs="?", default=None, metavar="{" + ",".join(BENCHMARKS) + "}",
                       help="which benchmark (default: kernels, the CPU kernel benchmark)")
    bench.add_argument("--debug", action="store_true",
                       help="show the traceback of a user error too (bugs always show one)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # eval/demo/plan own their argument parsing: hand them everything after the command name
    # (but --debug, which is the CLI's).
    if argv and argv[0] in PASSTHROUGH:
        args, extra = parser.parse_args(argv[:1]), [a for a in argv[1:] if a != "--debug"]
        args.debug = "--debug" in argv[1:]
        from .runtime.backends import quiet_unused_backends

        quiet_unused_backends()  # none of them chooses a torchao optimizer (the demo: adamw)
    else:
        args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    return args.handler(args, extra)


if __name__ == "__main__":
    sys.exit(main())
