"""Options generated from config dataclasses, the solver rename and typed run records."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest

from neuqi.cli import build_parser
from neuqi.commands.options import add_config_options, cli_fields, config_kwargs
from neuqi.distill import DistillConfig
from neuqi.errors import ConfigError
from neuqi.pipeline.config import CalibrationConfig, QuantConfig
from neuqi.pipeline.records import LinearRecord, QuantResult


def _parser(command: str = "quantize") -> argparse.ArgumentParser:
    sub = build_parser()._subparsers._group_actions[0]  # the sub-command action
    return sub.choices[command]


def _quantize_parser() -> argparse.ArgumentParser:
    return _parser("quantize")


@pytest.mark.parametrize("command, cls", [("quantize", QuantConfig), ("quantize", CalibrationConfig),
                                          ("distill", DistillConfig)])
def test_every_documented_field_is_an_option(command, cls):
    options = {a.dest: a for a in _parser(command)._actions if a.help != argparse.SUPPRESS}
    for f, _ in cli_fields(cls):
        assert f.name in options, f.name
        assert options[f.name].help.startswith(f.metadata["help"])


def test_options_pass_only_what_was_given():
    @dataclasses.dataclass
    class Demo:
        n: int = dataclasses.field(default=3, metadata={"help": "a count"})
        flag: bool = dataclasses.field(default=True, metadata={"help": "a switch"})
        name: str | None = dataclasses.field(default=None, metadata={"help": "a name", "choices": ("a", "b")})
        hidden: int = 7

    p = argparse.ArgumentParser()
    add_config_options(p, Demo, "demo")
    assert config_kwargs(Demo, p.parse_args([]), {"n": 5}) == {"n": 5}
    assert config_kwargs(Demo, p.parse_args(["--n", "9", "--no-flag", "--name", "b"])) == {
        "n": 9, "flag": False, "name": "b"}
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden", "1"])
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "c"])


def test_method_is_a_deprecated_name_of_solver():
    with pytest.warns(DeprecationWarning):
        config = QuantConfig(method="gptq")
    assert config.solver == "gptq"
    with pytest.warns(DeprecationWarning):
        assert config.method == "gptq"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QuantConfig.from_dict({"method": "rtn", "init": "minmax"}).solver == "rtn"  # old checkpoints
        assert "method" not in QuantConfig().to_dict()
    args = _quantize_parser().parse_args(["--method", "rtn"])
    assert args.solver == "rtn"


def test_label_names_the_report_row():
    assert QuantConfig(solver="rtn", init="minmax").label() == "rtn"
    assert QuantConfig(solver="ldlq", init="minmax").label() == "gptq"
    assert QuantConfig(init="neuqi_int").label() == "neuqi_int"
    assert QuantConfig().label() == "neuqi"


@pytest.mark.parametrize("kwargs", [{"nsamples": 0}, {"seqlen": 1}, {"seed": 1.5}, {"nsamples": True}])
def test_calibration_config_is_validated(kwargs):
    with pytest.raises(ConfigError):
        CalibrationConfig(**kwargs)


def test_quant_result_round_trips_json_and_sums_losses():
    records = [LinearRecord("a", (4, 8), 3, 8, seconds=0.1, loss=1.0, loss_before=2.0, init_loss=3.0),
               LinearRecord("b", (4, 8), 3, 8, seconds=0.2, loss=0.5, loss_before=1.0, init_loss=None)]
    result = QuantResult(QuantConfig(bits=3, group_size=8), records, extra={"eval": {"ppl": 1.5}})
    assert result.totals == {"linears": 2, "loss": 1.5, "loss_before": 3.0, "init_loss": None}
    data = result.to_dict()
    back = QuantResult.from_dict(data)
    assert back.records == records and back.config == result.config and back.to_dict() == data
    with pytest.warns(DeprecationWarning):
        assert result["totals"]["loss"] == 1.5


def test_distill_options_build_the_config():
    from neuqi.commands.distill import _config

    args = _parser("distill").parse_args(["ckpt", "--loss", "kl", "--no-teacher-cache", "--allow-calibration-overlap",
                                          "--nsamples", "8", "--seqlen", "64"])
    config = _config(args)
    assert (config.loss, config.cache_teacher, config.avoid_calibration_overlap, config.nsamples) == ("kl", False,
                                                                                                     False, 8)
    assert _config(_parser("distill").parse_args(["ckpt"])) == DistillConfig()
