"""torch.distributed: `torchrun --nproc-per-node 2 neuqi quantize` (gloo on CPU) against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TOKEN_IDS, tiny_causal_lm

from neuqi.pipeline.distributed import Dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dist")
    path = root / "tiny"
    tiny_causal_lm("llama", num_hidden_layers=3, **TOKEN_IDS).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 127}" for i in range(3000)))
    return path, calib


def _quantize(tiny: tuple[Path, Path], out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    path, calib = tiny
    argv = ["quantize", str(path), "--calib", str(calib), "--nsamples", "5", "--seqlen", "32", "--batch-size", "1",
            "--group-size", "32", "--dtype", "bf16", "--device", "cpu", "--quiet", "--stream", "--out", str(out),
            *extra]
    launcher = [sys.executable, "-m", "neuqi.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "neuqi.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("options", [["--solver", "ldlq"], pytest.param(["--solver", "gptq"], marks=pytest.mark.slow),
                                     ["--solver", "ldlq", "--refine", "2"]], ids=["ldlq", "gptq", "ldlq-refine"])
def test_two_gloo_processes_write_the_single_process_checkpoint(tiny_dir, tmp_path, options):
    one = _quantize(tiny_dir, tmp_path / "one", 1, *options)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _quantize(tiny_dir, tmp_path / "two", 2, *options)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("quantized ") == 1 and "on 2 process(es)" in two.stdout  # rank 0 reports
    # 5 batches over 2 ranks (3 + 2), row blocks of odd sizes: the tensors are the same bytes
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    s1, s2 = (json.loads((tmp_path / d / "neuqi_summary.json").read_text()) for d in ("one", "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    for r1, r2 in zip(s1["records"], s2["records"], strict=True):
        assert r1["tokens"] == r2["tokens"] == 5 * 32
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)  # rank-order sum of per-rank losses


def test_row_blocks_and_gathers_in_one_process():
    dist = Dist(rank=1, world_size=3, device=torch.device("cpu"), comm=torch.device("cpu"))
    bounds = [dist._bounds(10, r) for r in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)] and dist.rows(10) == slice(4, 7)
    assert dist.batch_ids(7) == [1, 4]
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        dist.batch_ids(2)
