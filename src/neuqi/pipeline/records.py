"""Typed results of a quantization run: one ``LinearRecord`` per quantized linear and the ``QuantResult``.

Both round-trip JSON through ``to_dict``/``from_dict`` (``neuqi_summary.json`` is ``QuantResult.to_dict()``);
the per-linear ``QParams`` travel in memory only (the checkpoint stores them).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..quant.grid import QParams
from .config import QuantConfig


@dataclass
class LinearRecord:
    """What quantizing one linear cost and gave. Losses are tr(ΔW H ΔWᵀ) (None without calibration):
    ``init_loss`` of the initial RTN with the diagonal weighting only, ``loss_before`` the RTN proxy loss,
    ``loss`` after the solver."""

    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    seconds: float
    loss: float | None = None
    loss_before: float | None = None
    init_loss: float | None = None
    init_seconds: float | None = None
    damping: float | None = None
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearRecord:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        d["shape"] = tuple(d["shape"])
        return cls(**d)


def _sum(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values))


@dataclass
class QuantResult:
    """The outcome of ``quantize_model``: config, per-linear records, timings, memory, and the QParams to pack.

    Indexing it like the dict returned before (``result["records"]``) still works, with a DeprecationWarning.
    """

    config: QuantConfig
    records: list[LinearRecord]
    qparams: dict[str, QParams] = field(default_factory=dict, repr=False)
    model: dict[str, Any] = field(default_factory=dict)
    layers: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    timings: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. ``eval`` results added by the command

    @property
    def totals(self) -> dict[str, Any]:
        return {"linears": len(self.records), "loss": _sum([r.loss for r in self.records]),
                "loss_before": _sum([r.loss_before for r in self.records]),
                "init_loss": _sum([r.init_loss for r in self.records])}

    def loss_text(self) -> str:
        """The summed layer loss for a summary line ("n/a" when RTN ran without calibration)."""
        loss = self.totals["loss"]
        return "n/a (no calibration)" if loss is None else f"{loss:.4g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no QParams); ``extra`` keys sit at the top level."""
        return {"config": self.config.to_dict(), "model": self.model, "layers": self.layers,
                "calibration": self.calibration, "device": self.device, "world_size": self.world_size,
                "records": [r.to_dict() for r in self.records], "totals": self.totals, "timings": self.timings,
                "memory": self.memory, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantResult:
        known = {"config", "model", "layers", "calibration", "device", "world_size", "records", "totals", "timings",
                 "memory"}
        return cls(config=QuantConfig.from_dict(data["config"]),
                   records=[LinearRecord.from_dict(r) for r in data.get("records", [])],
                   model=data.get("model", {}), layers=data.get("layers", 0), calibration=data.get("calibration", {}),
                   device=data.get("device", "cpu"), timings=data.get("timings", {}), memory=data.get("memory", {}),
                   world_size=data.get("world_size", 1), extra={k: v for k, v in data.items() if k not in known})

    def __getitem__(self, key: str) -> Any:
        warnings.warn("indexing the quantize_model result is deprecated; use its attributes (result.records, "
                      "result.qparams, result.to_dict())", DeprecationWarning, stacklevel=2)
        if key == "qparams":
            return self.qparams
        if key == "records":
            return [r.to_dict() for r in self.records]
        return self.to_dict()[key]
