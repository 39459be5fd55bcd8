"""AutoRound (Intel's sign-gradient rounding and clipping tuning) on a local FP model, in its own virtual
environment; our harness scores it.

Run by ``benchmarks/compare.py`` (row ``autoround``) with the peer environment's Python:

    PEER/bin/python benchmarks/peers/autoround.py FP_DIR CALIB.pt OUT_DIR --bits 2 --group-size 64

FP_DIR: a transformers checkpoint (saved by the harness); CALIB.pt: the harness's calibration token ids (n, seqlen).
The recipe is AutoRound's documented light one (``iters=50``, ``lr=5e-3``; the default is 200 iterations, about 4x
the time: some 1.5 h per SmolLM2 row on one thread here, where the light one took 23-24 min): asymmetric integer
zero-points (``sym=False``) at our bits and group size, every decoder linear, ``lm_head`` left alone. The tokens are
exactly the harness's calibration tokens, cut into windows of ``--window`` (default 512, so 32 x 2048 becomes 128 x
512; AutoRound tunes each block on mini-batches of 8 windows, and 2048-token windows would cost 4x per step).
OUT_DIR gets what ``contract`` says, with every quantized linear's weight as AutoRound leaves it in the model after
tuning: its own fake-quantized ``scale·(q − zero_point)``. This file imports only the peer's packages, never neuqi.
"""

from __future__ import annotations

import time

import contract
import torch


def main() -> int:
    p = contract.parser(__doc__)
    p.add_argument("--iters", type=int, default=50, help="tuning steps per block (light recipe: 50, default: 200)")
    p.add_argument("--lr", type=float, default=5e-3, help="sign-gradient step (light recipe: 5e-3)")
    p.add_argument("--window", type=int, default=512, help="calibration window length handed to AutoRound")
    args = p.parse_args()

    import auto_round
    import transformers
    from auto_round import AutoRound

    ids = torch.load(args.calib)  # (n, seqlen) int64
    if ids.shape[1] % args.window:
        raise SystemExit(f"calibration length {ids.shape[1]} is not a multiple of --window {args.window}")
    windows = ids.reshape(-1, args.window)  # the same tokens, shorter windows
    model = transformers.AutoModelForCausalLM.from_pretrained(args.fp_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.fp_dir)
    dataset = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    recipe = {"bits": args.bits, "group_size": args.group_size, "sym": False, "iters": args.iters, "lr": args.lr,
              "nsamples": windows.shape[0], "seqlen": args.window, "batch_size": 8, "seed": 42}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, dataset=dataset, device_map="cpu", **recipe)
    rounder.quantize()
    seconds = time.perf_counter() - start
    out: dict[str, torch.Tensor] = {}
    for name in linears:
        module = model.get_submodule(name)
        if getattr(module, "scale", None) is None:
            raise SystemExit(f"AutoRound left {name} unquantized")
        out[name] = module.weight.data.float().contiguous()
    info = {"tool": "AutoRound (light recipe)", "auto_round": auto_round.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "recipe": recipe,
            "linears": len(out), "calibration": list(ids.shape), "windows": list(windows.shape),
            "seconds": round(seconds, 1)}
    contract.write(args.out, out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
