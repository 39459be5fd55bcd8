"""Why is HQQ worse than RTN at W3 g64 on SmolLM2? Compare the two per linear on the errors that matter.

For every decoder linear: the plain L2 weight error ‖ΔW‖², the largest |Δw|, the activation-weighted layer loss
tr(ΔW H ΔWᵀ) and the output-Fisher weighted loss ½ Σ_o F_o (ΔW H ΔWᵀ)_oo (``neuqi.pipeline.sensitivity``: the
predicted increase of the cross-entropy, nats per token), with H and F from the FP model on calibration windows;
and ``top3``: Σ_o Σ_{c in top 3} H_cc Δw_oc², the error on the three input channels with the largest H_cc (SmolLM2
has massive activations: in layer 11's down_proj one channel holds 89 % of diag H). Rows: RTN (Min-Max with an
integer zero-point, as the RTN row), HQQ as benchmarks/compare.py calls it, and HQQ without its optimizer (Min-Max
with a real-valued zero-point).

    python benchmarks/hqq_check.py --bits 3 --group-size 64 --windows 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from neuqi.pipeline import data, models
from neuqi.pipeline.sensitivity import decoder_linears, measure_stats
from neuqi.quant import grid
from neuqi.quant.init import init_params


def hqq_weight(w: torch.Tensor, bits: int, group: int, optimize: bool = True) -> torch.Tensor:
    """HQQ fake-quantized ``w`` (out, in), called as benchmarks/compare.py does (axis=1, fp16 scale and zero)."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, axis=1, optimize=optimize,
                                   bitpack=False, device=str(w.device))
    meta["compute_dtype"] = torch.float32
    meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
    return Quantizer.dequantize(w_q, meta).reshape(w.shape)


def rtn_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    s, z = grid.to_storage(*init_params(w.float(), bits, group, method="minmax"))
    return grid.fake_quantize(w.float(), s, z, bits, group)


def metrics(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> dict[str, float]:
    d = (w_hat - w.float())  # (out, in)
    r = ((d @ h) * d).sum(1)  # (out,) per-row layer loss
    top = h.diagonal().topk(3).indices
    return {"l2": float(d.pow(2).sum()), "max_abs": float(d.abs().max()), "layer": float(r.sum()),
            "fisher": float(0.5 * (f * r).sum()), "row_bias": float((d.sum(1) ** 2).sum()),
            "top3": float((d[:, top].pow(2) * h.diagonal()[top]).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=2, help="calibration windows of 2048 for H and F")
    p.add_argument("--out", default="benchmarks/results/hqq_check.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = models.load_model("smollm2", dtype="bfloat16")
    calib, _ = data.calibration_tokens("c4", tokenizer, 32, 2048, 0)
    stats = measure_stats(model, calib[: args.windows])
    rows = {}
    for name, (_, linear) in decoder_linears(model).items():
        w, st = linear.weight.detach(), stats[name]
        rows[name] = {k: metrics(w, fn(w), st.hessian, st.fisher) for k, fn in (
            ("rtn", lambda x: rtn_weight(x, args.bits, args.group_size)),
            ("hqq", lambda x: hqq_weight(x, args.bits, args.group_size)),
            ("hqq_no_optimize", lambda x: hqq_weight(x, args.bits, args.group_size, optimize=False)))}
    totals = {m: {k: sum(r[k][m] for r in rows.values()) for k in ("rtn", "hqq", "hqq_no_optimize")}
              for m in ("l2", "layer", "fisher", "row_bias", "top3")}
    wins = {m: sum(r["hqq"][m] < r["rtn"][m] for r in rows.values())
            for m in ("l2", "max_abs", "layer", "fisher", "top3")}
    worst = sorted(rows, key=lambda n: rows[n]["hqq"]["fisher"] - rows[n]["rtn"]["fisher"], reverse=True)[:8]
    result = {"bits": args.bits, "group_size": args.group_size, "windows": args.windows, "totals": totals,
              "hqq_better_in": wins, "linears": len(rows), "worst_for_hqq": {n: rows[n] for n in worst},
              "seconds": round(time.perf_counter() - start, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("totals", "hqq_better_in", "linears", "seconds")}, indent=1))
    for n in worst:
        print(n, {k: {m: f"{v:.3g}" for m, v in rows[n][k].items()} for k in rows[n]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
