"""The quantization run's configuration: plain, validated dataclasses that round-trip JSON.

``QuantConfig`` says how the linears are quantized, ``CalibrationConfig`` which tokens calibrate them. Each field's
``metadata`` holds its command-line help (and ``choices``), from which ``neuqi quantize`` builds its options
(``neuqi.commands.options``): a new option is one field here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..quant import grid, solvers
from ..quant.grid import check_positive_int

PARAM_FITS = ("static", "dynamic")
BPW_WEIGHTINGS = ("kl", "fisher", "layer")  # how --bpw compares linears (neuqi.pipeline.sensitivity)
SOLVERS = ("rtn", "gptq", "ldlq")
TARGETS = ("quantized", "fp")
INITS = ("minmax", "neuqi_int", "neuqi")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; validated on construction, JSON round-trip via to_dict/from_dict.

    ``method=`` is the deprecated name of ``solver`` (accepted with a DeprecationWarning).
    """

    bits: int = field(default=3, metadata={"help": "bits per weight, 2..8"})
    group_size: int = field(default=128, metadata={"help": "input columns per (scale, zero-point); -1: per row"})
    solver: str = field(default="ldlq", metadata={"help": "rounding solver", "choices": SOLVERS})
    init: str = field(default="neuqi", metadata={"help": "parameter initializer", "choices": INITS})
    act_order: bool = field(default=True, metadata={"help": "process columns by decreasing diag(H)"})
    damping: float = field(default=0.01, metadata={"help": "λ = damping·mean(diag H) added to H"})
    block_size: int = field(default=128, metadata={"help": "solver block size (lazy updates)"})
    param_fit: str = field(
        default="static",
        metadata={"help": "static: fit (s, Z) on the original W (paper); dynamic: on the error-updated W when the "
                  "solver reaches the group", "choices": PARAM_FITS},
    )
    target: str = field(
        default="quantized",
        metadata={"help": "the output each linear is fitted to, from the quantized model's input x: quantized: its "
                  "own W·x (GPTQ, the paper); fp: the FP model's W·x̃, so the error of the layers before is "
                  "corrected too (asymmetric calibration; one FP forward more per layer, FP activations kept)",
                  "choices": TARGETS})
    refine: int = field(
        default=8,
        metadata={"help": "rounds of refinement after GPTQ/LDLQ, each a coordinate-descent pass over the codes and "
                  "the least-squares (s, Z) of every row for its codes (neuqi.quant.solvers.refine); 0: off (the "
                  "paper). RTN is never refined"})
    refine_damping: float = field(
        default=0.1, metadata={"help": "λ = refine_damping·mean(diag H) in the refinement's H (at least the solver's)"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per layer forward"})
    init_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra initializer options"})
    bpw: float | None = field(
        default=None,
        metadata={"help": "mixed precision: average bits per weight (codes + fp16 scales and zeros) over the "
                  "quantized linears; bits and group size are then chosen per linear (neuqi.pipeline.budget)"})
    bpw_weighting: str = field(
        default="kl",
        metadata={"help": "--bpw losses: kl: Fisher losses calibrated per linear on its measured end-to-end KL "
                  "(2 extra forwards per linear); fisher: output-Fisher losses only; layer: raw layer losses",
                  "choices": BPW_WEIGHTINGS})
    plan: dict[str, list[int]] | None = field(
        default=None, metadata={"cli": False, "help": "{linear name: [bits, group_size]} overriding bits and "
                                "group_size per linear (what --bpw chose)"})
    version: int = field(default=CONFIG_VERSION, metadata={"cli": False})
    method: InitVar[str | None] = None

    def __post_init__(self, method: str | None) -> None:
        if method is not None:
            warnings.warn("QuantConfig(method=...) is deprecated; use solver=...", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "solver", method)
        grid.check_bits(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
                self.group_size != -1 and self.group_size <= 0):
            raise ConfigError(f"group_size must be a positive integer or -1 (per row), got {self.group_size!r}")
        solvers.get_solver(self.solver)
        if self.init not in _init_methods():
            raise ConfigError(f"unknown init {self.init!r}; choose one of {_init_methods()}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of {list(TARGETS)}")
        if self.param_fit not in PARAM_FITS:
            raise ConfigError(f"unknown param_fit {self.param_fit!r}; choose one of {list(PARAM_FITS)}")
        for name in ("damping", "refine_damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        check_positive_int("block_size", self.block_size)
        check_positive_int("refine", self.refine, minimum=0)
        check_positive_int("batch_size", self.batch_size)
        if not isinstance(self.init_options, dict) or not all(isinstance(k, str) for k in self.init_options):
            raise ConfigError("init_options must be a dict with string keys")
        if self.bpw_weighting not in BPW_WEIGHTINGS:
            raise ConfigError(f"unknown bpw_weighting {self.bpw_weighting!r}; choose one of {list(BPW_WEIGHTINGS)}")
        _check_mixed(self.bpw, self.plan)
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"QuantConfig version {self.version} is not supported (this is {CONFIG_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of ``to_dict``; also reads configs written before ``method`` became ``solver``."""
        data = dict(data)
        if "method" in data:
            data.setdefault("solver", data.pop("method"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def label(self) -> str:
        """The row label reports use: rtn (RTN solver), gptq (Min-Max + GPTQ/LDLQ), else the initializer's name."""
        if self.solver == "rtn":
            return "rtn"
        return "gptq" if self.init == "minmax" else self.init

    def refine_rounds(self) -> int:
        """Rounds of refinement the solver's result gets: ``refine``, or 0 for RTN (never refined)."""
        return 0 if self.solver == "rtn" else self.refine

    def linear_format(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of the linear ``name``: from ``plan`` if it lists it, else the config's."""
        bits, group_size = (self.plan or {}).get(name, (self.bits, self.group_size))
        return bits, group_size

    def short_name(self) -> str:
        """e.g. ``w3g64-neuqi-ldlq``, ``bpw2.5-neuqi-ldlq``; ``-r0`` appended for ``refine=0`` (the paper's
        pipeline) and ``-rN`` for other non-default rounds, ``-fp`` for ``target="fp"``."""
        size = f"bpw{self.bpw:g}" if self.bpw is not None else (
            f"w{self.bits}g{'c' if self.group_size == -1 else self.group_size}")
        refine = "" if self.solver == "rtn" or self.refine == _REFINE_DEFAULT else f"-r{self.refine}"
        return f"{size}-{self.init.replace('_', '-')}-{self.solver}{refine}" + ("-fp" if self.target == "fp" else "")


_REFINE_DEFAULT = QuantConfig.__dataclass_fields__["refine"].default


def _deprecated_method(self: QuantConfig) -> str:
    warnings.warn("QuantConfig.method is deprecated; use .solver", DeprecationWarning, stacklevel=2)
    return self.solver


# ``config.method`` reads the solver (the InitVar's class-level default would otherwise answer None)
QuantConfig.method = property(_deprecated_method)  # type: ignore[assignment]


@dataclass(frozen=True)
class CalibrationConfig:
    """Which tokens calibrate the Hessians: ``nsamples`` windows of ``seqlen`` tokens from ``source``."""

    source: str | None = field(
        default=None, metadata={"help": "calibration text: c4 | wikitext2 | PATH (default: C4, else Python's "
                                "bundled docs)", "flag": "--calib"})
    nsamples: int = field(default=128, metadata={"help": "calibration windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per window"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})

    def __post_init__(self) -> None:
        check_positive_int("nsamples", self.nsamples)
        check_positive_int("seqlen", self.seqlen, minimum=2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_mixed(bpw: Any, plan: Any) -> None:
    """bpw: None or a positive finite number; plan: None or {name: [bits, group_size]} with valid values."""
    if bpw is not None and (isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not math.isfinite(bpw)
                            or bpw <= 0):
        raise ConfigError(f"bpw must be a positive number of bits per weight, got {bpw!r}")
    if plan is None:
        return
    if not isinstance(plan, dict):
        raise ConfigError(f"plan must be a dict {{linear name: [bits, group_size]}}, got {type(plan).__name__}")
    for name, spec in plan.items():
        if not isinstance(name, str) or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            raise ConfigError(f"plan entry {name!r}: expected [bits, group_size], got {spec!r}")
        grid.check_bits(spec[0])
        if isinstance(spec[1], bool) or not isinstance(spec[1], int) or (spec[1] != -1 and spec[1] <= 0):
            raise ConfigError(f"plan entry {name!r}: group_size must be a positive integer or -1, got {spec[1]!r}")


def _init_methods() -> list[str]:
    from ..quant.init import available_init_methods

    return available_init_methods()


def needs_calibration(config: QuantConfig) -> bool:
    """False for RTN with an initializer that ignores the Hessian: nothing then depends on the calibration
    activations."""
    from ..quant.init import uses_hessian

    return config.solver != "rtn" or uses_hessian(config.init)
