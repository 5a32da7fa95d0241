from dataclasses import dataclass

from seqforget.losses import answer_nll
from seqforget.methods.base import Defaults


@dataclass
class GradientAscent(Defaults):
    """Raise the forget answers' negative log-likelihood: loss = -NLL(forget)."""

    name = "ga"
    scopes = ("visual", "full")  # the scopes it serves (seqforget.scopes.SCOPES)
    source = ('Jang et al., "Knowledge Unlearning for Mitigating Privacy Risks in Language Models", ACL '
             '2023 (arXiv 2210.01504)')
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        pass

    def loss(self, model, forget, retain, original):
        nll = answer_nll(model, forget)
        return -nll, {"forget_nll": nll.item()}
