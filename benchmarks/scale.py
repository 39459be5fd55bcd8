"""Scale benchmarks of streaming quantization (``neuqi quantize --stream``): memory against depth, real layer shapes,
a model bigger than memory, and 2 processes against 1.

    python benchmarks/scale.py depth        # hidden 1024, 8/16/32 layers: peak RSS and wall time (must be flat)
    python benchmarks/scale.py layer8b      # one Llama-3-8B layer, NeUQI + LDLQ W3 g128; extrapolated to 32 layers
    python benchmarks/scale.py big          # Llama-2-13B shapes, 40 layers bf16 (26 GB), GPTQ + Min-Max W4 g128
    python benchmarks/scale.py big --layers 1   # its per-layer cost only
    python benchmarks/scale.py dist         # SmolLM2 W3 g64 NeUQI + LDLQ, torchrun 2 processes against 1

Checkpoints are random (``normal(0, 0.02)`` weights, unit norms) and written shard by shard, so making them needs
little memory; calibration tokens are random ids. Each quantization runs in a fresh process (``run``), whose peak
RSS (``ru_maxrss``) is the number reported. Results are merged into ``benchmarks/results/scale.json`` by key.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "scale.json"
WORK = Path(os.environ.get("NEUQI_SCALE_DIR", "/tmp/neuqi-scale"))
SHAPES = {  # hidden, intermediate, heads, kv heads, vocab
    "h1024": (1024, 2816, 16, 4, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 128256),
    "llama2-13b": (5120, 13824, 40, 40, 32000),
}


def make_checkpoint(path: Path, shape: str, layers: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """A random Llama checkpoint at ``path`` (one safetensors shard per layer + index); returns its size in GB."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from neuqi.formats.checkpoint import _parameters_on_meta

    hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, num_hidden_layers=layers,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype=dtype)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in model.state_dict().items():
        key = f"layer{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "other"
        groups.setdefault(key, []).append((name, p.shape))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for key, names in groups.items():
        tensors = {n: (torch.ones(s, dtype=dtype) if len(s) == 1 else
                       torch.randn(s, generator=gen).mul_(0.02).to(dtype)) for n, s in names}
        save_file(tensors, path / f"{key}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f"{key}.safetensors"))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total / 1e9


def run(args: argparse.Namespace) -> None:
    """Quantize one checkpoint streaming (in this fresh process); print a JSON line of what it cost."""
    from neuqi.pipeline import QuantConfig
    from neuqi.pipeline.stream import StreamConfig, quantize_checkpoint

    config = QuantConfig(**json.loads(args.config))
    tokens = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = quantize_checkpoint(args.ckpt, tokens, config, args.out, StreamConfig(stream=True), dtype="bfloat16",
                                 device=args.device, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    row = {"wall_s": round(wall, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                                          3),
           "layers_s": result.timings["layers_s"], "capture_s": result.timings["capture_s"],
           "linears_s": round(sum(r.seconds for r in result.records), 1),
           "out_gb": round(sum(f.stat().st_size for f in Path(args.out).iterdir()) / 1e9, 3)}
    if args.load:
        import neuqi

        t1 = time.perf_counter()
        model = neuqi.load(args.out)
        row["load_s"] = round(time.perf_counter() - t1, 1)
        row["loaded_quant_linears"] = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
    print("RESULT " + json.dumps(row), flush=True)


def measure(ckpt: Path, out: Path, config: dict[str, Any], nsamples: int, seqlen: int, load: bool = False,
            threads: int = 2, device: str = "cpu") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "run", "--ckpt", str(ckpt), "--out", str(out), "--config", json.dumps(config),
           "--device", device,
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), *(["--load"] if load else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def save(key: str, value: Any) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


GPTQ_MINMAX = {"bits": 4, "group_size": 128, "solver": "gptq", "init": "minmax", "batch_size": 1}
RTN_MINMAX = {"bits": 4, "group_size": 128, "solver": "rtn", "init": "minmax", "batch_size": 1}  # no calibration
NEUQI_LDLQ = {"bits": 3, "group_size": 128, "solver": "ldlq", "init": "neuqi", "batch_size": 1}


def depth(args: argparse.Namespace) -> None:
    config, method = (RTN_MINMAX, "RTN + Min-Max W4 g128 (no calibration)") if args.rtn else (
        GPTQ_MINMAX, "GPTQ + Min-Max W4 g128")
    rows = []
    for layers in (8, 16, 32):
        ckpt = WORK / f"h1024-{layers}"
        gb = make_checkpoint(ckpt, "h1024", layers)
        row = {"layers": layers, "checkpoint_gb": round(gb, 3),
               **measure(ckpt, WORK / "out", config, args.nsamples, args.seqlen)}
        row["per_layer_s"] = round(sum(row["layers_s"]) / layers, 2)
        del row["layers_s"]
        rows.append(row)
        print(row, flush=True)
        shutil.rmtree(ckpt)
    save("depth_rtn" if args.rtn else "depth", {
                   "method": method, "calibration": random_calibration(args),
                   "shape": "hidden 1024, intermediate 2816, 16 heads, 4 kv heads, vocab 32000, bf16",
                   "machine": machine(), "rows": rows})


def random_calibration(args: argparse.Namespace) -> str:
    """The calibration these synthetic runs use, as the result JSONs spell it."""
    return f"{args.nsamples} x {args.seqlen} random ids"


def layer8b(args: argparse.Namespace) -> None:
    """One layer: the per-linear parameter search + solver (``linears_s``, independent of the calibration size)
    and the rest (forwards and Hessians, linear in the calibration tokens), extrapolated to 32 layers."""
    ckpt = WORK / "llama3-8b-1"
    make_checkpoint(ckpt, "llama3-8b", 1)
    try:
        row = measure(ckpt, WORK / "out8b", NEUQI_LDLQ, args.nsamples, args.seqlen, threads=args.threads,
                      device=args.device)
    finally:
        shutil.rmtree(ckpt)
        shutil.rmtree(WORK / "out8b", ignore_errors=True)
    layer_s, fixed = row["layers_s"][0], row["linears_s"]
    per_token = (layer_s - fixed) / (args.nsamples * args.seqlen)
    save(f"layer8b_{args.device.split(':')[0]}", {
                     "method": "NeUQI + LDLQ W3 g128", "shape": "Llama-3-8B layer (4096, 14336, 32/8 heads), bf16",
                     "calibration": random_calibration(args), "layer_s": layer_s,
                     "linears_s": fixed, "forward_hessian_s_per_1k_tokens": round(1000 * per_token, 2),
                     "peak_rss_gib": row["peak_rss_gib"],
                     "extrapolated_32_layers_h": {
                         f"{args.nsamples}x{args.seqlen}": round(32 * layer_s / 3600, 2),
                         "128x2048": round(32 * (fixed + per_token * 128 * 2048) / 3600, 2)},
                     "device": args.device, "machine": machine()})
    print(row)


def big(args: argparse.Namespace) -> None:
    ckpt = WORK / f"llama2-13b-{args.layers}"
    t0 = time.perf_counter()
    gb = make_checkpoint(ckpt, "llama2-13b", args.layers)
    make_s = time.perf_counter() - t0
    try:
        row = measure(ckpt, WORK / "out13b", GPTQ_MINMAX, args.nsamples, args.seqlen, load=True)
    finally:
        shutil.rmtree(ckpt)
        shutil.rmtree(WORK / "out13b", ignore_errors=True)
    row.update(layers=args.layers, checkpoint_gb=round(gb, 2), make_checkpoint_s=round(make_s, 1),
               per_layer_s=round(sum(row["layers_s"]) / args.layers, 1))
    save(f"big_{args.layers}_layers", {"method": "GPTQ + Min-Max W4 g128", "calibration":
                                       random_calibration(args), "shape": "Llama-2-13B, bf16",
                                       "machine": machine(), **row})
    print(row)


def dist(args: argparse.Namespace) -> None:
    """`neuqi quantize --stream` on SmolLM2 (demo settings) with 1 process (2 threads) and torchrun 2 x 1 thread."""
    common = ["quantize", "--stream", "--quiet", "--overwrite", "--device", "cpu"]
    rows = {}
    for n in (1, 2):
        out = WORK / f"smollm2-{n}"
        launcher = [sys.executable, "-m", "neuqi.cli"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "neuqi.cli"]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // n), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([*launcher, *common, "--out", str(out)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        rows[n] = {"wall_s": round(time.perf_counter() - t0, 1), "threads_per_process": 2 // n,
                   "summary": json.loads((out / "neuqi_summary.json").read_text())["timings"]}
        print(n, rows[n]["wall_s"], flush=True)
    same = all((WORK / "smollm2-1" / f).read_bytes() == (WORK / "smollm2-2" / f).read_bytes()
               for f in ("model.safetensors", "config.json"))
    save("dist", {"model": "SmolLM2-135M-Instruct", "method": "NeUQI + LDLQ W3 g64, 16 x 512 C4 (demo)",
                  "rows": rows, "speedup": round(rows[1]["wall_s"] / rows[2]["wall_s"], 2),
                  "identical_checkpoint": same, "machine": machine()})


def table(_args: argparse.Namespace) -> None:
    """Print the measured results of ``scale.json`` as Markdown."""
    data = json.loads(RESULTS.read_text())
    for d in (data[k] for k in ("depth", "depth_rtn") if k in data):
        print(f"Depth sweep ({d['shape']}; {d['method']}, {d['calibration']}):\n")
        print("| layers | checkpoint GB | peak RSS GiB | wall s | s / layer |\n|---|---|---|---|---|")
        for r in d["rows"]:
            cells = [r[k] for k in ("layers", "checkpoint_gb", "peak_rss_gib", "wall_s", "per_layer_s")]
            print("| " + " | ".join(map(str, cells)) + " |")
    for key in sorted(k for k in data if k.startswith(("layer8b", "big_"))):
        print(f"\n{key}: " + json.dumps({k: v for k, v in data[key].items() if k != "layers_s"}))
    if "dist" in data:
        d = data["dist"]
        print(f"\n2 processes vs 1 ({d['model']}, {d['method']}): " + ", ".join(
            f"{n} process(es) {r['wall_s']} s" for n, r in d["rows"].items())
              + f"; speedup {d['speedup']}x; identical checkpoint: {d['identical_checkpoint']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("depth", "layer8b", "big", "dist", "run", "table"))
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--layers", type=int, default=40, help="big: layers of the 13B-shaped checkpoint")
    p.add_argument("--device", default="cpu", help="where layers are computed (layer8b, run)")
    p.add_argument("--rtn", action="store_true", help="depth: RTN + Min-Max (no calibration): the I/O path alone")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the measured process")
    p.add_argument("--ckpt"), p.add_argument("--out"), p.add_argument("--config"), p.add_argument("--load",
                                                                                                  action="store_true")
    args = p.parse_args()
    {"depth": depth, "layer8b": layer8b, "big": big, "dist": dist, "run": run, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
