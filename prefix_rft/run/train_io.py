"""What the loop writes and measures besides its steps: a step's checkpoint, the save after a
crash, and the periodic held-out evaluation (``eval.files``). Its own concern (I/O of a run,
through :mod:`prefix_rft.run.checkpoint` and :mod:`prefix_rft.evaluate`), so the loop in
:mod:`prefix_rft.train` calls three named steps instead of spelling them out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import read_questions
from ..errors import UserError
from ..runtime import distributed as D
from . import checkpoint as ckpt
from .setup import Run


def periodic_eval(run: Run) -> dict[str, float]:
    """``eval.files`` scored with the rollout engine: ``eval/<file stem>/avg@k`` and ``pass@k``.
    Every rank evaluates every question (same seeds), so FSDP2 ranks stay in step."""
    from ..evaluate import evaluate_questions

    cfg, e, out = run.cfg, run.cfg.eval, {}
    # Any schema and format, detected per file; field names, instruction and system prompt
    # as for training.
    data_cfg = dataclasses.replace(cfg.data, format="auto", schema="auto", max_rows=0)
    for path in e.files:
        questions = read_questions(path, data_cfg, what="eval.files")
        with run.engine.generation_context(run.model), run.compute():
            result = evaluate_questions(
                run.model, run.tokenizer, questions, e.k, temperature=e.temperature,
                top_p=e.top_p, max_response_tokens=e.max_response_tokens, engine=run.engine,
                seed=cfg.train.seed, prompt_template=cfg.data.prompt_template,
                system_prompt=cfg.data.system_prompt)
        out[f"eval/{Path(path).stem}/avg@{e.k}"] = result[f"avg@{e.k}"]
        out[f"eval/{Path(path).stem}/pass@{e.k}"] = result[f"pass@{e.k}"]
    return out


def save_step(run: Run, done: int, sampler_state: dict, metrics: dict) -> Path:
    """The resumable checkpoint after ``done`` steps (keeps ``checkpoint.keep_last``).

    ``prefix.source: self``: the store (token ids, bulky) goes in ``prefix_store.pt``, so a
    resumed run draws the same prefixes and ``state.json`` stays small."""
    objects = ({"prefix_store": run.prefix_store.state_dict()} if run.prefix_store is not None
               else None)
    return ckpt.save_checkpoint(run.run_dir, done, model=run.model, optimizer=run.optimizer,
                                scheduler=run.scheduler, sampler_state=sampler_state,
                                extra={"metrics": metrics}, keep_last=run.cfg.checkpoint.keep_last,
                                extra_objects=objects)


def save_after_crash(run: Run, done: int, sampler_state: dict, error: BaseException) -> None:
    """Single process only (a collective save from one failing rank would hang the others)."""
    if D.is_distributed() or isinstance(error, UserError):
        return  # a user error (NaN, disk full, ...): keep the last good checkpoint as it is
    try:
        if not run.optimizer_stepped:  # model untouched this step: a clean checkpoint
            path = save_step(run, done, sampler_state, {"crashed": repr(error)[:500]})
        else:  # mid-step weights: keep them for inspection, but not as a resumable checkpoint
            path = ckpt.save_hf_model(run.model, run.tokenizer,
                                      run.run_dir / f"crash-step_{done + 1}")
        print(f"[prefix-rft] {type(error).__name__} in step {done + 1}: saved {path}", flush=True)
    except Exception as save_error:  # noqa: BLE001 -- never mask the original error
        print(f"[prefix-rft] could not save after the error: {save_error!r}", flush=True)
