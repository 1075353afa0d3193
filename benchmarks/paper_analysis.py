"""Per-question scores, slices, the paired family of each variant, and the analysis text of
``benchmarks/paper_repro.py``'s report, generated from the numbers whatever they say.

A claim *holds* when its difference's CI lies on the claimed side of 0 and its Holm-adjusted
p-value is below alpha; it is *reversed* when the same is true on the other side; otherwise it
is *not shown* (the CI straddles 0, or Holm's correction removes it).
"""

from __future__ import annotations

import numpy as np

from benchmarks.paper_stats import holm, paired_bootstrap

SLICES = ("all", "solvable", "unsolvable")


def methods_of(table: dict, variant: str) -> list[str]:
    """The methods a variant runs (``variant_methods``; default: all)."""
    return list((table.get("variant_methods") or {}).get(variant) or table["methods"])


def slice_mask(slices: dict, split: str, name: str) -> np.ndarray:
    """[Q] bool: the questions of ``split`` in slice ``name`` (base-solvable or not)."""
    solvable = np.asarray(slices[split]["solvable"], dtype=bool)
    if name == "all":
        return np.ones_like(solvable)
    return solvable if name == "solvable" else ~solvable


def score_matrix(rows: list[dict], variant: str, method: str, split: str,
                 mask: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """(seeds, [seeds, questions] scores = correct / k) of one method on one split."""
    cells = sorted((r for r in rows if r["status"] == "ok" and r["variant"] == variant
                    and r["method"] == method and r["split"] == split),
                   key=lambda r: r["seed"])
    if not cells:
        return [], np.zeros((0, 0))
    scores = np.array([np.asarray(r["correct"], dtype=float) / r["k"] for r in cells])
    return [r["seed"] for r in cells], scores if mask is None else scores[:, mask]


def paired_family(rows, table, variant, methods, slices) -> list[dict]:
    """Every (method != reference, split, slice) difference of one variant, with its CI and
    the Holm-adjusted p over this whole family."""
    ref, boot, out = table["reference"], table["eval"]["bootstrap"], []
    for method in (m for m in methods if m != ref):
        for split in table["eval"]["splits"]:
            for name in SLICES:
                mask = slice_mask(slices, split, name)
                if not mask.any():
                    continue
                seeds_a, a = score_matrix(rows, variant, method, split, mask)
                seeds_b, b = score_matrix(rows, variant, ref, split, mask)
                common = sorted(set(seeds_a) & set(seeds_b))
                if not common:
                    continue
                a = a[[seeds_a.index(s) for s in common]]
                b = b[[seeds_b.index(s) for s in common]]
                result = paired_bootstrap(a, b, n_boot=int(boot["n_boot"]),
                                          alpha=float(boot["alpha"]))
                out.append({"variant": variant, "method": method, "split": split,
                            "slice": name, **result})
    for p, adjusted in zip(out, holm([p["p"] for p in out])):
        p["p_holm"] = adjusted
    return out


def verdict(p: dict, sign: int, alpha: float) -> str:
    """'holds' / 'reversed' / 'not shown' for a claim that ``sign * diff > 0``."""
    lo, hi = sign * p["lo"], sign * p["hi"]
    low, high = min(lo, hi), max(lo, hi)
    if p["p_holm"] < alpha and low > 0:
        return "holds"
    if p["p_holm"] < alpha and high < 0:
        return "reversed"
    return "not shown"


def _fmt(p: dict) -> str:
    return (f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}], Holm p "
            f"{p['p_holm']:.3f}, n = {p['seeds']} seeds x {p['questions']} questions")


def _find(family, method, split, name):
    return next((p for p in family if p["method"] == method and p["split"] == split
                 and p["slice"] == name), None)


# (claim, method compared with the reference, sign: +1 when the claim is "method > reference")
CLAIMS = (("Prefix-RFT > RFT", "rft", -1), ("Prefix-RFT > SFT", "sft", -1),
          ("Prefix-RFT > SFT->RFT", "sft_rft", -1),
          ("entropy mask helps (Prefix-RFT > all prefix tokens trained)",
           "prefix_rft_all_tokens", -1),
          ("cosine schedule helps (Prefix-RFT > uniform schedule)", "prefix_rft_uniform", -1),
          # which advantage the demo's default should use (configs/demo.yaml: official)
          ("the authors' advantage beats the paper's (official > group)",
           "prefix_rft_official", +1))


def robustness(rows, table, variants, slices) -> list[dict]:
    """Does a worse demonstrator hurt Prefix-RFT less than SFT? Per non-expert variant, the
    difference in differences ``[PRFT(v) - PRFT(expert)] - [SFT(v) - SFT(expert)]`` on test
    (seeds paired by index), bootstrapped like a paired difference; > 0 means more robust."""
    ref, boot, out = table["reference"], table["eval"]["bootstrap"], []
    for variant in (v for v in variants if v != "expert" and "expert" in variants):
        for name in SLICES:
            mask = slice_mask(slices, "test", name)
            mats = {(m, v): score_matrix(rows, v, m, "test", mask)
                    for m in (ref, "sft") for v in (variant, "expert")}
            common = sorted(set.intersection(*(set(s) for s, _ in mats.values())))
            if not common or not mask.any():
                continue
            pick = {key: m[[s.index(c) for c in common]] for key, (s, m) in mats.items()}
            a = pick[(ref, variant)] - pick[(ref, "expert")]
            b = pick[("sft", variant)] - pick[("sft", "expert")]
            out.append({"variant": variant, "method": "robustness", "split": "test",
                        "slice": name, **paired_bootstrap(a, b, int(boot["n_boot"]),
                                                          float(boot["alpha"]))})
    for p, adjusted in zip(out, holm([p["p"] for p in out])):
        p["p_holm"] = adjusted
    return out


def analysis_text(families: dict[str, list[dict]], robust: list[dict], table: dict) -> str:
    """The Markdown analysis: each claim per variant on test (all and base-unsolvable)."""
    alpha = float(table["eval"]["bootstrap"]["alpha"])
    lines = [f"Each line: the difference in points of avg@{table['eval']['k']} on **test**, "
             f"{100 * (1 - alpha):.0f}% CI from the bootstrap over seeds x questions, Holm p "
             "over the variant's family. A claim holds when the CI excludes 0 on its side and "
             "Holm p < alpha.", ""]
    for claim, method, sign in CLAIMS:
        lines.append(f"**{claim}**")
        found = False
        for variant, family in families.items():
            for name in ("all", "unsolvable"):
                p = _find(family, method, "test", name)
                if p is None:
                    continue
                found = True
                # stated as "claimed winner - other"; + 0.0: no "-0.0" in the text
                shown = p if sign > 0 else {**p, "diff": -p["diff"] + 0.0,
                                            "lo": -p["hi"] + 0.0, "hi": -p["lo"] + 0.0}
                pair = f"{method} - prefix_rft" if sign > 0 else f"prefix_rft - {method}"
                lines.append(f"- {variant}, {name} questions: {verdict(p, sign, alpha)} "
                             f"({pair}: {_fmt(shown)})")
        if not found:
            lines.append("- not run")
        lines.append("")
    lines.append("**Robustness to the demonstrator** (Prefix-RFT loses less than SFT when the "
                 "demonstrator gets worse; difference in differences vs expert)")
    for p in robust or []:
        if p["slice"] in ("all", "unsolvable"):
            lines.append(f"- {p['variant']}, {p['slice']} questions: {verdict(p, +1, alpha)} "
                         f"({_fmt(p)})")
    if not robust:
        lines.append("- not run (needs the expert and another variant)")
    return "\n".join(lines) + "\n"
