from dataclasses import dataclass

from seqforget.losses import answer_nll
from seqforget.methods.base import Defaults


@dataclass
class GradientDifference(Defaults):
    """Gradient ascent on the forget set, descent on the retain set:
    loss = -NLL(forget) + retain_weight * NLL(retain)."""

    retain_weight: float = 1.0
    name = "gd"
    scopes = ("visual", "full")  # the scopes it serves (seqforget.scopes.SCOPES)
    source = ('Liu, Liu and Stone, "Continual Learning and Private Unlearning", CoLLAs 2022 (arXiv '
             "2203.12817); TOFU's gradient difference")
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        pass

    def loss(self, model, forget, retain, original):
        forget_nll, retain_nll = answer_nll(model, forget), answer_nll(model, retain)
        return -forget_nll + self.retain_weight * retain_nll, {
            "forget_nll": forget_nll.item(),
            "retain_nll": retain_nll.item(),
        }
