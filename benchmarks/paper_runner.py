"""Cached, lock-shared training and evaluation for ``benchmarks/paper_repro.py``.

A training run is cached by the hash of its full override list, an evaluation by
(model, split, setting, k, max tokens, seed); both as JSON records under ``{workdir}/cache``.
Two processes may share one workdir (one per core): a run in progress holds
``cache/train_<key>.lock`` (with its pid), and the other process waits for its record instead
of training it twice (a lock whose pid is gone is stale and taken over). That matters because
runs that read no demonstration (RFT) are keyed on the expert's train file and so are shared
by every demonstrator variant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_POLL_S = 5.0  # seconds between checks while another process trains a run


def log(message: str) -> None:
    print(f"[paper_repro {time.strftime('%H:%M:%S')}] {message}", flush=True)


def as_overrides(mapping: dict[str, Any] | None) -> list[str]:
    """``{"train.steps": 3}`` -> ``["--train.steps=3"]`` (values in YAML syntax)."""
    out = []
    for key, value in (mapping or {}).items():
        text = value if isinstance(value, str) else yaml.safe_dump(
            value, default_flow_style=True).strip()
        out.append(f"--{key}={text.removesuffix(chr(10) + '...').strip()}")
    return out


def write_json(path: Path, payload: Any) -> None:
    """Atomic: a reader in the other process never sees half a record."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reads_demonstrations(stage: dict) -> bool:
    """False for a stage that trains on rewards alone (RFT): its run is the same for every
    demonstrator variant."""
    return not any(str(o).lstrip("-") == "loss.algo=rft" for o in stage["set"])


class Runner:
    """Trains and evaluates with caching; one instance per command."""

    def __init__(self, table: dict, workdir: Path, extra: list[str]):
        self.table, self.workdir, self.extra = table, workdir, extra
        self.cache = workdir / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config_path = str(REPO_ROOT / table["base_config"])
        self.timings: dict[str, float] = {"train": 0.0, "eval": 0.0, "assets": 0.0}
        self.counts = {"train": 0, "eval": 0}
        self.paths: dict[str, str] = {}
        self._loaded: tuple = (None, None, None)

    # ------------------------------------------------------------------ assets
    def assets(self) -> dict[str, str]:
        from benchmarks.paper_task import TableTask, prepare_table_assets
        from prefix_rft.demo.base import SFTConfig

        a = self.table["assets"]
        start = time.perf_counter()
        self.paths = prepare_table_assets(str(self.workdir), int(a["seed"]),
                                          TableTask(**a["task"]), SFTConfig(**a["sft"]),
                                          a["model_size"], log=log)
        self.timings["assets"] += time.perf_counter() - start
        return self.paths

    # ------------------------------------------------------------------ training
    def stage_overrides(self, variant: str, stage: dict, lr: float, steps: int, seed: int,
                        model: str, run_dir: Path, curve: bool = False) -> list[str]:
        own = [f"--{o}" if not o.startswith("--") else o for o in stage["set"] + self.extra]
        budget = {**self.table["budget"], "train.steps": steps}
        train_file = self.paths["train_" + (variant if reads_demonstrations(stage) else "expert")]
        c = self.table["eval"].get("curve") or {}
        evals = ["--eval.every=0", "--eval.files=[]"]
        if curve and c:
            evals = [f"--eval.every={c['every']}", f"--eval.files=[{self.paths['validation']}]",
                     f"--eval.k={c['k']}", f"--eval.temperature={c['temperature']}",
                     f"--eval.top_p={c['top_p']}"]
        return (as_overrides(self.table["common"]) + as_overrides(budget) + own
                + [f"--optim.lr={lr:g}", f"--model.path={model}",
                   f"--model.tokenizer_path={model}", f"--data.train_files=[{train_file}]",
                   f"--train.run_dir={run_dir}", f"--train.seed={seed}"] + evals)

    def train(self, variant: str, method: str, seed: int, lrs: dict[str, float],
              curve: bool = False) -> tuple[str, list[str]]:
        """(final model dir, run dirs of its stages) of ``method``, trained unless cached."""
        model, run_dirs = self.paths["model"], []
        for stage in self.table["methods"][method]:
            steps = max(1, round(float(stage["share"]) * int(self.table["budget"]["train.steps"])))
            lr = float(lrs[stage["lr_of"]])
            probe = self.stage_overrides(variant, stage, lr, steps, seed, model, Path("RUN"),
                                         curve)
            key = hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]
            run_dir = self.workdir / "runs" / key
            overrides_for = functools.partial(self.stage_overrides, variant, stage, lr, steps,
                                              seed, model, curve=curve)
            record = self._train_stage(key, run_dir, f"{variant}/{method} seed {seed} lr {lr:g} "
                                       f"steps {steps}", overrides_for)
            model = record["model_dir"]
            run_dirs.append(str(run_dir))
        return model, run_dirs

    def _train_stage(self, key: str, run_dir: Path, label: str, overrides_for) -> dict:
        """The ok record of one stage: cached, waited for (the other process has it) or
        trained here. A failure is recorded and raised (retried on the next invocation)."""
        record, lock = self.cache / f"train_{key}.json", self.cache / f"train_{key}.lock"
        while True:
            if record.is_file() and json.loads(record.read_text())["status"] == "ok":
                return json.loads(record.read_text())
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(lock.read_text() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and not _pid_alive(owner):
                    lock.unlink(missing_ok=True)  # stale: its process is gone
                time.sleep(LOCK_POLL_S)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            try:
                # the other process may have finished it between the check and the lock
                if record.is_file() and json.loads(record.read_text())["status"] == "ok":
                    return json.loads(record.read_text())
                return self._run_stage(key, run_dir, label, overrides_for, record)
            finally:
                lock.unlink(missing_ok=True)

    def _run_stage(self, key, run_dir: Path, label: str, overrides_for, record: Path) -> dict:
        from prefix_rft.config import load_config as load_train_config
        from prefix_rft.train import train

        start = time.perf_counter()
        if run_dir.exists():  # a half-finished earlier attempt: start clean
            shutil.rmtree(run_dir)
        overrides = overrides_for(run_dir)
        log(f"train {label} ({key})")
        try:
            result = train(load_train_config(self.config_path, overrides))
            if not result["final_model_dir"]:
                raise RuntimeError("train() stopped without a final model")
        except Exception as error:  # noqa: BLE001 -- recorded, the table goes on
            write_json(record, {"status": "failed", "error": repr(error)[:300]})
            raise
        seconds = time.perf_counter() - start
        self.timings["train"] += seconds
        self.counts["train"] += 1
        out = {"status": "ok", "model_dir": result["final_model_dir"], "seconds": seconds,
               "overrides": overrides}
        write_json(record, out)
        return out

    def cache_totals(self) -> dict[str, float]:
        """Runs and seconds recorded in the whole cache (every invocation and process), so the
        report of a final all-cached invocation still states what the comparison cost."""
        out = {"trainings": 0, "train_s": 0.0, "evaluations": 0, "eval_s": 0.0}
        for kind, count, seconds in (("train", "trainings", "train_s"),
                                     ("eval", "evaluations", "eval_s")):
            for path in self.cache.glob(f"{kind}_*.json"):
                record = json.loads(path.read_text())
                if record.get("status", "ok") == "ok":
                    out[count] += 1
                    out[seconds] += float(record.get("seconds", 0.0))
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model_dir: str, split: str, setting: dict, seed: int,
                 k: int | None = None) -> dict[str, Any]:
        """Per-question correct counts of a model on a split (k samples each), cached."""
        ev = self.table["eval"]
        k = int(k or ev["k"])
        max_tokens = int(ev["max_response_tokens"][split])
        key_src = json.dumps([model_dir, split, setting, k, max_tokens, seed])
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        record = self.cache / f"eval_{key}.json"
        if record.is_file():
            return json.loads(record.read_text())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prefix_rft.data import read_questions
        from prefix_rft.evaluate import evaluate_questions

        questions = read_questions(self.paths[split])
        start = time.perf_counter()
        if self._loaded[0] != model_dir:  # one load per model for all its splits / settings
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            self._loaded = (model_dir, model, tokenizer)
        _, model, tokenizer = self._loaded
        result = evaluate_questions(
            model, tokenizer, questions, k, temperature=float(setting["temperature"]),
            top_p=float(setting["top_p"]), max_response_tokens=max_tokens,
            batch_questions=int(ev.get("batch_questions", 50)), seed=seed,
            prompt_template=self.prompt_template())
        out = {"correct": [int(c) for c in result["correct"]], "avg": result[f"avg@{k}"],
               "pass": result[f"pass@{k}"], "k": k, "length": result["mean_response_tokens"],
               "seconds": time.perf_counter() - start}
        self.timings["eval"] += out["seconds"]
        self.counts["eval"] += 1
        write_json(record, out)
        return out

    def prompt_template(self) -> str:
        """The training config's prompt template, so evaluation prompts match training's."""
        from prefix_rft.config import load_config as load_train_config

        return load_train_config(self.config_path, []).data.prompt_template
