"""``train.offload``: move training state off the GPU.

========== ======================================================================================
``none``   params, gradients and optimizer state on the GPU (sharded 1/N under FSDP2).
``optimizer`` :class:`HostOptimizer`: the optimizer state *and* an fp32 (or bf16) host copy of
           each trainable tensor live in CPU RAM and the optimizer step runs on the CPU; the
           GPU keeps params and gradients. Each step copies the (clipped) gradients to the
           host, steps there, and copies the new values back. Under FSDP2 it works on each
           rank's local shards, so the host holds 1/N. Saves ``optimizer state`` per param on
           the GPU (8 bytes with AdamW fp32) for 2 PCIe transfers of the trainable tensors per
           optimizer step. FSDP2 itself cannot offload only the optimizer state (its
           ``CPUOffloadPolicy`` moves the parameters too), hence this wrapper.
``params`` FSDP2's ``CPUOffloadPolicy``: the sharded parameters and gradients live in CPU RAM
           (so does the optimizer state, which follows its parameters) and the optimizer step
           runs on the CPU; each layer's parameters are copied to the GPU for its forward and
           backward only. Uses FSDP2 also on a single GPU (a one-rank process group). The GPU
           keeps activations, the head's workspace and ~2 layers' (plus the root's) weights.
========== ======================================================================================

    opt = HostOptimizer(model.parameters(), lambda ps: make_optimizer("adamw", ps, lr=1e-6))
    ...; clip_grad_norm(model); opt.step(); opt.zero_grad()

Checkpoints: ``state_dict()`` is the inner (host) optimizer's, keyed by position in this
rank's parameter list (FSDP2: this rank's shards), so it resumes with the same number of
ranks; ``prefix_rft.run.checkpoint`` writes it per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

# train.offload: none | optimizer (HostOptimizer below) | params (FSDP2 CPUOffloadPolicy)
Offload = Literal["none", "optimizer", "params"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class HostOptimizer(torch.optim.Optimizer):
    """An optimizer whose state and step live in host RAM (see the module doc).

    ``params``: the model's parameters (plain tensors or FSDP2 DTensors; frozen ones are
    skipped). ``build``: makes the inner optimizer over the host copies, e.g.
    ``lambda ps: make_optimizer(name, ps, lr=...)``. ``param_groups`` and ``state`` are the
    inner optimizer's, so LR schedulers work unchanged.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter],
                 build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]):
        self.device_params = [p for p in params if p.requires_grad]
        if not self.device_params:
            raise ValueError("the model has no trainable parameters (requires_grad) to optimize")
        pin = torch.cuda.is_available() and any(_local(p).is_cuda for p in self.device_params)
        self.host_params = []
        for p in self.device_params:
            local = _local(p.detach())
            host = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
            host.copy_(local)
            self.host_params.append(torch.nn.Parameter(host))
        self.inner = build(self.host_params)
        super().__init__(self.host_params, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostOptimizer.step does not take a closure")
        for p, host in zip(self.device_params, self.host_params):
            grad = p.grad
            if grad is None:
                host.grad = None
                continue
            grad = _local(grad)
            if host.grad is None:
                host.grad = torch.empty_like(host)
            host.grad.copy_(grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.inner.step()
        for p, host in zip(self.device_params, self.host_params):
            if p.grad is not None:
                _local(p.detach()).copy_(host, non_blocking=True)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def resync_from_model(self) -> None:
        """Copy the device params into the host copies (after loading a checkpoint)."""
        with torch.no_grad():
            for p, host in zip(self.device_params, self.host_params):
                host.copy_(_local(p.detach()))
