"""Decode and prefill speed of the packed demo model (SmolLM2-135M-Instruct) in transformers, per forward path.

Rows: the FP model (bf16 nn.Linear) and the packed model at W4/W3/W2 g64 through each QuantLinear path
(neuqi.formats.kernels): ``auto`` (the default: torch's int4 kernel for decode, exact dequantize-then-matmul for
prefill), ``dequant`` (always the exact cache-free fast dequantize), ``reference`` (the pre-kernel path: unpack and
dequantize the whole weight in fp32 every call) and ``cache`` (a dense bf16 copy of every weight, kept for
comparison; it is not a default because it gives back the memory the packing saves).

    OMP_NUM_THREADS=1 python benchmarks/decode.py                    # bf16, one thread
    OMP_NUM_THREADS=1 python benchmarks/decode.py --bits 3 --paths auto,dequant --tokens 16

Decode: batch 1, greedy, KV cache on, ``--tokens`` new tokens after an 8-token prompt, tokens/s = new tokens / wall
time (median of ``--repeats`` runs after one warm-up; the slow reference and dequant paths: ``--slow-tokens``, one run
after a warm-up). Prefill: one forward of ``--prefill`` tokens (median).
Memory: bytes of the model's parameters and buffers (what is saved) plus what a path builds at run time
(int4 layouts, dense caches). The codes come from min-max RTN (no calibration): speed does not depend on them.
Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuqi.formats import packed
from neuqi.pipeline import models
from neuqi.quant import grid
from neuqi.quant.grid import QParams
from neuqi.quant.init import init_params

PATHS = ("auto", "dequant", "reference", "cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="4,3,2", help="comma list of bit widths (group size --group-size)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--paths", default="auto,dequant,reference,cache", help=f"comma list of {PATHS}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    p.add_argument("--slow-tokens", type=int, default=4,
                   help="new tokens per run (one run after a warm-up) for the slow reference and dequant paths")
    p.add_argument("--prefill", type=int, default=512, help="prefill length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/decode.json")
    return p.parse_args(argv)


def rtn_pack(fp: nn.Module, bits: int, group_size: int) -> nn.Module:
    """A packed copy of ``fp`` (fp32) with every decoder linear min-max RTN-quantized."""
    model = copy.deepcopy(fp)
    qparams = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            s, z = grid.to_storage(*init_params(m.weight, bits, group_size, method="minmax"))
            with torch.no_grad():
                m.weight.copy_(grid.fake_quantize(m.weight, s, z, bits, group_size))
            qparams[name] = QParams(s, z, bits, group_size)
    return packed.pack_model(model, qparams)


def model_bytes(model: nn.Module) -> int:
    """Parameters + buffers (each shared tensor once) + run-time layouts/caches of the QuantLinears."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total + packed.runtime_bytes(model)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the decoder linears only: dense weights, or packed buffers + run-time layouts/caches."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, packed.QuantLinear):
            total += m.qweight.nbytes + m.scales.nbytes + m.zeros.nbytes + m.runtime_bytes()
        elif isinstance(m, nn.Linear) and name != "lm_head":
            total += m.weight.nbytes
    return total


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (also builds any int4 layout)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: nn.Module, tokens: int, prefill: int, repeats: int) -> dict[str, Any]:
    prompt = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4451]])  # any 8 ids
    ctx = torch.randint(100, 40000, (1, prefill), generator=torch.Generator().manual_seed(0))

    def decode() -> None:
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                       pad_token_id=0)

    def forward() -> None:
        model(ctx, use_cache=False)

    with torch.inference_mode():
        t_dec = _median_seconds(decode, repeats)
        t_pre = _median_seconds(forward, max(1, repeats - 1))
    return {"decode_tok_s": tokens / t_dec, "decode_tokens": tokens, "prefill_s": t_pre,
            "prefill_tok_s": prefill / t_pre, "memory_mib": model_bytes(model) / 2**20,
            "linears_mib": linear_bytes(model) / 2**20}


def run_path(model: nn.Module, path: str) -> None:
    packed.set_weight_cache(model, path == "cache")
    packed.set_kernel(model, "reference" if path == "cache" else path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fp, _ = models.load_model("smollm2", dtype="float32")
    rows: list[dict[str, Any]] = []
    fp_run = copy.deepcopy(fp).to(dtype)
    rows.append({"model": "FP", "path": "dense", **measure(fp_run, args.tokens, args.prefill, args.repeats)})
    print(rows[-1], flush=True)
    del fp_run
    for bits in (int(b) for b in args.bits.split(",")):
        model = rtn_pack(fp, bits, args.group_size).to(dtype)
        for path in args.paths.split(","):
            run_path(model, path)
            slow = path in ("reference", "dequant")
            tokens, repeats = (args.slow_tokens, 1) if slow else (args.tokens, args.repeats)
            row = {"model": f"W{bits} g{args.group_size}", "path": path,
                   **measure(model, tokens, args.prefill, repeats)}
            rows.append(row)
            print(row, flush=True)
        del model
    fp_tok_s = rows[0]["decode_tok_s"]
    print(f"\n{'model':<10} {'path':<10} {'decode tok/s':>12} {'vs FP':>6} {'prefill s':>10} {'memory MiB':>11} "
          f"{'linears MiB':>12}")
    for r in rows:
        print(f"{r['model']:<10} {r['path']:<10} {r['decode_tok_s']:>12.2f} {r['decode_tok_s'] / fp_tok_s:>6.2f} "
              f"{r['prefill_s']:>10.2f} {r['memory_mib']:>11.1f} {r['linears_mib']:>12.1f}")
    out = {"conditions": {"dtype": args.dtype, "threads": args.threads, "prefill": args.prefill,
                          "group_size": args.group_size, "repeats": args.repeats, "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
