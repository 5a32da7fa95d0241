"""Retained activations: the Gram matrix of the inputs each target layer receives, and which
target layers receive the same input."""

import torch
from torch import nn

from seqforget.losses import MODEL_INPUTS


class InputGrams:
    """G = sum over retained tokens of x x^T, (d, d) in float64, for each named linear layer,
    gathered from every forward pass of the model while this is open (`with InputGrams(...)`):
    the passes that probe the retained rows give the statistics too, at no second pass.

    Layers that read the very same input tensor (a transformer's q, k and v projections; an
    MLP's gate and up projections) have the same Gram matrix: it is gathered once, for the
    first of them to run, their `leader`. Language-model layers see padding too; rows of padded
    positions are dropped using the attention mask when the layer's input has the batch's
    (B, T) shape.
    """

    def __init__(self, model: nn.Module, modules: list[str]):
        self.model, self.modules = model, list(modules)
        self.leader: dict[str, str] = {}  # layer -> the first layer that read its input (itself if none)
        self._grams: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple = (None, None)  # the input of the last layer called, and that layer's leader
        self._handles: list = []

    def gram(self, name: str) -> torch.Tensor:
        """The Gram matrix of `name`'s inputs (its leader's: the same object)."""
        lead = self.leader.get(name, name)
        if lead not in self._grams:  # no pass reached it
            d = dict(self.model.named_modules())[lead].in_features
            self._grams[lead] = torch.zeros(d, d, dtype=torch.float64)
        return self._grams[lead]

    def __enter__(self) -> "InputGrams":
        named = dict(self.model.named_modules())
        self._handles = [self.model.register_forward_pre_hook(self._batch, with_kwargs=True)]
        self._handles += [named[name].register_forward_hook(self._collect(name)) for name in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._last, self._mask = [], (None, None), None

    def _batch(self, _model, _args, kwargs):
        self._mask = kwargs.get("attention_mask")

    def _collect(self, name: str):
        @torch.no_grad()
        def collect(_module, inputs, _output):
            x = inputs[0]  # (..., d)
            if name not in self.leader:  # a layer called twice keeps what its first call said
                self.leader[name] = self._last[1] if self._last[0] is x else name
            self._last = (x, self.leader[name])
            if self.leader[name] != name:
                return  # its leader gathers this very tensor
            mask = self._mask
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]  # (n_tokens, d)
            x = x.reshape(-1, x.shape[-1]).double()
            gram = self._grams.get(name)
            self._grams[name] = x.T @ x if gram is None else gram.add_(x.T @ x)

        return collect


@torch.no_grad()
def input_grams(model: nn.Module, batches: list[dict[str, torch.Tensor]], modules: list[str]) -> dict[str, torch.Tensor]:
    """InputGrams over forward passes of `batches`: {layer: its Gram matrix}."""
    with InputGrams(model, modules) as grams:
        for batch in batches:
            model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    return {name: grams.gram(name) for name in modules}

