"""The full-logits plain-torch reference of linear -> (log-prob, entropy).

:func:`linear_logprob_entropy_reference` materializes the ``[N, V]`` logits in fp32 or
fp64 and differentiates through them with autograd: it is the independent ground truth the
tests and benchmarks hold the fused implementations to, never a production path (that is
``linear_logprob_entropy_torch.py`` on CPU and ``linear_logprob_entropy_triton.py`` on CUDA).
"""

from __future__ import annotations

import torch


def linear_logprob_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-logits ground truth: ``[N, V]`` logits in ``dtype`` (fp32 or fp64), autograd.

    Returns ``(logprob [N], entropy [N])`` in ``dtype``; ignored rows are 0 and carry no
    gradient. Tests call it with ``dtype=torch.float64`` as the independent reference.
    """
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logprob = log_probs.gather(-1, safe_labels[:, None].long()).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    return torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)
