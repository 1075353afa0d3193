"""Both Triton backwards at the anchor shape against a chunked fp64 reference: PASS or FAIL.

    python3 benchmarks/gpu_correctness.py --out-dir OUT            # CUDA, bf16
    python3 benchmarks/gpu_correctness.py --out-dir OUT --dry-run  # CPU interpreter, tiny fp32

Checks, each one row of ``OUT/correctness.csv`` appended as soon as it is decided:

* ``fp64`` (bwd = split, atomic): N=8192, H=4096, V=151,936, bf16 inputs made on the GPU, 10%
  ignored labels, temperature 0.7, a peaked softmax (logit scale ~4, so entropies span ~0.5-9
  nats). Reference: the same bf16 values in fp64, vocabulary in chunks (never an fp64
  ``[N, V]``). Relative RMS and max relative error of log-prob, entropy, dX, dW. Bounds:
  log-prob / entropy rel. RMS <= 1e-4 (fp32 accumulation of exact bf16 products), dX / dW
  <= 1e-2 (dz is rounded to bf16 once, each output once); plain bf16 torch's errors are
  written beside them for scale;
* ``determinism``: two split backwards bitwise equal;
* ``split_vs_atomic``: their dX / dW relative RMS <= 1e-2;
* ``ignored_rows``: log-prob, entropy and dX exactly 0 on ignored rows;
* ``n_v_over_2^31``: N=16384 (N*V > 2^31 elements of logits, int32 offsets would wrap):
  log-prob, entropy and dX of 512 sampled rows against fp64, same bounds.

Dry run: fp32 at a tiny shape (bounds 1e-5 for all four: fp32 accumulation everywhere).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: `benchmarks.*` from the source tree, appended
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.results_io import device_name, git_commit, require_kernels  # noqa: E402

IGNORE, TEMPERATURE, SCALE = -100, 0.7, 4.0
SHAPE, BIG_N, SAMPLED = (8192, 4096, 151936), 16384, 512
DRY_SHAPE, DRY_BIG_N, DRY_SAMPLED = (40, 32, 700), 64, 16
BOUNDS = {"bf16": {"lp": 1e-4, "ent": 1e-4, "dX": 1e-2, "dW": 1e-2},
          "fp32": {"lp": 1e-5, "ent": 1e-5, "dX": 1e-5, "dW": 1e-5}}
FIELDS = ["check", "bwd", "shape", "dtype", "rms_lp", "rms_ent", "rms_dX", "rms_dW", "max_lp",
          "max_ent", "max_dX", "max_dW", "torch_rms_lp", "torch_rms_ent", "torch_rms_dX",
          "torch_rms_dW", "bound", "pass", "note", "device", "commit"]


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(relative RMS, max |a - e| / max |e|); inf when ``actual`` is not finite."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    scale = e.abs().max().item() or 1.0
    return ((a - e).norm() / (e.norm() or 1.0)).item(), ((a - e).abs().max() / scale).item()


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(n, h, generator=g, device=device) * SCALE).to(dtype)
    w = (torch.randn(v, h, generator=g, device=device) / h ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[torch.rand(n, generator=g, device=device) < 0.1] = IGNORE
    return x, w, y, torch.randn(n, generator=g, device=device), torch.randn(
        n, generator=g, device=device)


def reference_fp64(x, w, y, g_lp, g_h, need_dw=True, chunk=8192):
    """Log-prob, entropy, dX, dW in fp64 over vocab chunks (two passes, no [N, V] tensor)."""
    xd, n = x.double(), x.shape[0]
    valid = y != IGNORE
    yy = torch.where(valid, y, 0)
    m = torch.full((n,), -float("inf"), dtype=torch.float64, device=x.device)
    s, t, zy = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    spans = [(v0, min(v0 + chunk, w.shape[0])) for v0 in range(0, w.shape[0], chunk)]
    for v0, v1 in spans:  # online logsumexp and sum p*z
        z = xd @ w[v0:v1].double().T / TEMPERATURE
        m_new = torch.maximum(m, z.max(1).values)
        e = (z - m_new[:, None]).exp()
        r = (m - m_new).exp()
        s, t = s * r + e.sum(1), t * r + (e * z).sum(1)
        m = m_new
        hit = (yy >= v0) & (yy < v1)
        zy[hit] = z[hit, (yy - v0)[hit]]
    lse = m + s.log()
    ent = lse - t / s
    lp = torch.where(valid, zy - lse, 0.0)
    ent = torch.where(valid, ent, 0.0)
    glp, gh = torch.where(valid, g_lp.double(), 0.0), torch.where(valid, g_h.double(), 0.0)
    dx = torch.zeros_like(xd)
    dw = torch.empty(w.shape, dtype=torch.float64, device=w.device) if need_dw else None
    for v0, v1 in spans:
        wd = w[v0:v1].double()
        z = xd @ wd.T / TEMPERATURE
        p = (z - lse[:, None]).exp()
        dz = -glp[:, None] * p - gh[:, None] * p * (z - (lse - ent)[:, None])
        hit = (yy >= v0) & (yy < v1) & valid
        dz[hit, (yy - v0)[hit]] += glp[hit]
        dz /= TEMPERATURE
        dx += dz @ wd
        if need_dw:
            dw[v0:v1] = dz.T @ xd
    return lp, ent, dx, dw


def kernel_run(x, w, y, g_lp, g_h, bwd, need_dw=True):
    kernels = require_kernels()
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(need_dw)
    lp, ent = kernels.linear_logprob_entropy(xs, ws, y, temperature=TEMPERATURE, impl="triton",
                                             bwd=bwd)
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
    return lp.detach(), ent.detach(), xs.grad, ws.grad if need_dw else None


def bf16_torch(x, w, y, g_lp, g_h, chunk=2048):
    """What a user writes: logits in the input dtype, softmax in fp32 (rows in chunks)."""
    outs = [[], [], []]
    ws = w.detach().clone().requires_grad_()
    for r0 in range(0, x.shape[0], chunk):
        xs = x[r0:r0 + chunk].detach().clone().requires_grad_()
        logp = ((xs @ ws.T).float() / TEMPERATURE).log_softmax(-1)
        yy, valid = y[r0:r0 + chunk], y[r0:r0 + chunk] != IGNORE
        lp = torch.where(valid, logp.gather(-1, torch.where(valid, yy, 0)[:, None])[:, 0], 0.0)
        ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
        ((lp * g_lp[r0:r0 + chunk]).sum() + (ent * g_h[r0:r0 + chunk]).sum()).backward()
        for o, t in zip(outs, (lp.detach(), ent.detach(), xs.grad)):
            o.append(t)
        del logp
    return [torch.cat(o) for o in outs] + [ws.grad]


class Writer:
    """Appends each check's row to ``correctness.csv`` as it is decided."""

    def __init__(self, out_dir):
        import csv

        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "correctness.csv")
        self._csv, self.ok = csv, True
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in FIELDS}
        row.update(device=device_name(), commit=git_commit())
        self.ok &= row["pass"] == "PASS"
        with open(self.path, "a", newline="") as f:
            self._csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
        print({k: v for k, v in row.items() if v != ""}, flush=True)


def compare(got, ref, names, bound) -> dict:
    row = {}
    for name, g, r in zip(names, got, ref):
        rms, mx = errors(g, r)
        row[f"rms_{name}"], row[f"max_{name}"] = f"{rms:.2e}", f"{mx:.2e}"
        row["pass"] = "PASS" if rms <= bound[name] and row.get("pass", "PASS") == "PASS" \
            else "FAIL"
    row["bound"] = " ".join(f"{k}<={bound[k]:g}" for k in names)
    return row


def check_anchor(out: Writer, shape, dtype, device, bound):
    n, h, v = shape
    x, w, y, g_lp, g_h = make_inputs(n, h, v, dtype, device)
    names, shape_s = ("lp", "ent", "dX", "dW"), f"N={n},H={h},V={v}"
    dt = str(dtype).replace("torch.", "")
    ref = reference_fp64(x, w, y, g_lp, g_h)
    base = bf16_torch(x, w, y, g_lp, g_h) if dtype != torch.float32 else None
    runs = {}
    for bwd in ("split", "atomic"):
        runs[bwd] = got = kernel_run(x, w, y, g_lp, g_h, bwd)
        row = {"check": "fp64", "bwd": bwd, "shape": shape_s, "dtype": dt,
               **compare(got, ref, names, bound)}
        if base is not None:
            row.update({f"torch_rms_{k}": f"{errors(b, r)[0]:.2e}"
                        for k, b, r in zip(names, base, ref)})
        out.write(row)
    del ref, base
    again = kernel_run(x, w, y, g_lp, g_h, "split")
    same = all(torch.equal(a, b) for a, b in zip(runs["split"], again))
    out.write({"check": "determinism", "bwd": "split", "shape": shape_s, "dtype": dt,
               "pass": "PASS" if same else "FAIL", "note": "two runs bitwise equal"})
    row = compare(runs["split"][2:], runs["atomic"][2:], ("dX", "dW"),
                  {"dX": bound["dX"], "dW": bound["dW"]})
    out.write({"check": "split_vs_atomic", "bwd": "split/atomic", "shape": shape_s, "dtype": dt,
               **row})
    ignored = y == IGNORE
    zero = all(bool((t[ignored] == 0).all()) for t in runs["split"][:3] + runs["atomic"][:3])
    out.write({"check": "ignored_rows", "bwd": "split+atomic", "shape": shape_s, "dtype": dt,
               "pass": "PASS" if zero and bool(ignored.any()) else "FAIL",
               "note": f"{int(ignored.sum())} ignored rows: lp, ent, dX exactly 0"})


def check_large(out: Writer, n, h, v, sampled, dtype, device, bound):
    """N*V > 2^31: the kernel on every row, fp64 on ``sampled`` rows (dX is per row)."""
    x, w, y, g_lp, g_h = make_inputs(n, h, v, dtype, device, seed=1)
    got = kernel_run(x, w, y, g_lp, g_h, "split", need_dw=False)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:sampled].to(device)
    ref = reference_fp64(x[rows], w, y[rows], g_lp[rows], g_h[rows], need_dw=False)
    row = compare([t[rows] for t in got[:3]], ref[:3], ("lp", "ent", "dX"), bound)
    out.write({"check": "n_v_over_2^31", "bwd": "split", "shape": f"N={n},H={h},V={v}",
               "dtype": str(dtype).replace("torch.", ""), **row,
               "note": f"N*V={n * v:.3e} (2^31={2 ** 31:.3e}); {sampled} sampled rows"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny fp32 shapes")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        device, dtype, shape, big, sampled = "cpu", torch.float32, DRY_SHAPE, DRY_BIG_N, \
            DRY_SAMPLED
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_correctness.py: needs CUDA (or --dry-run)")
        device, dtype, shape, big, sampled = "cuda", torch.bfloat16, SHAPE, BIG_N, SAMPLED
    require_kernels()
    bound = BOUNDS["fp32" if dtype == torch.float32 else "bf16"]
    out = Writer(args.out_dir)
    check_anchor(out, shape, dtype, device, bound)
    if device == "cuda":
        torch.cuda.empty_cache()
    check_large(out, big, shape[1], shape[2], sampled, dtype, device, bound)
    print(f"wrote {out.path}: {'PASS' if out.ok else 'FAIL'}")
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
