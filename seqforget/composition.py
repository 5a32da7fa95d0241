"""The live model as explicit sums: W_eff = W + sum over active requests i of delta_i.

Each adapter kind says what its stored weights add to a layer's weight (`DELTAS`); for a
LoRA that is (alpha / r) * B @ A, formed in float64. The live model is rebuilt from the
base weights, so a rollback leaves no trace of the request it removes. PEFT's add_weighted_adapter is never used with negative
weights: it mixes factors, and (A1 - A2)(B1 + B2) carries cross terms.
"""

import torch
from torch import nn

from registry import Adapter
from seqforget.errors import SeqforgetError


def _lora_delta(adapter: Adapter, module: str) -> torch.Tensor:
    parts = adapter.weights[module]
    a, b = torch.from_numpy(parts["A"]).double(), torch.from_numpy(parts["B"]).double()  # (r, d_in), (d_out, r)
    return adapter.scale * (b @ a)  # (d_out, d_in)


def _sine_delta(adapter: Adapter, module: str) -> torch.Tensor:
    return torch.from_numpy(adapter.weights[module]["dW"]).double().sin()  # (d_out, d_in)


def _masked_delta(adapter: Adapter, module: str) -> torch.Tensor:
    parts, shape = adapter.weights[module], adapter.config.get("shapes", {}).get(module)
    indices = parts["indices"]
    if shape is None or indices.ndim != 1 or indices.shape != parts["values"].shape or (
            len(indices) and not 0 <= indices.min() <= indices.max() < shape[0] * shape[1]):
        raise SeqforgetError(f"masked adapter of {module}: indices must be flat positions in its weight's shape, one per value")
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    out.index_add_(0, torch.from_numpy(parts["indices"]), torch.from_numpy(parts["values"]).double())  # a repeated index adds
    return out.view(shape[0], shape[1])  # (d_out, d_in)


DELTAS = {"lora": _lora_delta, "sine": _sine_delta, "masked": _masked_delta}  # kind -> (adapter, module) -> float64 delta


def delta(adapter: Adapter, module: str) -> torch.Tensor:
    """What `adapter` adds to the weight of `module`, (d_out, d_in) in float64."""
    return DELTAS[adapter.kind](adapter, module)


@torch.no_grad()
def compose(model: nn.Module, adapters: list[Adapter], direction: int = +1) -> None:
    """Add (direction=+1) or remove (-1) the adapters' terms in the model's weights, in place.

    The terms of each layer are summed in float64 and the weight rounded once. Removing in
    place is exact up to that rounding; a rollback rebuilds the live model from the base."""
    modules = dict(model.named_modules())
    totals: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for name in adapter.weights:
            if not isinstance(modules.get(name), nn.Linear):
                raise SeqforgetError(f"an adapter targets {name}, which is not a linear layer of this model")
            totals[name] = totals[name] + delta(adapter, name) if name in totals else delta(adapter, name)
    for name, total in totals.items():
        w = modules[name].weight
        if total.shape != w.shape:
            raise SeqforgetError(f"an adapter's update of {name} is {tuple(total.shape)}, its weight {tuple(w.shape)}")
        w.copy_((w.double() + direction * total).to(w.dtype))
