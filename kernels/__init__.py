"""prefix_rft.kernels: fused linear -> log-prob / entropy, importable with torch + triton only.

    from prefix_rft.kernels import linear_logprob_entropy, entropy_topk_mask
    from prefix_rft.kernels import linear_policy_loss   # fused head-and-loss, 6NHV

This folder is installed as ``prefix_rft.kernels`` (setup.cfg ``package_dir``). Python run
from the repository root also sees it as a top-level package named ``kernels``, which is the
name of Hugging Face's ``kernels`` package that transformers imports. Imported under that
name, this file hands over to the real ``kernels`` (or fails as if this folder were not
there), so ``python -m pytest`` from the root works beside the newest transformers.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over() -> None:
        """Replace this module in ``sys.modules`` with the ``kernels`` found on ``sys.path``
        without the repository root; the import statement then returns that one (importlib
        reads ``sys.modules`` back after running a module). None found: ModuleNotFoundError,
        exactly as if this folder were not on the path."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _hand_over()
    del _hand_over
else:
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
