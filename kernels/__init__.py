"""prefix_rft.kernels: fused linear -> log-prob / entropy, importable with torch + triton only.

    from prefix_rft.kernels import linear_logprob_entropy, entropy_topk_mask
    from prefix_rft.kernels import linear_policy_loss   # fused head-and-loss, 6NHV
"""

from .entropy_mask import entropy_topk_mask
from .linear_logprob_entropy import LinearLogprobEntropyFunction, linear_logprob_entropy
from .linear_policy_loss import LinearPolicyLossFunction, linear_policy_loss
from .linear_policy_loss_reference import linear_policy_loss_reference
from .reference import linear_logprob_entropy_reference

__all__ = [
    "LinearLogprobEntropyFunction",
    "LinearPolicyLossFunction",
    "entropy_topk_mask",
    "linear_logprob_entropy",
    "linear_logprob_entropy_reference",
    "linear_policy_loss",
    "linear_policy_loss_reference",
]
