"""Summary of a benchmarks/gpu_check.sh run: the verdicts, from whatever the stages wrote.

    python3 benchmarks/gpu_summary.py OUT_DIR     # reads OUT_DIR/*.csv, writes summary.md

Standard library only (no torch, no matplotlib), and every section copes with missing or
partial files, so the summary is written even when stages failed or timed out.

Kernel verdict (anchor shape N=8192, H=4096, V=151936): **AT FLOOR** when the split fwd+bwd
<= 1.10 x floor8 (4 x the measured ``x @ W.T``) and the Triton forward and the dz kernel each
reach >= 85 % of the cuBLAS rate; otherwise the part with the largest gap over its cuBLAS-rate
time (forward, dz, dX GEMMs, dW GEMMs, rest of the backward).
"""

from __future__ import annotations

import csv
import os
import sys

FLOOR_RATIO, RATE_SHARE, FUSED_GOAL = 1.10, 0.85, 1.10
ANCHOR = "N=8192,H=4096,V=151936"


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ms(row: dict | None) -> float | None:
    try:
        v = float(row["ms_p50"]) if row else None
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


def _extra(row: dict, key: str) -> str:
    for part in (row.get("extra") or "").split(";"):
        if part.startswith(key + "="):
            return part.split("=", 1)[1]
    return ""


def _find(rows, impl, mode, shape=None):
    hits = [r for r in rows if r["impl"].split(" ")[0] == impl and r["mode"] == mode
            and (shape is None or r["shape"] == shape)]
    return hits[-1] if hits else None


def verdict(rows: list[dict], shape: str) -> str:
    """One line: AT FLOOR, or the part with the largest gap (see the module docstring)."""
    g = _ms(_find(rows, "gemm_fwd", "fwd", shape))
    split = _ms(_find(rows, "triton-split", "fwd+bwd", shape))
    if not g or not split:
        return "verdict: NONE (no gemm_fwd / triton-split fwd+bwd row at this shape)"
    parts = {"forward": _ms(_find(rows, "triton-split", "fwd", shape)),
             "dz kernel": _ms(_find(rows, "split-dz", "bwd", shape)),
             "dX GEMMs": _ms(_find(rows, "split-dX", "bwd", shape)),
             "dW GEMMs": _ms(_find(rows, "split-dW", "bwd", shape))}
    rest = _ms(_find(rows, "split-rest", "bwd", shape))
    share = {k: g / v for k, v in parts.items() if v}
    text = (f"split fwd+bwd {split:.2f} ms = {split / (4 * g):.3f} x floor8 ({4 * g:.2f} ms); "
            + ", ".join(f"{k} {100 * s:.0f}% of cuBLAS rate" for k, s in share.items()))
    fwd_ok = share.get("forward", 0) >= RATE_SHARE and share.get("dz kernel", 0) >= RATE_SHARE
    if split <= FLOOR_RATIO * 4 * g and fwd_ok:
        return f"verdict: AT FLOOR -- {text}"
    gaps = {k: v - g for k, v in parts.items() if v}
    if rest is not None:
        gaps["rest of the backward"] = rest
    worst = max(gaps, key=gaps.get) if gaps else "unknown"
    return (f"verdict: NOT AT FLOOR, largest gap: {worst} (+{gaps.get(worst, 0):.2f} ms over "
            f"the cuBLAS-rate time) -- {text}")


def kernel_table(rows: list[dict], shape: str) -> list[str]:
    out = ["| impl | mode | ms p50 | TFLOP/s | x bare GEMMs | x floor8 | peak MiB | "
           "peak w/o dX,dW MiB | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["shape"] != shape or r["op"] != "linear_logprob_entropy":
            continue
        note = ";".join(p for p in r["extra"].split(";") if p.split("=")[0] not in (
            "tflops", "x_bare", "x_floor8", "peak_no_out_mb", "dtype"))
        out.append(f"| {r['impl']} | {r['mode']} | {r['ms_p50']} | {_extra(r, 'tflops')} | "
                   f"{_extra(r, 'x_bare')} | {_extra(r, 'x_floor8')} | {r['peak_mb']} | "
                   f"{_extra(r, 'peak_no_out_mb')} | {note} |")
    return out


def fused_head_lines(rows: list[dict], shape: str, out_dir: str) -> list[str]:
    """gpu_fused_head.py's fwd+bwd rows against the bare GEMMs (goal <= 1.1x) and floor8."""
    bare = _ms(_find(rows, "gemm", "fwd+bwd", shape))
    g = _ms(_find(rows, "gemm_fwd", "fwd", shape))
    split = _ms(_find(rows, "triton-split", "fwd+bwd", shape))
    lines = []
    for r in rows:
        if r["op"] != "fused_head_loss" or r["mode"] != "fwd+bwd":
            continue
        ms = _ms(r)
        parts = [f"- {r['impl']} {r['shape']}: {r['ms_p50']} ms"]
        if ms and bare and r["shape"] == shape:
            ok = "meets" if ms <= FUSED_GOAL * bare else "misses"
            parts.append(f"{ms / bare:.3f} x the 6NHV bare GEMMs (goal <= {FUSED_GOAL}: {ok})")
        if ms and g and r["shape"] == shape:
            parts.append(f"{ms / (4 * g):.3f} x floor8")
        if ms and split and r["shape"] == shape:
            parts.append(f"split backward fwd+bwd {split:.2f} ms")
        lines.append("; ".join(parts))
    check = os.path.join(out_dir, "fused_head_check.txt")
    if os.path.exists(check):
        lines.append("- check: " + open(check).read().strip())
    return lines or ["(no fused_head_loss rows)"]


def dz_lines(rows: list[dict]) -> list[str]:
    out = ["| BLOCK_N/V/K/warps/stages | ms p50 | TFLOP/s | x cuBLAS | regs | spills | smem KiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "dz-sweep":
            out.append(f"| {_extra(r, 'cfg')} | {r['ms_p50']} | {_extra(r, 'tflops')} | "
                       f"{_extra(r, 'x_cublas')} | {_extra(r, 'regs')} | {_extra(r, 'spills')} | "
                       f"{_extra(r, 'smem_kib')} |")
    return out if len(out) > 2 else ["(no dz sweep rows)"]


def correctness_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["correctness: NONE (no correctness.csv)"]
    ok = all(r["pass"] == "PASS" for r in rows)
    out = [f"correctness: {'PASS' if ok else 'FAIL'} ({len(rows)} checks)", ""]
    for r in rows:
        errs = " ".join(f"{k}={r[f'rms_{k}']}/{r[f'max_{k}']}" for k in ("lp", "ent", "dX", "dW")
                        if r.get(f"rms_{k}"))
        torch_errs = " ".join(f"{k}={r[f'torch_rms_{k}']}" for k in ("lp", "ent", "dX", "dW")
                              if r.get(f"torch_rms_{k}"))
        out.append(f"- {r['pass']} {r['check']} ({r['bwd']}, {r['shape']}, {r['dtype']})"
                   + (f": rel RMS/max {errs}" if errs else "")
                   + (f"; bf16 torch {torch_errs}" if torch_errs else "")
                   + (f"; {r['bound']}" if r.get("bound") else "")
                   + (f"; {r['note']}" if r.get("note") else ""))
    return out


def train_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if not _ms(r):
            out.append(f"- {r['impl']}: {r['extra']}")
            continue
        out.append(f"- {r['impl']} ({r['shape']}): {_extra(r, 'tokens_per_s')} tokens/s; "
                   f"max_memory_allocated {_extra(r, 'peak_gib') or '?'} GiB vs plan update "
                   f"phase {_extra(r, 'plan_update_gib')} GiB (error {_extra(r, 'update_err')}); "
                   f"resident {_extra(r, 'resident_gib')} vs {_extra(r, 'plan_resident_gib')}; "
                   f"CUDA context {_extra(r, 'context_gib')} vs {_extra(r, 'plan_context_gib')}; "
                   f"allocator slack {_extra(r, 'slack_gib')} vs {_extra(r, 'plan_slack_gib')}")
    return out or ["(no train-step rows)"]


def write_summary(out_dir: str) -> str:
    j = lambda name: os.path.join(out_dir, name)  # noqa: E731
    env = open(j("env.txt")).read().rstrip() if os.path.exists(j("env.txt")) else "(no env.txt)"
    kern = _rows(j("kernels.csv"))
    shapes = [r["shape"] for r in kern if r["impl"] == "gemm_fwd"]
    shape = ANCHOR if ANCHOR in shapes else (shapes[-1] if shapes else ANCHOR)
    parts = ["# GPU check summary", "", verdict(kern, shape)]
    parts += correctness_lines(_rows(j("correctness.csv")))[:1]
    parts += ["", "```", env, "```", "", "## Stages", "", "| stage | status | seconds |",
              "|---|---|---|"]
    if os.path.exists(j("stages.tsv")):
        with open(j("stages.tsv")) as f:
            parts += [f"| {' | '.join(line.rstrip(chr(10)).split(chr(9)))} |" for line in f][1:]
    parts += ["", f"## Kernels at {shape}", ""] + kernel_table(kern, shape)
    parts += ["", "## Fused head (6NHV) against the bare GEMMs", ""]
    parts += fused_head_lines(kern, shape, out_dir)
    parts += ["", "## dz tile sweep (real JIT resources)", ""] + dz_lines(kern)
    parts += ["", "## Correctness (vs chunked fp64)", ""]
    parts += correctness_lines(_rows(j("correctness.csv")))
    parts += ["", "## Train step vs `prefix-rft plan`", ""]
    parts += train_lines(_rows(j("train_step.csv")))
    if os.path.exists(j("tests.log")):
        tail = [line for line in open(j("tests.log")).read().splitlines() if line.strip()][-1:]
        parts += ["", "## Kernel tests", "", f"`{tail[0] if tail else '(empty log)'}`"]
    text = "\n".join(parts) + "\n"
    with open(j("summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python3 benchmarks/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    print(write_summary(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
