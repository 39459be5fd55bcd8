"""The layer-wise runner and `neuqi quantize` on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from tiny_models import TOKEN_IDS, tiny_causal_lm

from neuqi import pipeline
from neuqi.cli import main
from neuqi.errors import ConfigError
from neuqi.pipeline import QuantConfig, quantize_model, walker
from neuqi.pipeline.records import QuantResult
from neuqi.quant import grid


def tiny_llama(dtype=torch.float32):
    return tiny_causal_lm("llama", **TOKEN_IDS).to(dtype)


def tokens(n=6, seqlen=16):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"method": "awq"}, "unknown method"),
        ({"init": "hqq"}, "unknown init"),
        ({"param_fit": "lazy"}, "param_fit"),
        ({"target": "teacher"}, "target"),
        ({"group_size": 0}, "group_size"),
        ({"damping": -1.0}, "damping"),
        ({"refine_damping": float("nan")}, "refine_damping"),
        ({"batch_size": 0}, "batch_size"),
        ({"refine": -1}, "refine"),
        ({"version": 2}, "version"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_config_json_round_trip():
    config = QuantConfig(bits=2, group_size=-1, solver="gptq", init="neuqi_int", init_options={"steps": 64})
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"bits": 3, "wbits": 3})


def test_group_size_is_checked_before_any_work():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def never(*args, **kwargs):
        raise AssertionError("the initializer ran")

    with pytest.raises(ConfigError, match="model.layers.0.self_attn.q_proj: group_size 48 does not divide"):
        quantize_model(model, tokens(), QuantConfig(group_size=48), init_fn=never, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def linear_inputs(layer, linear, hiddens, call) -> torch.Tensor:
    """Every input ``linear`` sees when ``layer`` runs on ``hiddens``, as (tokens, in) fp64."""
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for hidden in hiddens:
            walker._call(layer, hidden, call)
    handle.remove()
    return torch.cat([t.reshape(-1, linear.in_features) for t in seen]).double()


def test_hessian_equals_direct_computation():
    from neuqi.pipeline import adapters

    model = tiny_llama()
    ids = tokens()
    stack = adapters.find_stack(model)
    hiddens, calls = adapters.capture_inputs(model, stack, list(ids.split(4)))
    layer = stack.layers[0]

    def hessian(linear, fp=None):
        with torch.no_grad():
            trace = adapters.trace_layer(layer, lambda: walker._call(layer, hiddens[0], calls[0]))
            return walker._hessian(layer, linear, hiddens, calls[0], walker.Replay(layer, trace), fp=fp)

    for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
        x = linear_inputs(layer, linear, hiddens, calls[0])
        h, n, cross = hessian(linear)
        assert n == ids.numel() and h.dtype == torch.float64 and cross is None
        ref = x.T @ x / n  # each batch product is fp32, so allow fp32 rounding
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        # with an FP pair (here: a perturbed copy of the layer on shifted states) C = X̃ᵀX / n
        other = copy.deepcopy(layer)
        with torch.no_grad():
            for param in other.parameters():
                param.add_(0.05 * torch.randn_like(param))
        other_linear = other.get_submodule(next(name for name, m in layer.named_modules() if m is linear))
        shifted = [t + 0.1 for t in hiddens]
        x_fp = linear_inputs(other, other_linear, shifted, calls[0])
        h2, _, cross = hessian(linear, fp=(other, other_linear, shifted))
        assert torch.equal(h2, h)
        ref = x_fp.T @ x / n
        torch.testing.assert_close(cross, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_gram_of_bf16_activations_is_accurate_to_fp32():
    x = torch.randn(4096, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = x.double().T @ x.double()
    fp32 = x.float().T @ x.float()
    before = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    got = walker.gram(x)
    assert got.dtype == torch.float32
    # bf16·bf16 products are exact in fp32: only the summation order differs from the fp32 product
    assert float((got.double() - ref).abs().max()) <= 4 * float((fp32.double() - ref).abs().max()) + 1e-3
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == before
    assert torch.equal(walker.gram(x.float()), fp32)


@pytest.mark.parametrize("method, param_fit", [("ldlq", "static"), ("gptq", "dynamic"), ("rtn", "static")])
def test_quantized_linears_hold_grid_values(method, param_fit):
    model = tiny_llama()
    config = QuantConfig(
        bits=3, group_size=16, solver=method, init="minmax", param_fit=param_fit, batch_size=4
    )
    summary = quantize_model(model, tokens(), config, progress=False)
    qparams = summary.qparams
    assert len(qparams) == len(summary.records) == 14
    for name, qp in qparams.items():
        w = model.get_submodule(name).weight
        assert torch.equal(qp.scale, qp.scale.half().float()) and torch.equal(
            qp.zero_point, qp.zero_point.half().float()
        )
        assert torch.equal(grid.fake_quantize(w, qp.scale, qp.zero_point, 3, 16), w), name
    totals = summary.totals
    assert totals["linears"] == 14
    assert totals["loss"] is None if method == "rtn" else totals["loss"] > 0  # RTN + Min-Max: no calibration
    if method != "rtn" and param_fit == "static":
        assert totals["loss"] < totals["loss_before"]
    assert summary.memory["peak_rss_mb"] > 0 and len(summary.timings["layers_s"]) == 2
    as_json = json.loads(json.dumps(summary.to_dict(), allow_nan=False))  # metrics are plain, strict JSON
    assert QuantResult.from_dict(as_json).to_dict() == as_json
    assert model(input_ids=tokens()).logits.isfinite().all()


def test_replaying_final_parts_changes_nothing(monkeypatch):
    llama = tf.models.llama.modeling_llama
    calls = {"attention": 0, "mlp": 0}
    for key, cls in (("attention", llama.LlamaAttention), ("mlp", llama.LlamaMLP)):
        original = cls.forward

        def counting(self, *args, key=key, original=original, **kwargs):
            calls[key] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    config = QuantConfig(bits=3, group_size=16, init="neuqi", batch_size=2)
    results = {}
    for replay in (True, False):
        model, calls["attention"], calls["mlp"] = tiny_llama(), 0, 0
        summary = quantize_model(model, tokens(), config, progress=False, replay_activations=replay)
        results[replay] = (model.state_dict(), summary.totals["loss"], dict(calls))
    (with_replay, loss, n_with), (without, loss_without, n_without) = results[True], results[False]
    assert loss == loss_without
    assert all(torch.equal(with_replay[k], without[k]) for k in with_replay)
    # per layer, 3 batches, +1 call tracing the layer. Without replay the q/k/v, o, gate/up, down and output passes
    # all enter the attention, and the last three the MLP. With it, the gate/up pass computes the attention as
    # o_proj(input recorded in the o pass) and the later passes replay it; the output pass computes the MLP as
    # down_proj(input recorded in the down pass).
    assert n_without == {"attention": 2 * (3 * 5 + 1), "mlp": 2 * (3 * 3 + 1)}
    assert n_with == {"attention": 2 * (3 * 2 + 1), "mlp": 2 * (3 * 2 + 1)}


def test_fp_target_fits_the_fp_output():
    """target="fp": replay changes nothing; the first group of the first layer sees the FP input (C = H), so it is
    quantized as with the quantized target, and later ones differ; the model's output is closer to the FP
    model's on the calibration tokens."""
    fp = tiny_llama()
    ids = tokens()
    results = {}
    for target, replay in (("quantized", True), ("fp", True), ("fp", False)):
        model = copy.deepcopy(fp)
        config = QuantConfig(bits=2, group_size=16, init="neuqi", batch_size=2, target=target)
        summary = quantize_model(model, ids, config, progress=False, replay_activations=replay)
        results[target, replay] = model, summary.qparams
    (fp_model, fp_qp), (again, _) = results["fp", True], results["fp", False]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fp_model.state_dict().items())
    quant_model, quant_qp = results["quantized", True]
    for name in ("q_proj", "k_proj", "v_proj"):
        a, b = quant_qp[f"model.layers.0.self_attn.{name}"], fp_qp[f"model.layers.0.self_attn.{name}"]
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert not torch.equal(quant_qp["model.layers.1.mlp.down_proj"].scale, fp_qp["model.layers.1.mlp.down_proj"].scale)
    with torch.no_grad():
        ref = fp(input_ids=ids).logits.log_softmax(-1)
        kl = {t: float((ref.exp() * (ref - m(input_ids=ids).logits.log_softmax(-1))).sum(-1).mean())
              for t, m in (("quantized", quant_model), ("fp", fp_model))}
    assert kl["fp"] < kl["quantized"]


def test_fp_target_names_its_runs():
    assert QuantConfig(bits=2, group_size=64).short_name() == "w2g64-neuqi-ldlq"
    assert QuantConfig(bits=2, group_size=-1, target="fp").short_name() == "w2gc-neuqi-ldlq-fp"
    assert QuantConfig(bpw=2.5, target="fp").short_name() == "bpw2.5-neuqi-ldlq-fp"


def test_fp_target_is_refused_when_streaming(tmp_path):
    from neuqi.pipeline.stream import quantize_checkpoint

    with pytest.raises(ConfigError, match="target='fp'"):
        quantize_checkpoint(tmp_path / "no-model", tokens(), QuantConfig(target="fp"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trace_finds_the_tail_linears():
    from neuqi.pipeline import adapters

    model = tiny_llama()
    stack = adapters.find_stack(model)
    hiddens, calls = adapters.capture_inputs(model, stack, [tokens(2)])
    layer = stack.layers[0]
    trace = adapters.trace_layer(layer, lambda: walker._call(layer, hiddens[0], calls[0]))
    assert trace.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert trace.tails == {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", 0)}


def test_rtn_with_minmax_needs_no_calibration(monkeypatch):
    from neuqi.quant.init import init_params

    model, reference = tiny_llama(), tiny_llama()
    forwards = []
    model.model.layers[0].register_forward_hook(lambda *a: forwards.append(1))
    summary = quantize_model(model, tokens(), QuantConfig(bits=3, group_size=16, solver="rtn", init="minmax"),
                             progress=False)
    assert not forwards and summary.records[0].loss is None
    for name, qp in summary.qparams.items():
        w0 = reference.get_submodule(name).weight.detach()
        scale, zero = grid.to_storage(*init_params(w0, 3, 16, method="minmax"))
        assert torch.equal(qp.scale, scale) and torch.equal(qp.zero_point, zero)
        assert torch.equal(model.get_submodule(name).weight, grid.fake_quantize(w0, scale, zero, 3, 16))
    assert walker.needs_calibration(QuantConfig(solver="rtn", init="neuqi"))  # NeUQI reads diag(H)
    assert walker.needs_calibration(QuantConfig(solver="ldlq", init="minmax"))


def test_refine_lowers_every_layer_loss_and_keeps_the_grid():
    """refine=2: q, k and v of the first layer (the same H either way) each have a lower loss than the solver's alone;
    every linear holds the grid of its recorded parameters; the run is named for it."""
    results = {}
    for rounds in (0, 2):
        model = tiny_llama()
        config = QuantConfig(bits=2, group_size=16, batch_size=3, refine=rounds)
        results[rounds] = model, quantize_model(model, tokens(), config, progress=False)
    model, summary = results[2]
    for before, after in zip(results[0][1].records[:3], summary.records[:3]):
        assert after.name == before.name and after.loss < before.loss and after.loss_before == before.loss_before
    for name, qp in summary.qparams.items():
        w = model.get_submodule(name).weight
        assert torch.equal(grid.fake_quantize(w, qp.scale, qp.zero_point, 2, 16), w), name
    assert QuantConfig(bits=2, group_size=64, refine=4).short_name() == "w2g64-neuqi-ldlq-r4"
    assert QuantConfig(bits=2, group_size=64, refine=0).short_name() == "w2g64-neuqi-ldlq-r0"
    assert QuantConfig(bits=2, group_size=64, solver="rtn", refine=0).short_name() == "w2g64-neuqi-rtn"


def test_bf16_model_is_quantized_in_place():
    """The bf16 weights become bf16 roundings of Ŵ that pack exactly: the packed layers give them back bit for bit,
    and the packed model the same logits."""
    from neuqi.formats.packed import QuantLinear, pack_model

    model = tiny_llama(torch.bfloat16)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    summary = quantize_model(model, tokens(), QuantConfig(group_size=32, init="minmax"), progress=False)
    assert set(summary.qparams) == set(original) - {"lm_head"}
    quantized = {name: model.get_submodule(name).weight.detach().clone() for name in summary.qparams}
    assert all(w.dtype == torch.bfloat16 and not torch.equal(w, original[n]) for n, w in quantized.items())
    ids = tokens(2)
    fake_logits = model(input_ids=ids).logits
    pack_model(model, summary.qparams)  # raises unless every weight is exactly on its grid
    for name, w in quantized.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and torch.equal(layer.dequantized_weight().to(torch.bfloat16), w)
    assert torch.equal(model(input_ids=ids).logits, fake_logits)


@pytest.fixture
def tiny_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 127}" for i in range(2000)))
    return model_dir, calib


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    import neuqi

    model_dir, calib = tiny_dir
    out = tmp_path / "out"
    argv = [
        "quantize",
        str(model_dir),
        "--calib",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--group-size",
        "32",
        "--init",
        "minmax",
        "--dtype",
        "fp32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "neuqi_summary.json").read_text())
    assert summary["calibration"]["origin"] == str(calib) and summary["calibration"]["tokens"] == 128
    assert summary["config"]["solver"] == "ldlq" and len(summary["records"]) == 14 and summary["world_size"] == 1
    assert {"capture_s", "total_s", "load_s", "wall_s"} <= set(summary["timings"])
    model = neuqi.load(out)
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "QuantLinear"
    assert not list(tmp_path.glob(".out.tmp-*"))

    assert main(argv) == 2  # a non-empty output directory is refused ...
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--format", "fake"]) == 0  # ... unless asked
    assert (out / "neuqi_summary.json").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--bits", "1"], "bits"),
        (["--method", "awq"], "unknown method"),
        (["--calib", "/no/such/file"], "calib"),
        (["--nsamples", "0"], "nsamples"),
        (["--dtype", "fp8"], "dtype"),
        (["--refine", "-1"], "refine must be an integer >= 0"),
        (["--target", "fp", "--stream"], "--target fp keeps the FP model's activations"),
    ],
)
def test_cli_bad_options_fail_before_loading(tmp_path, capsys, extra, match):
    # the model path does not exist: an error about the options proves nothing was loaded
    assert main(["quantize", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *extra]) == 2
    assert match in capsys.readouterr().err


def test_cli_search_option_reaches_the_initializer(tiny_dir, tmp_path):
    model_dir, calib = tiny_dir
    out = tmp_path / "out"
    argv = ["quantize", str(model_dir), "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--group-size",
            "32", "--init", "neuqi_int", "--search", "coarse_to_fine", "--dtype", "fp32", "--out", str(out), "--quiet",
            "--format", "fake"]
    assert main(argv) == 0
    summary = json.loads((out / "neuqi_summary.json").read_text())
    assert summary["config"]["init_options"] == {"search": "coarse_to_fine"}


def test_cli_low_memory_gives_the_same_model(tiny_dir, tmp_path, monkeypatch):
    model_dir, calib = tiny_dir
    seen = []
    original = pipeline.quantize_model
    monkeypatch.setattr(pipeline, "quantize_model", lambda *a, **k: seen.append(k["replay_activations"]) or
                        original(*a, **k))
    losses = {}
    for flags in ([], ["--low-memory"]):
        out = tmp_path / f"out{len(flags)}"
        argv = ["quantize", str(model_dir), "--calib", str(calib), "--nsamples", "2", "--seqlen", "32",
                "--group-size", "32", "--dtype", "fp32", "--out", str(out), "--quiet", "--format", "fake", *flags]
        assert main(argv) == 0
        losses[len(flags)] = json.loads((out / "neuqi_summary.json").read_text())["totals"]["loss"]
    assert seen == [True, False] and losses[0] == losses[1]
