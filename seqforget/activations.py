"""Retained activations: the statistics of the inputs each target layer receives (a Gram
matrix, or a sketch of the inputs for wide layers), and which target layers receive the same input."""

import torch
from torch import nn

from seqforget.losses import model_inputs
from seqforget.projection import SKETCH_RANK, Sketch, sketch_directions


class InputStats:
    """For each named linear layer, the statistics of the retained inputs x it receives,
    gathered from every forward pass of the model while this is open (`with InputStats(...)`):
    the passes that probe the retained rows give the statistics too, at no second pass.

    A layer of input width d <= 2 * `sketch_rank` keeps G = sum of x x^T, (d, d) in float64; a
    wider one keeps a seqforget.projection.Sketch of rank `sketch_rank`, G Omega (d, s), with
    one Omega per width: memory grows with d, not d^2 (at d = 11008, s = 1024: 90 MB a layer
    against 970 MB).

    Layers that read the very same input tensor (a transformer's q, k and v projections; an
    MLP's gate and up projections) have the same Gram matrix: it is gathered once, for the
    first of them to run, their `leader`. Language-model layers see padding too; rows of padded
    positions are dropped using the attention mask when the layer's input has the batch's
    (B, T) shape.
    """

    def __init__(self, model: nn.Module, modules: list[str], sketch_rank: int = SKETCH_RANK):
        self.model, self.modules, self.sketch_rank = model, list(modules), sketch_rank
        self._omegas: dict[int, torch.Tensor] = {}  # width -> the sketches' test matrix
        self.leader: dict[str, str] = {}  # layer -> the first layer that read its input (itself if none)
        self._stats: dict[str, torch.Tensor | Sketch] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple = (None, None)  # the input of the last layer called, and that layer's leader
        self._handles: list = []

    def stats(self, name: str) -> torch.Tensor | Sketch:
        """The Gram matrix, or the sketch, of `name`'s inputs (its leader's: the same object)."""
        lead = self.leader.get(name, name)
        if lead not in self._stats:  # no pass reached it
            self._stats[lead] = self._empty(dict(self.model.named_modules())[lead].in_features)
        return self._stats[lead]

    def _empty(self, d: int) -> torch.Tensor | Sketch:
        if d <= 2 * self.sketch_rank:  # a Gram matrix holds no more than a sketch's G Omega and Omega
            return torch.zeros(d, d, dtype=torch.float64)
        if d not in self._omegas:
            self._omegas[d] = sketch_directions(d, self.sketch_rank)
        return Sketch(d, self.sketch_rank, self._omegas[d])

    def __enter__(self) -> "InputStats":
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
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = self._empty(x.shape[-1])
            if isinstance(stats, Sketch):
                stats.add(x)
            else:  # computed where the inputs are, kept on the CPU
                stats.add_((x.T @ x).cpu())

        return collect


@torch.no_grad()
def input_stats(model: nn.Module, batches: list[dict[str, torch.Tensor]], modules: list[str],
                sketch_rank: int = SKETCH_RANK) -> dict[str, torch.Tensor | Sketch]:
    """InputStats over forward passes of `batches`: {layer: its Gram matrix or sketch}."""
    with InputStats(model, modules, sketch_rank) as gathered:
        for batch in batches:
            model(**model_inputs(model, batch))
    return {name: gathered.stats(name) for name in modules}

