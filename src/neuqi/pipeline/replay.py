"""Replay of a decoder layer's finished sub-blocks during calibration (bit-identical, about half the forward work)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import adapters


class Replay:
    """Skips recomputing the parts of a layer whose inputs no longer change; results are bit-identical.

    Groups are quantized in execution order. Before the calibration pass for group t, groups 0..t−1 are final, so:
    * a child (the attention, the MLP) whose output is its tail linear's output (``adapters.trace_layer``): the
      tail's input for batch j is final once the groups before the tail's group are; it is recorded the next time
      the tail runs (a forward pre-hook), and from then on the child is computed as tail(recorded input), skipping
      e.g. the attention core or the MLP's up projections;
    * any child: once the groups holding its linears are all final, its output for batch j is recorded the next
      time it runs and replayed after that.
    A child that may be skipped is swapped for an ``adapters.StandIn`` (same name, same tensors) until ``close()``
    puts it back.
    ``set_batch(j)`` must be called before running batch j; ``group_done()`` after each group is quantized;
    ``close()`` (or leaving ``with Replay(...) as replay:``) at the end.
    The recorded activations cost memory (for Llama, up to the MLP's intermediate width per calibration token);
    ``enabled=False`` recomputes everything instead.
    """

    def __init__(self, layer: nn.Module, trace: adapters.LayerTrace, enabled: bool = True) -> None:
        self.batch = 0
        self._done = 0
        self.enabled = enabled
        self._layer = layer
        group_of = {name: i for i, group in enumerate(trace.groups) for name in group}
        self._children: list[_ReplayedChild] = []
        for name, child in layer.named_children():
            used = [group_of[f"{name}.{n}"] for n, m in child.named_modules() if f"{name}.{n}" in group_of]
            if used and not isinstance(child, nn.Linear):
                tail, items = trace.tails.get(name, (None, 0))
                self._children.append(_ReplayedChild(
                    name, child, max(used), None if tail is None else layer.get_submodule(tail),
                    group_of.get(tail, -1), items,
                ))
        self._calls: dict[int, int] = {}
        self._update()

    def set_batch(self, j: int) -> None:
        self.batch, self._calls = j, {}

    def group_done(self) -> None:
        self._done += 1
        self._update()

    def _update(self) -> None:
        if not self.enabled:
            return
        for c in self._children:
            if c.tail is not None and c.record is None and self._done >= c.tail_group:
                c.record = c.tail.register_forward_pre_hook(self._recorder(c))
            if (c.record is not None or self._done > c.last_group) and c.stand_in is None:
                c.stand_in = adapters.StandIn(c.module, self._replaying_forward(c))
                self._layer.set_submodule(c.name, c.stand_in)

    def _recorder(self, c: _ReplayedChild) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple) -> None:
            if self.batch not in c.inputs:
                c.inputs[self.batch] = args[0].clone()

        return record

    def _replaying_forward(self, c: _ReplayedChild) -> Callable[..., Any]:
        """The forward of ``c``'s stand-in: a recorded output, else tail(recorded input), else the child itself."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            n = self._calls[id(c)] = self._calls.get(id(c), -1) + 1
            key = (self.batch, n)  # a child called twice per layer forward is keyed per call
            if key in c.outputs:
                return _clone(c.outputs[key])
            if n == 0 and self.batch in c.inputs:
                x = c.inputs[self.batch] if self._done <= c.last_group else c.inputs.pop(self.batch)  # last use
                out = c.tail(x)
                out = (out, *[None] * (c.items - 1)) if c.items else out
            else:
                out = c.module(*args, **kwargs)
            if self._done > c.last_group:
                c.outputs[key] = out
                return _clone(out)
            return out

        return forward

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Put every child back in place of its stand-in and remove the recording hooks (also on ``with`` exit)."""
        for c in self._children:
            if c.stand_in is not None:
                self._layer.set_submodule(c.name, c.module)
            if c.record is not None:
                c.record.remove()
        self._children.clear()


@dataclass
class _ReplayedChild:
    name: str  # the child's attribute name in the layer
    module: nn.Module
    last_group: int  # index of the last group holding one of its linears
    tail: nn.Module | None  # the linear whose output is the child's output
    tail_group: int
    items: int  # the child returns (tail output, None, ...) of this length; 0: the bare tensor
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> the tail's final input
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (batch, call) -> final output
    record: Any = None  # the recording hook's handle
    stand_in: adapters.StandIn | None = None  # in the child's place while installed


def _clone(out: Any) -> Any:
    """A copy of a module output (tensors in tuples/lists), so that in-place edits by the caller cannot reach
    the stored one."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(x) for x in out)
    return out
