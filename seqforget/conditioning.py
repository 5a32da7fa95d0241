"""The projector's Jacobian condition number: a health figure of a request.

SineProject traces the failure of unlearning in vision-language models to the projector: as
gradient methods train, the Jacobian of the projector's output with respect to its input
(what the vision tower hands over) grows ill-conditioned (about 10^6 at 7B), and the image
tokens the language model reads drift. For each image of a batch, the Jacobian J (d_out, d_in)
is taken at a few of its tokens; the figure is the median over those tokens of
sigma_max(J) / sigma_min(J), in float64.
"""

import torch
from torch import nn

from seqforget.representations import image_features
from seqforget.scopes import ARCHITECTURES

TOKENS_PER_IMAGE = 4  # tokens of each image whose Jacobian is taken, spread over the image
IMAGES = 4  # images a request's figure is taken on: 16 SVDs of (d_out, d_in), seconds on a CPU at 7B


def projector_name(model: nn.Module) -> str | None:
    """The name of the module that maps vision features to the language model's width (the
    architecture's projector, seqforget.scopes.ARCHITECTURES), or None for an unknown architecture."""
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    return None if arch is None else next((n for n, _ in model.named_modules() if n.endswith(arch.projector)), None)


def find_projector(model: nn.Module) -> nn.Module | None:
    """That module itself, or None."""
    name = projector_name(model)
    return None if name is None else model.get_submodule(name)


@torch.no_grad()
def projector_inputs(model: nn.Module, projector: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n_images, T, d_in): what the projector receives for these images."""
    seen = []
    handle = projector.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        image_features(model, pixel_values)
    finally:
        handle.remove()
    return seen[0]


def projector_condition(model: nn.Module, pixel_values: torch.Tensor) -> float | None:
    """Median condition number of the projector's Jacobian at tokens of these images
    (pixel_values (n_images, 3, H, W)); None for a model without a known projector
    (seqforget.scopes.ARCHITECTURES) or where a Jacobian is singular."""
    projector = find_projector(model)
    if projector is None:
        return None
    inputs = projector_inputs(model, projector, pixel_values)  # (n_images, T, d_in)
    picks = torch.linspace(0, inputs.shape[1] - 1, TOKENS_PER_IMAGE).round().long()
    tokens = inputs[:, picks].reshape(-1, inputs.shape[-1])  # (n_images * TOKENS_PER_IMAGE, d_in)
    out = []
    for x in tokens:
        jacobian = torch.autograd.functional.jacobian(lambda v: projector(v[None, None])[0, 0], x, vectorize=True)  # (d_out, d_in)
        s = torch.linalg.svdvals(jacobian.double())
        out.append((s[0] / s[-1]).item() if s[-1] > 0 else None)
    if None in out:
        return None  # a singular Jacobian: no finite condition number to record
    return float(torch.tensor(out).median())
