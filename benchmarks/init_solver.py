"""Speed and quality of the parameter initializers and the zero-point solver (spec §2–3, issue #2).

For every weight shape × source × bits × group size: wall time and total weighted loss (relative to Min-Max) of
``minmax``, ``neuqi`` coarse-to-fine, ``neuqi`` full grid and ``neuqi_int``; the gap of coarse-to-fine to the full
grid (acceptance: within 0.1 %); the worst relative gap of the fast solver to the exact breakpoint enumeration on a
sample of groups; and the speed of a *straightforward form* of the search, which re-sorts all 2n + 1 and 2n + 2
events for every candidate scale like the reference code (spec §2), on the same rows.

Sources: ``random`` (Student-t ν = 4 weights, h = 1) and ``smollm2``: the real q_proj (576×576), gate_proj
(1536×576) and down_proj (576×1536) of one SmolLM2-135M-Instruct layer with diag(XᵀX) from a forward pass over
calibration text. The full grid, neuqi_int and the straightforward form run on the first ``--slow-rows`` rows
(0 = all rows); their columns are marked * in the table. ``--whole-model`` times the search over every linear of
SmolLM2-135M (30 layers × 7 linears) with real Hessian diagonals.

    python benchmarks/init_solver.py --quick              # a few cases, about 2 minutes
    python benchmarks/init_solver.py --threads 2          # everything (tens of minutes on 2 cores)

OMP_WAIT_POLICY defaults to PASSIVE here: with the default busy-waiting, torch's OpenMP threads stall for whole
scheduler slices whenever another process holds a core, which made the search ~100x slower on a shared machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from neuqi.quant.init import init_params, weighted_loss
from neuqi.quant.zero_point import exact_zero_point, optimal_zero_point

SHAPES = ("576x576", "1536x576", "576x1536", "4096x4096")
SMOLLM2_LINEARS = {"576x576": "self_attn.q_proj", "1536x576": "mlp.gate_proj", "576x1536": "mlp.down_proj"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated OUTxIN shapes ('' for none)")
    p.add_argument("--bits", default="2,3,4", help="comma-separated bit widths")
    p.add_argument("--group-sizes", default="-1,64,128", help="comma-separated group sizes (-1 = channel-wise)")
    p.add_argument("--sources", default="random,smollm2", help="random and/or smollm2 (576/1536 shapes only)")
    p.add_argument("--slow-rows", type=int, default=64, help="rows for full grid, neuqi_int, straightforward (0=all)")
    p.add_argument("--exact-groups", type=int, default=256, help="groups sampled for the fast-vs-exact solver gap")
    p.add_argument("--layer", type=int, default=15, help="SmolLM2 layer whose linears are used")
    p.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens for diag(XᵀX)")
    p.add_argument("--whole-model", action="store_true", help="also time NeUQI on every linear of SmolLM2")
    p.add_argument("--model-bits", type=int, default=3, help="bits for --whole-model (group size 64)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="3-bit only; shapes 576x576, 576x1536, 4096x4096 (g128)")
    p.add_argument("--output", default="benchmarks/results/init_solver.json", help="JSON results path")
    args = p.parse_args()
    if args.quick:
        args.shapes, args.bits, args.group_sizes, args.slow_rows = "576x576,576x1536,4096x4096", "3", "64,128", 32
    return args


# ----------------------------------------------------------------------------------------------------- weights
def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    chi2 = torch.randn(4, out_features, in_features, generator=gen).pow(2).mean(0)  # Student-t, ν = 4
    return 0.02 * w / chi2.sqrt()


def smollm2_linears(layers: list[int] | None, calib: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (weight, diag(XᵀX))} of the decoder linears of SmolLM2-135M-Instruct (``layers``; None = all)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neuqi.pipeline import data, models

    model, tokenizer = models.load_model(None)
    tokens, _ = data.calibration_tokens(None, tokenizer, nsamples=calib, seqlen=512)
    diag: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        index = name.split(".layers.")[-1].split(".")[0] if ".layers." in name else None
        if isinstance(module, torch.nn.Linear) and index is not None and (layers is None or int(index) in layers):

            def hook(mod, inputs, _out, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                diag[name] = diag.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    return {name: (modules[name].weight.detach().float().clone(), d.float()) for name, d in diag.items()}


# ------------------------------------------------------------------------------------- straightforward form
def straightforward_zero_point(x: torch.Tensor, h: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's two stages as written in spec §2, sorting all events for every call: (z, F), z = −Z.

    x, h: (N, n) float64, h normalised to Σ h = 1 per group (stage 2 needs it)."""
    m = 2**bits - 1
    inf = torch.full_like(x[:, :1], float("inf"))
    # stage 1: relaxed envelope, 2n events
    times = torch.cat([x - m - 0.5, x + 0.5], 1)
    d0 = torch.cat([-h, h], 1)
    d1 = torch.cat([-h * (x - m), h * x], 1)
    d2 = torch.cat([-h * ((x - m) ** 2 - 0.25), h * (x * x - 0.25)], 1)
    times, order = torch.sort(times, 1)
    a0 = torch.cat([h.sum(1, keepdim=True), d0.gather(1, order)], 1).cumsum(1)
    a1 = torch.cat([(h * (x - m)).sum(1, keepdim=True), d1.gather(1, order)], 1).cumsum(1)
    a2 = torch.cat([(h * (x - m) ** 2).sum(1, keepdim=True), d2.gather(1, order)], 1).cumsum(1)
    lo, hi = torch.cat([-inf, times], 1), torch.cat([times, inf], 1)
    flat = a0 <= 1e-12
    z = torch.where(flat, torch.where(lo.isfinite(), lo, hi), (a1 / a0.clamp(min=1e-300)).clamp(lo, hi))
    value = torch.where(flat, a2, a0 * z * z - 2 * a1 * z + a2)
    z_env = z.gather(1, value.argmin(1, keepdim=True))
    # stage 2: exact sweep on [z̃ − 1, z̃ + 1], 2n + 2 events
    left, right = z_env - 1, z_env + 1
    d = torch.floor(x + 0.5 - left)
    c = x - d.clamp(0, m)
    t0 = torch.maximum(x + 0.5 - d, left)
    t1 = t0 + 1
    use0 = (d >= 1) & (d <= m) & (t0 <= right)
    use1 = (d >= 2) & (d <= m + 1) & (t1 <= right)
    times = torch.cat([left, t0, t1, right], 1)
    step1 = torch.cat([0 * left, h * use0, h * use1, 0 * left], 1)
    step2 = torch.cat([0 * left, 2 * h * t0 * use0, 2 * h * t1 * use1, 0 * left], 1)
    times, order = torch.sort(times, dim=1, stable=True)
    b1 = ((h * c).sum(1, keepdim=True) + step1.gather(1, order).cumsum(1))[:, :-1]
    b2 = ((h * c * c).sum(1, keepdim=True) + step2.gather(1, order).cumsum(1))[:, :-1]
    z = b1.clamp(times[:, :-1], times[:, 1:])
    value = (z - b1) ** 2 + b2 - b1 * b1
    best = value.argmin(1, keepdim=True)
    return z.gather(1, best).squeeze(1), value.gather(1, best).squeeze(1)


def straightforward_search(weight: torch.Tensor, h: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Coarse-to-fine NeUQI (64 + 32 candidates) with the straightforward solver: best scale per group (G,)."""
    w = weight.double().reshape(-1, group_size)
    hg = torch.ones_like(w) if h is None else h.double().view(1, -1, group_size).expand(weight.shape[0], -1, -1)
    hg = hg.reshape(-1, group_size)
    hg = torch.where(hg.sum(1, keepdim=True) == 0, 1.0, hg)
    hg = hg / hg.sum(1, keepdim=True)
    s0 = ((w.amax(1) - w.amin(1)) / (2**bits - 1)).clamp(min=1e-12)

    def best_of(candidates: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        best_loss, best_s = torch.full_like(s0, float("inf")), s0.clone()
        for s in candidates:
            loss = straightforward_zero_point(w / s.unsqueeze(1), hg, bits)[1] * s * s
            better = loss < best_loss
            best_loss, best_s = torch.where(better, loss, best_loss), torch.where(better, s, best_s)
        return best_loss, best_s

    loss, s_mid = best_of([s0 * i / 64 for i in range(1, 65)])
    fine_loss, fine_s = best_of([s_mid + s0 * j / 2048 for j in [*range(-16, 0), *range(1, 17)]])
    return torch.where(fine_loss < loss, fine_s, s_mid)


# --------------------------------------------------------------------------------------------------- one case
def timed(fn, *a, **kw):
    start = time.perf_counter()
    result = fn(*a, **kw)
    return result, time.perf_counter() - start


def solver_gap(weight, h, scale, bits, group_size, count: int, seed: int) -> float:
    """Worst relative gap F_fast/F_exact − 1 over ``count`` sampled groups, at the chosen and at random scales."""
    gen = torch.Generator().manual_seed(seed)
    w = weight.double().reshape(-1, group_size)
    hg = None if h is None else h.double().view(1, -1, group_size).expand(weight.shape[0], -1, -1).reshape(w.shape)
    rows = torch.randperm(w.shape[0], generator=gen)[:count]
    s = scale.reshape(-1)[rows].double().unsqueeze(1)
    s = s * torch.cat([torch.ones(1), 0.3 + 0.75 * torch.rand(3, generator=gen)]).double()  # (count, 4)
    x = (w[rows].unsqueeze(1) / s.unsqueeze(2)).reshape(-1, group_size)
    hx = None if hg is None else hg[rows].repeat_interleave(4, 0)
    f_fast = optimal_zero_point(x, hx, bits)[1]
    f_exact = exact_zero_point(x, hx, bits)[1]
    floor = 1e-15 * (group_size if hx is None else hx.sum(1))  # constant groups have F = 0
    return ((f_fast - f_exact).abs() / (f_exact + floor)).max().item()


def run_case(weight, h, bits: int, group_size: int, args) -> dict:
    rec: dict = {"bits": bits, "group_size": group_size}
    total = lambda params, w=weight, hh=h: weighted_loss(w, *params, bits, group_size, hh).sum().item()  # noqa: E731
    mm, rec["t_minmax"] = timed(init_params, weight, bits, group_size, "minmax")
    cpu = time.process_time()
    c2f, rec["t_neuqi"] = timed(init_params, weight, bits, group_size, "neuqi", h)
    rec["cpu_neuqi"] = time.process_time() - cpu  # all threads
    rec["loss_minmax"], rec["loss_neuqi"] = total(mm), total(c2f)
    rows = weight.shape[0] if args.slow_rows <= 0 else min(args.slow_rows, weight.shape[0])
    rec["slow_rows"] = rows
    sub = weight[:rows]
    sub_loss = lambda params: total(params, sub)  # noqa: E731
    full, rec["t_full*"] = timed(init_params, sub, bits, group_size, "neuqi", h, search="full")
    integer, rec["t_int*"] = timed(init_params, sub, bits, group_size, "neuqi_int", h)
    _, rec["t_neuqi*"] = timed(init_params, sub, bits, group_size, "neuqi", h)
    n_groups = weight.shape[1] // (weight.shape[1] if group_size == -1 else group_size)
    mm_sub = (mm[0][:rows], mm[1][:rows])
    c2f_sub = (c2f[0][:rows], c2f[1][:rows])
    rec["loss_minmax*"], rec["loss_neuqi*"] = sub_loss(mm_sub), sub_loss(c2f_sub)
    rec["loss_full*"], rec["loss_int*"] = sub_loss(full), sub_loss(integer)
    rec["gap_c2f_vs_full"] = rec["loss_neuqi*"] / rec["loss_full*"] - 1
    g = weight.shape[1] // n_groups
    rec["solver_gap"] = solver_gap(weight, h, c2f[0], bits, g, args.exact_groups, seed=bits * 100 + g)
    scales, rec["t_straightforward*"] = timed(straightforward_search, sub, h, bits, g)
    rec["straightforward_speed_ratio"] = rec["t_straightforward*"] / rec["t_neuqi*"]
    rec["straightforward_scale_mismatch"] = (scales.float() != c2f_sub[0].reshape(-1)).float().mean().item()
    return rec


def fmt_row(shape: str, source: str, r: dict) -> str:
    return (
        f"{shape:>9} {source:>7} {r['bits']:>2} {r['group_size']:>5} | {r['t_minmax']:7.3f} {r['t_neuqi']:8.2f} "
        f"{r['t_full*']:8.2f} {r['t_int*']:8.2f} {r['t_straightforward*']:9.2f} "
        f"{r['straightforward_speed_ratio']:6.1f}x"
        f" | {r['loss_neuqi'] / r['loss_minmax']:6.4f} {r['loss_full*'] / r['loss_minmax*']:6.4f} "
        f"{r['loss_int*'] / r['loss_minmax*']:6.4f} | {100 * r['gap_c2f_vs_full']:+8.4f}% {r['solver_gap']:8.1e}"
    )


HEADER = (
    "    shape  source  b group | minmax_s  neuqi_s  full*_s   int*_s  simple*_s  ratio | c2f/mm full/mm* "
    "int/mm* | c2f-full*   solver"
)


def whole_model(args) -> dict:
    linears = smollm2_linears(None, args.calib)
    seconds, cpu_seconds, elements, losses = 0.0, 0.0, 0, {"minmax": 0.0, "neuqi": 0.0}
    for weight, h in linears.values():
        cpu = time.process_time()
        params, t = timed(init_params, weight, args.model_bits, 64, "neuqi", h)
        seconds += t
        cpu_seconds += time.process_time() - cpu
        losses["neuqi"] += weighted_loss(weight, *params, args.model_bits, 64, h).sum().item()
        mm = init_params(weight, args.model_bits, 64, "minmax")
        losses["minmax"] += weighted_loss(weight, *mm, args.model_bits, 64, h).sum().item()
        elements += weight.numel()
    return {
        "linears": len(linears),
        "elements": elements,
        "bits": args.model_bits,
        "group_size": 64,
        "seconds_neuqi": seconds,
        "cpu_seconds_neuqi": cpu_seconds,
        "loss_ratio_neuqi_vs_minmax": losses["neuqi"] / losses["minmax"],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_before": os.getloadavg(),
        },
        "cases": [],
    }
    real = {}
    if "smollm2" in args.sources:
        try:
            real = smollm2_linears([args.layer], args.calib)
        except Exception as exc:  # noqa: BLE001 - the model is optional here
            print(f"SmolLM2 unavailable ({exc.__class__.__name__}: {exc}); random weights only")
    print(HEADER)
    for shape in filter(None, args.shapes.split(",")):
        out_features, in_features = map(int, shape.split("x"))
        sources = [("random", random_weight(out_features, in_features), None)]
        name = SMOLLM2_LINEARS.get(shape)
        match = [k for k in real if name and k.endswith(name)]
        if match:
            sources.append(("smollm2", *real[match[0]]))
        for source, weight, h in sources:
            if source not in args.sources:
                continue
            for bits in map(int, args.bits.split(",")):
                for group_size in map(int, args.group_sizes.split(",")):
                    if group_size != -1 and in_features % group_size:
                        continue
                    rec = run_case(weight, h, bits, group_size, args)
                    rec.update(shape=shape, source=source)
                    results["cases"].append(rec)
                    print(fmt_row(shape, source, rec), flush=True)
    if args.whole_model:
        results["whole_model"] = whole_model(args)
        print("whole model:", json.dumps(results["whole_model"]))
    results["machine"]["load_after"] = os.getloadavg()
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
