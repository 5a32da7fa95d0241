"""The trainable form of each adapter kind: what training moves, and what the registry stores.

One class per kind, each with the same few members, so the training loop never asks which:

    model          what to call: the live model with the update in its forward pass
    parameters     the tensors the optimiser moves
    signed         the tensors whose sign is the update's sign (LoRA's B, sine's dW, masked's D):
                   negating them negates what the update adds to every weight
    project()      put the update back into the null space of the retained inputs
    original()     a context in which the model runs as it was before this request
    adapter(sign)  the registry's Adapter of the update, multiplied by `sign`
    remove()       take the update out of the model, leaving it as it was
    whole_layers   whether its target layers must stay whole in every process when the model's
                   weights are sharded (seqforget.distributed): torch's parametrize replaces the
                   weight it reparametrises, which the sharding holds by name
    roles          the layers it trains when a request names none (seqforget.scopes.ROLES), in place
                   of the scope's; None: the scope's
    budget         defaults of the request's `steps` and `lr` for this kind, over the method's

A request names its kind beside its method (`adapter: sine`); each method lists the kinds it can
train (`adapters`, seqforget.methods), its default first.

    lora    PEFT's LoRA on the target layers: W + (alpha / r) B A. A is projected, A <- A (I - U U^T),
            so that dW x = 0 for retained x, exactly.
    sine    W + sin(dW), a dense residual per layer (SineProject, arXiv 2511.18444): each weight moves
            by at most 1 whatever the loss does, which keeps the projector's Jacobian well
            conditioned (the paper: under 10^3 where plain gradient methods reach 10^6 at 7B; every
            request records the figure). By default it trains the projector's linear layers, biases
            left alone, zero at the start, under any loss but vleraser's; 600 steps at lr 3e-3
            (at 3e-4 a stranger objective moved the forget rows of one benchmark world from 0.96 to
            0.94 in 600 steps). dW is projected, dW <- dW (I - U U^T); since sin is applied
            entrywise, sin(dW) x = 0 holds only to first order in dW (sin(dW) = dW - dW^3 / 6 + ...):
            a sine update is near, not in, the null space.
    masked  W + M * D, a dense update D on the entries a boolean mask M frees (MMUnlearner's saliency
            mask acts on the base weights' update, not on LoRA factors); stored sparse. Not projected:
            restricting a projected update to a mask leaves the null space, and the exact projection
            within each row's support needs a k x k solve per row; its protection is the mask (and the
            method's step guard), as in MMUnlearner. `restrict(masks)` sets M; until then every entry
            is free, and the gradient of D is the gradient of the weight itself.
"""

import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from registry import Adapter
from seqforget.projection import NullSpace

_PREFIX = "base_model.model."


class LoraUpdate:
    kind = "lora"
    roles = None
    budget: dict = {}
    projected = True  # whether project() keeps it in the null space
    whole_layers = False  # PEFT wraps the layer and leaves its weight where it is

    def __init__(self, model: nn.Module, targets: list[str], settings, nullspaces: dict[str, NullSpace]):
        from peft import LoraConfig, get_peft_model

        self.config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(targets), lora_dropout=0.0)
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(model, self.config)
        self.layers = {}
        for name, module in self.model.named_modules():
            short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            if short in targets and hasattr(module, "lora_A"):
                self.layers[short] = module
        self.nullspaces = nullspaces
        self._a = {name: layer.lora_A["default"].weight for name, layer in self.layers.items()}  # (r, d_in)
        self.signed = [layer.lora_B["default"].weight for layer in self.layers.values()]  # (d_out, r)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.hooks = [a.register_hook(nullspaces[name].project) for name, a in self._a.items() if name in nullspaces]
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        for name, a in self._a.items():
            if name in self.nullspaces:
                a.copy_(self.nullspaces[name].project(a))

    def original(self):
        return self.model.disable_adapter()

    def adapter(self, sign: int) -> Adapter:
        weights = {name: {"A": layer.lora_A["default"].weight.detach().cpu().numpy().copy(),
                          "B": sign * layer.lora_B["default"].weight.detach().cpu().numpy().copy()}
                   for name, layer in self.layers.items()}
        return Adapter("lora", weights, _peft_config(self.config))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.model.unload()  # removes the LoRA layers, restoring the model's own modules


class _Residual(nn.Module):
    """A parametrisation of a weight: W + f(delta) while `on`, else W."""

    def __init__(self, weight: torch.Tensor, fn):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))  # (d_out, d_in), float32 whatever the weight's
        self.mask: torch.Tensor | None = None  # (d_out, d_in) bool, or None: every entry free
        self.fn, self.on = fn, True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return weight
        delta = self.delta if self.mask is None else self.delta * self.mask
        return weight + self.fn(delta).to(weight.dtype)


class _DenseUpdate:
    """A residual on each target layer's weight through torch's parametrize, with a switch for original()."""

    kind: str
    fn = staticmethod(lambda d: d)
    projected = True
    whole_layers = True
    roles = None
    budget: dict = {}

    def __init__(self, model: nn.Module, targets: list[str], settings, nullspaces: dict[str, NullSpace]):
        self.model = model
        named = dict(model.named_modules())
        self.residuals: dict[str, _Residual] = {}
        for name in targets:
            layer = named[name]
            residual = _Residual(layer.weight.detach(), self.fn)
            parametrize.register_parametrization(layer, "weight", residual)
            self.residuals[name] = residual
        self.nullspaces = nullspaces if self.projected else {}
        self.signed = [r.delta for r in self.residuals.values()]
        self.parameters = list(self.signed)
        self.hooks = [r.delta.register_hook(self.nullspaces[name].project)
                      for name, r in self.residuals.items() if name in self.nullspaces]

    @torch.no_grad()
    def project(self) -> None:
        for name, r in self.residuals.items():
            if name in self.nullspaces:
                r.delta.copy_(self.nullspaces[name].project(r.delta))
            if r.mask is not None:
                r.delta.mul_(r.mask)  # entries outside the mask stay exactly zero

    @contextmanager
    def original(self):
        for r in self.residuals.values():
            r.on = False
        try:
            yield
        finally:
            for r in self.residuals.values():
                r.on = True

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        named = dict(self.model.named_modules())
        for name in self.residuals:
            parametrize.remove_parametrizations(named[name], "weight", leave_parametrized=False)


class SineUpdate(_DenseUpdate):
    kind = "sine"
    roles = ("projector",)
    budget = {"steps": 600, "lr": 3e-3}
    fn = staticmethod(torch.sin)

    def adapter(self, sign: int) -> Adapter:
        # sin is odd: sin(-dW) = -sin(dW), so the negated update stores -dW
        weights = {name: {"dW": sign * r.delta.detach().cpu().numpy().copy()} for name, r in self.residuals.items()}
        return Adapter("sine", weights, {"modules": sorted(weights)})


class MaskedUpdate(_DenseUpdate):
    kind = "masked"
    projected = False

    def restrict(self, masks: dict[str, torch.Tensor]) -> None:
        """Free only the entries of each layer's weight where masks[layer] is True; the others stay."""
        with torch.no_grad():
            for name, mask in masks.items():
                r = self.residuals[name]
                r.mask = mask.to(torch.bool)
                r.delta.mul_(r.mask)

    def adapter(self, sign: int) -> Adapter:
        weights, shapes = {}, {}
        for name, r in self.residuals.items():
            flat = (r.delta.detach() if r.mask is None else r.delta.detach() * r.mask).reshape(-1).cpu()
            indices = flat.nonzero().reshape(-1)  # (n,) entries that moved
            weights[name] = {"indices": indices.numpy().astype("int64"), "values": sign * flat[indices].numpy().copy()}
            shapes[name] = list(r.delta.shape)
        return Adapter("masked", weights, {"shapes": shapes})


UPDATES = {u.kind: u for u in (LoraUpdate, SineUpdate, MaskedUpdate)}


def _peft_config(config) -> dict:
    """The adapter_config.json PEFT writes for `config`, with no base model path."""
    out = _jsonable(config.to_dict())
    out["target_modules"] = sorted(out["target_modules"])
    out["base_model_name_or_path"] = None
    out["inference_mode"] = True
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums
        return obj.value
    return obj
