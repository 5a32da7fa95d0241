"""Retained activations: the Gram matrix of the inputs each target layer receives, and which
target layers receive the same input."""

import torch
from torch import nn

from seqforget.losses import MODEL_INPUTS


@torch.no_grad()
def input_grams(model: nn.Module, batches: list[dict[str, torch.Tensor]], modules: list[str]) -> dict[str, torch.Tensor]:
    """G = sum over retained tokens of x x^T, (d, d) in float64, for each named linear layer.

    Language-model layers see padding too; rows of padded positions are dropped
    using the attention mask when the layer's input has the batch's (B, T) shape.
    """
    named = dict(model.named_modules())
    grams = {name: torch.zeros(named[name].in_features, named[name].in_features, dtype=torch.float64) for name in modules}
    mask: torch.Tensor | None = None

    def hook(name):
        def collect(_module, inputs, _output):
            x = inputs[0]  # (..., d)
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]  # (n_tokens, d)
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name] += x.T @ x

        return collect

    handles = [named[name].register_forward_hook(hook(name)) for name in modules]
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    finally:
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def shared_inputs(model: nn.Module, batch: dict[str, torch.Tensor], modules: list[str]) -> dict[str, str]:
    """For each named layer, the first of `modules` that reads the very same input tensor in a
    forward pass of `batch` (itself if none): a transformer's q, k and v projections read one
    input, as do an MLP's gate and up projections. Layers with the same input have the same
    Gram matrix, so they can share one basis."""
    named = dict(model.named_modules())
    leader: dict[str, str] = {}
    last: list = [None, None]  # the input of the last target layer called, and that layer's leader

    def hook(name):
        def seen(_module, inputs, _output):
            if name in leader:  # a layer called twice keeps what its first call said
                return
            same = last[0] is not None and inputs[0] is last[0]
            leader[name] = last[1] if same else name
            last[0], last[1] = inputs[0], leader[name]

        return seen

    handles = [named[name].register_forward_hook(hook(name)) for name in modules]
    try:
        model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    finally:
        for h in handles:
            h.remove()
    return {name: leader.get(name, name) for name in modules}
