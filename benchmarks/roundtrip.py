"""Packed checkpoint and engine exports on the demo model (SmolLM2-135M-Instruct): do they give our perplexity?

For each setting (default W3 g64 and W2 g64, NeUQI + LDLQ):
  * WikiText-2 perplexity of the in-memory fake-quantized model (what the pipeline evaluates);
  * the same model packed, saved with ``neuqi.save_quantized``, reloaded with ``neuqi.load`` and with
    ``transformers.AutoModelForCausalLM.from_pretrained``: perplexity and the safetensors size against the bound
    (bits + 32/group_size)/16 of the fp16 decoder linears + the unquantized tensors in fp16;
  * the HQQ export loaded by the ``hqq`` library: perplexity.
And at W4 g32 (the only setting GGUF Q4_1 holds): the GGUF Q4_1 export evaluated by llama.cpp (``llama-cpp-python``)
on the same windows, next to ours.

    python benchmarks/roundtrip.py                          # 8 x 2048 C4 calibration, 10 WikiText-2 windows
    python benchmarks/roundtrip.py --settings w3g64 --no-gguf --windows 40

Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuqi
from neuqi import eval as evaluate
from neuqi.eval import report
from neuqi.eval.perplexity import corpus_ids
from neuqi.formats.checkpoint import WEIGHTS_NAME, size_report
from neuqi.formats.packed import pack_model
from neuqi.pipeline import QuantConfig, data, models, quantize_model

SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64), "w4g32": (4, 32), "w3g128": (3, 128)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", default="w3g64,w2g64", help=f"comma list of {list(SETTINGS)}")
    p.add_argument("--gguf", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the W4 g32 GGUF Q4_1 export through llama.cpp")
    p.add_argument("--gguf-method", default="neuqi", choices=("neuqi", "rtn"),
                   help="W4 g32 model for the GGUF row: NeUQI + LDLQ, or Min-Max RTN (seconds, no calibration)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (any number will do)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--windows", type=int, default=10, help="WikiText-2 perplexity windows of 2048")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/roundtrip.json")
    return p.parse_args(argv)


def ppl(model: nn.Module, tokenizer, windows: int) -> float:
    return evaluate.perplexity(model, tokenizer, "wikitext2", max_windows=windows, progress=False)["ppl"]


def size_bound(model: nn.Module, bits: int, group_size: int) -> dict[str, int]:
    """Bytes allowed by the acceptance bound: (bits + 32/g)/16 of the fp16 linears + the rest in fp16."""
    report = size_report(model)
    fp16_linears = 2 * report.quantized_weights
    other_fp16 = report.other_bytes // next(p for p in model.parameters() if p.is_floating_point()).element_size() * 2
    return {"bound_bytes": int((bits + 32 / group_size) / 16 * fp16_linears + other_fp16),
            "quantized_bytes": report.quantized_bytes, "other_bytes": report.other_bytes,
            "bits_per_weight": round(report.bits_per_weight, 4)}


def llama_cpp_ppl(path: Path, ids: torch.Tensor, windows: int, threads: int) -> float:
    """GPTQ-convention perplexity computed by llama.cpp: windows of 2048 evaluated alone, every next token scored."""
    import llama_cpp
    import numpy as np

    seqlen = 2048
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=seqlen, n_batch=512, n_threads=threads,
                          verbose=False)
    total = 0.0
    try:
        for w in range(windows):
            window = ids[w * seqlen : (w + 1) * seqlen].tolist()
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.asarray(llm.scores[: seqlen - 1], dtype=np.float32))
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:])).item()
    finally:
        llm.close()
    return math.exp(total / windows)


def quantize(fp: nn.Module, calib: torch.Tensor, bits: int, group_size: int) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(fp)
    summary = quantize_model(model, calib, QuantConfig(bits=bits, group_size=group_size), progress=False)
    return model, summary


def checkpoint_row(setting: str, fp: nn.Module, tokenizer, calib: torch.Tensor, args, tmp: Path) -> dict[str, Any]:
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    from neuqi.formats.exports import export_hqq

    bits, group_size = SETTINGS[setting]
    t = time.perf_counter()
    fake, summary = quantize(fp, calib, bits, group_size)
    row: dict[str, Any] = {"setting": setting, "quant_seconds": round(time.perf_counter() - t, 1)}
    row["ppl_fake_quantized"] = ppl(fake, tokenizer, args.windows)
    packed = pack_model(copy.deepcopy(fake), summary.qparams)
    del fake
    ckpt = neuqi.save_quantized(packed, tmp / setting, tokenizer=tokenizer)
    row.update(size_bound(packed, bits, group_size))
    row["safetensors_bytes"] = (ckpt / WEIGHTS_NAME).stat().st_size
    with open(ckpt / WEIGHTS_NAME, "rb") as f:  # safetensors: u64 header length, JSON header, tensor bytes
        row["header_bytes"] = 8 + int.from_bytes(f.read(8), "little")
    row["within_bound"] = row["safetensors_bytes"] - row["header_bytes"] <= row["bound_bytes"]
    loaded = neuqi.load(ckpt, dtype=torch.bfloat16)
    row["ppl_neuqi_load"] = ppl(loaded, tokenizer, args.windows)
    del loaded
    neuqi.register_transformers()
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    row["ppl_from_pretrained"] = ppl(hf, tokenizer, args.windows)
    del hf
    export_hqq(packed, tmp / f"{setting}-hqq")
    hqq_model = AutoHQQHFModel.from_quantized(str(tmp / f"{setting}-hqq"), compute_dtype=torch.bfloat16,
                                              device="cpu")
    row["ppl_hqq_library"] = ppl(hqq_model, tokenizer, args.windows)
    row["same_4_digits"] = len({f"{row[k]:.4g}" for k in ("ppl_fake_quantized", "ppl_neuqi_load",
                                                         "ppl_from_pretrained")}) == 1
    return row


def gguf_row(fp: nn.Module, tokenizer, calib: torch.Tensor, args, tmp: Path) -> dict[str, Any]:
    from neuqi.formats.exports import export_gguf_q4_1

    threads = args.threads or torch.get_num_threads()
    t = time.perf_counter()
    if args.gguf_method == "rtn":
        model = copy.deepcopy(fp)
        summary = quantize_model(model, calib, QuantConfig(bits=4, group_size=32, solver="rtn", init="minmax"),
                                 progress=False)
    else:
        model, summary = quantize(fp, calib, 4, 32)
    quant_seconds = round(time.perf_counter() - t, 1)
    packed = pack_model(model, summary.qparams)
    row: dict[str, Any] = {"setting": "w4g32", "method": args.gguf_method, "quant_seconds": quant_seconds,
                           "ppl_ours_bf16": ppl(packed, tokenizer, args.windows)}
    row["ppl_ours_fp32"] = ppl(copy.deepcopy(packed).float(), tokenizer, args.windows)
    path = tmp / "model-q4_1.gguf"
    row["max_code_error"] = export_gguf_q4_1(packed, path, tokenizer_gguf=models.demo_gguf_path())
    row["gguf_bytes"] = path.stat().st_size
    ids = corpus_ids(tokenizer, "wikitext2")
    row["ppl_llama_cpp"] = llama_cpp_ppl(path, ids, args.windows, threads)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    fp, tokenizer = models.load_model(None, dtype="bfloat16")
    calib, origin = data.calibration_tokens("c4", tokenizer, args.nsamples, args.seqlen, seed=0)
    calibration = {"source": origin, "windows": args.nsamples, "seqlen": args.seqlen}
    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "calibration": calibration, "windows": args.windows,
                              "rows": [], "gguf": None}
    result["ppl_fp"] = ppl(fp, tokenizer, args.windows)
    with tempfile.TemporaryDirectory(prefix="neuqi-roundtrip-") as tmp:
        for setting in [s for s in args.settings.split(",") if s]:
            row = checkpoint_row(setting, fp, tokenizer, calib, args, Path(tmp))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        if args.gguf:
            result["gguf"] = gguf_row(fp, tokenizer, calib, args, Path(tmp))
            print(json.dumps(result["gguf"]), flush=True)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = report.machine_info()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nWikiText-2 PPL, first {args.windows} windows of 2048 (FP {result['ppl_fp']:.4f})")
    print("| setting | fake-quantized | neuqi.load | from_pretrained | hqq library | safetensors MB (header KB) "
          "| bound MB | bpw |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['setting']} | {r['ppl_fake_quantized']:.4f} | {r['ppl_neuqi_load']:.4f} | "
              f"{r['ppl_from_pretrained']:.4f} | {r['ppl_hqq_library']:.4f} | {r['safetensors_bytes'] / 1e6:.3f} "
              f"({r.get('header_bytes', 0) / 1e3:.0f}) | {r['bound_bytes'] / 1e6:.3f} | {r['bits_per_weight']:.3f} |")
    if result["gguf"]:
        g = result["gguf"]
        print(f"\nW4 g32 GGUF Q4_1: ours bf16 {g['ppl_ours_bf16']:.4f}, ours fp32 {g['ppl_ours_fp32']:.4f}, "
              f"llama.cpp {g['ppl_llama_cpp']:.4f} ({g['gguf_bytes'] / 1e6:.1f} MB)")
    print(f"wall time {result['wall_seconds'] / 60:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
