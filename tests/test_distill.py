"""Distillation: gradients, fp32 masters, frozen codes, losses, checkpoint round trip, windows, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_causal_lm
from torch import nn

from neuqi.distill import DistillConfig, MasterWeights, distill, final_hidden
from neuqi.errors import ConfigError
from neuqi.formats.checkpoint import load, save_quantized
from neuqi.formats.packed import QuantLinear, pack_model, quantized_linears
from neuqi.pipeline.data import disjoint_documents, distillation_windows, ngrams, overlapping_windows
from neuqi.quant import grid
from neuqi.quant.grid import QParams


def cfg(**kwargs) -> DistillConfig:
    """A config computing in fp32 (exact comparisons; bf16 autocast has its own test) with the reference's loss
    and scales and zero-points only, unless asked otherwise."""
    return DistillConfig(**{"compute_dtype": "float32", "loss": "mse", "train_norms": False, **kwargs})


def tiny_llama(vocab: int = 256, seed: int = 0) -> nn.Module:
    return tiny_causal_lm("llama", seed, intermediate_size=128, vocab_size=vocab, max_position_embeddings=2048,
                          tie_word_embeddings=True)


def quantize_copy(teacher: nn.Module, bits: int = 2, group_size: int = 32) -> nn.Module:
    """A packed copy of ``teacher``: min-max grid with a real zero-point, codes by RTN."""
    student = copy.deepcopy(teacher)
    qparams = {}
    for name, m in student.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            w = grid.to_groups(m.weight.detach(), group_size)
            lo, hi = w.amin(-1), w.amax(-1)
            s = (hi - lo) / grid.max_code(bits)
            s, z = grid.to_storage(s, -lo / s + 0.1)
            with torch.no_grad():
                m.weight.copy_(grid.fake_quantize(m.weight, s, z, bits, group_size))
            qparams[name] = QParams(s, z, bits, group_size)
    return pack_model(student, qparams)


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_llama()
    return teacher, quantize_copy(teacher)


@pytest.fixture(scope="module")
def bf16_student(pair, tmp_path_factory):
    """The packed student with bf16 embeddings and norms (and fp16 s, Z), as checkpoint.load builds it."""
    path = tmp_path_factory.mktemp("bf16") / "ckpt"
    save_quantized(pair[1], path)
    return load(path, dtype=torch.bfloat16)


def tokens(n: int = 4, seqlen: int = 24, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def hidden_mse(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((final_hidden(student, ids) - final_hidden(teacher, ids)) ** 2).item()


def state(model: nn.Module, suffix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(suffix)}


# ------------------------------------------------------------------------------------------------ config
def test_config_validates_and_round_trips() -> None:
    cfg = DistillConfig(loss="kl", lr=1e-3, betas=(0.8, 0.9), max_grad_norm=None)
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"loss": "ce"}, {"lr": 0.0}, {"betas": (0.9, 1.0)}, {"warmup_ratio": 1.0}, {"epochs": 0},
                {"compute_dtype": "float16"}, {"max_grad_norm": 0.0}, {"seqlen": 1},
                {"train_scales": False, "train_zeros": False, "train_norms": False}):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)


# --------------------------------------------------------------------------------------------- gradients
def test_scale_and_zero_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    out_f, in_f, g, bits = 3, 16, 8, 2
    codes = torch.randint(0, 4, (out_f, in_f), dtype=torch.uint8)
    layer = QuantLinear.from_codes(codes, torch.rand(out_f, in_f // g) * 0.1 + 0.05,
                                   torch.rand(out_f, in_f // g) * 3, bits, g)
    model = nn.Sequential(layer)
    x = torch.randn(5, in_f, dtype=torch.float64)
    c = torch.randn(5, out_f, dtype=torch.float64)
    masters = MasterWeights(model)
    s, z = masters.parameters()
    assert s.dtype == z.dtype == torch.float32 and model[0] is not layer
    (model(x.float()).double() * c).sum().backward()

    def f(s64: torch.Tensor, z64: torch.Tensor) -> torch.Tensor:  # the layer's function, in float64
        q = codes.double().view(out_f, -1, g)
        w = (s64.unsqueeze(-1) * (q - z64.unsqueeze(-1))).view(out_f, in_f)
        return ((x @ w.T) * c).sum()

    s64, z64, eps = s.detach().double(), z.detach().double(), 1e-6
    for which, grad in ((0, s.grad), (1, z.grad)):
        fd = torch.zeros(s64.numel(), dtype=torch.float64)
        for i in range(fd.numel()):
            e = torch.zeros_like(fd)
            e[i] = eps
            e = e.view_as(s64)
            plus, minus = ((s64 + e, z64), (s64 - e, z64)) if which == 0 else ((s64, z64 + e), (s64, z64 - e))
            fd[i] = (f(*plus) - f(*minus)) / (2 * eps)
        torch.testing.assert_close(grad.double(), fd.view_as(s64), rtol=1e-4, atol=1e-4)
    # the closed forms of spec §6: ∂Z = −s·Σ_group dW, ∂s = Σ_group dW·(q − Z)
    dw = (c.T @ x).view(out_f, -1, g)
    q = codes.double().view(out_f, -1, g)
    torch.testing.assert_close(z.grad.double(), -s64 * dw.sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.grad.double(), (dw * (q - z64.unsqueeze(-1))).sum(-1), rtol=1e-4, atol=1e-4)
    masters.restore()
    assert model[0] is layer and layer.scales.dtype == torch.float16
    assert "scales" in dict(layer.named_buffers())


def test_training_stand_in_matches_the_packed_layer(pair) -> None:
    student = copy.deepcopy(pair[1])
    ids = tokens(n=1, seed=3)
    with torch.no_grad():
        expected = student(ids).logits
        masters = MasterWeights(student)
        got = student(ids).logits
        masters.restore()
        assert torch.equal(student(ids).logits, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_masters_are_fp32_even_for_a_bf16_model(bf16_student) -> None:
    student = copy.deepcopy(bf16_student)
    assert student.model.norm.weight.dtype == torch.bfloat16
    norm = student.model.norm
    norm_weight = norm.weight
    layers = dict(quantized_linears(student))
    masters = MasterWeights(student, train_scales=True, train_zeros=True, train_norms=True)
    params = masters.parameters()
    assert len(params) == 2 * len(layers) + 2 * 2 + 1  # s and Z per linear, 2 norms per layer, the final norm
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in params)
    assert norm.weight.dtype == torch.float32 and norm.weight is not norm_weight
    assert not list(quantized_linears(student))  # all swapped for the training stand-ins
    h = norm(torch.randn(2, 3, 64, dtype=torch.bfloat16))
    assert h.dtype == torch.bfloat16  # the norm still returns the activation dtype
    masters.restore()
    assert norm.weight is norm_weight and norm.weight.dtype == torch.bfloat16
    assert dict(quantized_linears(student)) == layers
    assert all(layer.scales.dtype == torch.float16 for layer in layers.values())


# ---------------------------------------------------------------------------------------------- training
def test_only_scales_and_zeros_change_codes_frozen(pair) -> None:
    teacher, packed = pair
    student = copy.deepcopy(packed)
    codes, scales, other = state(student, "qweight"), state(student, "scales"), state(student, "weight")
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    history = distill(student, teacher, tokens(), cfg(lr=1e-2), progress=False)
    assert len(history.loss) == 4 and len(history.lr) == len(history.grad_norm) == len(history.seconds) == 4
    assert history.trainable == sum(2 * layer.scales.numel() for _, layer in quantized_linears(student))
    for k, v in state(student, "qweight").items():
        assert torch.equal(v, codes[k])
    assert any(not torch.equal(v, scales[k]) for k, v in state(student, "scales").items())
    for k, v in state(student, "weight").items():  # embeddings and norms are frozen by default
        assert torch.equal(v, other[k])
    for _, layer in quantized_linears(student):
        assert layer.scales.dtype == layer.zeros.dtype == torch.float16
        assert not isinstance(layer.scales, nn.Parameter) and (layer.scales >= grid.MIN_SCALE).all()
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags


def test_loss_decreases_on_a_tiny_model(pair) -> None:
    teacher, packed = pair
    student = copy.deepcopy(packed)
    ids = tokens(n=2)
    before = hidden_mse(student, teacher, ids)
    history = distill(student, teacher, ids, cfg(lr=5e-3, epochs=8, warmup_ratio=0.0), progress=False)
    after = hidden_mse(student, teacher, ids)
    assert after < 0.8 * before
    assert history.loss[-1] < history.loss[0]
    assert history.lr[0] == pytest.approx(5e-3) and history.lr[-1] < 5e-4  # cosine decay


def test_kl_loss_chunking_and_checkpointing_do_not_change_the_result(pair) -> None:
    teacher, packed = pair
    results = []
    for chunk, ckpt in ((1000, False), (5, False), (5, True)):
        student = copy.deepcopy(packed)
        config = cfg(loss="kl", lr=1e-3, kl_chunk=chunk, gradient_checkpointing=ckpt)
        history = distill(student, teacher, tokens(n=2), config, progress=False)
        results.append((history.loss, state(student, "scales"), state(student, "zeros")))
        assert type(student.model.layers[0]).__name__ == "LlamaDecoderLayer"  # wrappers removed
    base = results[0]
    assert base[0][0] > 0
    for other in results[1:]:
        assert other[0] == pytest.approx(base[0], rel=1e-4)
        for a, b in zip(other[1:], base[1:]):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-3)


def test_bf16_student_with_norm_training(pair, bf16_student) -> None:
    teacher = pair[0]
    student = copy.deepcopy(bf16_student)
    norm_before = student.model.norm.weight.clone()
    config = cfg(lr=1e-2, train_norms=True, compute_dtype="bfloat16", cache_teacher=False)
    history = distill(student, teacher, tokens(n=2), config, progress=False)
    assert history.compute_dtype == "bfloat16" and all(torch.isfinite(torch.tensor(history.loss)))
    assert student.model.norm.weight.dtype == torch.bfloat16
    assert not torch.equal(student.model.norm.weight, norm_before)
    assert all(layer.zeros.dtype == torch.float16 for _, layer in quantized_linears(student))


def test_small_steps_accumulate_in_the_fp32_masters(pair, bf16_student) -> None:
    """Spec §6: steps of 1e-4 on bf16 zero-points (|Z| ≥ 0.125) round away; the fp32 masters keep them."""
    student = copy.deepcopy(bf16_student)
    before = torch.cat([v.flatten() for v in state(student, "zeros").values()])
    as_bf16 = before.to(torch.bfloat16)
    lost = ((as_bf16 + 1e-4).to(torch.bfloat16) == as_bf16).float().mean()
    assert lost > 0.9  # what the reference's bf16 parameters would do with every such step
    config = cfg(lr=1e-4, epochs=10, warmup_ratio=0.0, train_scales=False, compute_dtype="bfloat16")
    distill(student, pair[0], tokens(n=1), config, progress=False)
    after = torch.cat([v.flatten() for v in state(student, "zeros").values()])
    assert (after != before).float().mean() > 0.5  # ~5.5e-4 of accumulated steps survive in fp16 storage


def test_distilled_model_saves_and_reloads_identically(pair, tmp_path) -> None:
    teacher, packed = pair
    student = copy.deepcopy(packed)
    distill(student, teacher, tokens(n=2), cfg(lr=1e-2), progress=False)
    save_quantized(student, tmp_path / "ckpt")
    reloaded = load(tmp_path / "ckpt")
    ids = tokens(n=1, seed=7)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_error_leaves_the_student_untouched(pair) -> None:
    teacher, packed = pair
    student = copy.deepcopy(packed)
    buffers = {n: b for n, b in student.named_buffers() if n.endswith(("scales", "zeros"))}
    bad = tokens()
    bad[0, 0] = 10_000  # out of the vocabulary: the student's forward fails after the teacher cache
    with pytest.raises(IndexError):
        distill(student, copy.deepcopy(teacher).requires_grad_(False), bad,
                cfg(cache_teacher=False), progress=False)
    after = {n: b for n, b in student.named_buffers() if n.endswith(("scales", "zeros"))}
    assert after.keys() == buffers.keys() and all(after[n] is buffers[n] for n in buffers)
    with pytest.raises(ConfigError):
        distill(student, student, tokens(), progress=False)


# ------------------------------------------------------------------------------------------------ windows
class CharTokenizer:
    """One token per character (batched like a HF tokenizer)."""

    def __call__(self, text, **_):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) % 251 for c in t] for t in text]}
        return {"input_ids": [ord(c) % 251 for c in text]}


def test_ngram_overlap_and_disjoint_documents() -> None:
    a = torch.arange(40).view(2, 20)
    assert len(ngrams(a, 16)) == 2 * 5 and ngrams(a[:, :10], 16) == set()
    b = torch.cat([torch.full((1, 10), 99), a[:1, 3:19], torch.full((1, 4), 98)], dim=1)  # a[0, 3:19] inside
    assert overlapping_windows(b, a) == 1 and overlapping_windows(b + 500, a) == 0
    docs = ["x" * 30 + "abcdefghijklmnopqrstuvwxyz", "completely different text, long enough here", "short"]
    window = torch.tensor([[ord(c) for c in "cdefghijklmnopqrstu"]])
    assert disjoint_documents(docs, CharTokenizer(), window) == docs[1:]


def test_distillation_windows_avoid_recorded_calibration(tmp_path) -> None:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "iota"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = CharTokenizer()
    calib = {"origin": str(path), "windows": 8, "seqlen": 64, "seed": 0}
    windows, info = distillation_windows(tok, str(path), 16, 48, 0, calib)
    assert windows.shape == (16, 48) and info["calibration_overlap"] == 0 and info["excluded_documents"] > 0
    windows, info = distillation_windows(tok, str(path), 16, 48, 0, None)
    assert "unknown" in info["calibration_overlap"]


# --------------------------------------------------------------------------------------------------- CLI
def word_tokenizer(words: list[str]):
    """A whitespace word-level fast tokenizer over ``words`` (id 0 = unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_cli_end_to_end(pair, tmp_path) -> None:
    import random

    from neuqi.cli import main

    teacher, packed = pair
    words = [f"w{i}" for i in range(255)]
    tokenizer = word_tokenizer(words)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(40, 120)))})
                                for _ in range(30)))
    teacher_dir, ckpt, out = tmp_path / "teacher", tmp_path / "ckpt", tmp_path / "out"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    save_quantized(packed, ckpt, tokenizer)
    calibration = {"origin": str(corpus), "windows": 4, "seqlen": 32, "seed": 0}
    (ckpt / "neuqi_summary.json").write_text(json.dumps({"model": {"source": str(teacher_dir)},
                                                          "calibration": calibration}))
    argv = ["distill", str(ckpt), "--calib", str(corpus), "--nsamples", "3", "--seqlen", "24", "--lr", "1e-2",
            "--compute-dtype", "float32", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 2  # refuses to overwrite without --overwrite
    summary = json.loads((out / "neuqi_summary.json").read_text())
    section = summary["distillation"]
    assert section["teacher"] == str(teacher_dir) and section["steps"] == 3
    assert section["data"]["calibration_overlap"] == 0 and section["data"]["excluded_documents"] >= 1
    assert summary["calibration"] == calibration  # the quantization summary is carried over
    history = json.loads((out / "distill_history.json").read_text())
    assert len(history["loss"]) == 3 and (out / "distill_loss.png").stat().st_size > 0
    from neuqi.formats.checkpoint import read_quantization_config

    assert read_quantization_config(out)["distillation"]["loss"] == "kl"  # the default
    distilled = load(out)
    changed = [not torch.equal(a.scales, b.scales)
               for (_, a), (_, b) in zip(quantized_linears(distilled), quantized_linears(packed))]
    assert any(changed)
    assert not torch.equal(distilled.model.norm.weight.float(), packed.model.norm.weight.float())  # norms train
