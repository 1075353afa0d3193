"""prefix_rft.kernels: fused linear -> log-prob / entropy, importable with torch + triton only.

    from prefix_rft.kernels import linear_logprob_entropy, entropy_topk_mask
"""

from .entropy_mask import entropy_topk_mask
from .linear_logprob_entropy import LinearLogprobEntropyFunction, linear_logprob_entropy
from .reference import linear_logprob_entropy_reference

__all__ = [
    "LinearLogprobEntropyFunction",
    "entropy_topk_mask",
    "linear_logprob_entropy",
    "linear_logprob_entropy_reference",
]
