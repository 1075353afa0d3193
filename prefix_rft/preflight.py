"""Checks that need no model, run before the heavy imports and before step 1.

    preflight(cfg)      # UserError naming the field or file and what to do; else None

Paths (``model.path``, ``model.tokenizer_path``, ``data.train_files`` incl. their format,
``eval.files``, ``checkpoint.resume``) and the device. Everything here reads only the
file system (and ``torch.cuda`` for ``train.device=cuda``): seconds before transformers or
vLLM are imported or a model is loaded, so a typo costs no waiting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PARQUET_MAGIC = b"PAR1"


def check_model_path(path: str, key: str = "model.path") -> None:
    if not path:
        raise UserError(f"{key} is not set: pass --{key}=/path/to/a/local/hf/model/directory")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key} {path!r} does not exist: set it to a local HF model directory "
                        f"(with config.json and the weights)")
    if not (p / "config.json").is_file():
        raise UserError(f"{key} {path!r} is not a HF model directory (no config.json): point "
                        f"it at the directory save_pretrained wrote")


def check_tokenizer_path(path: str, key: str = "model.tokenizer_path") -> None:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{key} {path!r} is not a directory: set it to a local tokenizer "
                        f"directory or leave it empty to use model.path")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"{key} {path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
                        f": point it at the directory tokenizer.save_pretrained wrote")


def _looks_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == _PARQUET_MAGIC


def data_file_kind(path: str, fmt: str, key: str) -> str:
    """The format of one data file (``jsonl`` | ``parquet`` | ``disk``), checked against its
    name and first bytes; UserError for a missing/empty file or a format mismatch."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}: {path!r} does not exist: check the path")
    if p.is_dir():
        if fmt not in ("auto", "disk"):
            raise UserError(f"{key}: {path!r} is a directory but data.format is {fmt}: set "
                            f"data.format=disk (a saved HF dataset) or give a file")
        return "disk"
    if p.stat().st_size == 0:
        raise UserError(f"{key}: {path!r} is empty: give a file with rows")
    kind = fmt
    if fmt in ("auto", "disk"):
        suffix = p.suffix.lower()
        kind = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "")
        if fmt == "disk" or not kind:
            raise UserError(f"{key}: cannot tell the format of {path!r} from its name (data."
                            f"format={fmt}): set data.format to jsonl or parquet")
    is_parquet = _looks_parquet(p)
    if kind == "parquet" and not is_parquet:
        raise UserError(f"{key}: {path!r} is not a parquet file (no PAR1 header) but "
                        f"data.format/its name says parquet: set data.format=jsonl or fix the "
                        f"file")
    if kind == "jsonl" and is_parquet:
        raise UserError(f"{key}: {path!r} is a parquet file but data.format/its name says "
                        f"jsonl: set data.format=parquet")
    return kind


def check_resume(resume: str) -> None:
    """``checkpoint.resume``: none | auto | an existing checkpoint or run directory."""
    if resume in ("none", "auto", ""):
        return
    p = Path(resume)
    if not p.exists():
        raise UserError(f"checkpoint.resume {resume!r} does not exist: give none, auto, or a "
                        f"checkpoint or run directory")
    candidates = [p] + sorted((p / "checkpoints").glob("*step_*")) + sorted(p.glob("*step_*"))
    if not any((c / "state.json").is_file() for c in candidates):
        raise UserError(f"checkpoint.resume {resume!r} holds no checkpoint (no state.json in "
                        f"it or in its checkpoints/step_*): give none, auto, or a checkpoint "
                        f"or run directory")


def check_device(device: str) -> None:
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA GPU is available (torch "
                        f"{torch.__version__}): use --train.device=cpu or auto")


def preflight(cfg: Any) -> None:
    """Every model-free check of a training config (see the module docstring)."""
    check_model_path(cfg.model.path)
    if cfg.model.tokenizer_path and cfg.model.tokenizer_path != cfg.model.path:
        check_tokenizer_path(cfg.model.tokenizer_path)
    elif not any((Path(cfg.model.path) / n).is_file() for n in _TOKENIZER_FILES):
        raise UserError(f"model.path {cfg.model.path!r} has no tokenizer files: set "
                        f"model.tokenizer_path to a tokenizer directory")
    if not cfg.data.train_files:
        raise UserError("data.train_files is empty: pass --data.train_files=[a.jsonl,...]")
    for i, path in enumerate(cfg.data.train_files):
        data_file_kind(path, cfg.data.format, f"data.train_files[{i}]")
    for i, path in enumerate(cfg.eval.files):
        data_file_kind(path, "auto", f"eval.files[{i}]")
    check_resume(cfg.checkpoint.resume)
    check_device(cfg.train.device)
