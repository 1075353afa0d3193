"""Run logging: ``metrics.jsonl`` per step, TensorBoard when installed, a progress bar, PNG plots.

    log = MetricsLogger(run_dir, total_steps=cfg.train.steps, start_step=resumed_step)
    log.log(step, {"reward_mean": 0.4, "tokens_per_s": 812.0, ...})   # one line per step
    log.close()                                                        # then:
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")        # PNGs for the run

Every line of ``metrics.jsonl`` is ``{"step": int, "time": unix seconds, <metric>: float}``.
A non-finite metric stays visible: it is written as the bare token ``NaN``, ``Infinity`` or
``-Infinity`` (what Python's ``json`` writes and reads back as a float; strict JSON parsers
such as ``jq`` reject these tokens); ``null`` only marks a value that is not a number.
On resume the lines after the resumed step (written after the last checkpoint by the run
that was interrupted) and a torn last line are dropped, so the file always reads as one
continuous run; that rewrite goes to a temp file renamed over the old one, so a kill at any
instant keeps every row.
Only the main rank should construct an enabled logger (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import write_text_atomic

METRICS_FILE = "metrics.jsonl"
# (short name shown in the progress bar, metric key)
PROGRESS_KEYS = (("reward", "reward_mean"), ("pass", "pass_rate"),
                 ("H_cont", "entropy_continuation"), ("low", "prefix_low"), ("clip", "clip_frac"),
                 ("tok/s", "tokens_per_s"))
# summed into one "non-finite" entry of the progress bar when a step zeroed any
# (reward.non_finite: zero; the first one also prints a line)
NON_FINITE_KEYS = ("non_finite_rewards", "non_finite_advantages")
# plot file stem -> (title, metric keys drawn as lines on it)
PLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reward": ("reward", ("reward_mean", "reward_on_policy", "reward_hybrid")),
    "pass_rate": ("pass rate (an on-policy rollout of the group correct)", ("pass_rate",)),
    "entropy": ("token entropy", ("entropy_prefix", "entropy_continuation")),
    "prefix_ratio": ("prefix ratio", ("prefix_low", "prefix_ratio_mean", "prefix_token_frac")),
    "response_length": ("response length (tokens)", ("response_len_mean", "response_len_max")),
    "clip_fraction": ("clip fraction", ("clip_frac", "clip_frac_low", "clip_frac_high")),
    "tokens_per_s": ("update tokens / s", ("tokens_per_s",)),
}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a torn last line from a kill is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _number(value: Any) -> float | None:
    """``value`` as a float (NaN and Inf kept), or None when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class MetricsLogger:
    """Writes one JSON line per step, mirrors it to TensorBoard, drives a tqdm bar.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        total_steps: steps of the whole run (the bar's total; its ETA comes from tqdm).
        start_step: steps already done (resume); later lines in the file are dropped.
        tensorboard: ``"auto"`` (when ``torch.utils.tensorboard`` imports) | ``"true"`` |
            ``"false"``.
        progress: show the progress bar.
        enabled: False on non-main ranks: every method becomes a no-op.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: str = "auto", progress: bool = True, enabled: bool = True):
        if tensorboard not in ("auto", "true", "false"):
            raise ValueError(f"tensorboard must be auto|true|false, got {tensorboard!r}")
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                         purge_step=start_step + 1)
            except ImportError:
                if tensorboard == "true":
                    raise ValueError("log.tensorboard=true but tensorboard is not installed "
                                     "(pip install tensorboard)") from None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """Keep the rows up to ``start_step`` (and no torn line); atomic when it rewrites."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= start_step]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        if text != self.path.read_text(encoding="utf-8"):
            write_text_atomic(self.path, text, pause="metrics-rewrite")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of training step ``step`` (1-based: steps done so far)."""
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _number(v) for k, v in metrics.items()})  # NaN/Inf kept
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {name: f"{row[key]:.3g}" for name, key in PROGRESS_KEYS
                     if row.get(key) is not None}
            non_finite = sum(row.get(key) or 0 for key in NON_FINITE_KEYS)
            if non_finite:
                shown["non-finite"] = f"{non_finite:.0f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` without logging (steps skipped by ``log.every``)."""
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per entry of ``PLOTS`` (metric vs step) from a ``metrics.jsonl``.

    Metrics missing from every row are left out of a plot; a plot with none of its metrics
    is not written. Returns the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, keys) in PLOTS.items():
        series = {}
        for key in keys:
            points = [(row["step"], _finite(row.get(key))) for row in rows]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                series[key] = points
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3,
                    label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


class MetricAverager:
    """Token-weighted means of the loss metrics over micro-batches (sums for the loss).

    ``add(m)`` per micro-batch; ``n_mini += 1`` per optimizer step; ``result()`` the step's
    metrics (``loss`` is the mean over optimizer steps)."""

    WEIGHTS = {"clip_frac_low": "num_tokens", "clip_frac_high": "num_tokens",
               "clip_frac_dual": "num_tokens", "ratio_mean": "num_tokens",
               "prefix_token_frac": "num_tokens", "kept_prefix_token_frac": "num_tokens",
               "kept_prefix_frac": "num_prefix_tokens", "entropy_prefix": "num_prefix_tokens",
               "entropy_continuation": "num_continuation_tokens", "nll_per_token": "num_tokens",
               "head_path_fused": "num_tokens"}  # share of tokens through the fused head+loss

    def __init__(self):
        self.sums, self.weights, self.loss, self.n_mini = {}, {}, 0.0, 0
        self.ratio_min, self.ratio_max = math.inf, -math.inf

    def add(self, m: dict[str, float]) -> None:
        self.loss += m["loss"]
        if m.get("num_tokens"):
            self.ratio_min = min(self.ratio_min, m.get("ratio_min", math.inf))
            self.ratio_max = max(self.ratio_max, m.get("ratio_max", -math.inf))
        for key, weight_key in self.WEIGHTS.items():
            if key in m:
                w = m.get(weight_key, 0.0)
                self.sums[key] = self.sums.get(key, 0.0) + m[key] * w
                self.weights[key] = self.weights.get(key, 0.0) + w

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] if self.weights[k] else 0.0 for k in self.sums}
        out["loss"] = self.loss / max(1, self.n_mini)  # mean over optimizer steps
        if "clip_frac_low" in out:
            out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
            out["ratio_min"] = self.ratio_min if math.isfinite(self.ratio_min) else 1.0
            out["ratio_max"] = self.ratio_max if math.isfinite(self.ratio_max) else 1.0
        return out
