"""A tiny Qwen2-architecture causal LM built from a config and saved as a HF directory.

The demo model goes through exactly the path a real checkpoint takes:
``Qwen2ForCausalLM.from_pretrained(dir)`` / ``AutoModelForCausalLM.from_pretrained(dir)``.

Shape choices (why):
- head_dim 32: vLLM's CPU attention backend only supports a few head sizes (32, 64,
  80, 96, 112, 128, 256); 32 keeps the model small.
- grouped-query attention (fewer KV heads than query heads) like Qwen2.5, so the
  trainer and rollout engines exercise the GQA path.
- untied input embedding and ``lm_head`` (``tie_word_embeddings=False``, like
  Qwen2.5-7B): the fused loss reads ``model.lm_head.weight [V, H]`` and the
  decoder's last hidden states; untied weights keep the state dict plain (one tensor
  per name) for FSDP2 and weight sync. The vocabulary is tiny, so the cost is nil.
- fp32 weights: the demo trains on CPU.
"""

from __future__ import annotations

import os

import torch

# name -> (hidden, layers, query heads, kv heads, intermediate); head_dim = hidden / heads
MODEL_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "micro": (64, 2, 2, 1, 128),  # tests: ~0.1M parameters
    "tiny": (128, 2, 4, 2, 384),  # the demo default: ~0.5M parameters
    "small": (128, 4, 4, 2, 384),  # ~0.9M parameters, ~2x slower per step
    "medium": (256, 4, 8, 4, 768),  # ~3.3M parameters
}


def tiny_qwen2_config(
    vocab_size: int,
    size: str = "tiny",
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    max_position_embeddings: int = 1024,
):
    """A ``Qwen2Config`` of one of ``MODEL_SIZES`` (head_dim 32) for ``vocab_size`` tokens."""
    from transformers import Qwen2Config

    if size not in MODEL_SIZES:
        raise ValueError(f"size: expected one of {sorted(MODEL_SIZES)}, got {size!r}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size: expected >= 2, got {vocab_size}")
    hidden, layers, heads, kv_heads, intermediate = MODEL_SIZES[size]
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def model_size_summary(model) -> str:
    """One line: parameter count and shape, for logs."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (
        f"Qwen2 {n / 1e6:.2f}M params: hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads}x{c.hidden_size // c.num_attention_heads} heads "
        f"({c.num_key_value_heads} kv), mlp {c.intermediate_size}, vocab {c.vocab_size}"
    )


def build_tiny_model(tokenizer_dir: str, out_dir: str | None = None, size: str = "tiny",
                     seed: int = 0):
    """Randomly initialize a tiny Qwen2ForCausalLM for the tokenizer in ``tokenizer_dir``.

    ``vocab_size = len(tokenizer)``; ``eos_token_id`` is ``[<|im_end|>, <|endoftext|>]``
    (as in Qwen2.5-Instruct's generation config) and ``pad_token_id`` the tokenizer's pad.
    When ``out_dir`` is given the fp32 model, its generation config and the tokenizer
    are saved there with ``save_pretrained`` (one self-contained HF directory).
    Returns the model (eval mode, fp32, CPU).
    """
    from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer_dir: expected an existing directory, got {tokenizer_dir!r}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos_ids = [tok.eos_token_id]
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        eos_ids.append(tok.pad_token_id)
    config = tiny_qwen2_config(
        len(tok), size, pad_token_id=tok.pad_token_id, eos_token_id=eos_ids
    )
    # why fork_rng: building a model must not move the caller's global torch RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=None,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    model.eval()
    if out_dir is not None:
        save_model(model, tok, out_dir)
    return model


def save_model(model, tokenizer, out_dir: str) -> str:
    """``save_pretrained`` model (fp32 safetensors) and tokenizer into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_model(model_dir: str):
    """``AutoModelForCausalLM.from_pretrained(model_dir)`` in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError("model_dir: expected a HF model directory with config.json, got "
                         f"{model_dir!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model
