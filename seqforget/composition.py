"""The live model as explicit sums: W_eff = W + sum over active requests i of delta_i.

Each adapter kind says what its stored weights add to a layer's weight (`DELTAS`); for a
LoRA that is (alpha / r) * B @ A, formed in float64. The terms are summed exactly, in fixed
point: each delta is rounded once to a multiple of QUANTUM (2^-48, far below float32's
resolution) and held as an int64 count of quanta. Integer sums do not depend on their order,
and taking a term off gives back exactly the sum without it, so the live model is the same
bits however it was reached: composed at once, grown request by request, or left by a
rollback (seqforget.live). PEFT's add_weighted_adapter is never used with negative weights:
it mixes factors, and (A1 - A2)(B1 + B2) carries cross terms.
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


QUANTUM = 2.0 ** -48  # the unit of the exact sums: about 3.6e-15
LIMIT = 2.0 ** 14  # the largest entry a term may have: sums of terms this size stay exact in float64 too


def delta(adapter: Adapter, module: str) -> torch.Tensor:
    """What `adapter` adds to the weight of `module`, (d_out, d_in) in float64."""
    return DELTAS[adapter.kind](adapter, module)


def changes(adapter: Adapter, module: str) -> bool:
    """Whether `adapter` changes the weight of `module` at all, read off its stored parts."""
    parts = adapter.weights[module]
    if adapter.kind == "lora":
        return bool(parts["A"].any() and parts["B"].any())
    return bool(delta(adapter, module).any())


def low_rank(adapter: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B', A) in float32 with delta = B' A, for a LoRA (B' = scale * B, (d_out, r); A (r, d_in));
    None for the kinds whose delta is dense."""
    if adapter.kind != "lora":
        return None
    parts = adapter.weights[module]
    return adapter.scale * torch.from_numpy(parts["B"]).float(), torch.from_numpy(parts["A"]).float()


def term(adapter: Adapter, module: str) -> torch.Tensor:
    """`delta` as an exact count of quanta (int64); an entry beyond LIMIT is refused."""
    d = delta(adapter, module)
    if not bool(torch.isfinite(d).all()) or d.abs().max().item() >= LIMIT:
        raise SeqforgetError(f"an adapter's update of {module} is not finite or has an entry of {LIMIT:g} or more; "
                             "it cannot be composed")
    return torch.round(d / QUANTUM).to(torch.int64)  # dividing by a power of two is exact


def summed_terms(model: nn.Module, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Per layer, the exact sum of the adapters' terms, after checking each fits its layer."""
    modules = dict(model.named_modules())
    totals: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for name in adapter.weights:
            if not isinstance(modules.get(name), nn.Linear):
                raise SeqforgetError(f"an adapter targets {name}, which is not a linear layer of this model")
            t = term(adapter, name)
            if t.shape != modules[name].weight.shape:
                raise SeqforgetError(f"an adapter's update of {name} is {tuple(t.shape)}, its weight "
                                     f"{tuple(modules[name].weight.shape)}")
            totals[name] = totals[name] + t if name in totals else t
    return totals


def added(weight: torch.Tensor, total: torch.Tensor, direction: int = +1) -> torch.Tensor:
    """`weight` plus (or minus) an exact sum of terms, rounded once to the weight's dtype."""
    return (weight.double() + direction * total.to(weight.device).double() * QUANTUM).to(weight.dtype)


@torch.no_grad()
def compose(model: nn.Module, adapters: list[Adapter], direction: int = +1) -> None:
    """Add (direction=+1) or remove (-1) the adapters' terms in the model's weights, in place.

    The terms of each layer are summed exactly and the weight rounded once. Removing in
    place is exact up to that rounding; seqforget.live keeps the base weights and the sums
    so that its rollbacks are exact."""
    modules = dict(model.named_modules())
    for name, total in summed_terms(model, adapters).items():
        w = modules[name].weight
        w.copy_(added(w, total, direction))
