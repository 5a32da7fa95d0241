from dataclasses import dataclass, field

from seqforget.methods.base import Defaults


LOSSES = ("stranger", "target", "contrastive", "gd", "ga", "npo")  # the visual scope's losses


@dataclass
class SineProject(Defaults):
    """The projector's linear layers trained as W + sin(dW), under any of the visual losses
    (SineProject):

        projector(x) = (W2 + sin dW2) gelu((W1 + sin dW1) x + b1) + b2,   dW1 = dW2 = 0 at the start

    Each weight moves by at most 1 whatever the loss does, which keeps the projector's Jacobian
    well conditioned (the paper: under 10^3 where plain gradient methods reach 10^6 at 7B;
    every request records the figure). `objective` names the method whose loss trains it, at that
    method's own defaults; the budget is 600 steps at lr 3e-3 whatever the loss (at 3e-4 a
    stranger objective moved the forget rows of one benchmark world from 0.96 to 0.94 in 600
    steps).

    Kept from the paper: both projector layers modulated, biases left alone, plain sin (no
    frequency or scale), zero initialisation, the vision tower frozen, any unlearning loss.
    Changed: the paper also trains a LoRA (rank 32) on the language model for its refusal
    setting; a request here stores one kind of update, so this method is the projector part
    alone and serves the `visual` scope, whose promise (the language model untouched) it
    keeps. The null-space projection holds to first order only (sin(dW) x = dW x + O(dW^3)).
    """

    objective: str = field(default="stranger", metadata={"choices": LOSSES})
    name = "sine"
    scopes = ("visual",)  # the scopes it serves (seqforget.scopes.SCOPES)
    adapter_kind = "sine"
    source = ('SineProject: sinusoidally reparameterised projector for stable vision-language unlearning '
              '(arXiv 2511.18444)')
    layers = ("projector",)
    sign = +1

    def __post_init__(self):
        from seqforget.methods import METHODS

        self._inner = METHODS[self.objective]()
        self.needs_reference = self._inner.needs_reference
        self.budget = {"steps": 600, "lr": 3e-3}

    def prepare(self, model, forget, retain, reference, original, update):
        self._inner.prepare(model, forget, retain, reference, original, update)

    def loss(self, model, forget, retain, original):
        return self._inner.loss(model, forget, retain, original)
