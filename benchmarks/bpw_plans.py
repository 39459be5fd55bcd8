"""Read the sensitivities that ``compare.py`` saved for the bpw rows: check the prediction, show the plans.

* For every uniform setting (W4 g64, W3 g64, W2 g64, W3/W2 channel-wise) whose row JSON exists: the predicted
  increase of the cross-entropy Σ_ℓ ½ Σ_o F_o (ΔW H ΔWᵀ)_oo (nats per token) and its KL-calibrated version next
  to the measured one, ln(ppl / ppl_FP), on WikiText-2 and C4. The raw layer loss Σ_ℓ tr(ΔW H ΔWᵀ) is shown for
  comparison.
* By kind of linear (q, k, v, o, gate, up, down): the 2-bit g64 cost the Fisher predicts against the end-to-end KL
  measured for the anchors, summed over the layers.
* For each budget: how many linears of each kind get which format under each weighting (KL-calibrated, Fisher,
  raw layer loss).

    python benchmarks/bpw_plans.py --budgets 2.5,3.5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from compare import SETTINGS, load_sensitivity

from neuqi.pipeline import sensitivity


def uniform_prediction(sens: sensitivity.Sensitivity, bits: int, group: int, weighting: str) -> float | None:
    """Σ over linears of the predicted loss of (bits, group), channel-wise where group does not divide."""
    total = 0.0
    for name, (_, in_features) in sens.shapes.items():
        g = group if group != -1 and in_features % group == 0 and group < in_features else -1
        value = sens.losses[weighting][name].get((bits, g))
        if value is None:
            return None
        total += value
    return total


def prediction_table(sens: sensitivity.Sensitivity, out: Path, model: str) -> list[str]:
    fp = json.loads((out / f"{model}-fp-fp.json").read_text())["metrics"]
    lines = ["| setting | predicted ΔCE (Fisher) | KL-calibrated | measured ln(ppl/FP) WikiText-2 | C4 | "
             "raw layer loss |", "|---|---:|---:|---:|---:|---:|"]
    for setting, (bits, group) in SETTINGS.items():
        path = out / f"{model}-{setting}-neuqi.json"
        if group is None or not path.exists():
            continue
        m = json.loads(path.read_text())["metrics"]
        pred = uniform_prediction(sens, bits, group, "fisher")
        kl = uniform_prediction(sens, bits, group, "kl") if "kl" in sens.losses else None
        raw = uniform_prediction(sens, bits, group, "layer")
        kl_cell = "–" if kl is None else f"{kl:.3f}"
        wt2, c4 = (math.log(m[f"{d}_ppl"] / fp[f"{d}_ppl"]) for d in ("wikitext2", "c4"))
        lines.append(f"| {setting} | {pred:.3f} | {kl_cell} | {wt2:.3f} | {c4:.3f} | {raw:.4g} |")
    return lines


def kind_table(sens: sensitivity.Sensitivity) -> list[str]:
    """Per kind of linear: Σ Fisher-predicted and Σ measured (anchor KL) cost of 2-bit g64 and channel-wise."""
    if sens.anchors is None:
        return []
    lines = ["| kind | Fisher W2 g64 | KL W2 g64 | Fisher W2 chan | KL W2 chan |", "|---|---:|---:|---:|---:|"]
    kinds: dict[str, list[str]] = {}
    for name in sens.shapes:
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    for kind, names in kinds.items():
        cells = [sum(table[n].get(c, 0.0) for n in names) for c in ((2, 64), (2, -1))
                 for table in (sens.losses["fisher"], sens.anchors)]
        lines.append(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return lines


def plan_summary(sens: sensitivity.Sensitivity, bpw: float, weighting: str) -> list[str]:
    plan, report = sensitivity.plan_from_sensitivity(sens, bpw, weighting)
    kinds: dict[str, Counter] = {}
    for name, (bits, group) in plan.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], Counter())[f"w{bits}{'c' if group == -1 else f'g{group}'}"] += 1
    head = (f"{bpw} bpw, {weighting}: {report['bpw']:.4f} bpw used, predicted {report['predicted_loss']:.4g} "
            f"(LP bound {report['lower_bound']:.4g})")
    return [head] + [f"  {kind:<10} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                     for kind, c in kinds.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/compare")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budgets", default="2.5,3.5")
    args = p.parse_args(argv)
    out = Path(args.out)
    sens = load_sensitivity(out / f"sensitivity-{args.model}.json")
    lines = prediction_table(sens, out, args.model) + [""] + kind_table(sens) + [""]
    for bpw in (float(b) for b in args.budgets.split(",")):
        for weighting in (w for w in sensitivity.WEIGHTINGS if w in sens.losses):
            lines += plan_summary(sens, bpw, weighting)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
