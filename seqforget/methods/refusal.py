from dataclasses import dataclass

from seqforget.losses import answer_nll


@dataclass
class Refusal:
    """Teach a refusal: the forget rows arrive with the refusal as their answer.

    loss = NLL(forget, refusal answers) + retain_weight * NLL(retain)
    """

    retain_weight: float = 1.0
    name = "refusal"
    adapter_kind = "lora"
    source = ('cross-entropy towards a fixed refusal, the "I don\'t know" baseline of TOFU (Maini et al., '
             'arXiv 2401.06121)')
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        pass

    def loss(self, model, forget, retain, original):
        forget_nll, retain_nll = answer_nll(model, forget), answer_nll(model, retain)
        return forget_nll + self.retain_weight * retain_nll, {
            "forget_nll": forget_nll.item(),
            "retain_nll": retain_nll.item(),
        }
