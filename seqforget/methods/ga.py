from dataclasses import dataclass

from seqforget.losses import answer_nll
from seqforget.targets import default_targets


@dataclass
class GradientAscent:
    """Raise the forget answers' negative log-likelihood: loss = -NLL(forget)."""

    name = "ga"
    sign = +1
    scopes = ("visual", "full")

    def targets(self, model, scope):
        return default_targets(model, scope)

    def loss(self, model, forget, retain, reference):
        nll = answer_nll(model, forget)
        return -nll, {"forget_nll": nll.item()}
