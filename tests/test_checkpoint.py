"""Checkpoint safety (issue 12): byte-reproducible files, NaN/Inf scales refused on load, SIGTERM and stale temporary
directories of dead runs (formats/atomic.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import packed_llama

import neuqi
from neuqi.errors import CheckpointError
from neuqi.formats import atomic
from neuqi.formats.checkpoint import WEIGHTS_NAME, save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")


def test_saving_the_same_model_gives_the_same_bytes(tmp_path):
    model = packed_llama()
    files = {save_quantized(model, tmp_path / str(i)) / WEIGHTS_NAME for i in range(8)}
    assert len({f.read_bytes() for f in files}) == 1  # the metadata order used to follow a Rust hash map
    assert neuqi.load(tmp_path / "0") is not None


@pytest.mark.parametrize("key, value", [("scales", float("nan")), ("scales", -1.0), ("zeros", float("-inf"))])
def test_load_refuses_non_finite_scales_and_zeros(tmp_path, key, value):
    path = save_quantized(packed_llama(), tmp_path / "ckpt")
    tensors = load_file(path / WEIGHTS_NAME)
    tensors[f"model.layers.0.self_attn.v_proj.{key}"][1, 0] = value
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model\.layers\.0\.self_attn\.v_proj\.{key} has 1 value"):
        neuqi.load(path)
    from transformers import AutoModelForCausalLM

    assert neuqi.register_transformers()
    with pytest.raises(CheckpointError, match=rf"v_proj\.{key}"):
        AutoModelForCausalLM.from_pretrained(path)


def test_sigterm_handler_is_installed_only_during_the_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic.atomic_output_dir(tmp_path / "o") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not before
        (tmp / "f").write_text("x")
    assert signal.getsignal(signal.SIGTERM) is before and (tmp_path / "o" / "f").is_file()


def test_sigterm_reaches_a_previous_python_handler_after_cleanup(tmp_path):
    script = (
        "import signal, sys, os\n"
        "from neuqi.formats.atomic import atomic_output_dir\n"
        "def handler(signum, frame):\n"
        "    print('handled', flush=True); sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "with atomic_output_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'f').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 7 and proc.stdout.strip() == "handled", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_keeps_live_and_foreign_directories_and_restores_a_moved_output(tmp_path):
    out = tmp_path / "o"
    host = atomic._host_tag()
    pid = dead_pid()
    dead_tmp = tmp_path / f".o.tmp-{host}-{pid}-abc"
    live_tmp = tmp_path / f".o.tmp-{host}-{os.getpid()}-abc"
    foreign = tmp_path / f".o.tmp-00000000-{pid}-abc"  # another host: its pid means nothing here
    legacy = tmp_path / ".o.tmp-k2j4h5"  # no owner recorded: left alone
    dead_old = tmp_path / f".o.old-{host}-{pid}-abc"
    for d in (dead_tmp, live_tmp, foreign, legacy, dead_old / "old"):
        d.mkdir(parents=True)
    (dead_old / "old" / "config.json").write_text("{}")
    assert sorted(atomic.remove_stale(out)) == sorted([dead_tmp, dead_old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", live_tmp.name, foreign.name, legacy.name])
    assert (out / "config.json").is_file()  # the previous output, moved aside by the dead run, is back
    shutil.rmtree(live_tmp)
