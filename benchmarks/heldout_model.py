"""The held-out model of the comparison: a small Qwen2-family model, randomly initialised (seed 0).

No trained model of a family other than Llama can be loaded offline here (the only real one is SmolLM2), so the
held-out sanity run uses this one, with SmolLM2's tokenizer. Its perplexity is near the vocabulary size for every
method; the per-layer proxy loss (``layer_loss`` in the result files) is what ranks the methods on it.

    python benchmarks/heldout_model.py runs/heldout-qwen2
    python benchmarks/compare.py --model runs/heldout-qwen2 --settings w3g64 \\
        --methods fp,rtn,gptq,neuqi_int,neuqi,hqq
        --windows 10 --out benchmarks/results/heldout
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from neuqi.pipeline import models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the model and tokenizer to")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _, tokenizer = models.load_model(None, dtype="bfloat16")
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: Qwen2, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
