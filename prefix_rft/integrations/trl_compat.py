"""Which TRL versions :mod:`prefix_rft.integrations.trl` supports, checked before TRL is used.

The integration relies on two TRL details that are not public API, so it pins the versions it
was written and tested against (``SUPPORTED_TRL``):

* the fused-LM-head forward protocol: ``GRPOTrainer`` calls
  ``model(..., labels=labels, fused_lm_head=True)`` and reads ``.log_probs`` / ``.entropy`` of a
  ``trl.trainer.utils.FusedCausalLMOutput`` (TRL >= 1.15; documented on
  ``trl.trainer.add_fused_lm_head``);
* ``GRPOTrainer._compute_loss(model, inputs)`` and the fields of its ``inputs`` dict
  (``prompt_ids``, ``completion_mask``, ``advantages``, ``old_per_token_logps``,
  ``importance_sampling_ratio``, ``tool_mask``), identical in 1.15 and 1.16.

This module does not import TRL, so the check itself is cheap and testable without it.
"""

from __future__ import annotations

import re

SUPPORTED_TRL = ">=1.15,<1.17"
_MIN, _MAX_EXCLUSIVE = (1, 15), (1, 17)


def _release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``"1.16.0"`` or ``"1.15.0.dev0"``."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_trl_version(version: str | None = None) -> str:
    """Raise ``ImportError`` unless ``version`` (default: the installed ``trl``) is supported.

    Returns the version string. The message names the supported range and the pip command.
    """
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("trl")
        except PackageNotFoundError as err:
            raise ImportError(
                f"prefix_rft.integrations.trl needs TRL {SUPPORTED_TRL}, which is not installed: "
                f'pip install "prefix-rft[trl]"'
            ) from err
    release = _release(str(version))
    if release is None or not _MIN <= release < _MAX_EXCLUSIVE:
        raise ImportError(
            f"prefix_rft.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}: "
            f'pip install "trl{SUPPORTED_TRL}"'
        )
    return str(version)
