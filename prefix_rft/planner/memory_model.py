"""Arithmetic of a training run's peak memory, per component, from a model's ``config.json``.

Nothing here touches weights or a device: :func:`component_bytes` turns a :class:`ModelShape`
(read from ``config.json``) and a :class:`PlanInputs` (the memory-relevant settings of a run)
into bytes per component and phase. ``prefix_rft.planner.plan`` builds the inputs from a run config,
adds the rollout engine, decides fits / doesn't and suggests changes.

The model of one update step (per rank; ``N`` = FSDP2 ranks, params/grads/state sharded 1/N):

* stored params ``P * w`` (``w`` = 4 for fp32 masters, 2 for bf16-stored weights); under LoRA
  the frozen base is stored in the compute dtype and the adapters in fp32;
* gradients ``P_train * w``; optimizer state per trainable parameter: AdamW ``2 w``, torchao
  AdamW8bit ``2 * (1 + 4/256)`` (blockwise uint8 + fp32 scale; tensors < 4096 elements keep
  ``2 w``), AdamW bf16 + stochastic rounding ``2 * 2``;
* activations under gradient checkpointing: one ``[T, H]`` checkpoint per layer plus one
  layer's backward (``RECOMPUTE`` x its saved set of ``SAVED_H * H + SAVED_KV * kv +
  SAVED_I * I`` values per token), at ``T = train.micro_batch_tokens``; without
  checkpointing every layer's saved set plus the gradients in flight;
* the fused head: fp32 ``dX [T, H]`` + its logit tiles + (when the lm_head trains and the
  kernel sees a non-fp32 or gathered weight) the fp32 ``dW [V, H]`` accumulator;
* the optimizer step's temporaries (largest tensor, unfused / compiled per-tensor steps).

The backward peak is taken as the maximum over layers of (grads so far + checkpoints left +
one layer's recompute) and the head's backward; the step peak as grads + step temporaries.
The activation constants were fitted once on CPU (``benchmarks/memory.py``: fresh process per
case, each phase's rise of peak RSS over the memory held between steps, nothing computed
added) at two shapes, and are not tuned per shape; ``tests/test_plan.py`` checks each phase on
held-out shapes where activations are >= 30 % of the peak, within 15 %. What only a GPU can
measure (bf16 activations under autocast, compute copies, the Triton head's buffers, CUDA
context, allocator slack) is measured by ``benchmarks/gpu_check.sh``'s train-step stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.lora import DEFAULT_TARGETS
from ..runtime.offload import Offload
from ..runtime.optim import OPTIMIZERS, OptimizerName

GiB = 2**30
# Values per token that one Qwen2/Llama decoder layer's forward saves for its backward (SDPA):
# 9 x H (both RMSNorms' normalized input and output, rotary q, the attention output and its
# contiguous copy, the two residual sums, the layer output), 2 x kv (rotary k, v), 4 x I (gate,
# up, SiLU(gate), their product). Measured on CPU at 5,690 values/token on the fit shape
# (benchmarks/memory.py act-8L-256, checkpointing off), 5,632 counted.
SAVED_H, SAVED_KV, SAVED_I = 9, 2, 4
# The backward of one recomputed layer peaks at RECOMPUTE x its saved set (the saved set plus
# the gradients in flight, less what the MLP's backward has freed), fitted on CPU with
# checkpointing on at the fit shapes act-8L-256 (1.17, per-layer backward hooks) and
# act-12L-320 (1.25). tests/test_plan.py checks shapes not used to fit anything.
RECOMPUTE = 1.2
# Chunked torch head path (CPU): [1024, 8192] fp32 tiles, three alive in the forward and five
# in the backward (measured on CPU: the head's backward is the update's peak at the fit shape).
# The Triton path (CUDA) holds no tiles in the forward and one [T, CHUNK_V] dz buffer in the
# input dtype in the split backward.
HEAD_TOKEN_CHUNK, HEAD_VOCAB_CHUNK, HEAD_TILES, HEAD_TILES_BWD = 1024, 8192, 3, 5
# A checkpointed layer's forward (no graph kept) holds ~3 [T, I] MLP tensors at once.
LAYER_FWD_I = 3


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Qwen2/Llama-style decoder, as in its HF ``config.json``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelShape:
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
                       kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or hidden // heads),
                       intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                       tied=bool(cfg.get("tie_word_embeddings", False)),
                       qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")))
        except KeyError as err:
            raise ValueError(f"model config.json lacks {err.args[0]!r} (need a decoder-only "
                             f"HF config: hidden_size, num_hidden_layers, ...)") from None

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ValueError(f"model.path must be a directory with a config.json, "
                             f"got {str(path)!r}")
        return cls.from_dict(json.loads(file.read_text(encoding="utf-8")))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Decoder-layer linear name -> (in_features, out_features)."""
        H, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}

    def layer_params(self) -> int:
        bias = (self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return sum(i * o for i, o in self.linear_shapes().values()) + bias + 2 * self.hidden

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        heads = 1 if self.tied else 2
        return heads * self.embed_params() + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"model.lora.target_modules must be among {list(shapes)}, "
                             f"got {unknown}")
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass
class PlanInputs:
    """Memory-relevant settings of one run, per rank. Bytes are per element."""

    micro_batch_tokens: int  # tokens in one forward/backward per rank
    world: int = 1  # FSDP2 ranks
    device: str = "cuda"  # cuda | cpu (cpu: fp32 everywhere, no context/allocator terms)
    weight_bytes: int = 4  # stored trainable weights: 4 fp32 masters | 2 bf16-stored
    compute_bf16: bool = False  # bf16 compute (autocast / FSDP2 mixed precision)
    optim: OptimizerName = "adamw"
    lora_r: int = 0  # 0 = full fine-tuning
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    offload: Offload = "none"
    gradient_checkpointing: bool = True
    attention_mask_bytes: int = 0  # padded [B, 1, T, T] bool mask of a micro-batch, bytes
    fsdp: bool = False  # wrapped with FSDP2 (world > 1 or offload == params)
    notes: list[str] = field(default_factory=list)


def _optimizer_state_bytes(shape: ModelShape, inp: PlanInputs, trainable: list[int],
                           w: int) -> float:
    if inp.optim == "adamw":
        return 2.0 * w * sum(trainable)
    if inp.optim == "adamw8bit":  # torchao: blockwise 8-bit when numel >= 4096 and % 256 == 0
        return sum(2 * (1 + 4 / 256) * n if n >= 4096 and n % 256 == 0 else 2.0 * w * n
                   for n in trainable)
    if inp.optim == "adamw_bf16_sr":
        return 2.0 * 2 * sum(trainable)
    raise ValueError(f"optim.name must be one of {'|'.join(OPTIMIZERS)}, got {inp.optim!r}")


def _trainable_tensors(shape: ModelShape, inp: PlanInputs) -> list[int]:
    """Element counts of the trainable tensors (what the optimizer holds state for)."""
    if inp.lora_r:
        lin = shape.linear_shapes()
        per_layer = [n for t in inp.lora_targets for n in (inp.lora_r * lin[t][0],
                                                           inp.lora_r * lin[t][1])]
        return per_layer * shape.layers
    layer = [i * o for i, o in shape.linear_shapes().values()] + [shape.hidden] * 2
    if shape.qkv_bias:
        layer += [shape.heads * shape.head_dim, shape.kv_dim, shape.kv_dim]
    embeds = [shape.embed_params()] * (1 if shape.tied else 2)
    return embeds + layer * shape.layers + [shape.hidden]


def _step_temporaries(inp: PlanInputs, largest: int, w: int) -> float:
    """Optimizer-step scratch: torch AdamW is fused on CUDA (no scratch) and per-tensor on CPU
    (~2 tensors of the largest parameter); torchao's 8-bit step dequantizes the largest
    tensor's two moments to fp32; its bf16 + SR step fuses into one in-place kernel."""
    if inp.optim == "adamw":
        return 0.0 if inp.device == "cuda" else 2.0 * w * largest
    if inp.optim == "adamw8bit":  # the largest tensor's two moments dequantized to fp32
        return 2.0 * 4 * largest
    return 0.0  # bf16 + stochastic rounding: one compiled in-place kernel per tensor


def _activation_terms(shape: ModelShape, inp: PlanInputs, c: int, w: int
                      ) -> tuple[float, float, float, float]:
    """Bytes of (one layer's saved set, one layer's checkpoint -- its saved set when
    checkpointing is off --, one layer's backward set on top of the checkpoints, the
    layer-independent activations: embeddings out, final norm, head input, padded mask)."""
    T, H = inp.micro_batch_tokens, shape.hidden
    saved = T * (SAVED_H * H + SAVED_KV * shape.kv_dim + SAVED_I * shape.intermediate) * c
    if inp.lora_r and inp.lora_dropout > 0:  # peft's dropout copies of each target's input
        saved += T * sum(shape.linear_shapes()[t][0] for t in inp.lora_targets) * c
    # under single-process autocast the residual stream (the checkpointed input) stays fp32
    autocast = inp.compute_bf16 and inp.device == "cuda" and not inp.fsdp and w == 4
    if inp.gradient_checkpointing:
        ckpt_one, layer_bwd = T * H * (4 if autocast else c), RECOMPUTE * saved
    else:  # every layer's saved set is held; the backward adds the gradients in flight
        ckpt_one, layer_bwd = saved, (RECOMPUTE - 1) * saved
    fixed = 3 * T * H * 4 + inp.attention_mask_bytes
    return saved, ckpt_one, layer_bwd, fixed


def _head_workspace(shape: ModelShape, inp: PlanInputs, c: int, head_trains: bool
                    ) -> tuple[float, float]:
    """The fused head's (forward tiles, backward workspace) in bytes: the torch path's logit
    tiles on CPU, the Triton split backward's dz buffer on CUDA; plus the fp32 dX and, when
    the lm_head trains on a non-fp32 or gathered weight, the fp32 dW accumulator."""
    T, H, V = inp.micro_batch_tokens, shape.hidden, shape.vocab
    rows, cols = min(T, HEAD_TOKEN_CHUNK), min(V, HEAD_VOCAB_CHUNK)
    tiles, tiles_bwd = rows * cols * 4 * HEAD_TILES, rows * cols * 4 * HEAD_TILES_BWD
    if inp.device == "cuda":  # Triton: no forward tiles; the split backward's dz buffer
        tiles, tiles_bwd = 0.0, T * cols * c
    dw_extra = V * H * 4 if head_trains and (c != 4 or inp.fsdp) else 0.0
    return tiles, T * H * 4 + tiles_bwd + dw_extra


def component_bytes(shape: ModelShape, inp: PlanInputs) -> dict[str, float]:
    """Bytes per rank of each component of the update phase, plus the phase peaks.

    Keys: ``params``, ``grads``, ``optimizer_state``, ``compute_copies``, ``activations``,
    ``head_workspace``, ``step_temporaries`` (each the component's size at the update peak),
    ``update_peak`` (max over forward, backward and optimizer step), ``resident`` (what stays
    between steps: params + optimizer state on the device), ``phase_forward`` /
    ``phase_backward`` / ``phase_step`` (each phase's peak above ``resident``: what
    ``benchmarks/memory.py`` measures as a rise of peak RSS), and ``host_*`` (CPU RAM of
    offloaded states). ``cpu`` device: no compute copies (fp32 throughout).
    """
    N = max(1, inp.world) if inp.fsdp else 1
    H, L, T, V = shape.hidden, shape.layers, inp.micro_batch_tokens, shape.vocab
    c = 2 if inp.compute_bf16 else 4  # compute dtype bytes
    trainable = _trainable_tensors(shape, inp)
    p_total, p_train = shape.total_params(), sum(trainable)
    if inp.lora_r:  # frozen base in the compute dtype, adapters fp32
        stored = (p_total * c + p_train * 4) / N
        w = 4
    else:
        w = inp.weight_bytes
        stored = p_total * w / N
    grads = p_train * w / N
    state = _optimizer_state_bytes(shape, inp, trainable, w) / N
    step_tmp = _step_temporaries(inp, max(trainable), w) / N
    host = {"host_params": 0.0, "host_optimizer": 0.0}
    if inp.offload == "optimizer":  # state + fp32 master copy + step on the host
        host["host_optimizer"] = state + (p_train * w / N)
        state, step_tmp = 0.0, 0.0
    elif inp.offload == "params":  # FSDP2 CPUOffloadPolicy: sharded params/grads/state on host
        host["host_params"] = stored + grads
        host["host_optimizer"] = state
        stored, grads, state, step_tmp = 0.0, 0.0, 0.0, 0.0
    # bf16 compute copies: FSDP2 all-gathers the root (embeddings + head) and ~2 layers;
    # single-process autocast caches a bf16 copy of every decoder weight during the forward.
    heads = 1 if shape.tied else 2
    head_trains = not inp.lora_r
    copy_fwd = copy_bwd = 0.0
    if inp.fsdp:
        gathered = c if inp.compute_bf16 else w
        copy_fwd = copy_bwd = (heads * shape.embed_params() + 2 * shape.layer_params()) * gathered
        if N == 1 and not inp.compute_bf16 and inp.offload != "params":
            copy_fwd = copy_bwd = 0.0  # one rank, same dtype: the gathered tensor is the shard
    elif inp.compute_bf16 and inp.device == "cuda" and not inp.lora_r and w == 4:
        copy_fwd = shape.layer_params() * L * 2 + V * H * 2
        copy_bwd = V * H * 2  # the head's bf16 weight, saved for its backward
    _, ckpt_one, layer_bwd, fixed_act = _activation_terms(shape, inp, c, w)
    tiles, head_ws = _head_workspace(shape, inp, c, head_trains)
    head_grad = (V * H * w / N) if head_trains and not shape.tied else 0.0
    # backward: max over layers of grads so far + checkpoints left + one layer's recompute
    layer_grad = (p_train - (heads * shape.embed_params() if head_trains else 0)) / max(1, L)
    layer_grad = layer_grad * w / N if inp.offload != "params" else 0.0
    if inp.offload == "params":
        head_grad = 0.0
    bwd = max(head_grad + L * ckpt_one + fixed_act + head_ws + copy_bwd,
              max(head_grad + (L - k) * layer_grad + k * ckpt_one + layer_bwd + fixed_act
                  + copy_bwd for k in range(1, L + 1)))
    tied_tmp = V * H * w if (shape.tied and head_trains and inp.offload != "params") else 0.0
    bwd_end = grads + tied_tmp + fixed_act
    # forward: the checkpoints (every layer's saved set without checkpointing) plus the larger
    # of the head's tiles and one checkpointed layer's live intermediates
    layer_fwd = T * LAYER_FWD_I * shape.intermediate * c if inp.gradient_checkpointing else 0.0
    fwd = L * ckpt_one + fixed_act + copy_fwd + max(tiles, layer_fwd)
    step = grads + step_tmp
    transient = max(fwd, bwd, bwd_end, step)
    resident = stored + state
    out = {"params": stored, "grads": grads,
           "optimizer_state": state, "compute_copies": max(copy_fwd, copy_bwd),
           "activations": L * ckpt_one + layer_bwd + fixed_act, "head_workspace": head_ws,
           "step_temporaries": step_tmp, "update_peak": resident + transient,
           "resident": resident, "trainable_params": float(p_train),
           "total_params": float(p_total),
           # above ``resident``, the largest allocation of each phase of the step
           "phase_forward": fwd, "phase_backward": max(bwd, bwd_end), "phase_step": step}
    out.update(host)
    return out


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token (keys and values of every layer)."""
    return 2 * shape.layers * shape.kv_dim * dtype_bytes
