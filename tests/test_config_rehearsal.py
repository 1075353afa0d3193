"""Rehearse every shipped config on CPU: ``configs/*.yaml`` (picked up automatically) with a
tiny Qwen2 (Qwen-style chat template with a default system message) and a small file in the
config's schema (OpenR1/verl parquet: system + user messages, assistant demonstration, gold
answer; or flat jsonl), forced onto CPU and the HF engine, short responses. Each config runs
one step, stops, resumes and runs the second: configs, schema, template, prompt and the
precision path all flow. Runs whose optimizer state is fp32 masters must show changed masters
after the two steps (at the configs' own lr, 1e-6 for the Qwen presets: a bf16-stored weight
would not move)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefix_rft.config import load_config
from prefix_rft.data.templates import AUTHORS_INSTRUCTION, LUFFY_SYSTEM_PROMPT, VERL_INSTRUCTION

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# recipe overlays (configs/recipes/*.yaml) rehearse on the base config they document
RECIPE_BASE = ROOT / "configs" / "qwen2.5-math-1.5b.yaml"
RECIPES = [[RECIPE_BASE, path] for path in sorted((ROOT / "configs" / "recipes").glob("*.yaml"))]
# The rehearsal's demonstrations open with the boxed answer, so QuestA's group of 8 hinted
# rollouts (a 50 % hint holds the answer) all score 1: zero advantage, unmoved weights. One
# unhinted rollout gives the rehearsal a signal; everything else is the recipe's.
RECIPE_REHEARSAL = {"questa": ["--prefix.num_prefixed=7"]}

# Qwen2.5-style ChatML: a default system message when the conversation has none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _rows(n: int = 8) -> list[dict]:
    """Demonstrations open with the boxed answer, so a hybrid rollout (prefix >= 5% of it,
    cut to the short response cap) already holds the right answer: non-zero advantages."""
    from prefix_rft.demo.task import make_split

    rows = make_split("train", n, "easy", 0)
    for row in rows:
        row["solution"] = f"\\boxed{{{row['answer']}}} since " + row["solution"].split("\n")[0]
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefix_rft.demo.model import build_tiny_model
    from prefix_rft.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("rehearsal")
    rows = _rows()
    scaffold = " ".join([LUFFY_SYSTEM_PROMPT, AUTHORS_INSTRUCTION, VERL_INSTRUCTION,
                         "You are a helpful assistant."])
    tok = build_tokenizer(rows, str(root / "tok"), scaffold)
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(root / "tok"))
    build_tiny_model(str(root / "tok"), str(root / "model"), size="micro", seed=0)
    verl = [{"data_source": "openr1", "prompt": [{"role": "system", "content": LUFFY_SYSTEM_PROMPT},
                                                 {"role": "user", "content": r["problem"]}],
             "target": [{"role": "assistant", "content": r["solution"]}],
             "reward_model": {"ground_truth": r["answer"], "style": "rule"}} for r in rows]
    pq.write_table(pa.Table.from_pylist(verl), str(root / "openr1.parquet"))
    with open(root / "flat.jsonl", "w", encoding="utf-8") as handle:
        for r in rows:
            handle.write(json.dumps({k: r[k] for k in ("problem", "solution", "answer")}) + "\n")
    return {"model": str(root / "model"), "verl": str(root / "openr1.parquet"),
            "flat": str(root / "flat.jsonl")}


def rehearsal_overrides(schema: str, assets: dict[str, str], run_dir: Path) -> list[str]:
    """What the rehearsal swaps in: tiny model + data, CPU, HF engine, 2 short steps."""
    data = assets["verl"] if schema == "verl" else assets["flat"]
    return [
        f"--model.path={assets['model']}", f"--model.tokenizer_path={assets['model']}",
        "--model.liger=false", f"--data.train_files=[{data}]", "--data.max_prompt_tokens=1024",
        "--rollout.engine=hf", "--rollout.max_response_tokens=20", "--rollout.hf_batch_size=0",
        "--train.device=cpu", "--train.steps=2", "--train.prompts_per_step=2",
        "--train.mini_batch_size=1", "--train.micro_batch_tokens=512",
        f"--train.run_dir={run_dir}", "--prefix.decay_steps=2", "--loss.kernel_impl=torch",
        "--log.progress=false", "--log.tensorboard=false", "--log.plots=false",
        "--eval.every=0", "--eval.files=[]", "--checkpoint.every=1", "--checkpoint.keep_last=0",
        "--reward.num_workers=1",
    ]


def _latest_masters(run_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    return torch.load(steps[-1] / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS + RECIPES,
                         ids=[p.stem for p in CONFIGS] + [f"recipe-{p[1].stem}" for p in RECIPES])
def test_config_rehearses_on_cpu(config, assets, tmp_path):
    from prefix_rft.train import train

    shipped = load_config(config)
    run_dir = tmp_path / "run"
    overrides = rehearsal_overrides(shipped.data.schema, assets, run_dir)
    if isinstance(config, list):  # a recipe overlay
        overrides += RECIPE_REHEARSAL.get(config[-1].stem, [])
    first = train(load_config(config, overrides + ["--train.max_steps_per_run=1",
                                                   "--checkpoint.resume=\"none\""]))
    assert first["steps_done"] == 1 and first["stopped_early"]
    second = train(load_config(config, overrides + ["--checkpoint.resume=auto"]))
    assert second["steps_done"] == 2 and second["resumed_from"] is not None
    metrics = second["metrics"]
    assert all(v == v for k, v in metrics.items() if k.startswith(("loss", "grad_norm"))), metrics
    if shipped.loss.baseline == "official":  # the per-token advantage reached the loop
        assert "adv_hybrid_prefix_mean" in metrics

    # ---- precision: the masters moved at the config's own lr (1e-6 on the Qwen presets)
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    initial = initial.state_dict()
    masters = _latest_masters(run_dir)
    weights_dtype = getattr(shipped.model, "weights_dtype", "fp32")
    expected = torch.bfloat16 if weights_dtype == "bf16" else torch.float32
    if getattr(getattr(shipped.model, "lora", None), "r", 0):
        # LoRA: the frozen base does not move; the adapters' B matrices start at 0 and must
        lora_b = [k for k in masters if "lora_B" in k]
        assert lora_b, sorted(masters)[:5]
        for key in lora_b:
            assert masters[key].dtype == torch.float32, (key, masters[key].dtype)
            assert masters[key].abs().max().item() > 0, f"{config}: {key} did not move"
        return
    layer_weights = [k for k in masters if ".layers." in k and k.endswith("proj.weight")]
    assert layer_weights
    for key in layer_weights:
        assert masters[key].dtype == expected, (key, masters[key].dtype)
        moved = (masters[key].float() - initial[key]).abs().max().item()
        assert moved > 0, f"{config}: {key} did not change at lr {shipped.optim.lr}"

    # ---- the final HF export is in the dtype the config asks for
    if second["final_model_dir"]:
        exported = AutoModelForCausalLM.from_pretrained(second["final_model_dir"], dtype="auto")
        want = getattr(shipped.checkpoint, "export_dtype", "fp32")
        if want in ("fp32", "bf16"):
            assert next(exported.parameters()).dtype == {"fp32": torch.float32,
                                                         "bf16": torch.bfloat16}[want]
