"""The live model as explicit sums: W_eff = W + sum over active requests i of delta_i.

Each adapter kind says what its stored weights add to a layer's weight (`DELTAS`); for a
LoRA that is (alpha / r) * B @ A, formed in float64. Removing a request subtracts exactly
the term that adding it added. PEFT's add_weighted_adapter is never used with negative
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


DELTAS = {"lora": _lora_delta}  # adapter kind -> (adapter, module) -> float64 delta of the module's weight


def delta(adapter: Adapter, module: str) -> torch.Tensor:
    """What `adapter` adds to the weight of `module`, (d_out, d_in) in float64."""
    return DELTAS[adapter.kind](adapter, module)


@torch.no_grad()
def compose(model: nn.Module, adapters: list[Adapter], direction: int = +1) -> None:
    """Add (direction=+1) or remove (-1) each adapter's terms in the model's weights, in place."""
    modules = dict(model.named_modules())
    for adapter in adapters:
        for name in adapter.weights:
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise SeqforgetError(f"an adapter targets {name}, which is not a linear layer of this model")
            w = layer.weight
            w.copy_((w.double() + direction * delta(adapter, name)).to(w.dtype))
