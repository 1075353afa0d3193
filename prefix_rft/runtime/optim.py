"""The optimizer named by ``optim.name``: full-precision AdamW or a low-memory variant.

    optimizer = make_optimizer("adamw8bit", model.parameters(), lr=1e-6)

========================  =============================================  ===================
``optim.name``            what                                           state / parameter
========================  =============================================  ===================
``adamw``                 ``torch.optim.AdamW`` (fused kernel on CUDA)   2 x param dtype
``adamw8bit``             ``torchao.optim.AdamW8bit``: blockwise 8-bit   ~2 bytes (+ fp32
                          moments (block 256; tensors < 4096 values      scale per 256)
                          keep full-precision state)
``adamw_bf16_sr``         ``torchao.optim._AdamW(bf16_stochastic_round   2 x bf16 = 4 bytes
                          =True)`` on bf16-stored weights: the update is
                          rounded stochastically, so small steps survive
                          in expectation (no fp32 master copy)
========================  =============================================  ===================

torchao is an optional extra (``pip install prefix-rft[lowmem]``); its optimizers compile a
step function per parameter shape on their first step (~20 s on CPU, once per process).
Both torchao optimizers keep ``lr`` as a tensor; ``torch.optim.lr_scheduler`` updates it in
place, so the trainer's warmup/cosine schedule works unchanged. Every optimizer here
round-trips ``state_dict()`` exactly (checkpoints resume bit-exactly).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from ..checks import choices

OptimizerName = Literal["adamw", "adamw8bit", "adamw_bf16_sr"]  # optim.name (table above)
OPTIMIZERS = choices(OptimizerName)
TORCHAO_OPTIMIZERS = ("adamw8bit", "adamw_bf16_sr")  # the names that import torchao


def _torchao_optim():
    try:
        import torchao.optim as ao_optim
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError("optim.name adamw8bit/adamw_bf16_sr need torchao "
                         "(pip install 'prefix-rft[lowmem]' or pip install torchao)") from None
    return ao_optim


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``adamw | adamw8bit | adamw_bf16_sr``) over the trainable
    ``params`` (those with ``requires_grad``; frozen ones, e.g. a LoRA base, are skipped).

    ``adamw_bf16_sr`` needs bf16 parameters (that is its point: no fp32 masters); the others
    take any floating dtype. Raises ``ValueError`` naming ``optim.name`` for an unknown name.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {'|'.join(OPTIMIZERS)}, got {name!r}")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad) to optimize")
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        on_cuda = all(p.device.type == "cuda" for p in trainable)
        return torch.optim.AdamW(trainable, fused=True if on_cuda else None, **kwargs)
    ao_optim = _torchao_optim()
    if name == "adamw8bit":
        return ao_optim.AdamW8bit(trainable, **kwargs)
    not_bf16 = sorted({str(p.dtype) for p in trainable if p.dtype != torch.bfloat16})
    if not_bf16:
        raise ValueError(f"optim.name=adamw_bf16_sr updates bf16-stored weights; the trainable "
                         f"parameters are {', '.join(not_bf16)} (set model.dtype: bf16)")
    return ao_optim._AdamW(trainable, bf16_stochastic_round=True, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (torchao's 8-bit subclasses included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            local = value.to_local() if hasattr(value, "to_local") else value
            inner = [getattr(local, n) for n in ("codes", "scale") if hasattr(local, n)]
            total += sum(t.numel() * t.element_size() for t in (inner or [local]))
    return total
