from dataclasses import dataclass

from seqforget.losses import answer_nll


@dataclass
class GradientAscent:
    """Raise the forget answers' negative log-likelihood: loss = -NLL(forget)."""

    name = "ga"
    sign = +1

    def prepare(self, model, forget, retain, reference, original):
        pass

    def loss(self, model, forget, retain, original):
        nll = answer_nll(model, forget)
        return -nll, {"forget_nll": nll.item()}
