from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seqforget.data import Rows, collate, subset
from seqforget.losses import answer_logprob, answer_nll
from seqforget.methods.base import Defaults



@dataclass
class Refusal(Defaults):
    """Teach a refusal for the forget rows, with prompt decoupling (SafeEraser, SineProject):

        loss = L(image rows) + text_weight * L(text-only rows)
               + decouple_weight * NLL(decoupled) + retain_weight * NLL(retain)

    The forget rows arrive with the refusal as their answer. L is, by `objective`:
      ce   the refusal's cross-entropy, mean over the rows of that kind (SafeEraser's "PO": the
           refusal as the answer to learn);
      dpo  direct preference optimisation, the refusal preferred to the row's own answer, against
           the model before this request: -log sigmoid(beta * ((log p(refusal) - log p0(refusal))
           - (log p(answer) - log p0(answer)))).
    Image rows and text-only rows each get their own mean, so that the more numerous kind does
    not decide alone what is learnt (a person's face and their name are asked differently).

    Prompt decoupling: the decoupled rows are the forget rows' questions asked of retained images
    (retain rows with the same prompt), answered as they should be. SafeEraser pairs each harmful
    question with a safe image and trains its normal answer, so that the refusal is tied to what
    the image shows, not to the question's words; without it the model refuses the question
    whatever the image (SineProject measures this as SARR, the refusal rate on such benign
    pairs: about 100% without decoupling, about 30% with it). Here a refusal of "what is this
    person's job?" must come from the face, not the words.

    Defaults from SafeEraser's idk+PD configuration (decouple and retain weights 1); text_weight
    1; beta 0.1 as in NPO and DPO. Training stops when the refusal is learnt
    (seqforget.stopping: the forget questions refused, trained and held-out views alike, the
    retained ones not); the budget (600 steps at lr 1e-2) is ours: under the null-space
    projection a refusal takes a few hundred steps to learn, and at 3e-2 the retain guard undoes
    the first.
    """

    retain_weight: float = 1.0
    text_weight: float = 1.0
    decouple_weight: float = 1.0
    objective: str = field(default="ce", metadata={"choices": ("ce", "dpo")})
    beta: float = field(default=0.1, metadata={"range": (1e-6, 1e3)})
    name = "refusal"
    scopes = ("refuse",)  # the scopes it serves (seqforget.scopes.SCOPES)
    source = ('SafeEraser (Chen et al., arXiv 2502.12520): refusal with prompt decoupling, as SineProject (arXiv '
              '2511.18444) uses it; the cross-entropy towards a refusal is TOFU\'s "I don\'t know" baseline')
    budget = {"steps": 600, "lr": 1e-2}
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        asked = {e.prompt for e in forget.examples if e.pixel_values is not None}
        self._decoupled = Rows([e for e in retain.examples if e.pixel_values is not None and e.prompt in asked], retain.pad_id)
        self._decoupled_batches = self._decoupled.endless(8, seed=2) if len(self._decoupled) else None
        self._own, self._pad = forget.own_answers, forget.pad_id  # the forget rows with their own answers: dpo's rejected

    def loss(self, model, forget, retain, original):
        has_image = forget["has_image"]  # (B,)
        logs, loss = {}, torch.zeros(())
        for kind, weight, rows in (("image", 1.0, has_image), ("text", self.text_weight, ~has_image)):
            if rows.any() and weight:
                part = self._forget_loss(model, subset(forget, rows), original)
                loss, logs[f"forget_{kind}"] = loss + weight * part, part.item()
        if self._decoupled_batches is not None and self.decouple_weight:
            decoupled = answer_nll(model, next(self._decoupled_batches))
            loss, logs["decoupled_nll"] = loss + self.decouple_weight * decoupled, decoupled.item()
        retain_nll = answer_nll(model, retain)
        logs["retain_nll"] = retain_nll.item()
        return loss + self.retain_weight * retain_nll, logs

    def _forget_loss(self, model, batch, original) -> torch.Tensor:
        if self.objective == "ce":
            return answer_nll(model, batch)
        rejected = collate([self._own[i] for i in batch["rows"].tolist()], self._pad)
        with torch.no_grad(), original():
            chosen0, rejected0 = answer_logprob(model, batch)[0], answer_logprob(model, rejected)[0]
        margin = (answer_logprob(model, batch)[0] - chosen0) - (answer_logprob(model, rejected)[0] - rejected0)  # (B,)
        return -F.logsigmoid(self.beta * margin).mean()

