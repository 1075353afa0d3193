"""Mixed precision that updates: one optimizer step at lr 1e-6 moves the stored weights in
every precision mode the config allows (one process, and 2-rank FSDP2 on CPU), bf16 compute
really runs in bf16, and plain AdamW on bf16-stored weights is refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from prefix_rft.kernels import linear_logprob_entropy
from prefix_rft.runtime.precision import check_precision, precision_policy

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import dist_worker  # noqa: E402
from torchrun_timing import run_torchrun  # noqa: E402

LR = 1e-6


def _one_step(model_dtype: str, weights_dtype: str, optim_name: str):
    """One fused-head loss step at LR; returns (before, after, policy, head dtypes)."""
    policy = precision_policy(model_dtype, weights_dtype, "auto", "cpu", optim_name)
    model = dist_worker.build_model(tied=False).to(policy.weights)
    if optim_name == "adamw_bf16_sr":
        from torchao.optim import _AdamW

        optimizer = _AdamW(model.parameters(), lr=LR, weight_decay=0.0, bf16_stochastic_round=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    input_ids, labels = dist_worker.global_batch()
    with policy.autocast(model):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else hidden.dtype
        logprob, _ = linear_logprob_entropy(hidden.flatten(0, 1).to(dtype),
                                            model.lm_head.weight.to(dtype), labels.flatten(),
                                            impl="torch")
    mask = labels.flatten() != -100
    (-(logprob[mask]).sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return before, after, grads, policy, dtype


# every (model.dtype, model.weights_dtype, optim.name) a config may ask for on CPU
MODES = [("fp32", "fp32", "adamw"), ("auto", "fp32", "adamw"), ("bf16", "fp32", "adamw"),
         ("bf16", "bf16", "adamw_bf16_sr"), ("auto", "bf16", "adamw_bf16_sr")]


@pytest.mark.parametrize("model_dtype,weights_dtype,optim_name", MODES)
def test_one_step_at_lr_1e6_moves_the_stored_weights(model_dtype, weights_dtype, optim_name):
    if optim_name == "adamw_bf16_sr":
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    before, after, grads, policy, head_dtype = _one_step(model_dtype, weights_dtype, optim_name)
    want_compute = torch.bfloat16 if "bf16" in (model_dtype, weights_dtype) else torch.float32
    assert policy.compute == want_compute and head_dtype == want_compute
    num, den = 0.0, 0.0
    for name, w in after.items():
        assert w.dtype == policy.weights, name  # masters stay in the stored dtype
        step = w.double() - before[name].double()
        if policy.weights == torch.float32:
            # fp32 masters: every entry with a gradient moves (Adam's first step is ~lr)
            has_grad = grads[name] != 0
            assert bool((step[has_grad] != 0).all()), f"{name}: an entry did not move"
        target = -LR * torch.sign(grads[name].double())  # Adam's first step, exactly
        num, den = num + (step * target).sum().item(), den + (target * target).sum().item()
    # the stored move, projected on Adam's step: 1 for fp32 masters; for stochastic rounding
    # 1 in expectation (sampling noise ~0.05 at this model's ~0.1M entries)
    assert num / den == pytest.approx(1.0, abs=0.25 if policy.weights == torch.bfloat16 else 1e-3)


def _projected_move(optimizer_cls, **kwargs) -> float:
    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(512, 512) * 0.02).bfloat16())
    w0 = w.detach().double()
    w.grad = torch.randn(512, 512).bfloat16()
    optimizer_cls([w], lr=LR, weight_decay=0.0, **kwargs).step()
    target = -LR * torch.sign(w.grad.double())
    return ((w.detach().double() - w0) * target).sum().item() / (target * target).sum().item()


def test_stochastic_rounding_keeps_the_expected_update_of_bf16_weights():
    """On bf16 weights of scale 0.02 (spacing ~1e-4), one lr-1e-6 step: plain AdamW keeps a
    small fraction of Adam's step; torchao's stochastic rounding keeps all of it on average."""
    torchao_optim = pytest.importorskip("torchao.optim")
    assert _projected_move(torch.optim.AdamW) < 0.2
    sr = _projected_move(torchao_optim._AdamW, bf16_stochastic_round=True)
    assert sr == pytest.approx(1.0, abs=0.1)


def test_plain_bf16_weight_adamw_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match=r"model\.weights_dtype=bf16 with optim\.name=adamw"):
        check_precision("bf16", "bf16", "adamw")
    with pytest.raises(ValueError, match="model.dtype"):
        check_precision("fp32", "bf16", "adamw_bf16_sr")
    check_precision("bf16", "fp32", "adamw")  # mixed precision with fp32 masters is fine


@pytest.mark.distributed
@pytest.mark.parametrize("model_dtype", ["bf16", "fp32"])
def test_fsdp2_two_ranks_one_step_at_lr_1e6_moves_fp32_masters(model_dtype, tmp_path):
    out = tmp_path / "result.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(TESTS.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "precision_worker.py"), str(out), model_dtype]
    proc = run_torchrun("precision_step", cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["param_dtypes"] == ["torch.float32"]
    assert result["grad_dtypes"] == ["torch.float32"]
    want = "torch.bfloat16" if model_dtype == "bf16" else "torch.float32"
    assert result["compute_dtypes"] == [want]
    assert result["changed_frac"] > 0.99
    assert result["mean_abs_step"] == pytest.approx(LR, rel=0.2)
