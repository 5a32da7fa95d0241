from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seqforget.errors import SeqforgetError
from seqforget.methods.base import Defaults
from seqforget.representations import augment, image_features


@dataclass
class ContrastiveVisual(Defaults):
    """Move the forgotten faces' visual features away from their own identity, into the region
    where never-seen faces land, and hold every retained face's features where they were. Only
    the visual side trains (the scope's vision-tower MLPs and projector); the language model
    never sees a gradient, so what it knows from text stays by construction.

        loss = InfoNCE + pull * |z - t|^2 / |t|^2 + retain_weight * |f(v(x_r)) - f0(v(x_r))|^2 / |f0(v(x_r))|^2

        InfoNCE = - mean over forget images of log  exp(cos(z, t) / tau)
                                                   / (exp(cos(z, t) / tau) + sum_j exp(cos(z, o_j) / tau))

    f: the projector's output for an image (what the language model reads), flattened over its
    tokens, f0 the same before this request; z = f(v(x_f)) for a random augmented view v of a
    forget image; t: the neutral target of its row, the mean of f0 over the row's strangers
    (the reference images asked the same question: seqforget.stopping.stranger_rows); o_j: f0
    of the request's forget images, the identities being forgotten (negatives).

    Which region, and why: a model retrained without the person reads their face as it reads
    any face it never learned, so the features of never-seen faces are where a forgotten face
    should land. That region is bounded and in the distribution the language model reads, where
    pushing away alone has no resting point and zero or noise is out of distribution; the mean
    over several strangers is no one in particular. The pull term fixes the feature's scale,
    which a cosine leaves free.

    From the source (null-space constrained contrastive visual forgetting, continual): the
    frozen language model, the visual side trained, updates projected against the retained bases
    (the engine's null spaces), one request after another. Its exact loss, temperature and target
    region are not published in a form we could read; these are ours: tau 0.1 (SimCLR's range),
    the strangers' mean as the positive, the forget set's own original features as the
    negatives, and the retain term on features (where the language model's input is held, its
    answers are) with augmented views, which a study on another world found necessary to reach
    held-out views.
    """

    tau: float = field(default=0.1, metadata={"range": (1e-3, 10.0)})
    pull: float = 1.0
    retain_weight: float = 10.0
    augment: float = field(default=1.0, metadata={"range": (0.0, 4.0)})
    name = "contrastive"
    scopes = ("visual",)  # the scopes it serves (seqforget.scopes.SCOPES)
    source = ("null-space constrained contrastive visual forgetting for multimodal models (continual, visual module "
              "only; arXiv 2605.05909)")
    needs_reference = True
    budget = {"steps": 600, "lr": 3e-3}
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        images = [e.pixel_values for e in (reference.examples if reference is not None else []) if e.pixel_values is not None]
        owners = [k for e, k in zip(reference.examples, reference.stands_for) if e.pixel_values is not None] if images else []
        if set(owners) != set(range(len(forget))):
            raise SeqforgetError("method contrastive needs reference rows with images like every forget row (faces the model "
                                 "never saw): set reference: in the request, or init --reference")
        with torch.no_grad(), original():
            strangers = _features(model, torch.stack(images))  # (n_ref, T * H)
            own = _features(model, torch.stack([e.pixel_values for e in forget.examples]))  # (n_forget, T * H)
        owners = torch.tensor(owners, device=strangers.device)
        self._targets = torch.stack([strangers[owners == k].mean(0) for k in range(len(forget))])  # (n_forget, T * H)
        self._negatives = F.normalize(own.unique(dim=0), dim=-1)  # (n_images, T * H): each forget image once
        self._generator = torch.Generator().manual_seed(0)

    def loss(self, model, forget, retain, original):
        target = self._targets[forget["rows"]]  # (B, T * H): every forget row of a visual request has an image
        z = _features(model, augment(forget["pixel_values"], self._generator, self.augment))  # (B, T * H)
        zn = F.normalize(z, dim=-1)
        positive = (zn * F.normalize(target, dim=-1)).sum(-1, keepdim=True) / self.tau  # (B, 1)
        negatives = zn @ self._negatives.T / self.tau  # (B, n_images)
        logits = torch.cat([positive, negatives], dim=1)
        contrast = -F.log_softmax(logits, dim=1)[:, 0].mean()
        pull = ((z - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean()
        drift = torch.zeros(())
        if "pixel_values" in retain:
            views = augment(retain["pixel_values"], self._generator, self.augment)
            with torch.no_grad(), original():
                before = _features(model, views)
            drift = ((_features(model, views) - before).pow(2).sum(-1) / before.pow(2).sum(-1)).mean()
        loss = contrast + self.pull * pull + self.retain_weight * drift
        return loss, {"contrast": contrast.item(), "pull": pull.item(), "feature_drift": drift.item()}


def _features(model, pixels: torch.Tensor) -> torch.Tensor:
    return image_features(model, pixels).flatten(1)  # (n, T * H)
