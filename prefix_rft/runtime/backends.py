"""Optional back-ends: this project imports each only where a config chooses it.

===========  ======================================================  =========================
back-end     imported by                                             when
===========  ======================================================  =========================
torchao      :func:`prefix_rft.runtime.optim.make_optimizer`         ``optim.name`` adamw8bit
                                                                     or adamw_bf16_sr
liger-kernel :func:`prefix_rft.run.setup.apply_liger`                ``model.liger`` true
                                                                     (auto: on CUDA, when
                                                                     installed)
flash-attn   transformers, for ``model.attn_implementation``         flash_attention_2
vLLM         :mod:`prefix_rft.rollout.vllm`                          ``rollout.engine: vllm``
peft         :mod:`prefix_rft.runtime.lora` (via ``run.setup``)      ``model.lora.r > 0``
===========  ======================================================  =========================

One import is not ours: transformers imports torchao whenever it is installed (its quantizer
registry, on the first model import), and torchao then logs a warning per C extension that
does not load on this machine (CPU-only, or another CUDA build), plus torch's notes on the
enums it registers. :func:`quiet_unused_backends` keeps those lines out of a run that does not
use torchao; a run that does (a torchao optimizer) still sees them.
"""

from __future__ import annotations

import logging

from .optim import TORCHAO_OPTIMIZERS

# loggers that speak when transformers imports an installed torchao: its C-extension loading,
# and torch's pytree registry (one deprecation note per enum torchao registers)
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_unused_backends(optimizer_name: str | None = None) -> None:
    """Silence the import-time warnings of torchao (loaded by transformers, not by us) unless
    ``optimizer_name`` is one of the torchao optimizers. Call before transformers is imported."""
    if optimizer_name in TORCHAO_OPTIMIZERS:
        return
    for name in TORCHAO_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
