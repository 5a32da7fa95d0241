from dataclasses import dataclass, field

import torch

from seqforget.data import Rows
from seqforget.losses import answer_nll
from seqforget.methods.base import Defaults


@dataclass
class MMUnlearner(Defaults):
    """Gradient ascent on the forget rows and descent on the retain rows, moving only the base
    weights that matter more to the forget rows than to anything retained (MMUnlearner):

        loss = -NLL(forget) + retain_weight * NLL(retain),   W <- W + M * D

        F_x = mean over batches of x of (dNLL/dW)^2            (diagonal Fisher, per weight)
        M   = F_forget >= max(F_retain images, F_text only)    (their union is protected)

    F_retain images: the retain rows with an image; F_text only: the text-only retain rows
    (under `visual` these include the forgotten people's text rows, whose knowledge stays). The
    mask frees a weight only where the forget rows' saliency is at least that of each retained
    kind: MMUnlearner's ratio F_f / F_p >= 1, taken against each kind so that neither can hide
    behind the other. It applies to the base weights' update D, stored sparse (kind "masked"),
    not to LoRA factors, on which a mask of the base weights means nothing (MMUnlearner's own
    code masks its LoRA's parameters by the base weights' names, so no mask applies: its issue 8).

    A step guard (step_guard, nats per answer token) halves any step that raises the retain
    batch's loss by more than the bound, and undoes it if half is still too much
    (seqforget.training.guarded_step). Masked updates are not projected into the null space
    (seqforget.updates): the mask and the guard are the protection, as in the paper.

    Kept from the paper: the saliency (squared gradients, forget against retained), the
    union of the retained kinds, ascent on the forget rows with descent on the retain rows
    (retain weight 1), and the layers (the scope's; under `full` the language model's, where the
    text-only saliency protects what is known from text). Changed: dense base-weight updates
    instead of a LoRA (so that the mask means what it says), a calibrated stop in place of one
    epoch, and the step guard, whose bound the paper does not have (its script only stops on a
    retain loss above 1e10).
    """

    retain_weight: float = 1.0
    step_guard: float = field(default=0.05, metadata={"range": (1e-6, 1e6)})
    name = "mmunlearner"
    scopes = ("visual", "full")  # the scopes it serves (seqforget.scopes.SCOPES)
    adapters = ("masked",)  # its saliency mask acts on the weights' own update
    source = ('Huo et al., "MMUnlearner: Reformulating Multimodal Machine Unlearning in the Era of Multimodal Large '
              'Language Models", ACL Findings 2025 (arXiv 2502.11051)')
    budget = {"steps": 200, "lr": 1e-4}
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        retain_images = Rows([e for e in retain.examples if e.pixel_values is not None], retain.pad_id)
        text_only = Rows([e for e in retain.examples if e.pixel_values is None], retain.pad_id)
        salient_forget = _fisher(model, forget, update)
        protected = [_fisher(model, rows, update) for rows in (retain_images, text_only) if len(rows)]
        masks = {}
        for name in salient_forget:
            guarded = torch.stack([p[name] for p in protected]).amax(0) if protected else torch.zeros_like(salient_forget[name])
            masks[name] = (salient_forget[name] + 1e-15) >= (guarded + 1e-15)
        update.restrict(masks)

    def loss(self, model, forget, retain, original):
        forget_nll, retain_nll = answer_nll(model, forget), answer_nll(model, retain)
        return -forget_nll + self.retain_weight * retain_nll, {"forget_nll": forget_nll.item(), "retain_nll": retain_nll.item()}


def _fisher(model, rows: Rows, update) -> dict[str, torch.Tensor]:
    """Mean over the rows' batches of the squared gradient of their answer NLL with respect to each
    target layer's weight, {module: (d_out, d_in)}; the update is still zero and unmasked, so its
    gradient is the weight's."""
    sums = {name: torch.zeros_like(r.delta) for name, r in update.residuals.items()}
    batches = rows.fixed
    for batch in batches:
        for r in update.residuals.values():
            r.delta.grad = None
        nll = answer_nll(model, batch)
        if not nll.requires_grad:  # these rows never reach the target layers (text rows, vision-side layers)
            continue
        nll.backward()
        for name, r in update.residuals.items():
            if r.delta.grad is not None:
                sums[name] += r.delta.grad.pow(2)
    for r in update.residuals.values():
        r.delta.grad = None
    return {name: s / max(len(batches), 1) for name, s in sums.items()}
