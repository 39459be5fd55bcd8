"""The paper's comparison on the demo model (SmolLM2-135M-Instruct), one command.

Rows: FP, RTN (Min-Max, round to nearest), GPTQ (Min-Max + LDLQ), NeUQI_int + LDLQ, NeUQI + LDLQ,
NeUQI + LDLQ + distill (2 and 3 bits), and HQQ (the real ``hqq`` library: float zero-points, no calibration data).
Settings: W4 g64, W3 g64, W2 g64, W3 channel-wise, W2 channel-wise, and mixed precision at 2.5 and 3.5 bits per
weight (``bpw2.5``, ``bpw3.5``: ``QuantConfig.bpw``; the sensitivities are measured once, without refinement as in
``plan_for_budget``, and kept in ``sensitivity-<model>.json``; NeUQI rows plan on the Fisher losses calibrated by
end-to-end KL anchors,
``neuqi_fisher`` on the Fisher losses alone, ``neuqi_layer`` on raw layer losses).
``gptq_dynamic`` is GPTQ with Min-Max fitted when LDLQ reaches each group; ``neuqi_fp`` fits every linear to the FP
model's output (``QuantConfig.target="fp"``); ``distill`` and ``distill_kl`` distil the NeUQI row. Every quantized
row uses the same calibration windows (C4 train from ../shared/data, seed 0) and is evaluated on WikiText-2 and C4
perplexity (GPTQ convention, the first ``--windows`` windows of 2048) and, with ``--zero-shot``, on the five lm-eval
tasks.

One result JSON per row goes to ``--out`` (schema: ``neuqi.report``); at the end ``neuqi report`` renders them to
``compare.md`` and ``compare.png`` there. Rows whose JSON exists are skipped (``--redo`` to recompute).

    python benchmarks/compare.py                        # everything, 32 x 2048 calibration, 40 eval windows
    python benchmarks/compare.py --settings w3g64 --methods gptq,neuqi --windows 10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuqi import eval as evaluate
from neuqi.eval import report
from neuqi.formats.packed import pack_model, quantized_linears, set_weight_cache
from neuqi.pipeline import QuantConfig, data, models, quantize_model

log = logging.getLogger("compare")

SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64), "w3c": (3, -1), "w2c": (2, -1),
            "bpw2.5": (2.5, None), "bpw3.5": (3.5, None)}
# "bpwB" settings: mixed precision at B average bits per weight (QuantConfig.bpw); the quantized rows then use the
# plan chosen with the KL-calibrated losses, "neuqi_fisher" with the Fisher losses alone, "neuqi_layer" with raw
# layer losses.
# row -> (solver, initializer, initializer options); "fp", "hqq" and the distill rows are handled apart.
# NeUQI_int searches NeUQI's 96 coarse-to-fine candidate scales instead of the paper's 2048: within 0.3 % of the full
# grid's loss on SmolLM2 and 10-14x cheaper (benchmarks/int_search.py), so the whole table fits on a CPU (see README).
QUANT_ROWS = {"rtn": ("rtn", "minmax", {}), "gptq": ("ldlq", "minmax", {}),
              "gptq_dynamic": ("ldlq", "minmax", {}),
              "neuqi_int": ("ldlq", "neuqi_int", {"search": "coarse_to_fine"}), "neuqi": ("ldlq", "neuqi", {}),
              "neuqi_fisher": ("ldlq", "neuqi", {}), "neuqi_layer": ("ldlq", "neuqi", {}),
              "neuqi_fp": ("ldlq", "neuqi", {}), "neuqi_refine": ("ldlq", "neuqi", {})}
PARAM_FIT = {"gptq_dynamic": "dynamic"}  # rows whose (s, Z) are fitted when LDLQ reaches the group
TARGET = {"neuqi_fp": "fp"}  # rows fitted to the FP model's output (QuantConfig.target; default "quantized")
REFINE = {"neuqi_refine": 8}  # rounds of refinement after the solver (QuantConfig.refine); every other row: 0
WEIGHTING = {"neuqi_fisher": "fisher", "neuqi_layer": "layer"}  # mixed-precision rows' weighting (default: "kl")
PEER_ROWS = {"llmc_gptq": "peers/llmcompressor_gptq.py",  # run in the peer's own venv (--peer-python)
             "autoround": "peers/autoround.py"}
# distill row -> (the quantized row it starts from, DistillConfig settings); the student is that row's model of the
# same setting in the same run. "distill": the reference's loss (MSE on the final hidden states), scales and
# zero-points; "distill_kl": the KL of the logits, scales, zero-points and norm weights.
DISTILL_ROWS = {"distill": ("neuqi", {"loss": "mse"}), "distill_kl": ("neuqi", {"loss": "kl", "train_norms": True}),
                "distill_refine": ("neuqi_refine", {"loss": "kl", "train_norms": True})}
ROWS = ("fp", *QUANT_ROWS, *DISTILL_ROWS, "hqq", *PEER_ROWS)
LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ (Min-Max + LDLQ)", "gptq_dynamic": "GPTQ, dynamic Min-Max",
          "neuqi_int": "NeUQI_int + LDLQ", "neuqi": "NeUQI + LDLQ", "neuqi_fisher": "NeUQI + LDLQ, Fisher-only plan",
          "neuqi_layer": "NeUQI + LDLQ, raw-loss plan", "neuqi_fp": "NeUQI + LDLQ, FP target",
          "neuqi_refine": "NeUQI + LDLQ + refine",
          "distill": "NeUQI + LDLQ + distill", "distill_kl": "NeUQI + LDLQ + distill (KL, norms)",
          "distill_refine": "NeUQI + LDLQ + refine + distill (KL, norms)", "hqq": "HQQ",
          "llmc_gptq": "llm-compressor GPTQ (int zero-point)",
          "autoround": "AutoRound, light recipe (int zero-point)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model to quantize (default: the offline demo model)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
    p.add_argument("--methods", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--calib", default="c4", help="calibration source: c4 | wikitext2 | PATH")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows of 2048 per data set")
    p.add_argument("--datasets", default="wikitext2,c4", help="perplexity data sets")
    p.add_argument("--zero-shot", action="store_true", help="also run the five lm-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="lm-eval examples per task")
    p.add_argument("--distill-samples", type=int, default=64, help="distillation windows")
    p.add_argument("--distill-seqlen", type=int, default=512, help="distillation window length")
    p.add_argument("--dtype", default="bfloat16", help="forward dtype for calibration and evaluation")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--out", default="benchmarks/results/compare", help="directory for the result JSON files")
    p.add_argument("--redo", action="store_true", help="recompute rows whose JSON already exists")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report, plot and tables from the JSON files in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-cache", default=None, metavar="DIR",
                   help="keep each peer row's weights here and reuse them (e.g. to add zero-shot columns later)")
    p.add_argument("--peer-python", action="append", default=[], metavar="ROW=PYTHON",
                   help=f"the Python of a peer's own virtual environment, e.g. llmc_gptq=venvs/llmc/bin/python "
                        f"(peer rows: {list(PEER_ROWS)})")
    p.add_argument("--sens-windows", type=int, default=8, help="calibration windows for the bpw sensitivities")
    p.add_argument("--sens-rows", type=int, default=64, help="rows per linear for the bpw candidate losses")
    args = p.parse_args(argv)
    for name, valid, value in (("settings", SETTINGS, args.settings), ("methods", ROWS, args.methods)):
        bad = [v for v in value.split(",") if v not in valid]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(valid)}")
    return args


def bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Codes plus one fp16 scale and one fp16 zero-point per group."""
    g = in_features if group_size == -1 else group_size
    return bits + 32 / g


def model_bits_per_weight(model: nn.Module, bits: int, group_size: int) -> float:
    """Average over the quantized linears, weighted by their size (channel-wise groups differ per width)."""
    total = weights = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            n = module.weight.numel()
            total += n * bits_per_weight(bits, group_size, module.in_features)
            weights += n
    return total / weights


def hqq_quantize_(model: nn.Module, bits: int, group_size: int) -> float:
    """Replace every decoder linear's weight by its HQQ fake-quantized version (``hqq`` library, axis=1, i.e. groups
    along the input dimension like ours; channel-wise = one group per row). Returns the seconds spent."""
    from hqq.core.quantize import Quantizer

    start = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            w = module.weight.data
            g = w.shape[1] if group_size == -1 else group_size
            w_q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=g, axis=1, optimize=True,
                                           bitpack=False, device=str(w.device))
            meta["compute_dtype"] = torch.float32
            # HQQ keeps scale and zero in the compute dtype (fp16 on GPUs); round them the same way as ours
            meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
            module.weight.data = Quantizer.dequantize(w_q, meta).reshape(w.shape).to(w.dtype)
    return time.perf_counter() - start


def evaluate_model(model: nn.Module, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    tasks = [t for t in args.datasets.split(",") if t]
    if args.zero_shot:
        tasks += list(evaluate.ZERO_SHOT_TASKS)
    return evaluate.evaluate_tasks(model, tokenizer, tasks, max_windows=args.windows, limit=args.limit,
                                   device=args.device)


def distill_windows(tokenizer, calib: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Distillation windows from C4 documents that share no text with the calibration windows."""
    from neuqi.pipeline.data import disjoint_documents

    docs = disjoint_documents(data.load_documents(args.calib, "train"), tokenizer, calib)
    return data.sample_windows(docs, tokenizer, args.distill_samples, args.distill_seqlen, seed=args.seed + 1)


def run_row(row: str, setting: str, fp: nn.Module, tokenizer, calib: torch.Tensor, args: argparse.Namespace,
            cache: dict[str, nn.Module]) -> dict[str, Any]:
    bits, group_size = SETTINGS[setting]
    fields: dict[str, Any] = {"method": row, "label": LABELS[row], "bits": bits,
                              "group_size": "mixed" if group_size is None else group_size, "setting": setting}
    if row == "hqq":
        if group_size is None:
            raise RuntimeError("the hqq row has no mixed-precision (bpw) setting")
        model = copy.deepcopy(fp)
        fields["quant_seconds"] = round(hqq_quantize_(model, bits, group_size), 1)
        fields["init"] = "hqq"
    elif row in PEER_ROWS:
        if group_size is None:
            raise RuntimeError(f"the {row} row has no mixed-precision (bpw) setting")
        model, extra = peer_row(row, bits, group_size, fp, tokenizer, calib, args)
        fields.update(extra)
    elif row in DISTILL_ROWS:
        from neuqi.distill import DistillConfig, distill

        start, settings = DISTILL_ROWS[row]
        model = cache.get(f"{setting}/{start}")
        if model is None:
            raise RuntimeError(f"the {row} row needs the {start} row of the same setting in this run")
        model = copy.deepcopy(model)
        tokens = distill_windows(tokenizer, calib, args)
        config = DistillConfig(nsamples=tokens.shape[0], seqlen=tokens.shape[1], seed=args.seed, **settings)
        history = distill(model, fp, tokens, config, device=args.device)
        solver, init, _ = QUANT_ROWS[start]
        fields.update(init=init, solver=solver, quant_seconds=round(history.total_seconds, 1),
                      distill={**settings, "windows": tokens.shape[0], "seqlen": tokens.shape[1],
                               "first_loss": history.loss[0], "last_loss": history.loss[-1]})
    else:
        model, extra = quantize_row(row, setting, fp, calib, args, cache)
        fields.update(extra)
        if students_of(row, args.methods.split(",")):
            cache[f"{setting}/{row}"] = model
    if group_size is None:  # mixed precision: the planned formats, counted exactly
        plan = cache[f"{setting}/plan/{DISTILL_ROWS[row][0] if row in DISTILL_ROWS else row}"]
        fields["bits_per_weight"] = round(planned_bits_per_weight(fp, plan), 4)
    else:
        fields["bits_per_weight"] = round(model_bits_per_weight(fp, bits, group_size), 4)
    if any(True for _ in quantized_linears(model)):
        fields["packed_linears"] = sum(1 for _ in quantized_linears(model))
    fields["metrics"], fields["eval_seconds"] = _timed_eval(model, tokenizer, args)
    return fields


def students_of(row: str, rows: list[str]) -> list[str]:
    """The distill rows among ``rows`` that start from ``row``'s model."""
    return [d for d in rows if d in DISTILL_ROWS and DISTILL_ROWS[d][0] == row]


def peer_row(row: str, bits: int, group_size: int, fp: nn.Module, tokenizer, calib: torch.Tensor,
             args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``fp`` whose linears hold the weights a peer tool (``PEER_ROWS[row]``, run with its own venv's
    Python from ``--peer-python``) quantized on our calibration windows, as that tool dequantizes them; with
    ``--peer-cache`` a kept run is reused."""
    from safetensors.torch import load_file

    cached = Path(args.peer_cache) / f"{Path(args.model).name}-{row}-w{bits}g{group_size}-{calib_key(calib, args)}" \
        if args.peer_cache else None
    if cached is not None and (cached / "peer.json").exists():
        log.info("peer: %s from %s (not re-run)", row, cached)
        weights, info = load_file(cached / "weights.safetensors"), json.loads((cached / "peer.json").read_text())
    else:
        weights, info = run_peer(row, bits, group_size, fp, tokenizer, calib, args, cached)
    model = copy.deepcopy(fp)
    for name, w in weights.items():
        linear = model.get_submodule(name)
        if linear.weight.shape != w.shape:
            raise ValueError(f"{row}: {name} came back {tuple(w.shape)}, not {tuple(linear.weight.shape)}")
        with torch.no_grad():
            linear.weight.copy_(w)
    return model, {"init": row, "solver": row, "quant_seconds": info["seconds"], "peer": info}


def calib_key(calib: torch.Tensor, args: argparse.Namespace) -> str:
    """The calibration windows as a file-name part, e.g. ``c4-32x2048-s0``."""
    return f"{Path(args.calib).name}-{calib.shape[0]}x{calib.shape[1]}-s{args.seed}"


def run_peer(row: str, bits: int, group_size: int, fp: nn.Module, tokenizer, calib: torch.Tensor,
             args: argparse.Namespace, keep: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the peer script of ``row`` with its venv's Python on a saved copy of ``fp`` and ``calib``; its
    (weights, info), also kept in ``keep`` (moved there whole, so a stopped run leaves nothing) when given."""
    import shutil
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    pythons = dict(item.split("=", 1) for item in args.peer_python)
    if row not in pythons:
        raise RuntimeError(f"the {row} row runs in its own virtual environment: pass --peer-python {row}=PYTHON")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp.save_pretrained(tmp / "fp")
        tokenizer.save_pretrained(tmp / "fp")
        torch.save(calib.cpu(), tmp / "calib.pt")
        script = Path(__file__).parent / PEER_ROWS[row]
        cmd = [pythons[row], str(script), str(tmp / "fp"), str(tmp / "calib.pt"), str(tmp / "out"),
               "--bits", str(bits), "--group-size", str(group_size)]
        log.info("peer: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        weights = load_file(tmp / "out" / "weights.safetensors")
        info = json.loads((tmp / "out" / "peer.json").read_text())
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp / "out"), str(keep))
    return weights, info


def quantize_row(row: str, setting: str, fp: nn.Module, calib: torch.Tensor, args: argparse.Namespace,
                 cache: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A packed copy of ``fp`` quantized as ``row`` at ``setting`` and the row's JSON fields. Under a ``bpwB``
    setting the plan comes from the sensitivities, measured once per run (cached) and saved beside the rows."""
    bits, group_size = SETTINGS[setting]
    solver, init, options = QUANT_ROWS[row]
    common = dict(solver=solver, init=init, init_options=options, param_fit=PARAM_FIT.get(row, "static"),
                  target=TARGET.get(row, "quantized"), refine=REFINE.get(row, 0))
    fields: dict[str, Any] = {"init": init, "init_options": options, "solver": solver,
                              "param_fit": common["param_fit"], "target": common["target"],
                              "refine": common["refine"]}
    if common["refine"]:
        fields["refine_damping"] = QuantConfig().refine_damping
    plan_seconds = 0.0
    if group_size is None:
        config, report = plan_row(row, setting, fp, calib, args, cache, common)
        plan_seconds = report["seconds_charged"]
        fields["plan"] = report
    else:
        config = QuantConfig(bits=bits, group_size=group_size, **common)
    model = copy.deepcopy(fp)
    summary = quantize_model(model, calib, config, device=args.device)
    pack_model(model, summary.qparams)
    set_weight_cache(model, True)  # dequantize once, not at every evaluation forward
    fields.update(quant_seconds=round(summary.timings["total_s"] + plan_seconds, 1),
                  layer_loss=summary.totals["loss"], init_loss=summary.totals["init_loss"])
    return model, fields


def plan_row(row: str, setting: str, fp: nn.Module, calib: torch.Tensor, args: argparse.Namespace,
             cache: dict[str, Any], common: dict[str, Any]) -> tuple[QuantConfig, dict[str, Any]]:
    """The mixed-precision config of ``row`` at ``setting`` (bpw) and its plan report; the sensitivity
    measurement (the same for every budget and weighting) is charged to the first row that needs it."""
    from neuqi.pipeline import sensitivity

    bpw = SETTINGS[setting][0]
    weighting = WEIGHTING.get(row, "kl")
    sens_config = sensitivity.planning_config(QuantConfig(**common))
    path = Path(args.out) / f"sensitivity-{Path(args.model).name}.json"  # not a row: outside the row glob
    charged = 0.0
    if "sensitivity" not in cache:
        if path.exists() and not args.redo:
            cache["sensitivity"] = load_sensitivity(path)
            log.info("sensitivities from %s (measured in %.0f s)", path, cache["sensitivity"].info["seconds"])
        else:
            cache["sensitivity"] = sensitivity.measure_sensitivity(fp, calib, sens_config, args.device,
                                                                   args.sens_windows, args.sens_rows)
            save_sensitivity(cache["sensitivity"], path)
        info = cache["sensitivity"].info  # a Fisher or raw-loss plan does not use the anchors: not charged for them
        charged = info["seconds"] - (0 if weighting == "kl" else info.get("kl_seconds", 0))
    if weighting not in cache["sensitivity"].losses:  # a file from before the end-to-end anchors: add them
        before = cache["sensitivity"].info["seconds"]
        cache["sensitivity"] = sensitivity.add_anchors(cache["sensitivity"], fp, calib, sens_config)
        charged += cache["sensitivity"].info["seconds"] - before
        save_sensitivity(cache["sensitivity"], path)
    plan, report = sensitivity.plan_from_sensitivity(cache["sensitivity"], bpw, weighting)
    cache[f"{setting}/plan/{row}"] = plan
    report.update(seconds_charged=charged, formats=plan_counts(plan))
    print(sensitivity.plan_table(plan, cache["sensitivity"].shapes))
    return QuantConfig(bpw=bpw, plan=plan, bpw_weighting=weighting, **common), report


def _keys(d: dict[str, dict[tuple[int, int], float]]) -> dict[str, dict[str, float]]:
    return {n: {f"{k},{g}": v for (k, g), v in by.items()} for n, by in d.items()}


def _tuples(d: dict[str, dict[str, float]]) -> dict[str, dict[tuple[int, int], float]]:
    return {n: {tuple(int(x) for x in k.split(",")): v for k, v in by.items()} for n, by in d.items()}


def save_sensitivity(sens, path: Path) -> None:
    """The candidate losses as JSON: {weighting: {linear: {"bits,group": loss}}}, with shapes, info and the
    measured end-to-end anchors (the "kl" losses are recomputed from them on loading)."""
    losses = {w: _keys(by) for w, by in sens.losses.items() if w != "kl"}
    anchors = None if sens.anchors is None else _keys(sens.anchors)
    path.write_text(json.dumps({"info": sens.info, "shapes": sens.shapes, "losses": losses, "anchors": anchors},
                               indent=1))


def load_sensitivity(path: Path):
    """Inverse of ``save_sensitivity``."""
    from neuqi.pipeline.sensitivity import Sensitivity

    data = json.loads(path.read_text())
    anchors = data.get("anchors")
    return Sensitivity({w: _tuples(by) for w, by in data["losses"].items()},
                       {n: tuple(s) for n, s in data["shapes"].items()}, data["info"],
                       None if anchors is None else _tuples(anchors))


def plan_counts(plan: dict[str, list[int]]) -> dict[str, int]:
    """How many linears use each format, e.g. {"w2g64": 120, "w4c": 3}."""
    counts: dict[str, int] = {}
    for bits, group in plan.values():
        key = f"w{bits}{'c' if group == -1 else f'g{group}'}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def planned_bits_per_weight(model: nn.Module, plan: dict[str, list[int]]) -> float:
    """Average bits per weight of the planned formats over the quantized linears, weighted by size."""
    total = weights = 0
    for name, module in model.named_modules():
        if name in plan:
            n = module.weight.numel()
            total += n * bits_per_weight(*plan[name], module.in_features)
            weights += n
    return total / weights


def _timed_eval(model: nn.Module, tokenizer, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    result = evaluate_model(model, tokenizer, args)
    return result["metrics"], round(time.perf_counter() - start, 1)


SETTING_TITLES = {"w4g64": "W4 g64", "w3g64": "W3 g64", "w2g64": "W2 g64", "w3c": "W3 per-channel",
                  "w2c": "W2 per-channel", "bpw2.5": "mixed", "bpw3.5": "mixed"}


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "–" if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _pivot(title: str, results: list[dict[str, Any]], settings: list[str], head: str, cell, missing: str,
           fp_cell: str | None = None) -> list[str]:
    """One markdown table: a row per method that has any cell, a column per setting; ``cell(result)`` → text."""
    by = {(r.get("method"), r.get("setting")): r for r in results}
    lines = [title, "", head, "|---|" + "---:|" * len(settings)]
    if fp_cell is not None:
        lines.append("| FP (16 bpw) | " + " | ".join(fp_cell for _ in settings) + " |")
    for row in ROWS[1:]:
        cells = [cell(by[(row, s)]) if (row, s) in by else None for s in settings]
        cells = [missing if c is None else c for c in cells]
        if any(c != missing for c in cells):
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return lines + [""]


def pivot_tables(results: list[dict[str, Any]]) -> str:
    """Markdown: WikiText-2 / C4 perplexity per method (rows) and setting (columns), the zero-shot average where
    rows have it, then quantization minutes."""
    settings = [s for s in SETTINGS if any(r.get("setting") == s for r in results)]
    fp = next((r for r in results if r.get("method") == "fp"), None)
    bpw = {s: next(r["bits_per_weight"] for r in results if r.get("setting") == s) for s in settings}
    head = "| method | " + " | ".join(f"{SETTING_TITLES[s]} ({bpw[s]:.2f} bpw)" for s in settings) + " |"

    # bold: what `neuqi quantize` does by default (neuqi_refine), or the paper's pipeline where that was not run
    refined = {r.get("setting") for r in results if r.get("method") == "neuqi_refine"}

    def ppl(r: dict[str, Any]) -> str:
        cell = f"{_cell(r['metrics'], 'wikitext2_ppl')} / {_cell(r['metrics'], 'c4_ppl')}"
        default = "neuqi_refine" if r.get("setting") in refined else "neuqi"
        return f"**{cell}**" if r.get("method") == default else cell

    def zero_shot(r: dict[str, Any]) -> str | None:
        avg = r["metrics"].get("zero_shot_avg")
        return None if avg is None else f"{100 * avg:.1f}"

    fp_ppl = None if fp is None else f"{_cell(fp['metrics'], 'wikitext2_ppl')} / {_cell(fp['metrics'], 'c4_ppl')}"
    lines = _pivot("WikiText-2 / C4 perplexity", results, settings, head, ppl, "not run", fp_ppl)
    scored = [r for r in results if "zero_shot_avg" in r["metrics"]]
    if scored:
        limits = sorted({str(r.get("settings", {}).get("limit")) for r in scored})
        fp_zs = zero_shot(fp) if fp is not None else None
        lines += _pivot(f"Zero-shot average, % (ARC-e acc, ARC-c acc_norm, HellaSwag acc_norm, PIQA acc, WinoGrande "
                        f"acc; lm-eval, first {'/'.join(limits)} examples per task)", results, settings, head,
                        zero_shot, "–", fp_zs)
    lines += _pivot("Quantization wall time, minutes", results, settings, head,
                    lambda r: f"{r['quant_seconds'] / 60:.1f}", "–")
    return "\n".join(lines[:-1]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("neuqi.pipeline").setLevel(logging.WARNING)  # one line per linear is too much here
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.report_only:
        write_tables(out, args.model)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fp, tokenizer = models.load_model(args.model, dtype=args.dtype)
    calib, origin = data.calibration_tokens(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    common = {"calibration": {"source": origin, "windows": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
              "settings": {"windows": args.windows, "datasets": args.datasets, "dtype": args.dtype,
                           "zero_shot": args.zero_shot, "limit": args.limit}}
    model_name = args.model
    rows = [r for r in ROWS if r in args.methods.split(",")]
    plan = [("fp", "fp")] if "fp" in rows else []
    for setting in args.settings.split(","):
        bits = SETTINGS[setting][0]
        plan += [(r, setting) for r in rows if r != "fp" and not (r in DISTILL_ROWS and bits >= 4)
                 and not (r == "hqq" and SETTINGS[setting][1] is None)]
    cache: dict[str, nn.Module] = {}  # setting/row -> packed model of a row a distill row starts from
    for i, (row, setting) in enumerate(plan, 1):
        path = out / f"{Path(model_name).name}-{setting}-{row}.json"
        needed_by_distill = SETTINGS[setting][0] < 4 and any(
            not (out / f"{Path(model_name).name}-{setting}-{d}.json").exists() for d in students_of(row, rows))
        if path.exists() and not args.redo and not needed_by_distill:
            log.info("[%d/%d] %s %s: kept %s", i, len(plan), setting, row, path)
            continue
        log.info("[%d/%d] %s %s ...", i, len(plan), setting, row)
        t = time.perf_counter()
        if row == "fp":
            metrics, eval_s = _timed_eval(fp, tokenizer, args)
            fields = {"method": "fp", "label": "FP", "bits": 16, "bits_per_weight": 16.0, "metrics": metrics,
                      "eval_seconds": eval_s}
        else:
            fields = run_row(row, setting, fp, tokenizer, calib, args, cache)
        result = report.new_result(model_name, fields.pop("metrics"), **fields, **common)
        report.write_result(path, result)
        log.info("[%d/%d] %s %s: %s (%.0f s)", i, len(plan), setting, row,
                 json.dumps({k: round(v, 3) for k, v in result["metrics"].items()}), time.perf_counter() - t)
    wall = time.perf_counter() - started
    with (out / "run_info.txt").open("a") as f:  # appended: one block per run
        f.write(f"wall_seconds {wall:.1f}\nargv {' '.join(sys.argv[1:])}\n"
                f"machine {json.dumps(report.machine_info())}\n")
    write_tables(out, model_name)
    print(f"\nwall time {wall / 60:.1f} min")
    return 0


def write_tables(out: Path, model_name: str) -> None:
    """``neuqi report`` output (report.md, plot) and the pivot ``tables.md`` from every row JSON in ``out``."""
    results = report.load_results(sorted(out.glob(f"{Path(model_name).name}-*.json")))
    paths = report.write_report(results, out, title=f"neuqi comparison on {model_name}")
    tables = pivot_tables(results)
    (out / "tables.md").write_text(tables)
    print(tables)
    print(f"report in {paths['markdown']}, tables in {out / 'tables.md'}")


if __name__ == "__main__":
    sys.exit(main())
