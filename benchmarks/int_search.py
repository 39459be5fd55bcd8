"""NeUQI_int's two scale searches on real SmolLM2 layers: coarse-to-fine (NeUQI's 96 candidates) against the paper's
full 2048-step grid, in wall time and total weighted loss Σ h (ŵ − w)² with h = diag(XᵀX).

    python benchmarks/int_search.py                 # layer 15, first 64 rows of each of its 7 linears, 1 thread
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from init_solver import smollm2_linears  # noqa: E402

from neuqi.quant.init import init_params, weighted_loss  # noqa: E402

SETTINGS = [(4, 64), (3, 64), (2, 64), (3, -1), (2, -1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--rows", type=int, default=64, help="rows of each linear (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/int_search.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    linears = smollm2_linears([args.layer], 8)
    rows = []
    print(f"{'setting':10} {'c2f s':>7} {'full s':>7} {'speed-up':>8} {'loss c2f/full − 1':>18}")
    for bits, group_size in SETTINGS:
        seconds = {"coarse_to_fine": 0.0, "full": 0.0}
        loss = {"coarse_to_fine": 0.0, "full": 0.0}
        for weight, h in linears.values():
            w = weight[: args.rows] if args.rows else weight
            for search in seconds:
                start = time.perf_counter()
                s, z = init_params(w, bits, group_size, "neuqi_int", h, search=search)
                seconds[search] += time.perf_counter() - start
                loss[search] += float(weighted_loss(w, s, z, bits, group_size, h).sum())
        row = {"bits": bits, "group_size": group_size, "seconds": seconds, "loss": loss,
               "speedup": seconds["full"] / seconds["coarse_to_fine"],
               "loss_gap": loss["coarse_to_fine"] / loss["full"] - 1}
        rows.append(row)
        print(f"W{bits} g{group_size:<5} {seconds['coarse_to_fine']:7.2f} {seconds['full']:7.2f} "
              f"{row['speedup']:7.1f}x {100 * row['loss_gap']:+17.4f}%", flush=True)
    Path(args.output).write_text(json.dumps({"layer": args.layer, "rows": args.rows, "threads": args.threads,
                                             "torch": torch.__version__, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
