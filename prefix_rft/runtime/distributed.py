"""Process groups, FSDP2 wrapping, full-state-dict gathering, metric reduction.

Everything works without ``torchrun``: with no process group (world size 1) the helpers are
no-ops, ``wrap_fsdp2`` is skipped by the caller or leaves the model unsharded, and
``gather_full_state_dict`` returns the plain state dict on CPU.

How the training loop uses the fused kernel under FSDP2 (read this before writing the loop)
-----------------------------------------------------------------------------------------
The fused ``linear_logprob_entropy`` needs the *full* ``lm_head`` weight, but under FSDP2
the registered parameter is a sharded ``DTensor`` between forwards. The lm_head (and, for
tied models, the embedding) belongs to the root FSDP group, whose parameters are
all-gathered only inside a forward *of the root module*. So the kernel must run inside such
a forward. ``wrap_fsdp2`` binds a second forward method, ``prefix_rft_hidden_forward``, to
the model and registers it with ``torch.distributed.fsdp.register_fsdp_forward_method``;
``forward_with_head`` calls it:

    def head_fn(hidden, weight, bias):          # hidden [B, T, H]; weight [V, H] unsharded
        return linear_logprob_entropy(hidden.flatten(0, 1), weight, labels.flatten(),
                                      bias=bias, temperature=temperature)
    logprob, entropy = forward_with_head(model, head_fn, input_ids, attention_mask=mask)
    loss = my_loss(logprob, entropy, ...); loss.backward()

Inside the call the weight is the unsharded parameter FSDP2 gathered for this forward, so
autograd sends its gradient through FSDP2's reduce-scatter like any other parameter
(averaged over ranks, as for the decoder layers). Do NOT use ``model.lm_head.weight``
outside that call (it is a DTensor shard) nor ``weight.full_tensor()`` (its gradient
bypasses FSDP's averaging). The same code runs unchanged on an unwrapped model.
tests/test_distributed.py checks loss and one AdamW step against a single process.

Gradients are *averaged* over ranks (FSDP2 default), so each rank's loss must be its share
of the global mean: scale per-rank sums by ``world_size / global_count``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

HIDDEN_FORWARD = "prefix_rft_hidden_forward"


Device = Literal["auto", "cpu", "cuda"]  # train.device: auto = cuda when available


# ---------------------------------------------------------------- process group
def init_distributed(device: Device = "auto",
                     timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's env vars; return (rank, world, device).

    ``device``: ``auto`` (cuda when available) | ``cpu`` | ``cuda``. Backend is nccl on CUDA,
    gloo on CPU. Without torchrun (no ``WORLD_SIZE`` or 1) nothing is initialized and
    ``(0, 1, device)`` is returned. Each CUDA rank uses GPU ``LOCAL_RANK``.
    """
    if device not in typing.get_args(Device):
        raise ValueError(f"device must be auto|cpu|cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return 0, 1, dev
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return dist.get_rank(), dist.get_world_size(), dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float] | torch.Tensor | float) -> Any:
    """Mean over ranks of a float, a tensor or a dict of floats (one collective for a dict).

    Single process: returned unchanged (dict values as floats). Every rank must call it with
    the same keys in the same order.
    """
    if isinstance(values, dict):
        keys = list(values)
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        reduced = all_reduce_mean(packed)
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}
    if not isinstance(values, torch.Tensor):
        return float(all_reduce_mean(torch.tensor(float(values), dtype=torch.float64)))
    if not is_distributed():
        return values
    # gloo reduces CPU tensors, nccl CUDA ones: move to where the backend can work.
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    work = values.detach().to(backend_device, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return (work / dist.get_world_size()).to(values.device)


def agree_on_success(error: BaseException | None, what: str, timeout_s: float) -> None:
    """Collective: every rank says whether its part of ``what`` (e.g. ``"saving checkpoint
    step_000004"``) failed; when any did, every rank raises the same one line,
    ``"<what> failed on rank R: <that rank's message>"`` (R the lowest failing rank), as a
    :class:`~prefix_rft.errors.UserError` when the failure is the user's to fix (a full or
    read-only disk), else a RuntimeError; the failing rank chains its own error. A rank that
    does not answer within ``timeout_s`` seconds stops the waiting ranks with a UserError (under
    gloo the process then still waits at exit until that rank joins the collective or the
    process group's timeout passes). Single process: re-raises ``error`` unchanged."""
    from ..errors import UserError, user_error_from

    if not is_distributed():
        if error is not None:
            raise error
        return
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.tensor([0.0 if error is None else 1.0], device=backend_device)
    work = dist.all_reduce(failed, op=dist.ReduceOp.MAX, async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # a rank is stuck or gone; the collective cannot complete
        raise UserError(f"{what}: another rank did not answer within {timeout_s:g} s; "
                        f"stopping (rank {get_rank()})") from error or err
    if float(failed.item()) == 0.0:
        return
    user = user_error_from(error) if error is not None else None
    mine = None if error is None else (
        "user" if user is not None else "bug", " ".join(str(user or error).split())
        or type(error).__name__)
    reports: list[Any] = [None] * get_world_size()
    dist.all_gather_object(reports, mine)
    rank = next(r for r, report in enumerate(reports) if report is not None)
    kind, message = reports[rank]
    line = f"{what} failed on rank {rank}: {message}"
    raise (UserError(line) if kind == "user" else RuntimeError(line)) from error


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over ranks (one collective; single process: ``value``)."""
    if not is_distributed():
        return int(value)
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    work = torch.tensor([int(value)], dtype=torch.int64, device=backend_device)
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return int(work.item())


def shard_range(num_items: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous slice of ``num_items`` this rank owns (sizes differ by at most one)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ---------------------------------------------------------------- FSDP2
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"model must be an HF causal LM with model.model.layers (a ModuleList), "
            f"got {type(model).__name__}")
    return layers


def _hidden_forward(self: nn.Module, head_fn: Callable, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, **model_kwargs) -> Any:
    """Decoder forward to the last hidden states, then ``head_fn(hidden, weight, bias)``."""
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=False, **model_kwargs)
    head = self.get_output_embeddings()
    return head_fn(out.last_hidden_state, head.weight, getattr(head, "bias", None))


def forward_with_head(model: nn.Module, head_fn: Callable, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, **model_kwargs) -> Any:
    """Run the decoder and ``head_fn(hidden [B,T,H], lm_head.weight [V,H], bias|None)`` in one
    forward, so that under FSDP2 ``weight`` is the unsharded parameter (see module doc).

    Equivalent to ``head_fn(model.model(input_ids, ...).last_hidden_state,
    model.lm_head.weight, model.lm_head.bias)`` on an unwrapped model. Returns what
    ``head_fn`` returns; its gradient reaches every parameter. ``model_kwargs`` go to the
    decoder (e.g. the ``cu_seq_lens_q`` of a packed batch, :mod:`prefix_rft.update.packed`).
    """
    method = getattr(model, HIDDEN_FORWARD, None)
    if method is None:  # not wrapped: call the plain function on the model
        return _hidden_forward(model, head_fn, input_ids, attention_mask, position_ids,
                               **model_kwargs)
    return method(head_fn, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  **model_kwargs)


def wrap_fsdp2(model: nn.Module, *, mixed_precision_bf16: bool = False, mp_policy=None,
               reshard_after_forward: bool = True, offload_params: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every decoder layer
    (``model.model.layers[i]``), then on the root (embeddings, final norm, lm_head).

    ``mixed_precision_bf16``: compute in bf16 with fp32 gradient reduction
    (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). ``mp_policy``: a
    ``MixedPrecisionPolicy`` to use instead (the trainer passes
    ``precision.PrecisionPolicy.fsdp_mixed_precision()``). Parameters keep the dtype they
    have (fp32 masters unless the run stores bf16 weights). Also registers ``generate`` and
    the fused-head forward
    (``forward_with_head``) as FSDP forward methods. Needs an initialized process group.
    Returns the same model object (now an ``FSDPModule``).

    ``offload_params`` (``train.offload: params``): FSDP2's ``CPUOffloadPolicy`` -- sharded
    parameters and gradients live in host RAM (pinned on CUDA), the optimizer steps there,
    and each layer is copied to the device for its forward/backward only.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if not dist.is_initialized():
        raise ValueError("wrap_fsdp2 needs an initialized process group (run init_distributed "
                         "under torchrun)")
    layers = _decoder_layers(model)
    if mp_policy is not None:
        policy = mp_policy
    elif mixed_precision_bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    mesh = None
    if next(model.parameters()).device.type == "cpu":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, **kwargs)
    setattr(model, HIDDEN_FORWARD, types.MethodType(_hidden_forward, model))
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, HIDDEN_FORWARD)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def init_one_rank_group(device: torch.device) -> None:
    """A one-process group (gloo on CPU, nccl on CUDA) so that FSDP2 can wrap a single-GPU
    run (``train.offload: params``). No-op when a group exists."""
    if dist.is_initialized():
        return
    import tempfile

    store = dist.FileStore(tempfile.mktemp(prefix="prefix-rft-pg-"), 1)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)



@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Under FSDP2, gather the weights once for a whole block of forwards (e.g. one generate
    call: ranks decode different numbers of steps, so per-forward all-gathers would
    deadlock) and reshard after it. No-op on a plain model."""
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def gather_full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU (for vLLM weight sync and saving).

    FSDP2 model: every rank must call it (collective). With ``rank0_only`` the other ranks
    get ``{}`` (avoids N copies in host memory). Plain model: a CPU copy of ``state_dict()``.
    Keys are the model's own (no wrapper prefixes), so ``from_pretrained``-style loading works.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_fsdp(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    if not rank0_only:
        state = {k: v.detach().to("cpu") for k, v in state.items()}
    return state


def gather_merged_state_dict(model: nn.Module, *, rank0_only: bool = True
                             ) -> dict[str, torch.Tensor]:
    """:func:`gather_full_state_dict` with LoRA adapters merged into their base weights
    (plain HF keys; what vLLM and ``save_pretrained`` need). Without LoRA the same dict."""
    state = gather_full_state_dict(model, rank0_only=rank0_only)
    if not any(".lora_" in key for key in state):
        return state
    from .lora import merge_lora_state, scalings

    return merge_lora_state(state, scalings(model))


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (works on DTensor grads); returns the norm before
    clipping. ``max_norm <= 0`` only measures."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
