"""prefix_rft.integrations.trl against TRL's own GRPOTrainer, on CPU with a tiny local model.

The reference is TRL itself: the same batch goes through a stock ``GRPOTrainer`` (TRL's
chunked head and TRL's Dr. GRPO loss) and through the drop-in; loss, every parameter
gradient and TRL's loss metrics must agree in fp32 within 1e-5 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from prefix_rft.integrations import trl_compat  # noqa: E402

try:
    trl_compat.check_trl_version()
except ImportError:
    pytest.skip("installed trl is outside the supported range", allow_module_level=True)

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from prefix_rft.integrations.trl import (  # noqa: E402
    PrefixRFTGRPOTrainer,
    check_grpo_settings,
    use_fused_head,
)
from prefix_rft.integrations.trl_head import add_prefix_rft_head  # noqa: E402

TEXTS = ["what is 1 + 2 ? the answer is 3", "compute 7 * 6 = 42", "so the answer is \\boxed{5}"]
PROMPTS = ["what is 1 + 2 ?", "compute 7 * 6", "what is 3 + 4 ?", "compute 2 * 5"]


@pytest.fixture(scope="module")
def tok_model():
    from transformers import Qwen2ForCausalLM

    from prefix_rft.demo.model import tiny_qwen2_config
    from prefix_rft.demo.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS * 10, vocab_size=300)
    cfg = tiny_qwen2_config(len(tok), "micro", pad_token_id=tok.pad_token_id,
                            eos_token_id=[tok.eos_token_id])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).float()
    return tok, model


def _reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                num_generations=2, max_completion_length=8, loss_type="dr_grpo", beta=0.0,
                scale_rewards="none", report_to="none", use_cpu=True, logging_steps=1,
                max_steps=2, save_strategy="no", disable_tqdm=True, epsilon=0.2,
                epsilon_high=0.28, bf16=False)
    return GRPOConfig(**{**base, **overrides})


def _trainer(cls, tok_model, tmp_path, init=None, **overrides):
    """``cls`` on the tiny model; ``init``: extra constructor arguments, ``overrides``:
    GRPOConfig fields."""
    tok, model = tok_model
    ds = Dataset.from_dict({"prompt": PROMPTS})
    return cls(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path, **overrides),
               train_dataset=ds, processing_class=tok, **(init or {}))


def _batch(vocab, B=4, P=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[2, 4:] = 0  # right padding
    completion_mask[3, 6:] = 0
    return {
        "prompt_ids": torch.randint(3, vocab, (B, P), generator=g),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, vocab, (B, T), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
    }


def _loss_and_grads(trainer, inputs, accumulation=2):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads


def _rel(a, b):
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _assert_same(ours, theirs, tol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    assert _rel(loss_a, loss_b) <= tol, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_b
    for name in grads_b:
        assert _rel(grads_a[name], grads_b[name]) <= tol, name


def _with_old_and_is(inputs, trainer, seq_level=False, seed=1):
    """Add TRL's off-policy fields: old log-probs (current + noise, so clipping is active) and
    a vLLM importance-sampling ratio, as _generate_and_score_completions builds them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        T = inputs["completion_ids"].size(1)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        lp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T)
    out = dict(inputs)
    out["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    cols = 1 if seq_level else T
    ratio = torch.rand(lp.shape[0], cols, generator=g) * 1.5
    ratio[0, 0] = 0.0  # a *_mask mode drop
    out["importance_sampling_ratio"] = ratio
    return out


def test_on_policy_loss_and_grads_equal_trl(tok_model, tmp_path):
    ours = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path)
    theirs = _trainer(GRPOTrainer, tok_model, tmp_path)
    inputs = _batch(len(tok_model[0]))
    inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
    inputs["tool_mask"][0, 2:4] = 0  # env/tool tokens: the mask is a product of masks
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/high_max"):
        a, b = ours._metrics["train"][key][-1], theirs._metrics["train"][key][-1]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("seq_level", [False, True])
def test_off_policy_with_vllm_is_correction_equals_trl(tok_model, tmp_path, seq_level):
    ours = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path)
    theirs = _trainer(GRPOTrainer, tok_model, tmp_path)
    for t in (ours, theirs):  # what use_vllm=True sets up, without a vLLM server
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    inputs = _with_old_and_is(_batch(len(tok_model[0]), seed=2), theirs, seq_level)
    a, b = _loss_and_grads(ours, inputs, accumulation=3), _loss_and_grads(theirs, inputs, 3)
    _assert_same(a, b)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        x, y = ours._metrics["train"][key][-1], theirs._metrics["train"][key][-1]
        assert x == pytest.approx(y, rel=1e-5, abs=1e-7), key
    assert theirs._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # clipping was exercised


def test_use_fused_head_keeps_trl_loss(tok_model, tmp_path):
    """The one-call patch under TRL's own loss, here loss_type='grpo' (not just dr_grpo)."""
    patched = use_fused_head(_trainer(GRPOTrainer, tok_model, tmp_path, loss_type="grpo"))
    stock = _trainer(GRPOTrainer, tok_model, tmp_path, loss_type="grpo")
    inputs = _batch(len(tok_model[0]), seed=3)
    _assert_same(_loss_and_grads(patched, inputs), _loss_and_grads(stock, inputs))


def _trl_loss_types() -> list[str]:
    """The loss_type values the installed TRL lists in GRPOConfig's help text."""
    import dataclasses
    import re

    help_text = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"].metadata["help"]
    listed = help_text.split("Supported values are", 1)[1].split(".", 1)[0]
    return re.findall(r"'(\w+)'", listed)


# loss types that need sequence-level importance sampling in TRL
SEQUENCE_LEVEL_LOSSES = {"luspo": dict(importance_sampling_level="sequence")}


def _ref_logps(trainer, inputs):
    with torch.no_grad():
        T = inputs["completion_ids"].size(1)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, att, T)
    return logps


def test_trl_lists_the_loss_types_the_readme_promises():
    assert {"grpo", "dr_grpo", "dapo", "bnpo"} <= set(_trl_loss_types())


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", _trl_loss_types())
def test_use_fused_head_with_every_loss_type_and_kl(tok_model, tmp_path, loss_type, beta):
    """use_fused_head under each TRL loss, off-policy (clipping active), with and without the
    KL term: beta > 0 gives TRL a reference model, whose head is patched too."""
    settings = dict(loss_type=loss_type, beta=beta, **SEQUENCE_LEVEL_LOSSES.get(loss_type, {}))
    if beta:  # TRL loads its reference model from the policy's path: give it one on disk
        tok, model = tok_model
        model_dir = tmp_path / "model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        ds = Dataset.from_dict({"prompt": PROMPTS})
        patched, stock = (GRPOTrainer(model=str(model_dir), reward_funcs=_reward,
                                      args=_args(tmp_path, **settings), train_dataset=ds,
                                      processing_class=tok) for _ in range(2))
        use_fused_head(patched)
    else:
        patched = use_fused_head(_trainer(GRPOTrainer, tok_model, tmp_path, **settings))
        stock = _trainer(GRPOTrainer, tok_model, tmp_path, **settings)
    inputs = _with_old_and_is(_batch(len(tok_model[0]), seed=4), stock)
    inputs.pop("importance_sampling_ratio")  # no vLLM here
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()  # dapo, cispo, vespo: TRL's
    if beta:
        assert patched.ref_model is not None and stock.ref_model is not None
        assert getattr(patched.ref_model, "_prefix_rft_fused_head", None) is not None
        ours_ref, their_ref = _ref_logps(patched, inputs), _ref_logps(stock, inputs)
        assert _rel(ours_ref, their_ref) <= 1e-5
        # shift the reference away from the policy so the KL term has a gradient
        ours_inputs = dict(inputs, ref_per_token_logps=ours_ref - 0.2)
        their_inputs = dict(inputs, ref_per_token_logps=their_ref - 0.2)
    else:
        ours_inputs = their_inputs = inputs
    ours, theirs = _loss_and_grads(patched, ours_inputs), _loss_and_grads(stock, their_inputs)
    _assert_same(ours, theirs)
    if beta:
        assert stock._metrics["train"]["kl"][-1] > 0


def test_short_train_runs_with_accumulation(tok_model, tmp_path):
    trainer = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path, gradient_accumulation_steps=2,
                       per_device_train_batch_size=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert torch.isfinite(torch.tensor(h["loss"])) and h["entropy"] > 0
    moved = any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert moved


@pytest.mark.parametrize("change, name", [
    (dict(loss_type="grpo"), "loss_type"),
    (dict(beta=0.04), "beta"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(delta=2.0), "delta"),
])
def test_refuses_settings_it_cannot_honour(tmp_path, change, name):
    with pytest.raises(ValueError, match=name):
        check_grpo_settings(_args(tmp_path, **change))


def test_refuses_logit_softcapping(tok_model):
    model = copy.deepcopy(tok_model[1])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_prefix_rft_head(model)


def test_version_check():
    assert trl_compat.check_trl_version("1.15.0") == "1.15.0"
    assert trl_compat.check_trl_version("1.16.1.dev0") == "1.16.1.dev0"
    for bad in ("1.14.2", "1.17.0", "2.0.0", "garbage"):
        with pytest.raises(ImportError, match=r"trl>=1\.15,<1\.17"):
            trl_compat.check_trl_version(bad)


def test_import_fails_clearly_on_unsupported_trl(monkeypatch):
    """Importing the integration under an unsupported installed TRL raises a clear ImportError."""
    import importlib
    import importlib.metadata

    import prefix_rft.integrations.trl as integration

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.12.0" if name == "trl" else real_version(name))
    try:
        with pytest.raises(ImportError, match="found trl 1.12.0"):
            importlib.reload(integration)
    finally:
        monkeypatch.undo()
        importlib.reload(integration)


# ---------------------------------------------------------------------------- hybrid rollouts
DEMOS = {p: f"{p} so the answer is \\boxed{{5}} because 2 + 3 = 5" for p in PROMPTS}


def test_prefix_rollout_func_starts_hybrids_from_demonstration_prefixes(tok_model, tmp_path):
    from prefix_rft.integrations.trl import make_prefix_rollout_func

    tok = tok_model[0]
    trainer = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path, num_generations=4,
                       max_completion_length=12)
    rollout = make_prefix_rollout_func(DEMOS, num_prefixed=1, start=0.5, end=0.5, high=0.5)
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    out = rollout(prompts, trainer)
    assert len(out["completion_ids"]) == len(out["prefix_len"]) == 8
    for i, (ids, n) in enumerate(zip(out["completion_ids"], out["prefix_len"])):
        demo = tok(DEMOS[prompts[i]], add_special_tokens=False)["input_ids"]
        assert out["prompt_ids"][i] == tok(prompts[i], add_special_tokens=False)["input_ids"]
        assert 1 <= len(ids) <= 12
        if i % 4 == 0:  # the group's hybrid: ratio 0.5 of the demonstration, kept as ids
            assert n == len(demo) // 2 or n == 11
            assert ids[:n] == demo[:n] and len(ids) > n
        else:
            assert n == 0


@pytest.mark.parametrize("step, ratio", [(0, 0.5), (3, 0.25)])
def test_step_schedule_holds_the_ratio_itself(tok_model, tmp_path, step, ratio):
    """``schedule="step"``: the hybrid's ratio is ``start`` before ``decay_steps``, then
    ``end``, with no draw (QuestA's 50 % -> 25 %), as ``prefix.schedule: step``; the default
    draw would give other lengths at ``high=0.9``."""
    from prefix_rft.integrations.trl import make_prefix_rollout_func

    tok = tok_model[0]
    trainer = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path, num_generations=2,
                       max_completion_length=40)
    trainer.state.global_step = step
    rollout = make_prefix_rollout_func(DEMOS, num_prefixed=1, schedule="step", start=0.5,
                                       end=0.25, decay_steps=2, high=0.9)
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = rollout(prompts, trainer)
    for i in range(0, len(prompts), 2):
        demo = tok(DEMOS[prompts[i]], add_special_tokens=False)["input_ids"]
        assert out["prefix_len"][i] == max(1, int(ratio * len(demo)))
        assert out["prefix_len"][i + 1] == 0


def test_hybrid_train_logs_prefix_metrics(tok_model, tmp_path):
    from prefix_rft.integrations.trl import make_prefix_rollout_func

    tok, model = tok_model
    args = _args(tmp_path, num_generations=4, max_completion_length=12)
    trainer = PrefixRFTGRPOTrainer(
        model=copy.deepcopy(model), reward_funcs=_reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
        rollout_func=make_prefix_rollout_func(DEMOS, num_prefixed=1),
        entropy_top_fraction=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(h["prefix/prefix_token_frac"] > 0 for h in logs)
    # top half of the prefix tokens by entropy (rounded up), not all of them
    assert all(0.4 < h["prefix/kept_prefix_frac"] < 0.75 for h in logs)


def test_untrained_prefix_equals_trl_with_the_prefix_masked_out(tok_model, tmp_path):
    """``train_on_prefix=False``: the hybrid's prefix tokens get no loss (and no gradient); the
    result equals stock TRL on the same batch with those tokens taken out of its loss mask.
    With ``train_on_prefix=True`` the same batch gives another loss (the test can fail)."""
    untrained = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path,
                         init={"train_on_prefix": False})
    trained = _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path)
    trained.entropy_top_fraction = 1.0  # every prefix token trained: the difference is plain
    theirs = _trainer(GRPOTrainer, tok_model, tmp_path)
    inputs = _batch(len(tok_model[0]), seed=3)
    prefix_mask = torch.zeros_like(inputs["completion_mask"], dtype=torch.bool)
    prefix_mask[0, :3] = prefix_mask[2, :2] = True  # two hybrids
    hybrid = dict(inputs, prefix_mask=prefix_mask)
    # TRL's tool_mask takes tokens out of the loss while they stay attended to (the prefix
    # conditions the continuation); zeroing completion_mask would also hide them from it
    masked = dict(inputs, tool_mask=(~prefix_mask).long())
    ours = _loss_and_grads(untrained, hybrid)
    _assert_same(ours, _loss_and_grads(theirs, masked))
    assert _rel(_loss_and_grads(trained, hybrid)[0], ours[0]) > 1e-3
    assert not any(k.startswith("prefix/") for k in untrained._metrics["train"])


def test_train_on_prefix_must_be_a_bool(tok_model, tmp_path):
    with pytest.raises(ValueError, match="train_on_prefix"):
        _trainer(PrefixRFTGRPOTrainer, tok_model, tmp_path, init={"train_on_prefix": "no"})
