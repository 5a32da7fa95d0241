from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seqforget.losses import answer_logprob, answer_nll
from seqforget.methods.base import Defaults


@dataclass
class NPO(Defaults):
    """Negative Preference Optimization (Zhang et al., 2024), with a retain term:

        loss = -(2 / beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))
               + retain_weight * NLL(retain)

    p_ref is the model before this request. Unlike gradient ascent, the forget term
    saturates once the answer is unlikely, which slows the collapse.
    """

    beta: float = field(default=0.1, metadata={"range": (1e-6, 1e3)})
    retain_weight: float = 1.0
    name = "npo"
    scopes = ("visual", "full")  # the scopes it serves (seqforget.scopes.SCOPES)
    source = ('Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse to Effective '
             'Unlearning", COLM 2024 (arXiv 2404.05868)')
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        pass

    def loss(self, model, forget, retain, original):
        with torch.no_grad(), original():
            reference = answer_logprob(model, forget)[0]  # (B,)
        logp, n, _ = answer_logprob(model, forget)
        ratio = logp - reference  # (B,)
        forget_loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * ratio).mean()
        retain_nll = answer_nll(model, retain)
        return forget_loss + self.retain_weight * retain_nll, {
            "forget_nll": (-logp / n.clamp_min(1)).mean().item(),
            "retain_nll": retain_nll.item(),
        }
