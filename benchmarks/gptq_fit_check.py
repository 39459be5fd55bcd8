"""Does static Min-Max (fitted on the original W) hurt GPTQ/LDLQ? Layer losses of static vs dynamic parameter fits.

For the linears of a few SmolLM2 layers, with H from the FP model on one calibration window: the layer loss
tr(ΔW H ΔWᵀ) of RTN (Min-Max), of LDLQ with static Min-Max and of LDLQ with dynamic Min-Max (fitted on the
error-updated weights when the solver reaches the group), and the share of weights the static grid clips (the
error-updated value falls outside the group's grid by more than half a step).

    python benchmarks/gptq_fit_check.py --layers 5,15,25
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from neuqi.pipeline import data, models
from neuqi.pipeline.sensitivity import decoder_linears
from neuqi.quant import grid, solvers
from neuqi.quant.init import init_params


def losses(w: torch.Tensor, h: torch.Tensor, bits: int, group: int) -> dict[str, float]:
    def fit(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grid.to_storage(*init_params(x, bits, group, method="minmax"))

    s, z = fit(w, torch.arange(w.shape[1] // group))
    out = {"rtn": solvers.proxy_loss(grid.fake_quantize(w, s, z, bits, group), w, h)}
    out["ldlq_static"] = solvers.ldlq(w, h, s, z, bits, group).loss
    out["ldlq_dynamic"] = solvers.ldlq(w, h, None, None, bits, group, fit=fit).loss
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="5,15,25")
    p.add_argument("--settings", default="4:64,3:64")
    p.add_argument("--out", default="benchmarks/results/gptq_fit_check.json")
    args = p.parse_args(argv)
    model, tokenizer = models.load_model("smollm2", dtype="bfloat16")
    calib, _ = data.calibration_tokens("c4", tokenizer, 32, 2048, 0)
    layers = {f"model.layers.{i}." for i in args.layers.split(",")}
    linears = {n: m for n, (_, m) in decoder_linears(model).items() if any(n.startswith(x) for x in layers)}
    grams: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: grams.__setitem__(
        n, (lambda x: x.T @ x / x.shape[0])(a[0].float().reshape(-1, a[0].shape[-1])))) for n, m in linears.items()]
    with torch.no_grad():
        model(calib[:1])
    for h in hooks:
        h.remove()
    result: dict[str, dict] = {}
    for setting in args.settings.split(","):
        bits, group = (int(x) for x in setting.split(":"))
        rows = {n: losses(m.weight.detach().float(), grams[n].double(), bits, group) for n, m in linears.items()}
        total = {k: sum(r[k] for r in rows.values()) for k in ("rtn", "ldlq_static", "ldlq_dynamic")}
        better = sum(r["ldlq_dynamic"] < r["ldlq_static"] for r in rows.values())
        result[f"w{bits}g{group}"] = {"total": total, "dynamic_better_in": better, "linears": len(rows),
                                      "per_linear": rows}
        print(f"W{bits} g{group}: totals {json.dumps({k: round(v, 2) for k, v in total.items()})}, dynamic better in "
              f"{better}/{len(rows)}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
