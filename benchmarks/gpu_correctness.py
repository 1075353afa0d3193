"""Both Triton backwards at a real vocabulary against an fp32 full-logits reference.

For each H, bf16 hidden / lm_head (N tokens, V=151,936, 10% ignored labels, temperature 0.7)
run ``linear_logprob_entropy(impl="triton", bwd=...)`` for ``bwd`` in split / atomic, and
compare log-prob, entropy, dX and dW (relative RMS error) with the fp32 reference on the same
bf16 values, next to the error of plain bf16 torch (logits in bf16, softmax in fp32): a
kernel passes when its error is at most torch's + 5e-3. The split backward must also be
bitwise deterministic (two runs). Writes ``correctness.csv`` / ``.md`` into ``--out-dir``.

    python benchmarks/gpu_correctness.py --out-dir /tmp/gpu            # CUDA, N=2048, H=1536/4096
    python benchmarks/gpu_correctness.py --out-dir /tmp/gpu --dry-run  # CPU interpreter, tiny fp32
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # so an
    # installed prefix_rft (site-packages, PYTHONPATH) still wins over the source checkout

import torch  # noqa: E402

from benchmarks.results_io import device_name, git_commit, require_kernels  # noqa: E402

IGNORE = -100
BWDS = ("split", "atomic")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(device, dtype)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = IGNORE
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return x, w, y.to(device), g_lp.to(device), g_h.to(device)


def outputs_and_grads(fn, x, w, y, g_lp, g_h):
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lp, ent = fn(xs, ws, y)
    dx, dw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_h).sum(), (xs, ws))
    return lp.detach(), ent.detach(), dx, dw


def bf16_torch(x, w, y, t):
    """What a user writes: logits in the input dtype, softmax statistics in fp32."""
    z = (x @ w.T).float() / t
    logp = z.log_softmax(-1)
    valid = y != IGNORE
    lp = logp.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def check_shape(n, h, v, dtype, device, temperature=0.7) -> list[dict]:
    from prefix_rft.kernels import linear_logprob_entropy, linear_logprob_entropy_reference

    x, w, y, g_lp, g_h = make_inputs(n, h, v, dtype, device)
    ref = outputs_and_grads(lambda a, b, c: linear_logprob_entropy_reference(
        a.float(), b.float(), c, temperature=temperature, dtype=torch.float32), x, w, y, g_lp, g_h)
    base = outputs_and_grads(lambda a, b, c: bf16_torch(a, b, c, temperature), x, w, y, g_lp, g_h)
    base_err = [rel_rms(b, r) for b, r in zip(base, ref)]
    rows = []
    for bwd in BWDS:
        def fn(a, b, c, bwd=bwd):
            return linear_logprob_entropy(a, b, c, temperature=temperature, impl="triton",
                                          bwd=bwd)

        got = outputs_and_grads(fn, x, w, y, g_lp, g_h)
        deterministic = ""
        if bwd == "split":
            again = outputs_and_grads(fn, x, w, y, g_lp, g_h)
            deterministic = str(all(torch.equal(a, b) for a, b in zip(got[2:], again[2:])))
        errs = [rel_rms(g, r) for g, r in zip(got, ref)]
        ok = all(e <= b + 5e-3 for e, b in zip(errs, base_err)) and deterministic != "False"
        rows.append({"bwd": bwd, "shape": f"N={n},H={h},V={v}",
                     "dtype": str(dtype).replace("torch.", ""),
                     **{f"err_{k}": f"{e:.2e}" for k, e in zip(("lp", "ent", "dX", "dW"), errs)},
                     **{f"torch_{k}": f"{e:.2e}"
                        for k, e in zip(("lp", "ent", "dX", "dW"), base_err)},
                     "deterministic": deterministic, "pass": str(ok),
                     "device": device_name(), "commit": git_commit(),
                     "date": datetime.date.today().isoformat()})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--hidden", type=int, nargs="+", default=[1536, 4096])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU interpreter, fp32, tiny shapes (bf16 tl.dot is wrong there)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        device, dtype, shapes = "cpu", torch.float32, [(20, 24, 130)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_correctness.py needs CUDA (or --dry-run)")
        device, dtype = "cuda", torch.bfloat16
        shapes = [(args.tokens, h, args.vocab) for h in args.hidden]
    require_kernels()
    rows = []
    for n, h, v in shapes:
        rows += check_shape(n, h, v, dtype, device)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "correctness.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        keys = list(rows[0])
        f.write("# Triton backwards vs fp32 reference (relative RMS; torch_* = plain bf16 torch)"
                "\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        f.writelines("| " + " | ".join(r[k] for k in keys) + " |\n" for r in rows)
    print(f"wrote {path}")
    return 0 if all(r["pass"] == "True" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
