"""Map any transformers causal LM onto what the layer-wise pipeline needs (spec §11.2), derived, not
tabulated.

* ``find_stack(model)``: the decoder layer stack, an ``nn.ModuleList`` of blocks holding ``nn.Linear`` or packed
  ``QuantLinear`` layers, found from the model's ``_no_split_modules`` class names, else as the largest
  ``ModuleList`` of same-class modules. ``stem`` are
  the other children of the stack's parent (embeddings, rotary embeddings, final norm: what runs before layer
  0 and the final norm after it); ``head`` are the top-level modules outside that parent (``lm_head``).
* ``capture_inputs(model, stack, batches)``: the hidden states entering layer 0 for every batch and the
  keyword arguments every layer is called with (masks and position embeddings differ between layers in Gemma
  2/3). The layers are replaced by identities (``StandIn``) for this one pass and the last one stops the forward
  with a private exception that only this function catches, so nothing but the stem runs.
* ``linear_groups(layer, call)``: the layer's ``nn.Linear``s grouped by the tensor they read, in execution
  order (``[[q, k, v], [o], [gate, up], [down]]`` for Llama, ``[[qkv_proj], [o_proj], [gate_up_proj],
  [down_proj]]`` for Phi-3), found by hooking one call of the layer. ``trace_layer`` also names each child
  whose output is its last linear's output (``o_proj`` of the attention, ``down_proj`` of the MLP).
* ``lm_head(model)``: hidden states → logits, with the model's final logit soft-capping (Gemma 2).
* ``StandIn(module, forward)``: takes a module's place (same name, same tensors) with another forward, for a
  scoped change of behaviour without patching the module (input capture, replay, gradient checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..formats.packed import QuantLinear

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # positional args after the hidden states, keyword args


@dataclass
class DecoderStack:
    """Where the decoder blocks of a causal LM are. Names are qualified module names in the model."""

    name: str  # e.g. "model.layers"
    layers: nn.ModuleList
    stem: list[str] = field(default_factory=list)  # siblings of the stack: embeddings, rotary, final norm
    head: list[str] = field(default_factory=list)  # top-level modules outside the stack's parent: lm_head

    def layer_name(self, i: int) -> str:
        return f"{self.name}.{i}"


def _named_module_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            yield name, module


def _uniform(blocks: nn.ModuleList) -> bool:
    return len({type(b) for b in blocks}) == 1


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, QuantLinear)) for m in module.modules())


def find_stack(model: nn.Module) -> DecoderStack:
    """The decoder layer stack of ``model``; ModelError saying what was looked for when there is none."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, ml)
        for name, ml in _named_module_lists(model)
        if _uniform(ml) and type(ml[0]).__name__ in no_split and _has_linear(ml[0])
    ]
    if not candidates:  # fallback: the largest list of same-class blocks holding linears
        candidates = [(n, ml) for n, ml in _named_module_lists(model) if _uniform(ml) and _has_linear(ml[0])]
    if not candidates:
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of same-class "
            f"blocks holding nn.Linear layers (looked for classes {sorted(no_split) or 'none listed'} from "
            "_no_split_modules, then for any such list)"
        )
    name, layers = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))  # the longest, outermost
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    stem = [f"{parent_name}.{n}" if parent_name else n for n, m in parent.named_children() if m is not layers]
    head: list[str] = []
    if parent_name:
        top = parent_name.split(".")[0]
        head = [n for n, _ in model.named_children() if n != top]
    return DecoderStack(name=name, layers=layers, stem=stem, head=head)


def lm_head(model: nn.Module, head: nn.Module | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (…, H) → logits (…, V) through ``head`` (default: the model's output embeddings), with the model's final
    logit soft-capping c·tanh(logits / c) if its config has one (Gemma 2)."""
    head = head if head is not None else model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embeddings (lm_head)")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head if not cap else (lambda h: torch.tanh(head(h) / cap) * cap)


class StandIn(nn.Module):
    """Takes the place of ``module`` (under its name, e.g. ``layers[i] = StandIn(layers[i], f)``) with ``forward``
    as its forward, until the caller puts ``module`` back.

    It shares the module's submodule, parameter and buffer dicts, so qualified names, ``state_dict`` and ``.to()``
    see exactly the module's tensors; other attributes (``config``, ``attention_type``, ...) are read from the
    module. ``forward`` may call ``module`` itself.
    """

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.__dict__.update(
            _modules=module._modules,
            _parameters=module._parameters,
            _buffers=module._buffers,
            _non_persistent_buffers_set=module._non_persistent_buffers_set,
            training=module.training,
            module=module,  # not a submodule: its submodules are already ours
            _stand_in_forward=forward,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._stand_in_forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["module"], name)

    def train(self, mode: bool = True) -> StandIn:
        self.module.training = mode
        return super().train(mode)


# --------------------------------------------------------------------------------------------- input capture
class _StopForward(Exception):
    """Raised by the last identity layer of ``capture_inputs`` to end the model forward; caught only there."""


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], (tuple(args[1:]), dict(kwargs))
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], ((), rest)
    raise ModelError("a decoder layer was called without hidden states as first argument or 'hidden_states'")


@contextmanager
def layers_standing_in(
    layers: nn.ModuleList, forward: Callable[[int, nn.Module], Callable[..., Any]]
) -> Iterator[None]:
    """Within the block ``layers[i]`` is a ``StandIn`` whose forward is ``forward(i, layers[i])``; the layers are put
    back on exit."""
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = StandIn(layer, forward(i, layer))
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _identity(n_layers: int, on_call: Callable[[int, tuple, dict], None]) -> Callable[[int, nn.Module], Callable]:
    """Forwards for ``layers_standing_in``: layer i reports its call and returns its hidden states unchanged; the
    last one raises _StopForward."""

    def make(i: int, _layer: nn.Module) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            on_call(i, args, kwargs)
            if i == n_layers - 1:
                raise _StopForward
            return _hidden(args, kwargs)[0]

        return forward

    return make


@torch.no_grad()
def capture_inputs(
    model: nn.Module, stack: DecoderStack, batches: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """Run the stem on each batch of token ids (b, seqlen) and return (hidden states entering layer 0 per
    batch, the (args, kwargs) each layer receives besides its hidden states, taken from the first batch).

    The model's stem must already be on the device of the token ids.
    """
    hiddens: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(stack.layers)

    def on_call(i: int, args: tuple, kwargs: dict) -> None:
        hidden, call = _hidden(args, kwargs)
        if i == 0:
            hiddens.append(hidden)
        if calls[i] is None:
            calls[i] = call

    with layers_standing_in(stack.layers, _identity(len(stack.layers), on_call)):
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            else:
                raise ModelError(
                    f"the forward of {type(model).__name__} did not reach its last decoder layer"
                )
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing or len(hiddens) != len(batches):
        raise ModelError(f"decoder layers {missing} were never called during the forward")
    return hiddens, calls  # type: ignore[return-value]


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states returned by a decoder layer: a tensor, or the first item of a tuple/ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    first = next(iter(out.values()), None) if hasattr(out, "values") else None
    if isinstance(first, torch.Tensor):
        return first
    raise ModelError(f"cannot read hidden states from a decoder layer output of type {type(out).__name__}")


def fit_batch(call: LayerCall, batch: int) -> LayerCall:
    """``call`` with batch-sized tensors (masks) trimmed to ``batch`` rows when the captured batch was
    larger."""

    def trim(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > batch:
            return v[:batch]
        if isinstance(v, tuple):
            return tuple(trim(x) for x in v)
        return v

    args, kwargs = call
    return tuple(trim(a) for a in args), {k: trim(v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------------------------------- linear groups
def _same_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() or torch.equal(a, b)


@dataclass
class LayerTrace:
    """What one call of a decoder layer shows: ``groups`` of ``nn.Linear`` names (relative to the layer) that read
    the same tensor, in the order first used, and ``tails``: for a direct child (attention, MLP) called once
    whose output is its last linear's output object (or a tuple of it and Nones), child name -> (that linear's
    name relative to the layer, number of items of the tuple output or 0 for a bare tensor)."""

    groups: list[list[str]]
    tails: dict[str, tuple[str, int]]


def trace_layer(layer: nn.Module, call: Callable[[], Any]) -> LayerTrace:
    """Hook one ``call()`` that runs ``layer``; linears never called are left out of the groups."""
    seen: list[tuple[str, torch.Tensor]] = []
    outputs: dict[str, list[Any]] = {}

    def pre_hook(name: str) -> Callable[..., None]:
        def pre(_module: nn.Module, args: tuple) -> None:
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))

        return pre

    def out_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            outputs.setdefault(name, []).append(out)

        return hook

    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ModelError(f"decoder layer {type(layer).__name__} holds no nn.Linear layers to quantize")
    children = {n: c for n, c in layer.named_children() if not isinstance(c, nn.Linear) and _has_linear(c)}
    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in linears.items()]
    handles += [m.register_forward_hook(out_hook(n)) for n, m in {**linears, **children}.items()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        for x0, names in groups:
            if _same_input(x0, x):
                names.append(name)
                break
        else:
            groups.append((x, [name]))
    if not groups:
        raise ModelError(f"no nn.Linear of {type(layer).__name__} ran during its forward")
    tails = {}
    for child_name, outs in outputs.items():
        if child_name not in children or len(outs) != 1:
            continue
        out, items = outs[0], 0
        if isinstance(out, tuple) and out and all(x is None for x in out[1:]):
            out, items = out[0], len(out)
        tail = next((n for n in linears if n.startswith(child_name + ".") and
                     any(o is out for o in outputs.get(n, ()))), None)
        if tail is not None:
            tails[child_name] = (tail, items)
    return LayerTrace([names for _, names in groups], tails)


def linear_groups(layer: nn.Module, call: Callable[[], Any]) -> list[list[str]]:
    """The ``nn.Linear``s of ``layer`` (names relative to it) grouped by the tensor they read, in the order
    the groups are first used, by hooking one ``call()`` that runs the layer. Linears never called are left
    out."""
    return trace_layer(layer, call).groups
