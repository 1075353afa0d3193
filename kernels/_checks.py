"""Input validation shared by the public kernel entry points.

Every failure is a ``ValueError`` naming the argument and what was expected, so a user who
passes ``[B, T, H]`` hidden states or int64 weights learns what to change from one line.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_linear_logprob_entropy_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels must be 1-D [N] with N = hidden.shape[0] = {hidden.shape[0]}, "
            f"got shape {tuple(labels.shape)}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating tensor (fp32/bf16/fp16), got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating tensor (fp32/bf16/fp16), got {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {shape}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"hidden, weight, labels (and bias) must be on one device; got {listed}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if labels.numel():
        vocab = weight.shape[0]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {first}"
            )


def check_triton_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """The Triton path refuses mixed 16-bit / fp32 inputs: promoted to fp32 they would run the
    fp32 FMA tiles (no tensor cores, 15-30x slower) without a word."""
    dtypes = {t.dtype for t in (hidden, weight)}
    if len(dtypes) > 1 and dtypes & {torch.bfloat16, torch.float16}:
        low = next(d for d in (hidden.dtype, weight.dtype) if d != torch.float32)
        raise ValueError(
            f"hidden is {str(hidden.dtype)[6:]} but weight is {str(weight.dtype)[6:]}: mixed "
            f"inputs would run impl='triton' in fp32 without tensor cores (15-30x slower); cast "
            f"both to one dtype (e.g. weight.to({str(low)}) as under autocast, or both .float())"
        )


def check_fraction(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
