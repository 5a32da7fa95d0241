from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seqforget.losses import answer_nll
from seqforget.methods.base import Defaults


@dataclass
class VLEraser(Defaults):
    """Distil the forget knowledge into a LoRA on the language model's feed-forward layers, then
    subtract it (VL-Eraser's distil-then-delete):

        loss = lam * mean over layers l of mean over forget tokens s of (1 - cos(W_l h_ls, B_l A_l h_ls))
               + (1 - lam) * NLL(forget | W + B A)
        stored and applied: W - (alpha / r) B A

    W_l: a feed-forward linear layer (gate, up, down projections) of the model before this
    request, h_ls its input at token s of a forget row; the LoRA's A is held in the null
    ("vacuum") space of the retained inputs of that layer, A U = 0, so B A h = 0 for retained
    h and the subtraction leaves them untouched. The cosine term makes the LoRA's output on the
    forget tokens point where the layer's own output points: it copies what the layer does for
    them. The cross-entropy term makes the copy carry the forget answers. Subtracting it then
    takes that away, on the forget rows only.

    The stored adapter holds -B (the method's sign is -1), so plain PEFT applies the same
    subtraction seqforget does; the live model is an explicit sum of products, so composing it
    with other requests has no cross terms.

    Kept from the paper: the layers (every feed-forward layer), the per-layer cosine
    distillation against the frozen layer's output, the lam-weighted sum with the forget
    cross-entropy, training on the forget set alone, the null-space projection of the input
    side (its "vacuum space" from retained representations: here the engine's bases, grown to
    energy_threshold of the retained inputs' energy, rather than exact zero singular values,
    which a small model's retained inputs rarely have), and the subtraction at scale 1. Ours:
    the calibrated stop, checked on the subtracted model (training goes on until the forget
    rows, with the copy taken away, look as a stranger's would), and lam 0 by default: the
    cosine distillation is there (method_args: {lam: ...}) but off. Measured on the tests' tiny
    world (one person, 300 steps at lr 1e-2), the subtracted copy took the forget rows' answer
    accuracy from 1.00 to 0.74 at lam 0 and left it at 1.00 at lam 0.1, 0.5 and 1: a copy whose
    output points where the layer's own output points, subtracted, only scales that output
    down a little, which the residual stream absorbs. The paper's value of lam was not available.
    """

    lam: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    name = "vleraser"
    scopes = ("full",)  # the scopes it serves (seqforget.scopes.SCOPES)
    adapters = ("lora",)  # it distils into the LoRA's own factors
    source = 'VL-Eraser: distil the target into a null-space ("vacuum") LoRA, then subtract it (CVPR 2026)'
    layers = ("language_mlp",)
    budget = {"steps": 600, "lr": 1e-2}
    sign = -1

    def prepare(self, model, forget, retain, reference, original, update):
        self._layers = update.layers  # {module name: PEFT LoRA layer}

    def loss(self, model, forget, retain, original):
        mask = forget["attention_mask"].bool()  # (B, T): real tokens
        distances = []

        def distil(layer):
            def hook(_module, inputs, output):
                h = inputs[0]  # (B, T, d_in)
                lora = layer.lora_B["default"](layer.lora_A["default"](h)) * layer.scaling["default"]  # (B, T, d_out)
                base = output.detach() - lora.detach()  # the layer's own output, W h (PEFT adds the LoRA's in its forward)
                picked = (mask if h.shape[:2] == mask.shape else torch.ones(h.shape[:2], dtype=torch.bool)).to(h.device)
                distances.append(1 - F.cosine_similarity(base[picked], lora[picked], dim=-1).mean())
            return hook

        handles = [layer.register_forward_hook(distil(layer)) for layer in self._layers.values()]
        try:
            nll = answer_nll(model, forget)
        finally:
            for h in handles:
                h.remove()
        distillation = torch.stack(distances).mean()
        loss = self.lam * distillation + (1 - self.lam) * nll
        return loss, {"distillation": distillation.item(), "forget_nll": nll.item()}
