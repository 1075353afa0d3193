"""Built-in rollout engine: batched KV-cache sampling over the live transformers causal LM.

No copy of the policy is made, so ``load_weights`` is a no-op: every ``generate`` call sees
the policy's current parameters. Sampling applies vLLM's processing step for step (temperature,
then top-k, then top-p masking) and draws from the resulting distribution by inverse CDF: one
uniform per row instead of vLLM's one exponential per vocabulary entry (the same distribution;
on a CPU the V exponentials were about half of generation time). Log-probs follow the
convention documented in ``base.py``.

Batching: the ``sum(request.n)`` sample rows are sorted by context length and processed in
chunks of ``max_batch_rows``; contexts (``prompt + prefix``) are left-padded, with an
attention mask and explicit position ids so that padding changes nothing but numerics.
Rows that have finished keep stepping (their tokens are discarded) until the whole chunk is
done or every row has hit its budget.

Determinism: a request with ``sampling.seed`` draws its j-th sample's uniforms from its own
``torch.Generator`` seeded from ``(seed, j)``, so its samples do not depend on what else is
in the batch (up to floating-point effects of padding); unseeded rows share the engine's
generator (seeded by the ``seed`` setting).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .base import (
    GREEDY_TEMPERATURE,
    RolloutEngine,
    RolloutRequest,
    RolloutSample,
    eos_ids_from,
    finish_reason_for,
    validate_requests,
)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                      ) -> torch.Tensor:
    """Mask logits outside top-k, then outside top-p, to -inf (vLLM's rule, per row).

    logits [B, V] fp32; top_k [B] long (<= 0 = off); top_p [B] fp32 (1.0 = off).
    Top-k keeps every token tied with the k-th largest logit; top-p then drops the
    low-probability tail whose (renormalized) cumulative mass is <= 1 - p, always keeping
    the most likely token. Equivalent to vLLM's ``apply_top_k_top_p_pytorch``.
    """
    use_k, use_p = top_k > 0, top_p < 1.0
    if not bool(use_k.any()) and not bool(use_p.any()):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if bool(use_k.any()):
        kth_index = (vocab - top_k.clamp(min=1, max=vocab)).unsqueeze(1)
        kth_value = sorted_logits.gather(1, kth_index)
        below_k = (sorted_logits < kth_value) & use_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(below_k, float("-inf"))
    if bool(use_p.any()):
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        tail = cumulative <= (1.0 - top_p).unsqueeze(1)
        tail[:, -1] = False
        tail &= use_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class _Row:
    """One sample to draw: request index, sample index, context ids and its settings."""

    request_index: int
    sample_index: int
    request: RolloutRequest


class HFEngine(RolloutEngine):
    """Rollouts from a live ``transformers`` causal LM (``model(input_ids, attention_mask,
    position_ids, past_key_values, use_cache, logits_to_keep)`` API, e.g. Qwen2ForCausalLM).

    Args:
        model: the policy module itself (not copied; put it on the device you want).
        tokenizer: optional; only read for ``eos_token_id`` / ``pad_token_id``.
        eos_token_ids: ids every request stops at; default: the model config's and
            generation config's ``eos_token_id`` (and the tokenizer's).
        max_batch_rows: sample rows per forward batch (memory bound).
        seed: seed of the engine's generator for requests without ``sampling.seed``.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer=None, *,
                 eos_token_ids: Sequence[int] | None = None, max_batch_rows: int = 64,
                 seed: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), "
                             f"got {type(model)}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model = model
        config = getattr(model, "config", None)
        generation_config = getattr(model, "generation_config", None)
        if eos_token_ids is None:
            eos_token_ids = eos_ids_from(getattr(config, "eos_token_id", None),
                                         getattr(generation_config, "eos_token_id", None),
                                         getattr(tokenizer, "eos_token_id", None))
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None) or getattr(config, "pad_token_id", None)
        # The pad id only fills masked positions, so any valid id works.
        self.pad_token_id = int(pad) if pad is not None else (
            self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.max_batch_rows = max_batch_rows
        self._seed = seed
        self._device = next(model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)

    @classmethod
    def from_config(cls, cfg, model, tokenizer, *, device, rank) -> HFEngine:
        """Sample from the live policy; ``rollout.hf_batch_size`` rows per forward (0 = all)."""
        r = cfg.rollout
        return cls(model, tokenizer, max_batch_rows=r.hf_batch_size or 1 << 30,
                   seed=r.seed + rank)

    @classmethod
    def from_pretrained(cls, model_dir, tokenizer, *, device, seed=0,
                        gpu_memory_utilization=0.85) -> HFEngine:
        """Load ``model_dir`` with transformers (bf16 on CUDA, fp32 otherwise), eval mode."""
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, seed=seed)

    @classmethod
    def memory_terms(cls, shape, inp, eng, gpu_bytes: float) -> dict[str, float]:
        """KV cache and fp32 logits (+ sampling copy) of ``eng.rows`` sequences; the live
        policy is sampled, so it needs a whole-model copy only when FSDP2 gathers it or
        autocast caches bf16 casts of the fp32 masters. Nothing is held during the update."""
        from ..planner.memory_model import kv_bytes_per_token

        c = 2 if inp.compute_bf16 else 4
        kv = eng.rows * eng.seq_tokens * kv_bytes_per_token(shape, c)
        logits = eng.rows * shape.vocab * 4 * 2
        copies = shape.total_params() * c if (inp.fsdp or (inp.compute_bf16 and not inp.lora_r)) \
            else 0
        return {"rollout": kv + logits + copies, "update": 0.0, "weights": 0.0, "kv_cache": kv,
                "kv_tokens": eng.rows * eng.seq_tokens}

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """No-op: the engine samples from the live policy module."""

    def sync_from(self, model: torch.nn.Module) -> None:
        """No-op: every ``generate`` reads the policy's current parameters."""

    def generation_context(self, model: torch.nn.Module):
        """Under FSDP2, the policy's weights gathered once for the whole generate call."""
        from ..runtime.distributed import unsharded

        return unsharded(model)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[RolloutSample]]:
        requests = validate_requests(requests)
        rows = [_Row(i, j, request) for i, request in enumerate(requests)
                for j in range(request.n)]
        # Similar context lengths in one chunk keep left padding (wasted compute) small.
        rows.sort(key=lambda row: len(row.request.context_ids))
        results: list[list[RolloutSample | None]] = [[None] * r.n for r in requests]
        device = next(self.model.parameters()).device
        if device != self._device:  # the policy moved: the shared stream follows it
            self._device = device
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(rows), self.max_batch_rows):
                    chunk = rows[start:start + self.max_batch_rows]
                    for row, (tokens, logprobs) in zip(chunk, self._generate_chunk(chunk)):
                        request = row.request
                        results[row.request_index][row.sample_index] = RolloutSample(
                            response_ids=list(request.prefix_ids) + tokens,
                            prefix_len=len(request.prefix_ids),
                            finish_reason=finish_reason_for(tokens, self.stop_ids_for(request)),
                            logprobs=logprobs)
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _row_generators(self, rows: list[_Row]) -> list[torch.Generator | None]:
        generators: list[torch.Generator | None] = []
        for row in rows:
            seed = row.request.sampling.seed
            if seed is None:
                generators.append(None)
            else:
                mixed = (seed * 1_000_003 + row.sample_index) % (2**63)
                generators.append(torch.Generator(device=self._device).manual_seed(mixed))
        return generators

    def _generate_chunk(self, rows: list[_Row]) -> list[tuple[list[int], list[float]]]:
        """Sample every row of one chunk to completion: [(continuation ids, log-probs)]."""
        device, batch = self._device, len(rows)
        contexts = [row.request.context_ids for row in rows]
        width = max(len(c) for c in contexts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, context in enumerate(contexts):
            input_ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long)
            attention_mask[i, width - len(context):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        settings = [row.request.sampling for row in rows]
        temperature = torch.tensor([s.temperature for s in settings], device=device)
        top_k = torch.tensor([s.top_k for s in settings], dtype=torch.long, device=device)
        top_p = torch.tensor([s.top_p for s in settings], dtype=torch.float32, device=device)
        budget = torch.tensor([row.request.continuation_budget for row in rows], device=device)
        stop_sets = [sorted(self.stop_ids_for(row.request)) for row in rows]
        stop_matrix = torch.full((batch, max(1, max(len(s) for s in stop_sets))), -1,
                                 dtype=torch.long)
        for i, stops in enumerate(stop_sets):
            stop_matrix[i, :len(stops)] = torch.tensor(stops, dtype=torch.long)
        stop_matrix = stop_matrix.to(device)
        generators = self._row_generators(rows)

        max_steps = int(budget.max())
        tokens_out = torch.zeros((batch, max_steps), dtype=torch.long, device=device)
        logprobs_out = torch.zeros((batch, max_steps), dtype=torch.float32, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=1)
        for step in range(max_steps):
            tokens, logprobs = self._sample(out.logits[:, -1, :].float(), temperature, top_k,
                                            top_p, generators)
            active = ~finished
            tokens_out[:, step] = tokens
            logprobs_out[:, step] = logprobs
            lengths += active.long()
            finished |= (tokens.unsqueeze(1) == stop_matrix).any(-1) | (step + 1 >= budget)
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], 1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=out.past_key_values,
                             use_cache=True, logits_to_keep=1)
        tokens_cpu, logprobs_cpu, lengths_cpu = tokens_out.cpu(), logprobs_out.cpu(), lengths.cpu()
        return [(tokens_cpu[i, :n].tolist(), logprobs_cpu[i, :n].tolist())
                for i, n in enumerate(lengths_cpu.tolist())]

    def _sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, generators: list[torch.Generator | None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for every row: (token [B] long, its log-prob [B] fp32).

        logits [B, V] fp32. Greedy rows (temperature 0): argmax, log-prob under the raw
        ``log_softmax(logits)``. Sampling rows: ``processed = filter(logits / T)``, token drawn
        from ``softmax(processed)`` by inverse CDF with one uniform per row
        (``sample_inverse_cdf``), log-prob = ``log_softmax(processed)[token]`` from one
        logsumexp per row.
        """
        greedy = temperature < GREEDY_TEMPERATURE
        scaled = logits / torch.where(greedy, torch.ones_like(temperature),
                                      temperature).unsqueeze(1)
        processed = apply_top_k_top_p(scaled, torch.where(greedy, 0, top_k),
                                      torch.where(greedy, 1.0, top_p))
        uniforms = self._row_uniforms(generators, processed.device)
        sampled, logprobs = sample_inverse_cdf(processed, uniforms)
        tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
        if bool(greedy.any()):  # greedy rows: processed == logits (no scaling, no filter)
            logprobs = torch.where(greedy, token_logprob(processed, tokens), logprobs)
        return tokens, logprobs

    def _row_uniforms(self, generators: list[torch.Generator | None], device) -> torch.Tensor:
        """[B] uniforms in [0, 1): seeded rows from their own generator, the rest from the
        engine's shared one (in row order, one call)."""
        uniforms = torch.empty(len(generators), device=device)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            uniforms[shared] = torch.rand(len(shared), device=device, generator=self._generator)
        for i, generator in enumerate(generators):
            if generator is not None:
                uniforms[i] = torch.rand(1, device=device, generator=generator)[0]
        return uniforms


def token_logprob(processed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(processed)[arange(B), tokens]`` without the [B, V] log-softmax: one
    logsumexp per row. processed [B, V] fp32 (-inf = masked), tokens [B] long."""
    return processed.gather(1, tokens.unsqueeze(1)).squeeze(1) - processed.logsumexp(dim=-1)


def sample_inverse_cdf(processed: torch.Tensor, uniforms: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(processed)``: (tokens [B] long, log-probs [B]).

    processed [B, V] fp32 with -inf for masked tokens; uniforms [B] in [0, 1). The target
    ``(1 - u) * total`` lies in (0, total], and the first index whose cumulative weight reaches
    it always has a positive weight, so a masked token is never drawn (why ``1 - u``: u = 0
    would give target 0 and pick a leading masked token).
    """
    top = processed.max(dim=-1, keepdim=True).values
    weights = (processed - top).exp()  # masked tokens: exp(-inf) = 0; the top token: 1
    cdf = weights.cumsum(dim=-1)
    target = (1.0 - uniforms).unsqueeze(1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=processed.shape[1] - 1)
    # the log-normalizer from a pairwise sum (more exact than the cumsum's last entry)
    log_total = top.squeeze(1) + weights.sum(dim=-1).log()
    logprobs = processed.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_total
    return tokens, logprobs
