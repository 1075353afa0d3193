"""GPU stage: the fused head-and-loss (6NHV) timed beside the bare GEMMs and the split backward,
and checked against a chunked fp64 reference.

    python benchmarks/gpu_fused_head.py --out-dir OUT            # GPU: N=8192, H=4096,
                                                                 # V=151936, bf16
    TRITON_INTERPRET=1 python benchmarks/gpu_fused_head.py --out-dir OUT --dry-run   # CPU, tiny

Rows (``benchmarks/results_io.py`` columns, op ``fused_head_loss``, mode ``fwd+bwd``, shape
``N=..,H=..,V=..``) are appended to ``OUT/kernels.csv`` the moment each is measured:

* ``gemm6_bare`` -- per token chunk of the fused path's size: ``z = x_c @ W.T`` (fp32 out),
  ``dz @ W``, ``dW += dz.T @ x_c`` on preallocated buffers: the 6NHV floor;
* ``fused6_triton`` / ``fused6_torch`` -- :func:`prefix_rft.kernels.linear_policy_loss`
  (``impl="triton"``: the Triton elementwise pass between cuBLAS GEMMs; ``"torch"``: the
  chunked torch path), PPO clip + dual clip + old log-probs, then ``loss.backward()``;
* ``split8_triton`` -- :func:`~prefix_rft.kernels.linear_logprob_entropy` (Triton forward,
  vocab-split backward: 8NHV) + the same per-token loss in torch, then ``backward()``.

Times: CUDA events, median (p20/p80 too) of ``--iters`` (>= 10) calls after a warm-up, the
cases interleaved round by round. Then one check of ``fused6_triton`` against a chunked fp64
full-logits reference (loss, dX, dW relative RMS) writes one ``PASS``/``FAIL`` line to
``OUT/fused_head_check.txt``. ``--dry-run``: tiny fp32 shapes on CPU (Triton through its
interpreter), wall-clock times, the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("gemm6_bare", "fused6_triton", "fused6_torch", "split8_triton")
# bf16 inputs: dz is stored in bf16 and dX is returned in bf16 (2^-9 relative rounding each)
TOL = {"loss": 1e-4, "dX": 1e-2, "dW": 1e-2}
LOSS_OPTS = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0)


def make_inputs(n, h, v, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[torch.rand(n, generator=g).to(device) < 0.1] = -100
    adv = torch.randn(n, generator=g).to(device)
    return hidden, weight, labels, adv


def build_step(case, hidden, weight, labels, adv, old):
    """A ``step()`` running the case once, forward + backward."""
    import torch

    from prefix_rft.kernels import linear_logprob_entropy, linear_policy_loss
    from prefix_rft.kernels.linear_policy_loss_torch import DEFAULT_CHUNK_BYTES, chunk_rows

    n, v = hidden.shape[0], weight.shape[0]
    scale = 1.0 / n
    if case == "gemm6_bare":
        from prefix_rft.kernels.linear_policy_loss_triton import _addmm_fp32, _mm, dz_buffer

        rows = chunk_rows(v, DEFAULT_CHUNK_BYTES["cuda"], multiple=16)
        buf = torch.empty(min(rows, n), v, dtype=torch.float32, device=hidden.device)
        dz_buf = dz_buffer(buf, hidden.dtype).zero_()
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)

        def step():
            for c0 in range(0, n, rows):
                x = hidden[c0:c0 + rows]
                _mm(x, weight.T, out=buf[:x.shape[0]])
                dz = dz_buf[:x.shape[0]]
                _ = _mm(dz, weight) if dz.is_cuda else dz.float() @ weight.float()
                _addmm_fp32(dw, dz.T, x)
        return step
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        if case.startswith("fused6"):
            loss, _, _ = linear_policy_loss(h, w, labels, advantages=adv, old_logprob=old,
                                            loss_weight=scale, impl=case.split("_")[1],
                                            **LOSS_OPTS)
        else:
            lp, _ = linear_logprob_entropy(h, w, labels, impl="triton", bwd="split")
            ratio = torch.exp((lp - old).clamp(-20, 20))
            tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
            tok = torch.where(adv < 0, torch.minimum(tok, -adv * 3.0), tok)
            loss = torch.where(labels != -100, tok * scale, 0.0).sum()
        loss.backward()
        return loss, h.grad, w.grad
    return step


def timed(step, cuda):
    """``(ms, peak MiB allocated during the call)``; CUDA events on a GPU, wall clock on CPU."""
    import torch

    if not cuda:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() / 2**20


def fp64_reference(hidden, weight, labels, adv, old, chunk):
    """Loss, dX, dW in fp64 from full logits, ``chunk`` token rows at a time (autograd)."""
    import torch

    from prefix_rft.kernels import linear_policy_loss_reference

    w64 = weight.double().requires_grad_()
    loss, dx = torch.zeros((), dtype=torch.float64, device=hidden.device), []
    for c0 in range(0, hidden.shape[0], chunk):
        x = hidden[c0:c0 + chunk].double().requires_grad_()
        part, _, _ = linear_policy_loss_reference(
            x, w64, labels[c0:c0 + chunk], advantages=adv[c0:c0 + chunk],
            old_logprob=old[c0:c0 + chunk], loss_weight=1.0 / hidden.shape[0], **LOSS_OPTS)
        part.backward()
        loss += part.detach()
        dx.append(x.grad)
    return loss, torch.cat(dx), w64.grad


def check(out_dir, hidden, weight, labels, adv, old, fused_step):
    def rel(a, e):
        a, e = a.double(), e.double()
        return float("inf") if a.isnan().any() else ((a - e).norm() / e.norm()).item()

    loss, dx, dw = fused_step()
    ref = fp64_reference(hidden, weight, labels, adv, old, chunk=512)
    errs = {k: rel(a, e) for k, a, e in zip(("loss", "dX", "dW"), (loss, dx, dw), ref)}
    ok = all(errs[k] <= TOL[k] for k in TOL)
    line = ("PASS" if ok else "FAIL") + " fused_head_loss fused6_triton vs chunked fp64: " + \
        ", ".join(f"{k} rel-RMS {errs[k]:.2e} (tol {TOL[k]:.0e})" for k in TOL)
    with open(os.path.join(out_dir, "fused_head_check.txt"), "w") as f:
        f.write(line + "\n")
    print(line, flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on CPU")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per case (>= 10)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks.results_io import append_rows, make_row

    os.makedirs(args.out_dir, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run (TRITON_INTERPRET=1) on CPU")
    n, h, v, dtype = (8192, 4096, 151936, torch.bfloat16) if cuda else (37, 33, 257,
                                                                        torch.float32)
    iters = max(10, args.iters) if cuda else 1
    device = "cuda" if cuda else "cpu"
    hidden, weight, labels, adv = make_inputs(n, h, v, dtype, device)
    from prefix_rft.kernels import linear_logprob_entropy

    with torch.no_grad():
        old = linear_logprob_entropy(hidden, weight, labels)[0] + 0.1
    steps = {c: build_step(c, hidden, weight, labels, adv, old) for c in CASES}
    shape = f"N={n},H={h},V={v}"
    samples, peaks = {c: [] for c in CASES}, {c: None for c in CASES}
    for r in range(iters + 1):  # round 0 warms up (compiles the kernels)
        for case, step in steps.items():
            ms, peak = timed(step, cuda)
            if r:
                samples[case].append(ms)
                peaks[case] = peak if peaks[case] is None else max(peaks[case], peak)
    csv_path = os.path.join(args.out_dir, "kernels.csv")
    floor = sorted(samples["gemm6_bare"])[len(samples["gemm6_bare"]) // 2]
    for case in CASES:
        p50 = sorted(samples[case])[len(samples[case]) // 2]
        extra = f"vs_gemm6={p50 / floor:.3f};dtype={str(dtype).split('.')[-1]};iters={iters}"
        append_rows(csv_path, [make_row("fused_head_loss", case, "fwd+bwd", shape,
                                        samples[case], peaks[case], extra)])
        print(f"{case:14s} p50 {p50:9.3f} ms  x{p50 / floor:.3f} of gemm6_bare", flush=True)
    ok = check(args.out_dir, hidden, weight, labels, adv, old, steps["fused6_triton"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
