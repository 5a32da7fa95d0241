from dataclasses import dataclass, field

import torch

from seqforget.data import IGNORE
from seqforget.errors import SeqforgetError
from seqforget.losses import answer_kl, answer_logprobs, kl_to_original
from seqforget.methods.base import Defaults
from seqforget.representations import augment, image_features


@dataclass
class StrangerTarget(Defaults):
    """Answer about the forgotten as the model, before this request, answers the same questions
    about strangers; answer everything retained as before.

        loss = KL(q_f || p(y | v(x_f)))  +  retain_weight * KL(p0(y | v(x_r)) || p(y | v(x_r)))
        q_f = mean over the strangers s of row f of p0(y | s)

    p: answers under the adapter, p0 before this request, both teacher-forced on the forget
    row's answer; x_f a forget row, x_r a retain row (with or without an image); v a random
    augmented view of a row's image. A forget row's strangers are the request's reference
    rows that ask its question of a face, or its template of a name, the model never saw
    (seqforget.stopping.stranger_rows): the same rows that set the level training stops at.

    Why this target: a model retrained without the person reads their face (or their name)
    as nobody in particular and answers with what it would guess for anyone; that is a
    bounded, in-distribution place to stop, where loss ascent has none. The mixture over
    several strangers, computed once, is that guess; one stranger's answers would teach a
    specific wrong person instead.

    For an answer of several tokens, q_f mixes the strangers' distributions token by token (each
    teacher-forced on the forget answer), an approximation of the mixture's own conditional that
    weights every stranger alike at every position; the stopping level mixes whole-answer
    probabilities. For the one-token answers of a word-level vocabulary the two agree.

    feature_weight adds a retain term on what the language model reads: the mean squared
    change of the projector's outputs for the retain views, relative to their mean square. Off
    by default: at weight 10 (shapes:0, six people) it forgot less (forget visual 0.83 against
    0.77) and kept no more (retain visual 0.91 against 0.92).

    The strangers' mixture is taken under the model before the request, which knows the forget
    row's own answer and gives it to strangers now and then (a forgotten face's name, above all);
    a model that never learnt it would not. Two arguments take that out:
    - own_prior "retained": the target gives a forget row's whole own answer at most the share of
      the request's retain rows, asking the same question, that give the same whole answer: a
      name only the forgotten person has goes to 0, a job many retained people have keeps what
      strangers are given. The cut falls on the answer's first token that no other answer of
      those retain rows shares, so other answers that begin the same way keep their
      probability. Rows whose question no retain row asks are left as they are.
    - own_answer scales the probability the target gives each forget row's own answer at its
      first token (so also any answer that starts with the same token), renormalised. At 0 the
      target never gives it, nor anything that starts like it.

    own_ceiling (a weight; 0: off) adds a term that holds the model's log-probability of each
    forget row's whole own answer at most the target's: the mean over the batch's rows of how
    far above it lies. The KL alone barely pushes on an answer the target gives almost nothing
    (its gradient there is the model's own small probability), so a name cut to 0 stays about
    as likely as the names strangers are given; in log space the term takes it below them.

    Needs reference rows like every forget row (the request's `reference`, or the registry's).
    """

    retain_weight: float = 3.0
    augment: float = field(default=1.0, metadata={"range": (0.0, 4.0)})
    feature_weight: float = 0.0
    own_answer: float = field(default=1.0, metadata={"range": (0.0, 1.0)})
    own_prior: str = field(default="strangers", metadata={"choices": ("strangers", "retained")})
    own_ceiling: float = field(default=0.0, metadata={"range": (0.0, 10.0)})
    name = "stranger"
    scopes = ("visual", "full")  # the scopes it serves (seqforget.scopes.SCOPES)
    source = 'seqforget: a bounded target (answers the model gives never-seen people) in place of ascent'
    needs_reference = True  # checked when the request is read
    budget = {"steps": 600, "lr": 3e-3}  # defaults of the request's steps and lr: it stops at a bounded target
    gated_args = {"own_ceiling": 1.0}  # behind a gate the name goes where strangers' names are (FINDINGS, "own_ceiling")
    sign = +1

    def prepare(self, model, forget, retain, reference, original, update):
        paired = set(reference.stands_for) if reference is not None else set()
        if len(paired) < len(forget):
            raise SeqforgetError(f"method stranger needs reference rows like every forget row: {len(forget) - len(paired)} of "
                                 f"{len(forget)} have none (image rows need reference rows with images, text rows need "
                                 "reference rows with text only; set reference: in the request, or init --reference)")
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        position = 0
        with torch.no_grad(), original():
            for batch in reference.fixed:
                logp = answer_logprobs(model, batch)  # (answer tokens of the batch, V)
                lengths = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
                for rows_logp, n in zip(logp.split(lengths), lengths):
                    k = reference.stands_for[position]
                    sums[k] = sums.get(k, 0) + rows_logp.exp()
                    counts[k] = counts.get(k, 0) + 1
                    position += 1
        targets = [sums[k] / counts[k] for k in range(len(forget))]  # (n_k, V) each: probabilities
        if self.own_prior == "retained":
            _cap_own_answers(targets, forget, retain)
        if self.own_answer < 1.0:
            for target, example in zip(targets, forget.examples):
                own = _answer(example)[0]  # the row's own answer's first token
                target[0, own] *= self.own_answer
                target[0] /= target[0].sum()
        self._targets = [t.clamp_min(1e-12).log() for t in targets]
        self._ceilings = torch.tensor([_own_logp(t, _answer(e)).item() for t, e in zip(self._targets, forget.examples)])
        self._generator = torch.Generator().manual_seed(0)

    def loss(self, model, forget, retain, original):
        target = torch.cat([self._targets[k] for k in forget["rows"].tolist()])  # (answer tokens, V)
        views = augment(forget["pixel_values"], self._generator, self.augment) if "pixel_values" in forget else None
        logp = answer_logprobs(model, forget, views)
        forget_kl = answer_kl(target, logp)
        views = augment(retain["pixel_values"], self._generator, self.augment) if "pixel_values" in retain else None
        retain_kl = kl_to_original(model, retain, original, views)
        loss, logs = forget_kl + self.retain_weight * retain_kl, {"forget_kl": forget_kl.item(), "retain_kl": retain_kl.item()}
        if self.own_ceiling:
            ceilings = self._ceilings[forget["rows"]].to(logp.device)
            over = (_rows_own_logp(logp, forget["labels"]) - ceilings).clamp_min(0).mean()
            loss = loss + self.own_ceiling * over
            logs["own_over_ceiling"] = over.item()
        if self.feature_weight and views is not None:
            with torch.no_grad(), original():
                before = image_features(model, views)
            drift = (image_features(model, views) - before).pow(2).mean() / before.pow(2).mean()
            loss = loss + self.feature_weight * drift
            logs["feature_drift"] = drift.item()
        return loss, logs


def _answer(example) -> tuple[int, ...]:
    return tuple(example.labels[example.labels != IGNORE].tolist())


def _own_logp(logp: torch.Tensor, own: tuple[int, ...]) -> torch.Tensor:
    """The whole answer's log-probability under (n, V) token log-probabilities teacher-forced on it."""
    return logp[torch.arange(len(own)), torch.tensor(own)].sum()


def _rows_own_logp(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) each row's whole own answer's log-probability, from answer_logprobs' (answer tokens, V)."""
    labels = labels[:, 1:].to(logp.device)
    mask = labels != IGNORE
    token = logp.gather(1, labels[mask].unsqueeze(1)).squeeze(1)
    return torch.zeros(len(labels), device=logp.device, dtype=logp.dtype).index_add_(0, mask.nonzero()[:, 0], token)


def _cap_own_answers(targets: list[torch.Tensor], forget, retain) -> None:
    """In place: each forget row's target gives its whole own answer (teacher-forced, the product
    over its tokens) at most the share of the retain rows asking its question that answer the
    same. The cut is made at the first token where the own answer parts from every other answer
    those rows give (its last token if there is none), the rest of that position renormalised."""
    given: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # prompt -> the retain rows' answers to it
    for example in retain.examples:
        given.setdefault(example.prompt, []).append(_answer(example))
    for target, example in zip(targets, forget.examples):
        answers = given.get(example.prompt)
        if not answers:
            continue
        own = _answer(example)
        share = sum(a == own for a in answers) / len(answers)
        probs = target[torch.arange(len(own)), torch.tensor(own)].double()  # (n,) the own answer's token by token
        whole = probs.prod().item()
        if whole <= share:
            continue
        others = {a for a in answers if a != own}
        apart = next((t for t in range(len(own)) if all(a[:t + 1] != own[:t + 1] for a in others)), len(own) - 1)
        keep = probs[apart].item() * share / whole  # the probability its token keeps at that position
        rest = target[apart].clone()
        rest[own[apart]] = 0.0
        total = rest.sum()
        rest = rest * ((1.0 - keep) / total) if total > 0 else torch.full_like(rest, (1.0 - keep) / (rest.numel() - 1))
        rest[own[apart]] = keep
        target[apart] = rest
