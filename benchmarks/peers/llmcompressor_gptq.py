"""llm-compressor's GPTQ on a local FP model, in llm-compressor's own virtual environment; our harness scores it.

Run by ``benchmarks/compare.py`` (row ``llmc_gptq``) with the peer environment's Python:

    PEER/bin/python benchmarks/peers/llmcompressor_gptq.py FP_DIR CALIB.pt OUT_DIR --bits 3 --group-size 64

FP_DIR: a transformers checkpoint (saved by the harness); CALIB.pt: the harness's calibration token ids (n, seqlen),
the same windows every row uses. The recipe is the one llm-compressor documents for weight-only GPTQ, written out
as a config group so that bits and group size are ours: int weights, asymmetric (integer zero-point), strategy
"group", every ``Linear`` but ``lm_head``; everything else (dampening, block size, activation ordering, pipeline)
stays at the library's defaults. OUT_DIR gets ``weights.safetensors`` (each quantized linear's weight as the
library dequantizes it, fp32: scale·(q − zero_point)) and ``peer.json`` (versions, recipe, seconds).
This file imports only the peer's packages, never neuqi.
"""

from __future__ import annotations

import time

import contract
import torch


def main() -> int:
    p = contract.parser(__doc__)
    args = p.parse_args()

    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ids = torch.load(args.calib)  # (n, seqlen) int64
    model = transformers.AutoModelForCausalLM.from_pretrained(args.fp_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.fp_dir)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - start
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        w = fake_quantize(module.weight.data.float(), module.weight_scale.float(), module.weight_zero_point,
                          scheme.weights)
        out[name] = w.contiguous()
    info = {"tool": "llm-compressor GPTQModifier", "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "weights": weights, "ignore": ["lm_head"], "linears": len(out),
            "calibration": list(ids.shape), "seconds": round(seconds, 1)}
    contract.write(args.out, out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
