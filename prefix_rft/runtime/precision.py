"""The precision policy of a run: compute dtype, weight (master) dtype, gradient-reduction
dtype and the dtype of exported weights, from ``model.dtype``, ``model.weights_dtype``,
``optim.name`` and ``checkpoint.export_dtype``.

``model.dtype: bf16`` means what HF Trainer's ``bf16=True`` means: **bf16 compute, fp32 master
weights, fp32 optimizer state, fp32 gradient reduction.** A step of lr 1e-6 on a weight of
~1e-2 is far below bf16's spacing there (~6e-5), so an update applied to bf16-stored weights
rounds away; fp32 masters keep it.

================  ==========================================================================
run               how the compute dtype is reached
================  ==========================================================================
one process       fp32 weights + ``torch.autocast(device, bf16)`` around forward passes
                  (the fused head gets the autocast dtype: ``update.head.head_inputs``)
FSDP2 (torchrun)  fp32 sharded weights + ``MixedPrecisionPolicy(param_dtype=bf16,
                  reduce_dtype=fp32)``: bf16 all-gather and compute, fp32 reduce-scatter
================  ==========================================================================

Weights *stored* in bf16 (half the weight and optimizer memory) only with an update that
survives rounding: ``model.weights_dtype: bf16`` requires ``optim.name: adamw_bf16_sr``
(torchao's AdamW with stochastic rounding: each weight rounds up or down with probabilities
that make the expected stored update equal the fp32 one). Plain AdamW on bf16 weights is
refused before anything loads. Checkpoints hold the weights as trained (fp32 masters, or the
bf16 weights of the opt-in); the final HF export is cast to ``checkpoint.export_dtype``.

    policy = precision_policy(cfg, device)
    model = from_pretrained(..., dtype=policy.weights_dtype)
    wrap_fsdp2(model, mp_policy=policy.fsdp_mixed_precision())      # under torchrun
    with policy.autocast(model):                                     # forwards
        ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

ComputeDtype = Literal["auto", "fp32", "bf16"]  # model.dtype: auto = bf16 on CUDA, fp32 on CPU
WeightsDtype = Literal["fp32", "bf16"]  # model.weights_dtype: stored/updated weights
ExportDtype = Literal["auto", "fp32", "bf16"]  # checkpoint.export_dtype: auto = compute dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# optimizers whose update survives bf16 storage (stochastic rounding)
BF16_SAFE_OPTIMIZERS = ("adamw_bf16_sr",)


def stored_weights_dtype(weights_dtype: str, optim_name: str) -> str:
    """``model.weights_dtype``, or bf16 when the optimizer is a bf16 stochastic-rounding one
    (it exists to update bf16-stored weights)."""
    return "bf16" if optim_name in BF16_SAFE_OPTIMIZERS else weights_dtype


def check_precision(model_dtype: str, weights_dtype: str, optim_name: str = "adamw") -> None:
    """One-line ValueError for combinations that would not train as asked."""
    if weights_dtype not in DTYPES:
        raise ValueError(f"model.weights_dtype must be one of fp32|bf16, got {weights_dtype!r}")
    if weights_dtype == "bf16" and optim_name not in BF16_SAFE_OPTIMIZERS:
        raise ValueError(
            f"model.weights_dtype=bf16 with optim.name={optim_name} would lose updates below "
            f"bf16's spacing (lr 1e-6 on a 1e-2 weight rounds to no change): use "
            f"optim.name={BF16_SAFE_OPTIMIZERS[0]} (stochastic rounding) or "
            f"model.weights_dtype=fp32 (fp32 masters)")
    if weights_dtype == "bf16" and model_dtype == "fp32":
        raise ValueError("model.weights_dtype=bf16 computes in bf16: set model.dtype to bf16 "
                         "or auto, not fp32")


@dataclass(frozen=True)
class PrecisionPolicy:
    """``compute`` dtype of forward passes, ``weights`` dtype of the stored (master) weights
    and the optimizer state, ``reduce`` dtype of gradient reduction, ``export`` dtype of the
    final HF weights."""

    compute: torch.dtype
    weights: torch.dtype
    reduce: torch.dtype
    export: torch.dtype
    device_type: str

    @property
    def mixed(self) -> bool:
        """fp32 masters computed in a lower dtype (autocast / FSDP2 param_dtype)."""
        return self.compute != self.weights

    def fsdp_mixed_precision(self):
        """The FSDP2 ``MixedPrecisionPolicy``: bf16 all-gather/compute when mixed, fp32
        gradient reduction always."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed:
            return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=self.reduce)
        return MixedPrecisionPolicy(reduce_dtype=self.reduce)

    @contextlib.contextmanager
    def autocast(self, model: torch.nn.Module | None = None):
        """``torch.autocast(device, compute)`` for a one-process mixed run; a no-op under
        FSDP2 (its MixedPrecisionPolicy casts) and when nothing is mixed."""
        from .distributed import is_fsdp

        if self.mixed and not (model is not None and is_fsdp(model)):
            with torch.autocast(self.device_type, dtype=self.compute):
                yield
        else:
            yield


def precision_policy(model_dtype: str, weights_dtype: str, export_dtype: str,
                     device: torch.device | str, optim_name: str = "adamw") -> PrecisionPolicy:
    """Resolve the policy. ``model_dtype``: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16;
    ``weights_dtype``: fp32 | bf16; ``export_dtype``: auto (the compute dtype) | fp32 | bf16."""
    check_precision(model_dtype, weights_dtype, optim_name)
    device_type = torch.device(device).type
    if model_dtype == "auto":
        bf16 = device_type == "cuda" or weights_dtype == "bf16"
        compute = torch.bfloat16 if bf16 else torch.float32
    elif model_dtype in DTYPES:
        compute = DTYPES[model_dtype]
    else:
        raise ValueError(f"model.dtype must be one of auto|fp32|bf16, got {model_dtype!r}")
    if export_dtype == "auto":
        export = compute
    elif export_dtype in DTYPES:
        export = DTYPES[export_dtype]
    else:
        raise ValueError(f"checkpoint.export_dtype must be one of auto|fp32|bf16, "
                         f"got {export_dtype!r}")
    return PrecisionPolicy(compute=compute, weights=DTYPES[weights_dtype], reduce=torch.float32,
                           export=export, device_type=device_type)
