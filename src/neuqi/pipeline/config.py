"""The quantization run's configuration (``QuantConfig``): plain, validated data that round-trips JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..quant import grid, solvers

PARAM_FITS = ("static", "dynamic")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; plain data, validated on construction, JSON round-trip via
    to_dict/from_dict."""

    bits: int = field(default=3, metadata={"help": "bits per weight, 2..8"})
    group_size: int = field(
        default=128, metadata={"help": "input columns per (scale, zero-point); -1: per row"}
    )
    method: str = field(default="ldlq", metadata={"help": "rounding solver: rtn | gptq | ldlq"})
    init: str = field(default="neuqi", metadata={"help": "parameter initializer: minmax | neuqi_int | neuqi"})
    act_order: bool = field(default=True, metadata={"help": "process columns by decreasing diag(H)"})
    damping: float = field(default=0.01, metadata={"help": "λ = damping·mean(diag H) added to H"})
    block_size: int = field(default=128, metadata={"help": "solver block size (lazy updates)"})
    param_fit: str = field(
        default="static",
        metadata={
            "help": "static: fit (s, Z) on the original W; dynamic: when the solver "
            "reaches the group, on the error-updated W"
        },
    )
    batch_size: int = field(default=4, metadata={"help": "calibration windows per layer forward"})
    init_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra initializer options"})
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        grid.check_bits(self.bits)
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or (self.group_size != -1 and self.group_size <= 0)
        ):
            raise ConfigError(
                f"group_size must be a positive integer or -1 (per row), got {self.group_size!r}"
            )
        solvers.get_solver(self.method)
        if self.init not in _init_methods():
            raise ConfigError(f"unknown init {self.init!r}; choose one of {_init_methods()}")
        if self.param_fit not in PARAM_FITS:
            raise ConfigError(f"unknown param_fit {self.param_fit!r}; choose one of {list(PARAM_FITS)}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError(f"damping must be a finite number >= 0, got {self.damping!r}")
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.init_options, dict) or not all(isinstance(k, str) for k in self.init_options):
            raise ConfigError("init_options must be a dict with string keys")
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"QuantConfig version {self.version} is not supported (this is {CONFIG_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def short_name(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}g{g}-{self.init.replace('_', '-')}-{self.method}"


def _init_methods() -> list[str]:
    from ..quant.init import available_init_methods

    return available_init_methods()


def needs_calibration(config: QuantConfig) -> bool:
    """False for RTN with an initializer that ignores the Hessian: nothing then depends on the calibration
    activations."""
    from ..quant.init import uses_hessian

    return config.method != "rtn" or uses_hessian(config.init)
