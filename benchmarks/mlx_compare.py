"""Side by side with mlx-lm's own quantizers on the demo model (SmolLM2-135M-Instruct), scored by our evaluator.

Rows at W{2,3,4} g64 (decoder linears only; embeddings and the tied head stay FP in every row, so every row has
the same bits per weight in the quantized linears: k + 32/64 with 16-bit scales and biases):

* ``mlx-rtn``: ``mlx_lm.convert(quantize=True, q_bits=k, q_group_size=64, dtype="bfloat16")`` (affine min-max,
  bf16 scales and biases, as its users run it), restricted to the decoder linears by ``quant_predicate``;
* ``ours``: a neuqi checkpoint (NeUQI + LDLQ, ``--ours w3=DIR,...``) written with ``export_mlx`` (fp16 scales and
  biases).
Every row's weights are read back from the MLX files the tool wrote (safetensors: uint32 codes, scales, biases),
dequantized exactly in fp32 as w = scale·q + bias, put into the FP model, and scored with
``neuqi.eval.perplexity`` (WikiText-2 and C4, the first ``--windows`` windows of 2048, forward in ``--dtype``).

* ``mlx-gptq`` (``--rows ...,gptq``): ``mlx_lm.quant.gptq.gptq_quantize`` called on our calibration windows
  (``--nsamples`` × ``--seqlen`` C4, the ids compare.py uses) instead of its downloaded text, on the FP model in fp32
  (its Hessians accumulate in the model's dtype); it supports 2, 4 and 8 bits only (no 3-bit row);
* ``mlx-awq`` (``--rows ...,awq``): ``mlx_lm.quant.awq.awq_quantize`` on the same windows. AWQ folds its scales into
  the RMSNorm weights and the previous linear, so its rows are scored with every decoder tensor it wrote (norms
  included), not only the quantized linears; it quantizes the embedding too (``embed_bits``), which we do not
  score (our FP embedding and tied head are kept in every row).

MLX's CPU backend is slow on this machine (an fp32 512 × 576 × 1536 matmul ran at 5.7 GFLOP/s, its 4-bit quantized
matmul at 2.0), so the calibrated rows take long: ``--nsamples``/``--seqlen`` say what they got. DWQ (training through
MLX) is not run. ``--reuse`` adds our rows that benchmarks/compare.py measured in memory (same evaluator, same
windows), labelled as such.

Every row made by this run is also checked against mlx-lm's own forward (``--check-windows`` WikiText-2 windows of
``--check-seqlen`` tokens, fp32 on both sides, with every tensor the MLX files hold: embedding and norms as stored):
the perplexity ``mlx_lm.load`` + forward gives, and the one our evaluator gives from our reading of the same files.
The FP model handed to mlx-lm gets its RoPE settings lifted to the top level of config.json (``mlx_rope_config``),
as mlx-lm reads them there.

Runs merge into ``--out``: a row (label, bits, calibration) measured again replaces the old one, others stay, so the
slow rows can run one at a time.

    python benchmarks/mlx_compare.py --bits 2,3,4 --rows rtn --ours w2=CKPT2,w3=CKPT3,w4=CKPT4
    python benchmarks/mlx_compare.py --bits 2,4 --rows gptq --nsamples 8 --seqlen 512
    python benchmarks/mlx_compare.py --report-only

Prints a table, writes ``--out`` (JSON) and ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuqi.eval import perplexity
from neuqi.formats.checkpoint import load
from neuqi.formats.exports import export_mlx
from neuqi.formats.exports.mlx import mlx_rope_config
from neuqi.formats.packing import unpack
from neuqi.pipeline import data, models

COMPARE_DIR = Path("benchmarks/results/compare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ours", default="", help="comma list of wK=CHECKPOINT_DIR (neuqi checkpoints to export)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help=f"add our in-memory rows from {COMPARE_DIR} (NeUQI + LDLQ, + distill)")
    p.add_argument("--model", default="smollm2", help="model to quantize (demo model by default)")
    p.add_argument("--rows", default="rtn", help="mlx-lm rows: comma list of rtn, gptq, awq")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (gptq, awq)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (gptq, awq)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default="wikitext2,c4")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--check-windows", type=int, default=2,
                   help="mlx-lm forward check per row: WikiText-2 windows (0: no check)")
    p.add_argument("--check-seqlen", type=int, default=128, help="mlx-lm forward check: window length")
    p.add_argument("--out", default="benchmarks/results/mlx_compare.json",
                   help="JSON; rows already in it are kept unless this run redoes them (same row, bits, calibration)")
    p.add_argument("--plot", default="benchmarks/results/mlx_compare.png", help="WikiText-2 perplexity per row")
    p.add_argument("--report-only", action="store_true", help="table and plot from --out, nothing run")
    return p.parse_args(argv)


def read_mlx_tensors(mlx_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in an MLX model directory's ``model*.safetensors`` shards, as stored."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(mlx_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def read_mlx_decoder_tensors(mlx_dir: Path, prefix: str = "model.layers.") -> dict[str, torch.Tensor]:
    """{parameter name: tensor fp32} of the unquantized tensors whose names start with ``prefix`` in an MLX model
    directory: by default the decoder layers' norm weights and biases (what AWQ rescaled); ``prefix=""``: all."""
    tensors = read_mlx_tensors(mlx_dir)
    quantized = {k.removesuffix(".scales") for k in tensors if k.endswith(".scales")}
    return {k: t.float() for k, t in tensors.items() if k.startswith(prefix)
            and k.rsplit(".", 1)[0] not in quantized}


def read_mlx_linears(mlx_dir: Path, prefix: str = "model.layers.") -> dict[str, torch.Tensor]:
    """{module name: w (out, in) fp32} for every affine-quantized module whose name starts with ``prefix`` in an
    MLX model directory (``prefix=""``: the embedding too), w = s·q + b computed in fp32 (s·q is exact; one
    rounding) from the stored uint32 codes, scales and biases."""
    config = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    tensors = read_mlx_tensors(mlx_dir)
    weights = {}
    for key in [k for k in tensors if k.endswith(".scales") and k.startswith(prefix)]:
        name = key.removesuffix(".scales")
        spec = config.get(name) if isinstance(config.get(name), dict) else config
        bits, group = spec["bits"], spec["group_size"]
        scales, biases = tensors[key].float(), tensors[f"{name}.biases"].float()  # (out, G)
        packed = tensors[f"{name}.weight"].contiguous().view(torch.uint8)  # the uint32 words' little-endian bytes
        in_features = scales.shape[1] * group
        q = unpack(packed, bits, in_features).float().view(scales.shape[0], -1, group)
        weights[name] = (scales.unsqueeze(-1) * q + biases.unsqueeze(-1)).view(scales.shape[0], in_features)
    return weights


def substituted(fp: nn.Module, weights: dict[str, torch.Tensor],
                others: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``fp`` with the weights of the modules in ``weights`` (linears, or the embedding) and the
    parameters ``others`` (e.g. AWQ's rescaled norms) replaced."""
    model = copy.deepcopy(fp)
    for name, w in weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | nn.Embedding) or module.weight.shape != w.shape:
            raise ValueError(f"{name}: MLX weight {tuple(w.shape)} does not fit {module}")
        with torch.no_grad():
            module.weight.copy_(w)
    params = dict(model.named_parameters())
    for name, t in (others or {}).items():
        if name not in params or params[name].shape != t.shape:
            raise ValueError(f"{name}: MLX tensor {tuple(t.shape)} has no place in the model")
        with torch.no_grad():
            params[name].copy_(t)
    return model


def score(fp: nn.Module, tokenizer, weights: dict[str, torch.Tensor], args: argparse.Namespace,
          others: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Perplexities (``--windows`` windows of 2048, ``--dtype``) of ``fp`` with ``weights`` and ``others`` in."""
    model = substituted(fp, weights, others).to(getattr(torch, args.dtype))
    return {f"{ds}_ppl": perplexity(model, tokenizer, ds, max_windows=args.windows, progress=False)["ppl"]
            for ds in args.datasets.split(",")}


def mlx_forward_check(fp: nn.Module, tokenizer, mlx_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Does mlx-lm's own forward of the files give the perplexity our evaluator gives them? Both in fp32, on the
    first ``--check-windows`` WikiText-2 windows of ``--check-seqlen`` tokens, with every tensor the files hold
    (embedding and norms as stored, quantized or rescaled, unlike the scored row, which keeps the FP embedding)."""
    import mlx_lm
    from mlx_check import mlx_perplexity, mlx_to_float32

    from neuqi.eval.perplexity import corpus_ids

    windows = corpus_ids(tokenizer, "wikitext2")[: args.check_windows * args.check_seqlen]
    windows = windows.view(args.check_windows, args.check_seqlen)
    t0 = time.perf_counter()
    mlx_model, _ = mlx_lm.load(str(mlx_dir))
    mlx_to_float32(mlx_model)
    theirs = mlx_perplexity(mlx_model, windows)
    model = substituted(fp, read_mlx_linears(mlx_dir, prefix=""), read_mlx_decoder_tensors(mlx_dir, prefix=""))
    ours = perplexity(model, tokenizer, "wikitext2", seqlen=args.check_seqlen, max_windows=args.check_windows,
                      progress=False)["ppl"]
    return {"windows": args.check_windows, "seqlen": args.check_seqlen, "ppl_mlx_lm_fp32": theirs,
            "ppl_ours_fp32": ours, "relative_difference": abs(theirs - ours) / ours,
            "same_3_significant_digits": f"{theirs:.3g}" == f"{ours:.3g}",
            "seconds": round(time.perf_counter() - t0, 1)}


def decoder_linear(path: str, module: Any) -> bool:
    import mlx.nn as mnn

    return isinstance(module, mnn.Linear) and path.startswith("model.layers.")


def mlx_rtn_row(fp_dir: Path, bits: int, args: argparse.Namespace, tmp: Path) -> Path:
    from mlx_lm import convert

    out = tmp / f"mlx-rtn-w{bits}"
    convert(str(fp_dir), str(out), quantize=True, q_bits=bits, q_group_size=args.group_size, dtype="bfloat16",
            quant_predicate=decoder_linear)
    return out


def mlx_calibrated_row(method: str, fp_dir: Path, bits: int, args: argparse.Namespace, tmp: Path,
                       calib: torch.Tensor) -> Path:
    """mlx-lm's ``method`` at W``bits`` g``group_size`` on ``calib`` (n, seqlen) token ids, saved as an mlx-lm
    model: "gptq" (the embedding gets its 8-bit fallback, not scored) or "awq" (scale search + clipping,
    n_grid 20)."""
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import save as mlx_save

    model, tokenizer, config = mlx_load(str(fp_dir), lazy=True, return_config=True)
    data = mx.array(calib.numpy().astype("int32"))
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        model, config["quantization"] = gptq_quantize(model, data, bits, args.group_size, 8, args.group_size,
                                                      batch_size=1)
    elif method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], group_size=args.group_size, bits=bits,
                     embed_group_size=args.group_size, embed_bits=8)
        config = update_config(model, config)
    else:
        raise ValueError(f"unknown mlx-lm method {method!r}")
    out = tmp / f"mlx-{method}-w{bits}"
    mlx_save(str(out), str(fp_dir), model, tokenizer, config)
    return out


def calibration_label(windows: Any, seqlen: Any, source: Any, seed: Any) -> str:
    """How a row was calibrated, as every row of the table spells it: ``N x L SOURCE (seed S)``."""
    return f"{windows} x {seqlen} {source} (seed {seed})"


def reused_rows(bits: int, group: int) -> list[dict[str, Any]]:
    rows = []
    for method, label in (("neuqi", "ours: NeUQI + LDLQ (compare.py, in memory)"),
                          ("distill", "ours: NeUQI + LDLQ + distill (compare.py, in memory)")):
        f = COMPARE_DIR / f"smollm2-w{bits}g{group}-{method}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            cal = d.get("calibration", {})
            rows.append({"row": label, "bits": bits, "group_size": group, "source": str(f),
                         "calibration": calibration_label(cal.get("windows"), cal.get("seqlen"), cal.get("source"),
                                                          cal.get("seed")) if method == "neuqi" else
                                        "NeUQI row's calibration; distilled on 64 x 512 C4",
                         "metrics": d["metrics"], "bits_per_weight": d["bits_per_weight"]})
    return rows


def linear_formats(mlx_dir: Path) -> set[tuple[int, int]]:
    """{(bits, group_size)} of the quantized decoder linears in an MLX model directory."""
    quant = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    specs = {k: v for k, v in quant.items() if isinstance(v, dict) and k.startswith("model.layers.")}
    return {(v["bits"], v["group_size"]) for v in specs.values()} or {(quant["bits"], quant["group_size"])}


ROW_LABELS = {"rtn": "mlx-lm RTN (convert -q)", "gptq": "mlx-lm GPTQ (gptq_quantize)",
              "awq": "mlx-lm AWQ (awq_quantize)"}
OURS_LABEL = "ours: NeUQI + LDLQ (export_mlx, fp16 scales/biases)"


def ours_calibration(checkpoint: Path) -> str | None:
    """The calibration a neuqi checkpoint records in its ``neuqi_summary.json``, as ``N x L SOURCE``."""
    summary = checkpoint / "neuqi_summary.json"
    if not summary.is_file():
        return None
    cal = json.loads(summary.read_text()).get("calibration", {})
    return calibration_label(cal.get("windows"), cal.get("seqlen"), cal.get("origin"), cal.get("seed"))


def make_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Quantize, read back and score the rows this run asks for."""
    fp, tokenizer = models.load_model(args.model, dtype="float32")
    ours = dict(item.split("=", 1) for item in args.ours.split(",") if item)
    kinds = [r for r in args.rows.split(",") if r]
    calib = None
    if {"gptq", "awq"} & set(kinds):
        calib, origin = data.calibration_tokens("c4", tokenizer, args.nsamples, args.seqlen, args.seed)
        print(f"calibration: {tuple(calib.shape)} from {origin}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp_dir = tmp / "fp"
        fp.save_pretrained(fp_dir)
        tokenizer.save_pretrained(fp_dir)
        # mlx-lm reads rope_theta at the top level; transformers >= 5 nests it (without this, their rows would be
        # calibrated and run with θ = 10000 instead of SmolLM2's 100000)
        config = json.loads((fp_dir / "config.json").read_text())
        (fp_dir / "config.json").write_text(json.dumps(mlx_rope_config(config), indent=2))
        for bits in (int(b) for b in args.bits.split(",")):
            todo: dict[str, Any] = {ROW_LABELS[k]: k for k in kinds if not (k == "gptq" and bits not in (2, 4, 8))}
            if f"w{bits}" in ours:
                todo[OURS_LABEL] = Path(ours[f"w{bits}"])
            for label, what in todo.items():
                t0 = time.perf_counter()
                if isinstance(what, Path):
                    mlx_dir = tmp / f"ours-w{bits}"
                    export_mlx(load(what), mlx_dir, tokenizer, scale_dtype="float16")
                    calibration = ours_calibration(what)
                elif what == "rtn":
                    mlx_dir, calibration = mlx_rtn_row(fp_dir, bits, args, tmp), None
                else:
                    mlx_dir = mlx_calibrated_row(what, fp_dir, bits, args, tmp, calib)
                    calibration = calibration_label(args.nsamples, args.seqlen, "C4", args.seed)
                made_s = time.perf_counter() - t0
                if linear_formats(mlx_dir) != {(bits, args.group_size)}:
                    raise ValueError(f"{label}: {mlx_dir} holds {linear_formats(mlx_dir)}, not W{bits} "
                                     f"g{args.group_size}")
                weights = read_mlx_linears(mlx_dir)
                others = read_mlx_decoder_tensors(mlx_dir) if what == "awq" else None
                metrics = score(fp, tokenizer, weights, args, others)
                n = sum(w.numel() for w in weights.values())
                row = {"row": label, "bits": bits, "group_size": args.group_size, "linears": len(weights),
                       "bits_per_weight": bits + 32 / args.group_size, "quantized_weights": n,
                       "calibration": calibration, "metrics": metrics, "quantize_s": round(made_s, 1),
                       "seconds": round(time.perf_counter() - t0, 1)}
                if args.check_windows:
                    row["mlx_lm_forward_check"] = mlx_forward_check(fp, tokenizer, mlx_dir, args)
                rows.append(row)
                print(row, flush=True)
            if args.reuse:
                rows += reused_rows(bits, args.group_size)
    return rows


def row_label(row: dict[str, Any]) -> str:
    return row["row"] if not row.get("calibration") else f"{row['row']}; {row['calibration']}"


def report(out: dict[str, Any], plot: str | None) -> None:
    """Print the table (WikiText-2 / C4 per row and bit width) and draw WikiText-2 perplexity against bits."""
    rows, names = out["rows"], [f"{ds}_ppl" for ds in out["conditions"]["datasets"].split(",")]
    bits = sorted({r["bits"] for r in rows})
    order = ("mlx-lm RTN", "mlx-lm GPTQ", "mlx-lm AWQ", "ours: NeUQI + LDLQ (export", "ours: NeUQI + LDLQ (compare",
             "ours: NeUQI + LDLQ + distill")
    labels = sorted(dict.fromkeys(map(row_label, rows)),
                    key=lambda lb: (next((i for i, o in enumerate(order) if lb.startswith(o)), len(order)), lb))
    fp_row = COMPARE_DIR / "smollm2-fp-fp.json"  # same evaluator and windows (compare.py)
    fp_metrics = json.loads(fp_row.read_text())["metrics"] if fp_row.is_file() else None
    cell = {}
    for r in rows:
        cell[row_label(r), r["bits"]] = " / ".join(f"{r['metrics'][n]:,.2f}" for n in names)
    g = out["conditions"]["group_size"]
    print("\n| row | " + " | ".join(f"W{b} g{g} ({b + 32 / g:.2f} bpw)" for b in bits) + " |")
    print("|---|" + "---:|" * len(bits))
    if fp_metrics:
        fp_cell = " / ".join(f"{fp_metrics[n]:,.2f}" for n in names)
        print("| FP (bf16, 16 bpw) | " + " | ".join(fp_cell for _ in bits) + " |")
    for label in labels:
        print(f"| {label} | " + " | ".join(cell.get((label, b), "–") for b in bits) + " |")
    checks = [r for r in rows if "mlx_lm_forward_check" in r]
    if checks:
        print("\nmlx-lm forward check (fp32, every tensor of the files):")
        for r in checks:
            c = r["mlx_lm_forward_check"]
            print(f"  W{r['bits']} {r['row']}: mlx-lm {c['ppl_mlx_lm_fp32']:.4f}, ours {c['ppl_ours_fp32']:.4f} "
                  f"(rel. {c['relative_difference']:.1e}, {c['windows']} x {c['seqlen']})")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in labels:
            mine = [r for r in rows if row_label(r) == label]
            ax.plot([r["bits"] + 32 / g for r in mine], [r["metrics"][names[0]] for r in mine], marker="o",
                    label=label)
        if fp_metrics:
            fp_ppl = fp_metrics[names[0]]
            ax.axhline(fp_ppl, color="black", linestyle="--", linewidth=1, label=f"FP (bf16) {fp_ppl:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight in the quantized linears")
        ax.set_ylabel(f"{names[0].removesuffix('_ppl')} perplexity (log)")
        ax.set_title(f"SmolLM2-135M-Instruct, group {g}: mlx-lm quantizers and ours")
        ax.legend(fontsize=6.5, loc="upper right")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.out)
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    conditions = {"windows": args.windows, "seqlen": 2048, "dtype": args.dtype, "datasets": args.datasets,
                  "group_size": args.group_size}
    if args.report_only:
        report(old, args.plot)
        return 0
    if old["rows"] and old.get("conditions") != conditions:
        raise SystemExit(f"{path} was measured under {old.get('conditions')}, not {conditions}: use another --out")
    new = make_rows(args)
    redone = {(r["row"], r["bits"], r.get("calibration")) for r in new}
    rows = [r for r in old["rows"] if (r["row"], r["bits"], r.get("calibration")) not in redone] + new
    rows.sort(key=lambda r: (r["bits"], r["row"]))
    out = {"conditions": conditions, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    report(out, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
