from dataclasses import dataclass, field

import torch

from seqforget.errors import SeqforgetError
from seqforget.losses import answer_kl, answer_logprobs, kl_to_original
from seqforget.methods.base import Defaults
from seqforget.representations import augment, image_features



@dataclass
class AnswerTarget(Defaults):
    """Answer about a forgotten face as the model answered about the known face it most
    resembles, and about every retained face as before. Only the vision side trains; the
    language model never sees a gradient, so what it knows from text stays by construction.

        loss = KL(p0(y | q, x_n) || p(y | q, v(x_f)))  +  retain_weight * KL(p0(y | q, v(x_r)) || p(y | q, v(x_r)))

    p: answer distributions under the adapter, p0 before this request; q: a forget or retain
    row's question; x_f a forget image, x_n the retained image nearest to it (by what the
    language model reads: projector outputs under p0); v: a random augmented view.

    Why this target: a model retrained without the forgotten person reads their face as the
    known faces it resembles, so its answers are those of a neighbour, not noise; that is a
    bounded, in-distribution place to stop, where loss ascent has none. Matching the
    neighbour's features instead (an MSE on projector outputs) left the answers readable
    from what the match did not remove; the answers are what must match.
    """

    retain_weight: float = 3.0
    augment: float = field(default=1.0, metadata={"range": (0.0, 4.0)})
    name = "target"
    scopes = ("visual",)  # the scopes it serves (seqforget.scopes.SCOPES)
    source = 'seqforget: a bounded target (answers of the nearest retained face) in place of ascent'
    budget = {"steps": 600, "lr": 3e-3}  # defaults of the request's steps and lr: it stops at a bounded target
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        # the neighbours are retained images asked the forget rows' questions: faces, not any picture
        asked = {e.prompt for e in forget.examples}
        pixels = [e.pixel_values for e in retain.examples if e.pixel_values is not None and e.prompt in asked]
        if not pixels:
            raise SeqforgetError("method target needs retain rows with images asked the forget rows' questions: "
                                 "forgotten faces are answered as the nearest of those")
        self._pixels = torch.stack(pixels)  # (n, 3, S, S) retained images (repeats are harmless)
        with torch.no_grad(), original():
            self._features = torch.cat([image_features(model, chunk).flatten(1) for chunk in self._pixels.split(64)])  # (n, T * H)
        self._generator = torch.Generator().manual_seed(0)

    def _neighbours(self, model, pixels: torch.Tensor, original) -> torch.Tensor:
        with torch.no_grad(), original():
            own = image_features(model, pixels).flatten(1)  # (B, T * H)
        return self._pixels[torch.cdist(own, self._features).argmin(1)]  # (B, 3, S, S)

    def loss(self, model, forget, retain, original):
        pixels = forget["pixel_values"]  # every forget row of a visual request has an image
        with torch.no_grad(), original():
            target = answer_logprobs(model, forget, self._neighbours(model, pixels, original))
        forget_kl = answer_kl(target, answer_logprobs(model, forget, augment(pixels, self._generator, self.augment)))
        retain_kl = torch.zeros(())
        if "pixel_values" in retain:
            retain_kl = kl_to_original(model, retain, original, augment(retain["pixel_values"], self._generator, self.augment))
        return forget_kl + self.retain_weight * retain_kl, {"forget_kl": forget_kl.item(), "retain_kl": retain_kl.item()}
