"""Does mlx-lm run our MLX export of a real checkpoint as we do? Perplexity on a few short windows and a generation.

For a neuqi checkpoint (e.g. SmolLM2 W3 g64 from ``neuqi quantize``): export it with ``export_mlx`` (``--scale-dtype``),
load it with ``mlx_lm.load``, and compare
  * the weights: max |mx.dequantize(...) − ŵ| in quantization steps s, over every quantized linear (with fp16
    scales this includes mx.dequantize's own fp16 output rounding), and the rounding of the stored bias −s·Z alone
    (all that mlx-lm's quantized matmul sees with fp32 activations);
  * WikiText-2 perplexity on the first ``--windows`` windows of ``--seqlen`` tokens: mlx-lm's forward against ours
    (``neuqi.eval.perplexity``, same windows, same GPTQ convention), both in fp32, and both in the dtype the
    checkpoint stores its unquantized tensors in (bf16 from ``neuqi quantize``; MLX computes in that dtype);
  * ``mlx_lm.generate`` on a short chat prompt: the text it produces.
MLX's CPU backend is slow on this machine: keep windows short.

    OMP_NUM_THREADS=1 python benchmarks/mlx_check.py CHECKPOINT --windows 3 --seqlen 256

Prints the numbers and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuqi.eval import perplexity
from neuqi.eval.perplexity import corpus_ids
from neuqi.formats.checkpoint import load, load_tokenizer
from neuqi.formats.exports import export_mlx
from neuqi.formats.packed import quantized_linears, set_kernel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--scale-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results/mlx_check.json")
    return p.parse_args(argv)


def weight_steps(model: torch.nn.Module, mlx_model: Any) -> float:
    """max over layers of max |MLX's dequantized weight − ŵ| / s (quantization steps)."""
    import mlx.core as mx

    modules = dict(mlx_model.named_modules())
    worst = 0.0
    for name, layer in quantized_linears(model):
        m = modules[name]
        w = np.array(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32))
        s = layer.scales.float().repeat_interleave(layer.group_size, 1).numpy()
        worst = max(worst, float((np.abs(w - layer.dequantized_weight().detach().numpy()) / s).max()))
    return worst


def bias_steps(model: torch.nn.Module, dtype: torch.dtype) -> float:
    """max over layers of |dtype(−s·Z) − (−s·Z)| / s: what storing the bias in ``dtype`` costs, in steps."""
    worst = 0.0
    for _, layer in quantized_linears(model):
        s = layer.scales.float()
        bias = -(s * layer.zeros.float())  # exact in fp32
        worst = max(worst, float(((bias.to(dtype).float() - bias).abs() / s).max()))
    return worst


def mlx_perplexity(mlx_model: Any, windows: torch.Tensor) -> float:
    """GPTQ-convention perplexity of the MLX model: exp(mean over windows of the mean next-token NLL)."""
    import mlx.core as mx

    nlls = []
    for ids in windows:
        logits = torch.from_numpy(np.array(mlx_model(mx.array(ids[None].numpy())).astype(mx.float32)))[0]
        nlls.append(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())
    return math.exp(float(np.mean(nlls)))


def mlx_to_float32(mlx_model: Any) -> None:
    """Cast the MLX model's unquantized float tensors to fp32 (scales and biases keep their stored dtype)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    def cast(path: str, v: Any) -> Any:
        keep = path.endswith(("scales", "biases")) or not mx.issubdtype(v.dtype, mx.floating)
        return v if keep else v.astype(mx.float32)

    mlx_model.update(tree_map_with_path(cast, mlx_model.parameters()))


def our_perplexity(checkpoint: Path, tokenizer: Any, dtype: torch.dtype | None, args: argparse.Namespace) -> float:
    """Our perplexity, computed through the exact dequantize-then-matmul path (``dequant``) in ``dtype``."""
    model = load(checkpoint, dtype=dtype)
    set_kernel(model, "dequant")  # short windows would otherwise take the int4 kernel in bf16
    return perplexity(model, tokenizer, "wikitext2", seqlen=args.seqlen, max_windows=args.windows,
                      progress=False)["ppl"]


def main(argv: list[str] | None = None) -> int:
    import mlx_lm

    args = parse_args(argv)
    model, tokenizer = load(args.checkpoint), load_tokenizer(args.checkpoint)
    stored = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "scale_dtype": args.scale_dtype,
                              "stored_dtype": stored, "windows": args.windows, "seqlen": args.seqlen}
    result["ppl_ours_fp32"] = our_perplexity(args.checkpoint, tokenizer, torch.float32, args)
    result["ppl_ours_stored"] = our_perplexity(args.checkpoint, tokenizer, None, args)
    print(f"ours: ppl {result['ppl_ours_fp32']:.4f} (fp32), {result['ppl_ours_stored']:.4f} ({stored})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mlx"
        export_mlx(model, out, tokenizer, scale_dtype=args.scale_dtype)
        result["export_mib"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)
        mlx_model, mlx_tok = mlx_lm.load(str(out))
        result["max_weight_error_steps"] = weight_steps(model, mlx_model)
        result["max_bias_rounding_steps"] = bias_steps(model, getattr(torch, args.scale_dtype))
        print(f"max |Δw| of mx.dequantize = {result['max_weight_error_steps']:.2e} quantization steps "
              f"(bias rounding alone: {result['max_bias_rounding_steps']:.2e})", flush=True)
        windows = corpus_ids(tokenizer, "wikitext2")[: args.windows * args.seqlen].view(args.windows, args.seqlen)
        t0 = time.perf_counter()
        result["ppl_mlx_stored"] = mlx_perplexity(mlx_model, windows)
        prompt = mlx_tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        result["generated"] = mlx_lm.generate(mlx_model, mlx_tok, prompt, max_tokens=args.max_tokens)
        mlx_to_float32(mlx_model)
        result["ppl_mlx_fp32"] = mlx_perplexity(mlx_model, windows)
        result["seconds_mlx"] = round(time.perf_counter() - t0, 1)
        print(f"mlx-lm: ppl {result['ppl_mlx_fp32']:.4f} (fp32), {result['ppl_mlx_stored']:.4f} ({stored}); "
              f"{result['seconds_mlx']} s", flush=True)
        print(f"mlx_lm.generate: {result['generated']!r}", flush=True)
    for kind in ("fp32", "stored"):
        ours, theirs = result[f"ppl_ours_{kind}"], result[f"ppl_mlx_{kind}"]
        result[f"relative_difference_{kind}"] = abs(theirs - ours) / ours
        result[f"same_3_significant_digits_{kind}"] = f"{theirs:.3g}" == f"{ours:.3g}"
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
