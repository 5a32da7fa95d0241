"""The live model as explicit products: W_eff = W + sum_i s_i * (alpha_i / r_i) * B_i A_i.

Each term is formed as B @ A in float64 and added with its sign, so removing a
request subtracts exactly the term that adding it added. PEFT's
add_weighted_adapter is never used with negative weights: it mixes factors, and
(A1 - A2)(B1 + B2) carries cross terms.
"""

from dataclasses import dataclass

import torch
from torch import nn

from seqforget.errors import SeqforgetError


@dataclass
class Adapter:
    """One stored request's LoRA factors: {module: (A (r, d_in), B (d_out, r))}."""

    id: str
    sign: int  # +1: added; -1: subtracted (distilled target knowledge)
    scale: float  # lora_alpha / r
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def delta(self, module: str) -> torch.Tensor:
        """s * scale * B A, (d_out, d_in), in float64."""
        a, b = self.pairs[module]
        return self.sign * self.scale * (b.double() @ a.double())


@torch.no_grad()
def compose(model: nn.Module, adapters: list[Adapter], direction: int = +1) -> None:
    """Add (direction=+1) or remove (-1) each adapter's terms in the model's weights, in place."""
    modules = dict(model.named_modules())
    for adapter in adapters:
        for name in adapter.pairs:
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise SeqforgetError(f"adapter {adapter.id} targets {name}, which is not a linear layer of this model")
            w = layer.weight
            w.copy_((w.double() + direction * adapter.delta(name)).to(w.dtype))
