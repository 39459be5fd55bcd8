"""Streaming quantization from a checkpoint on disk: same tensors as in memory, resume after SIGKILL, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TOKEN_IDS, tiny_causal_lm

import neuqi
from neuqi.errors import CheckpointError, ConfigError
from neuqi.formats import sharded
from neuqi.formats.checkpoint import save_quantized
from neuqi.formats.packed import pack_model
from neuqi.pipeline import QuantConfig, quantize_model
from neuqi.pipeline import stream as stream_mod
from neuqi.pipeline.records import QuantResult
from neuqi.pipeline.stream import StreamConfig, quantize_checkpoint

CONFIG = QuantConfig(bits=3, group_size=16, batch_size=2)


def tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> Path:
    """A 3-layer tiny Llama saved as safetensors (fp32)."""
    path = tmp_path_factory.mktemp("fp") / "tiny"
    tiny_causal_lm("llama", num_hidden_layers=3, **TOKEN_IDS).save_pretrained(path)
    return path


def in_memory(path: Path, out: Path, dtype: torch.dtype, config: QuantConfig = CONFIG) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    result = quantize_model(model, tokens(), config, progress=False)
    pack_model(model, result.qparams)
    return save_quantized(model, out)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(set(sharded.read_index(path / sharded.INDEX_NAME).values())) if (
        path / sharded.INDEX_NAME).is_file() else [sharded.WEIGHTS_NAME]
    return {k: v for f in files for k, v in load_file(path / f).items()}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def stream(path: Path, out: Path, dtype=torch.float32, config: QuantConfig = CONFIG, **kwargs) -> QuantResult:
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in ("activations", "resume", "max_shard_mb", "allow_pickle")}
    calibration = kwargs.pop("calibration", tokens())
    return quantize_checkpoint(path, calibration, config, out, StreamConfig(stream=True, **opts), dtype=dtype,
                               progress=False, **kwargs)


@pytest.mark.parametrize("dtype, activations", [(torch.float32, "host"), (torch.bfloat16, "disk"),
                                                (torch.bfloat16, "device")])
def test_stream_gives_the_in_memory_tensors(fp_dir, tmp_path, dtype, activations):
    ref = in_memory(fp_dir, tmp_path / "ref", dtype)
    result = stream(fp_dir, tmp_path / "out", dtype, activations=activations)
    assert_same_tensors(ref, tmp_path / "out")
    assert result.world_size == 1 and len(result.records) == 21 and result.records[0].loss > 0
    summary = json.loads((tmp_path / "out" / "neuqi_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["stream"]["activations"] == activations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no partial or temporary directory left
    x = torch.randint(3, 128, (1, 8))
    torch.testing.assert_close(neuqi.load(tmp_path / "out")(x).logits, neuqi.load(ref)(x).logits, rtol=0, atol=0)


def test_stream_keeps_a_tied_head_tied(tmp_path):
    """Materializing the stem for calibration assigns a new embedding; the tied head must not then be read from
    the checkpoint (which stores it once, as the demo model does)."""
    path = tmp_path / "tied"
    tiny_causal_lm("llama", num_hidden_layers=2, tie_word_embeddings=True, **TOKEN_IDS).save_pretrained(path)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    ref = in_memory(path, tmp_path / "ref", torch.float32)
    stream(path, tmp_path / "out")
    assert_same_tensors(ref, tmp_path / "out")
    model = neuqi.load(tmp_path / "out")
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_stream_writes_shards_with_an_index_that_load_reads(fp_dir, tmp_path):
    ref = in_memory(fp_dir, tmp_path / "ref", torch.float32)
    stream(fp_dir, tmp_path / "out", max_shard_mb=0.02)
    index = json.loads((tmp_path / "out" / sharded.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "out" / sharded.WEIGHTS_NAME).exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(ref).values())
    assert_same_tensors(ref, tmp_path / "out")
    x = torch.randint(3, 128, (1, 8))
    torch.testing.assert_close(neuqi.load(tmp_path / "out")(x).logits, neuqi.load(ref)(x).logits, rtol=0, atol=0)


KILLER = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from neuqi.pipeline import QuantConfig
from neuqi.pipeline.runstate import RunState
from neuqi.pipeline.stream import StreamConfig, quantize_checkpoint
from test_stream import CONFIG, tokens

done = RunState.mark_done
def mark_done(self, i, *args):
    done(self, i, *args)
    if i == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # nothing runs after this: no cleanup, no finally
RunState.mark_done = mark_done
quantize_checkpoint({path!r}, tokens(), CONFIG, {out!r}, StreamConfig(stream=True), dtype=torch.float32,
                    progress=False)
"""


def kill_after_layer(path: Path, out: Path, layer: int) -> None:
    script = KILLER.format(tests=str(Path(__file__).parent), kill_after=layer, path=str(path), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_resume_after_sigkill_gives_the_same_bytes(fp_dir, tmp_path):
    stream(fp_dir, tmp_path / "whole")
    kill_after_layer(fp_dir, tmp_path / "out", layer=1)
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists() and json.loads((partial / "state.json").read_text())["layers_done"] == 2
    with pytest.raises(ConfigError, match="interrupted run.*--resume"):
        stream(fp_dir, tmp_path / "out")  # neither resumed nor overwritten: refused, kept
    with pytest.raises(ConfigError, match="cannot resume.*config.bits"):
        stream(fp_dir, tmp_path / "out", config=QuantConfig(bits=4, group_size=16, batch_size=2), resume=True)
    with pytest.raises(ConfigError, match="cannot resume.*calibration.sha256"):
        stream(fp_dir, tmp_path / "out", calibration=tokens(seed=2), resume=True)
    result = stream(fp_dir, tmp_path / "out", resume=True)
    assert result.timings["resumed_at_layer"] == 2 and len(result.records) == 21
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not partial.exists()


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    path = tmp_path / "bin"
    model = tiny_causal_lm("llama", num_hidden_layers=2, **TOKEN_IDS)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # what older save_pretrained wrote
    with pytest.raises(CheckpointError, match="only pickle weights.*--allow-pickle"):
        stream(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    stream(path, tmp_path / "out", allow_pickle=True)
    safe = tmp_path / "safe"
    tiny_causal_lm("llama", num_hidden_layers=2, **TOKEN_IDS).save_pretrained(safe)
    assert_same_tensors(tmp_path / "out", in_memory(safe, tmp_path / "ref", torch.float32))


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    path = tmp_path / "sharded"
    tiny_causal_lm("llama", num_hidden_layers=3, **TOKEN_IDS).save_pretrained(path, max_shard_size="60KB")
    assert (path / sharded.INDEX_NAME).is_file()
    return path


def test_sharded_source_gives_the_same_tensors(sharded_dir, fp_dir, tmp_path):
    stream(sharded_dir, tmp_path / "a")
    stream(fp_dir, tmp_path / "b")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def test_missing_shard_is_refused(sharded_dir, tmp_path):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} named by the index is missing"):
        stream(sharded_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


def test_shard_disagreeing_with_the_index_is_refused(sharded_dir, tmp_path):
    index_file = sharded_dir / sharded.INDEX_NAME
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]  # the tensor really lives in shards[0]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not match the index"):
        stream(sharded_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["layer", "final"])
def test_full_disk_leaves_nothing_that_looks_complete(fp_dir, tmp_path, monkeypatch, where):
    if where == "layer":
        real = stream_mod._save_tensors
        monkeypatch.setattr(stream_mod, "_save_tensors",  # the disk fills up while layer 1 is written
                            lambda t, p: _disk_full() if p.name == "00001.safetensors" and p.parent.name == "layers"
                            else real(t, p))
    else:
        monkeypatch.setattr(sharded, "merge", _disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*--resume"):
        stream(fp_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial"]  # no out, no temporary directory
    assert not list((tmp_path / ".out.partial").glob("config.json"))
    monkeypatch.undo()
    stream(fp_dir, tmp_path / "out", resume=True)  # space freed: the run finishes from where it stopped
    stream(fp_dir, tmp_path / "whole")
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "whole/model.safetensors").read_bytes()


def test_cli_stream(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from neuqi.cli import main

    path = tmp_path / "tiny"
    tiny_causal_lm("llama", **TOKEN_IDS).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 127}" for i in range(2000)))
    argv = ["quantize", str(path), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--group-size", "32",
            "--dtype", "fp32", "--quiet", "--stream"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv[:-1], "--out", str(tmp_path / "b")]) == 0  # in memory
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "a" / "neuqi_summary.json").read_text())["calibration"]["origin"] == str(calib)
    assert main([*argv, "--out", str(tmp_path / "c"), "--eval-ppl", "1"]) == 2


def test_budget_without_a_plan_is_refused_before_any_work(fp_dir, tmp_path):
    with pytest.raises(ConfigError, match="--bpw plans bit widths on the whole model"):
        stream(fp_dir, tmp_path / "out", config=QuantConfig(bpw=3.5, group_size=16, batch_size=2))
    assert not list(tmp_path.iterdir())
