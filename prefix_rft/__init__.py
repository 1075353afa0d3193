"""prefix-rft: a lean trainer for Prefix-RFT (SFT + RL fine-tuning with demonstration prefixes).

Kept light on purpose: importing ``prefix_rft`` or ``prefix_rft.kernels`` does not import
transformers, datasets or vLLM.
"""

__version__ = "0.1.0"
