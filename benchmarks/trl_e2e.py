"""End-to-end GRPO steps (generation included) and generation alone: TRL vs this trainer.

Cases run by ``benchmarks/trl.py`` (each in a fresh process, same model, prompts, thread
count and completion length as its policy-update cases):

* ``trl_e2e`` / ``trl_prefix_rft_e2e`` -- ``trainer.train()`` of a stock ``trl.GRPOTrainer`` /
  of :class:`prefix_rft.integrations.trl.PrefixRFTGRPOTrainer`; a step is TRL's own
  ``on_step_begin`` -> ``on_step_end`` (generate with ``model.generate``, reward, loss,
  backward, AdamW).
* ``prefix_rft_e2e`` -- ``prefix_rft.train.train_step`` (the built-in ``hf`` engine, reward,
  update; ``loss.algo=rft``, one optimizer step per rollout batch as TRL's default).
* ``gen_trl`` -- what TRL's generation runs: ``model.generate`` with TRL's GenerationConfig.
* ``gen_hf_engine`` -- :class:`prefix_rft.rollout.hf.HFEngine` with seeded requests, as the
  trainer sends them (one random stream per sample); ``gen_hf_engine_unseeded`` -- one shared
  stream, which isolates the per-sample streams' cost.

Rewards are uniform random in both trainers (a random model never answers), so every group has
a learning signal and both run a full update. A random model rarely samples EOS out of 151,936
ids, so every completion runs to the length cap in both. ``--profile`` prints the top ops of one
``gen_trl`` and one ``gen_hf_engine`` call (torch.profiler, self CPU time).
"""

from __future__ import annotations

import json
import os
import time

E2E_CASES = ("trl_e2e", "trl_prefix_rft_e2e", "prefix_rft_e2e")
GEN_CASES = ("gen_trl", "gen_hf_engine", "gen_hf_engine_unseeded")
WORDS = "what is 1 + 2 ? the answer is 3"


def benchmark_tokenizer():
    """The tiny tokenizer the TRL cases use (ids >= its size decode to nothing)."""
    from prefix_rft.demo.tokenizer import train_tokenizer

    return train_tokenizer([WORDS] * 10, vocab_size=300)


def prompt_text(tokenizer, tokens: int) -> str:
    """A prompt the tokenizer encodes to exactly ``tokens`` ids (no special tokens)."""
    def count(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False)["input_ids"])

    text = "what"
    while count(text) < tokens:  # " what" is 2 ids here (space, word), "?" is 1
        text += " what" if count(text) + 2 <= tokens else "?"
    got = count(text)
    if got != tokens:
        raise RuntimeError(f"benchmark prompt encodes to {got} tokens, expected {tokens}")
    return text


def _random_rewards(n: int, state=[0]) -> list[float]:  # noqa: B006 -- a call counter
    import torch

    state[0] += 1
    return torch.rand(n, generator=torch.Generator().manual_seed(state[0])).tolist()


# ---------------------------------------------------------------------------- end to end
def trl_e2e(case, model, sequences, prompt, completion, micro, repeats, tmp) -> list[float]:
    """Seconds of each timed ``trainer.train()`` step (after one warm-up step)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = benchmark_tokenizer()
    steps = repeats + 1
    args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=micro,
                      gradient_accumulation_steps=sequences // micro, num_generations=8,
                      max_completion_length=completion, loss_type="dr_grpo", beta=0.0,
                      scale_rewards="none", bf16=False, gradient_checkpointing=False,
                      use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                      max_steps=steps, learning_rate=1e-6, logging_steps=1, seed=0)
    if case == "trl_e2e":
        cls = GRPOTrainer
    else:
        from prefix_rft.integrations.trl import PrefixRFTGRPOTrainer as cls
    text = prompt_text(tok, prompt)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = cls(model=model, args=args, processing_class=tok, callbacks=[StepTimer()],
                  reward_funcs=lambda completions, **kw: _random_rewards(len(completions)),
                  train_dataset=Dataset.from_dict({"prompt": [text] * (sequences // 8 * steps)}))
    trainer.train()
    return times[1:]


def prefix_rft_e2e(model, sequences, prompt, completion, micro, repeats, tmp) -> list[float]:
    """Seconds of each timed ``prefix_rft.train.train_step`` (after one warm-up step)."""
    import prefix_rft.reward as reward
    import prefix_rft.train as T
    from prefix_rft.config import Config, resolve_config, validate_config
    from prefix_rft.data.prompts import prompt_text as templated
    from prefix_rft.run.setup import start_run

    tok = benchmark_tokenizer()
    tok.chat_template = None  # bare prompts, as TRL gets them: the question text + "\n"
    model_dir, data = os.path.join(tmp, "model"), os.path.join(tmp, "train.jsonl")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = next(t for t in (prompt_text(tok, n) for n in range(prompt, 0, -1))
                if len(tok(templated(tok, [{"role": "user", "content": t}]),
                           add_special_tokens=False)["input_ids"]) == prompt)
    with open(data, "w") as f:
        for _ in range(sequences // 8):
            f.write(json.dumps({"problem": text, "solution": "3", "answer": "3"}) + "\n")
    cfg = Config()
    cfg.model.path, cfg.model.dtype, cfg.model.gradient_checkpointing = model_dir, "fp32", False
    cfg.data.train_files, cfg.data.schema, cfg.data.prompt_template = [data], "flat", "none"
    cfg.data.max_prompt_tokens = prompt
    cfg.rollout.engine, cfg.rollout.group_size = "hf", 8
    cfg.rollout.max_response_tokens, cfg.rollout.temperature = completion, 1.0
    cfg.loss.algo, cfg.loss.kernel_impl = "rft", "torch"
    cfg.train.prompts_per_step = cfg.train.mini_batch_size = sequences // 8
    cfg.train.micro_batch_tokens = micro * (prompt + completion)
    cfg.train.device, cfg.train.run_dir = "cpu", os.path.join(tmp, "run")
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-6, 0
    cfg = validate_config(resolve_config(cfg))
    real = reward.math_rewards

    def random_rewards(responses, golds, **kw):
        _, stats = real(responses, golds, **kw)
        return _random_rewards(len(responses)), stats

    reward.math_rewards = random_rewards
    run = start_run(cfg)
    times = []
    for step in range(repeats + 1):
        t0 = time.perf_counter()
        metrics = T.train_step(run, step)
        times.append(time.perf_counter() - t0)
        if metrics.get("response_len_mean", completion) < completion * 0.9:
            print(f"warning: mean response {metrics['response_len_mean']} < {completion}")
    return times[1:]


# ---------------------------------------------------------------------------- generation
def prompt_batch(tokenizer, sequences: int, prompt: int):
    import torch

    ids = torch.tensor(tokenizer(prompt_text(tokenizer, prompt),
                                 add_special_tokens=False)["input_ids"])
    return ids.unsqueeze(0).repeat(sequences, 1)


def generate_fn(case: str, model, sequences: int, prompt: int, completion: int):
    """A no-argument callable that generates ``completion`` tokens for every sequence."""
    import torch

    tok = benchmark_tokenizer()
    prompts = prompt_batch(tok, sequences, prompt)
    model.eval()
    if case == "gen_trl":
        from transformers import GenerationConfig

        # TRL 1.16's GenerationConfig for a transformers (non-vLLM) rollout, as it builds it
        config = GenerationConfig(max_new_tokens=completion, do_sample=True,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=[tok.eos_token_id], temperature=1.0, top_p=1.0,
                                  top_k=0, min_p=None, repetition_penalty=1.0,
                                  cache_implementation=None, disable_compile=True)

        def run():
            with torch.no_grad():
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                               generation_config=config)
        return run
    from prefix_rft.rollout.base import RolloutRequest, SamplingSettings
    from prefix_rft.rollout.hf import HFEngine

    engine = HFEngine(model, tok)
    seeded = case == "gen_hf_engine"
    requests = [RolloutRequest(prompt_ids=prompts[0].tolist(), n=8, sampling=SamplingSettings(
        temperature=1.0, max_new_tokens=completion, seed=i if seeded else None))
        for i in range(sequences // 8)]
    return lambda: engine.generate(requests)


def generation(case, model, sequences, prompt, completion, repeats) -> list[float]:
    run = generate_fn(case, model, sequences, prompt, completion)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times[1:]


def profile(model, sequences: int, prompt: int, completion: int, rows: int = 12) -> None:
    """Top ops (self CPU time) of one TRL generate and one HFEngine generate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for case in ("gen_trl", "gen_hf_engine"):
        run = generate_fn(case, model, sequences, prompt, completion)
        run()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(f"== {case}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_case(case, model, sequences, prompt, completion, micro, repeats, tmp) -> tuple:
    """(timed seconds per repeat, tokens per repeat) of an end-to-end or generation case."""
    if case in GEN_CASES:
        return (generation(case, model, sequences, prompt, completion, repeats),
                sequences * completion)
    tokens = sequences * (prompt + completion)
    if case == "prefix_rft_e2e":
        return prefix_rft_e2e(model, sequences, prompt, completion, micro, repeats, tmp), tokens
    return trl_e2e(case, model, sequences, prompt, completion, micro, repeats, tmp), tokens
