"""What every peer script shares with ``benchmarks/compare.py``: its command line and its two output files.

    PEER/bin/python benchmarks/peers/<tool>.py FP_DIR CALIB.pt OUT_DIR --bits K --group-size G [tool options]

FP_DIR is a transformers checkpoint saved by the harness; CALIB.pt holds the harness's calibration token ids
(n, seqlen). OUT_DIR gets ``weights.safetensors`` (each quantized linear's weight as the tool dequantizes it, fp32,
under its module name) and ``peer.json`` (versions, recipe, seconds). Standard library only: the peer scripts run in
the peer's virtual environment, which has no neuqi.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parser(doc: str) -> argparse.ArgumentParser:
    """The shared arguments; a script adds its own options to the parser."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("fp_dir", type=Path)
    p.add_argument("calib", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    return p


def write(out: Path, weights: dict[str, Any], info: dict[str, Any]) -> None:
    """``weights.safetensors`` and ``peer.json`` into ``out``; ``info`` is also printed as one JSON line."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({name: w.float().contiguous() for name, w in weights.items()}, str(out / "weights.safetensors"))
    (out / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
