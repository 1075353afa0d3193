"""Atomic checkpoints and exact resume.

Layout of ``run_dir/checkpoints/step_000042/``:

    model.pt        full (unsharded) model state dict, fp32 masters, written by rank 0;
                    under LoRA the adapters only (the frozen base is model.path's)
    optimizer.pt    full optimizer state dict keyed by parameter names (DCP state_dict API);
                    optimizer_rank{r}.pt per rank instead with train.offload: optimizer
    scheduler.pt    LR scheduler state dict (when one is given)
    rng_rank{r}.pt  python / numpy / torch CPU / CUDA RNG states of rank r
    state.json      {"step", "world_size", "sampler", "extra"}: JSON, human-readable
    NAME.pt         each of ``extra_objects`` (e.g. prefix_store.pt), written by rank 0

A checkpoint is written into ``.tmp-step_000042`` and renamed into place only when every
file is complete, so a kill mid-write leaves the previous checkpoint as the latest;
leftover ``.tmp-*`` directories are ignored by ``find_latest`` and removed by the next save.
Re-saving an existing step renames the old directory aside (``.old-step_000042``), renames
the new one in, then deletes the old one; a kill between the two renames leaves the old one
aside, which ``list_checkpoints`` still counts (and the next save puts back), so some
complete checkpoint is found at every instant. Weights are checked for NaN/Inf before every
save and export (:class:`~prefix_rft.errors.NonFiniteError`, nothing written, nothing
pruned). Files are written through Python file objects, so a full disk is reported as
"no space left on device: <path>" (:class:`~prefix_rft.errors.UserError`).
Under FSDP2 every rank must call ``save_checkpoint`` / ``load_checkpoint`` /
``save_hf_model`` (they gather and scatter the full state dicts collectively).

    stop = install_signal_handlers()               # SIGTERM/SIGINT -> flag, not death
    for step in ...:
        ...
        if step % every == 0 or stop_requested(stop):
            save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                            sampler_state=sampler.state_dict(), extra={"metrics": m},
                            keep_last=cfg.checkpoint.keep_last)
        if stop_requested(stop): break
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError, crash_point, fsync_dir, save_file, writing
from ..finite import check_weights_finite
from ..runtime import distributed as D

# How long a rank waits for the others to finish their part of a save before it stops: rank 0
# writes the full model and optimizer state (minutes for a 7B model on a slow disk).
SAVE_TIMEOUT_S = 1800.0

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old-step_(\d+)$")


# ---------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when available) all CUDA generators of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``: the next random draws repeat those after capture."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- finding checkpoints
def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``run_dir/checkpoints`` as (step, path), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found, aside = {}, {}
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name) or _OLD_DIR.match(path.name)
        if match and path.is_dir() and (path / "state.json").is_file():
            (found if path.name.startswith("step_") else aside)[int(match.group(1))] = path
    for step, path in aside.items():  # killed mid re-save: the old copy is the checkpoint
        found.setdefault(step, path)
    return sorted(found.items())


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (for ``--resume auto``)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``checkpoint.resume`` -> a checkpoint directory or None.

    ``none``: start fresh. ``auto``: the latest checkpoint in ``run_dir`` (None when there is
    none yet, so the same command starts or continues a run). Otherwise a path to a
    checkpoint directory, or to a run directory (its latest checkpoint is used).
    """
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise UserError(f"checkpoint.resume {str(path)!r} does not exist: give none, auto, or "
                        f"a checkpoint or run directory")
    latest = find_latest(path)
    if latest is None:
        raise UserError(f"checkpoint.resume must be none|auto|a checkpoint or run directory; "
                        f"no checkpoint found at {str(path)!r}")
    return latest


# ---------------------------------------------------------------- save / load
def _is_host_optimizer(optimizer: Any) -> bool:
    from ..runtime.offload import HostOptimizer

    return isinstance(optimizer, HostOptimizer)


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state; under LoRA only the adapters (the frozen base is
    ``model.path``'s, reloaded at resume)."""
    state = D.gather_full_state_dict(model)  # collective
    from ..runtime.lora import has_lora

    if has_lora(model):
        state = {k: v for k, v in state.items() if ".lora_" in k}
    return state


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if _is_host_optimizer(optimizer):  # this rank's shards, saved per rank
        return optimizer.state_dict()

    options = StateDictOptions(full_state_dict=True, cpu_offload=D.is_distributed())
    return get_optimizer_state_dict(model, optimizer, options=options)


def _prune(run_dir: Path, keep_last: int) -> None:
    found = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, path in found[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def _tidy(root: Path) -> None:
    """Before a save (main rank): put back a checkpoint left aside by a kill mid re-save,
    delete leftovers of finished re-saves and interrupted writes."""
    if not root.is_dir():
        return
    for old in root.glob(".old-step_*"):
        final = root / old.name[len(".old-"):]
        if final.is_dir() and (final / "state.json").is_file():
            shutil.rmtree(old, ignore_errors=True)
        elif (old / "state.json").is_file():
            shutil.rmtree(final, ignore_errors=True)
            old.rename(final)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is renamed aside first and deleted
    only after the new one is in place (a kill in between leaves the old one findable)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    crash_point("checkpoint-replace")
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _save_torch(obj: Any, path: Path) -> None:
    save_file(path, lambda handle: torch.save(obj, handle))


def _write_files(tmp: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                 meta_text: str, extra_objects: dict[str, Any] | None = None) -> None:
    # the collectives first: a rank whose write fails must not leave the others in a gather
    model_state = _model_state(model)  # collective
    optim_state = _full_optimizer_state(model, optimizer) if optimizer is not None else None
    _save_torch(capture_rng_state(), tmp / f"rng_rank{D.get_rank()}.pt")
    if optim_state is not None and _is_host_optimizer(optimizer):
        _save_torch(optim_state, tmp / f"optimizer_rank{D.get_rank()}.pt")
        optim_state = None
    if D.is_main():
        _save_torch(model_state, tmp / "model.pt")
        if optim_state is not None:
            _save_torch(optim_state, tmp / "optimizer.pt")
        if scheduler is not None:
            _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, obj in (extra_objects or {}).items():
            _save_torch(obj, tmp / f"{name}.pt")
        # last: marks the directory complete
        save_file(tmp / "state.json", lambda handle: handle.write(meta_text.encode()))


def _failure(action: Callable[[], Any]) -> BaseException | None:
    """Run ``action``; the exception it raised (this rank's part of a save), else None."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 -- handed to D.agree_on_success, re-raised there
        return err
    return None


def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    sampler_state: dict | None = None, extra: dict | None = None,
                    keep_last: int = 0, timeout_s: float = SAVE_TIMEOUT_S,
                    extra_objects: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep_last`` (0 = all).

    ``sampler_state`` and ``extra`` must be JSON-serializable; ``extra_objects`` (name ->
    object, saved as ``name.pt`` by rank 0) hold bulk state that does not belong in
    ``state.json``. Returns the final directory.
    Collective under FSDP2 (call on every rank). The ranks agree after each phase (create,
    write, publish): a failure on any rank stops every rank with the same one line (see
    ``distributed.agree_on_success``; ``timeout_s`` bounds the wait for the slowest rank).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 = keep all), got {keep_last}")
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    meta = {"step": step, "world_size": D.get_world_size(), "sampler": sampler_state,
            "extra": extra if extra is not None else {}}
    meta_text = json.dumps(meta, indent=1)  # fail early on non-JSON data, before any write
    check_weights_finite(model, f"refusing to save checkpoint {final.name} (the last good "
                                f"checkpoint is kept)")  # collective
    what = f"saving checkpoint {final.name}"

    def create() -> None:
        if D.is_main():
            _tidy(root)
            with writing(root):
                tmp.mkdir(parents=True)

    def publish() -> None:
        if D.is_main():
            with writing(root):
                _replace_dir(tmp, final)  # re-saving a step (final save after a periodic one)
            _prune(Path(run_dir), keep_last)

    D.agree_on_success(_failure(create), what, timeout_s)
    try:
        D.agree_on_success(_failure(lambda: _write_files(tmp, model, optimizer, scheduler,
                                                         meta_text, extra_objects)),
                           what, timeout_s)
    except Exception:
        if D.is_main():  # e.g. disk full: give the space back, keep the older checkpoints
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    D.agree_on_success(_failure(publish), what, timeout_s)
    return final


def _load_model_state(model: nn.Module, path: Path) -> None:
    from ..runtime.lora import has_lora

    partial = has_lora(model)  # LoRA checkpoints hold the adapters only
    if not D.is_fsdp(model):
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=not partial)
        if partial and (result.unexpected_keys
                        or any(".lora_" in k for k in result.missing_keys)):
            raise ValueError(f"checkpoint {str(path)!r} does not match the model's LoRA "
                             f"adapters (model.lora settings changed?)")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # Only rank 0 reads the file; FSDP2 scatters the shards (no N copies in host memory).
    state = {}
    if D.is_main():
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=not partial))


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if _is_host_optimizer(optimizer):
        file = path / f"optimizer_rank{D.get_rank()}.pt"
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no {file.name}: train.offload="
                             f"optimizer resumes with the same number of ranks")
        optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        optimizer.resync_from_model()
        return
    broadcast = D.is_distributed()
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) \
        if (D.is_main() or not broadcast) else {}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=broadcast))


def load_checkpoint(path: str | Path, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into the given objects (model already wrapped
    the same way, optimizer built over its parameters); returns ``{"step", "sampler",
    "extra", "world_size"}``. RNG states are restored last, so the draws after loading repeat
    those after saving. Collective under FSDP2.
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise ValueError(f"path must be a checkpoint directory with state.json, got {str(path)!r}")
    meta = json.loads(state_file.read_text())
    _load_model_state(model, path)
    if optimizer is not None:
        if not _is_host_optimizer(optimizer) and not (path / "optimizer.pt").is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no optimizer.pt to restore")
        _load_optimizer_state(model, optimizer, path)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng:
        rng_file = path / f"rng_rank{D.get_rank()}.pt"
        if rng_file.is_file():  # absent when resuming with more ranks than were saved
            restore_rng_state(torch.load(rng_file, weights_only=False))
    return meta


# ---------------------------------------------------------------- final HF model
def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_hf_model(model: nn.Module, tokenizer: Any, out_dir: str | Path,
                  dtype: torch.dtype | None = None, timeout_s: float = SAVE_TIMEOUT_S) -> Path:
    """Write the model (full weights, safetensors) and tokenizer as a plain HF directory,
    loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)``. ``dtype`` (e.g.
    ``torch.bfloat16``) casts the floating-point weights (default: as trained, fp32
    masters; LoRA adapters merged in). Atomic like checkpoints; collective under FSDP2
    (rank 0 writes)."""
    out_dir = Path(out_dir)
    check_weights_finite(model, f"refusing to export {str(out_dir)!r}")  # collective
    state = D.gather_merged_state_dict(model)  # LoRA: adapters merged into the base weights
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    def write() -> None:
        if D.is_main():
            tmp = out_dir.with_name(f".tmp-{out_dir.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(tmp):
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                if dtype is not None:  # config.json says what the safetensors hold
                    _set_config_dtype(tmp / "config.json", dtype)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                _replace_dir(tmp, out_dir)

    D.agree_on_success(_failure(write), f"exporting {str(out_dir)!r}", timeout_s)
    return out_dir


# ---------------------------------------------------------------- signals
@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it, checkpoints and exits cleanly."""

    requested: bool = False
    signals: list[int] = field(default_factory=list)


def install_signal_handlers(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopFlag:
    """Turn the first SIGTERM/SIGINT into ``flag.requested = True`` instead of dying (so the
    loop saves a checkpoint before exiting); a second SIGINT raises KeyboardInterrupt as
    usual, for an impatient Ctrl-C. Call from the main thread."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signals.append(signum)

    for signum in signums:
        signal.signal(signum, handler)
    return flag


def stop_requested(flag: StopFlag) -> bool:
    """True when any rank got a stop signal (all ranks agree, so they stop at the same step).
    Collective under torchrun: call it at the same point on every rank."""
    if not D.is_distributed():
        return flag.requested
    return D.all_reduce_mean(1.0 if flag.requested else 0.0) > 0.0
