"""LoRA through peft, injected in place so the policy stays a plain HF causal LM.

    model = apply_lora(model, r=16, alpha=32, dropout=0.0)    # base frozen, adapters fp32
    merged = merge_lora_state(gather_full_state_dict(model), scalings(model))  # plain HF keys

``peft.inject_adapter_in_model`` replaces each target ``nn.Linear`` with a LoRA layer
(``<name>.base_layer`` + ``<name>.lora_A.default`` / ``lora_B.default``) inside the same
module tree, so ``model.model.layers``, ``get_output_embeddings()`` and FSDP2 wrapping work
unchanged: the fused loss still reads the (frozen) ``lm_head.weight``. Only the adapters
train: their optimizer state and checkpoints are small (see :func:`trainable_state_dict`),
and the merged weights ``W + (alpha / r) * B @ A`` feed the vLLM weight sync and the final HF
save. peft is an optional extra (``pip install prefix-rft[lowmem]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError("model.lora needs peft (pip install 'prefix-rft[lowmem]' or "
                         "pip install peft)") from None
    return peft


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
               target_modules: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Inject LoRA adapters (rank ``r``, scale ``alpha / r``) into ``target_modules`` of
    every decoder layer, freeze everything else, keep the adapters in fp32 whatever the base
    dtype. Returns the same model object. Adapter init is peft's (A random, B zero), so the
    model's outputs are unchanged until the first update."""
    if r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"model.lora.alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {dropout}")
    if not target_modules:
        raise ValueError("model.lora.target_modules must name at least one module")
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(target_modules), bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        is_adapter = ".lora_" in name
        param.requires_grad_(is_adapter)
        if is_adapter and param.dtype != torch.float32:
            param.data = param.data.float()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model.lora.target_modules {list(target_modules)} matched no module")
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def scalings(model: nn.Module) -> dict[str, float]:
    """LoRA module name (as in ``named_modules``) -> its scale ``alpha / r``."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and ADAPTER in scaling and hasattr(module, "base_layer"):
            out[name] = float(scaling[ADAPTER])
    return out


def merge_lora_state(state: dict[str, torch.Tensor], scales: dict[str, float]
                     ) -> dict[str, torch.Tensor]:
    """A full state dict of a LoRA model -> the plain HF state dict of the merged model:
    ``<m>.weight = <m>.base_layer.weight + scale * lora_B @ lora_A`` (computed in fp32, cast
    to the base dtype), ``<m>.base_layer.bias -> <m>.bias``, adapter keys dropped. ``scales``
    maps module names (the state dict's key prefixes) to ``alpha / r``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, scale in scales.items():
        prefix = name
        a_key = f"{prefix}.lora_A.{ADAPTER}.weight"
        if a_key not in state:
            raise ValueError(f"state dict has no LoRA weights for module {name!r}")
        base = state[f"{prefix}.base_layer.weight"]
        delta = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float() @ state[a_key].float()
        out[f"{prefix}.weight"] = (base.float() + scale * delta).to(base.dtype)
    return out


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train (the adapters under LoRA)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
