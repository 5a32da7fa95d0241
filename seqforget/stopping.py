"""When a request's training stops: where a model that never saw the forget rows would be.

The oracle's level is estimated without retraining, from reference rows: rows of the same
kinds about people (or things) the model never saw. Each forget row is paired with the
reference rows that ask the question most like its own (the same question about another
image, or the same template about another name), and those are scored on the forget row's
answer (`stranger_rows`): how likely the model finds "potter" for a stranger asked what
the forgotten potter was asked. A model that never saw the person treats them as any
stranger, so the probability it gives their answer is, on average over strangers, the mean
of the strangers' probabilities. The level is the median over forget rows of that mean's
per-token NLL, under the live model before this request (`stranger_level`). Every
`check_every` steps the forget rows are probed, and the request has reached the level when
their median NLL is at least that.

Why the mean of probabilities, not the strangers' own NLLs: a retrained model is itself one
confident reader of faces, right about some forgotten people by chance, and the median of
single strangers' NLLs can ask for more than it gives. On image rows the level is a lenient
bound: a retrained oracle clears it by a margin, so a request may stop while it still knows
more than a model that never saw the person (benchmarks/FINDINGS.md, "The stopping level
against the retrain oracle"). Scored on their own answers, reference rows would compare unlike
with unlike: a never-seen person's name is an answer the model was never trained to give.

Each check also gives how well the forget rows can be told from strangers: the share of pairs
(forget row, another forget row's level) in which the model is surer of the forget row's own
answer than of the level (`known_share`), a membership test's AUC. About 0.5 means the forget
rows read as strangers'; 1.0 means every one is still known better than any stranger; well below
0.5 means they are answered worse than a stranger's would be, which sets them apart too. It is
taken over all the forget rows and for each kind of question apart (`row_kind`: an image row's
question, e.g. "who is this?"; text rows together), with the share of each kind's rows still
answered as before (`by_kind`), because a median over all rows lets the many attribute questions
about a face carry the few that ask its name. By default the stop does not wait for them (a
request's `known_limit` below 1 makes it wait): the stranger target trains each row towards its
level, not past it, so a kind's known share hovers above 0.5 however long training goes on
(benchmarks/FINDINGS.md, "What the forget rows' median hides"). The record keeps them, before
training and at every check, and `status` and `report` show them.

A retain guard probes retain rows at the same checks: when their token accuracy falls more
than `retain_tolerance` below where it started, the adapter goes back to the last check that
kept it and training goes on at half the learning rate; the fourth time, it stops there. It
watches the request's held-out retain rows (the share `guard_share` of its retain images that
training never sees), because a retain term holds the rows it trains on whatever happens to
the rest: on the benchmark's worlds a guard on the trained rows did not fire while retained
people outside the sample lost accuracy (benchmarks/FINDINGS.md, "Single requests against the
retrain oracles"). With no reference rows there is no level to reach: the step budget alone
ends training, and the record says so.

With a registry budget (seqforget.budget), each check also probes the registry's guard rows,
and a check below its floor goes back as a retain guard's check does; if training ends on
it, the reason is "registry_guard".

A refusal (the `refuse` scope) has a level of its own: the request has reached it when greedy
decoding answers its forget questions with the refusal, those it trains on and those about
images it kept out of training alike (at least REFUSED of each), while the retained questions
the guard watches are refused at most SARR of the time (SineProject's safe-answer refusal rate).
"""

import difflib
from dataclasses import asdict, dataclass, replace

import torch

from seqforget.budget import Floor
from seqforget.data import IGNORE, RequestRows, Row, Rows
from seqforget.evaluation import probe
from seqforget.losses import answer_logprob


TEXT_ROWS = "(questions without an image)"  # the kind of every text-only row: a text question names its person


def row_kind(row: Row) -> str:
    """The kind of question a forget row asks, as the stopping rule groups them: an image row's
    question as it stands (the same question about every view), TEXT_ROWS for the rest."""
    return row.question if row.image is not None else TEXT_ROWS


def stranger_rows(forget: list[Row], reference: list[Row], per_row: int = 4) -> tuple[list[Row], list[int]]:
    """For each forget row, `per_row` reference rows asking the most similar question (by difflib's
    ratio), each answered with the forget row's answer; and, for each row returned, the position
    of the forget row it stands for. The picks are spread evenly over the best matches, and
    successive forget rows with the same question start one further on, so that many strangers
    count. An image row is paired only with image rows, a text row only with text rows.

    A text question names its person, so the best match is usually the same template about one
    stranger whose name is most like the forgotten one's: text rows mostly get one stranger each."""
    out, stands_for, ratio = [], [], {}
    pools = {has_image: [r for r in reference if (r.image is not None) == has_image] for has_image in (True, False)}
    for k, row in enumerate(forget):
        pool = pools[row.image is not None]
        if not pool:
            continue
        for q in {r.question for r in pool}:
            if (row.question, q) not in ratio:
                ratio[row.question, q] = difflib.SequenceMatcher(None, row.question, q).ratio()
        best = max(ratio[row.question, r.question] for r in pool)
        ties = [r for r in pool if ratio[row.question, r.question] == best]
        stride = max(1, len(ties) // per_row)  # reference rows come person by person: spread over the people
        chosen = [ties[(k + j * stride) % len(ties)] for j in range(min(per_row, len(ties)))]
        out += [replace(stranger, answer=row.answer) for stranger in chosen]
        stands_for += [k] * len(chosen)
    return out, stands_for


@torch.no_grad()
def stranger_level(model, reference: Rows) -> dict:
    """{"median_nll": the level (see the module's docstring), "rows": forget rows it covers,
    "strangers": reference rows scored, "levels": per forget row covered, the per-token NLL of
    the mean over its strangers of the probability of its whole answer, "owners": the positions
    of those forget rows}."""
    logp, tokens = [], []
    for batch in reference.fixed:
        lp, n, _ = answer_logprob(model, batch)  # (B,) summed log-probability of each answer, (B,) its tokens
        logp.append(lp)
        tokens.append(n)
    logp, tokens = torch.cat(logp).cpu(), torch.cat(tokens).cpu()
    owners = torch.tensor(reference.stands_for)
    levels = []
    for k in owners.unique():
        mine = owners == k
        mean_logp = torch.logsumexp(logp[mine], 0) - torch.log(mine.sum().double()).float()
        levels.append(-mean_logp / tokens[mine][0].clamp_min(1))
    return {"median_nll": torch.stack(levels).median().item(), "rows": len(levels), "strangers": len(reference),
            "levels": torch.stack(levels).tolist(), "owners": owners.unique().tolist()}


def known_share(row_nll: list[float], levels: list[float]) -> float:
    """The share of pairs (forget row, level) in which the forget row's answer is surer (lower NLL)
    than the level, ties counting half: the AUC of telling forget rows from strangers by NLL."""
    nll, level = torch.tensor(row_nll, dtype=torch.float64)[:, None], torch.tensor(levels, dtype=torch.float64)[None, :]
    return ((nll < level).double() + 0.5 * (nll == level).double()).mean().item()


def by_kind(row_nll: list[float], row_exact: list[bool], levels: list[float], owners: list[int],
            kinds: list[str]) -> dict[str, dict]:
    """For each kind of forget row: {"rows", "known": known_share of that kind's rows against
    the levels of the same rows, "answered": the share of them whose greedy answer is still
    theirs}. `levels[j]` belongs to forget row `owners[j]`; rows without a level count in neither."""
    groups: dict[str, list[int]] = {}
    for j, k in enumerate(owners):
        groups.setdefault(kinds[k], []).append(j)
    return {kind: {"rows": len(js), "known": known_share([row_nll[owners[j]] for j in js], [levels[j] for j in js]),
                   "answered": sum(row_exact[owners[j]] for j in js) / len(js)}
            for kind, js in groups.items()}


REFUSED = 0.99  # share of a refuse request's forget questions answered with its refusal, trained and held-out views alike
SARR = 0.10  # share of the retained questions the guard watches that it may refuse


@dataclass
class Stop:
    """How training ended, as stored with the request and shown by `status`."""

    rule: str  # "reference" (the oracle's level from reference rows) | "refusal" (REFUSED, SARR) | "budget" (neither)
    reason: str  # "reached" | "retain_guard" | "registry_guard" (the registry's budget) | "budget"
    step: int  # optimiser steps taken up to the check whose adapter was kept (steps the guard undid before it count)
    checks: list[dict]  # one record per check: step, forget, guard (the rows the retain guard watches), decision
    reference: dict | None  # the level from the reference rows (stranger_level), before training

    @property
    def reached(self) -> bool:
        """Whether the request did what its rule asks: the reference level, or its whole budget."""
        return self.reason == "reached" or (self.rule == "budget" and self.reason == "budget")

    @property
    def kept(self) -> dict | None:
        """The check whose adapter was kept; None if none was (step 0)."""
        return kept_check(self.checks, self.step)

    def record(self) -> dict:
        return asdict(self)

    def shortfall(self, steps: int, tolerance: float, floor: Floor | None = None, known_limit: float = 1.0) -> str:
        """How training ended short of its level, in words, for a request of `steps` steps whose
        retain guard allowed `tolerance` and whose stop asked every kind of forget question to be
        told from strangers' at most `known_limit` (and whose registry's budget is `floor`)."""
        last = self.checks[-1] if self.checks else None
        if self.reason == "registry_guard":
            kept = self.kept
            lowest = min(c["retained"] for c in self.checks)
            within = f"step {self.step}, at {floor.share(kept['retained']):.1%}" if kept else "none"
            return (f"would take the registry below its budget of {floor.budget:.0%} of the base model's answers on "
                    f"its guard rows (it reached {floor.share(lowest):.1%}), and its last step within the budget "
                    f"({within}) had not reached its level")
        if self.rule == "refusal":
            figures = refusal_figures(self.checks, self.step)
            seen = (f"at step {self.step} it refused {figures['trained']:.0%} of its trained forget questions, "
                    + (f"{figures['held_out']:.0%} of those about images it never trained on, "
                       if figures["held_out"] is not None else "")
                    + f"and {figures['sarr']:.0%} of the retained questions" if figures else "it kept no step")
            why = "the retain guard stopped it" if self.reason == "retain_guard" else f"its budget of {steps} steps ran out"
            return (f"did not learn its refusal ({REFUSED:.0%} of its forget questions refused, at most {SARR:.0%} of "
                    f"retained ones): {why}; {seen}")
        where = (f"forget median NLL {last['forget']['median_nll']:.2f} against the reference's "
                 f"{self.reference['median_nll']:.2f}" if last and self.reference else "no reference rows")
        if last and self.reference and known_limit < 1.0:
            kind, known = most_known(last["forget"]["kinds"])
            where += f"; its forget questions {kind!r} still told from strangers' at {known:.2f} (limit {known_limit})"
        why = ("the retain guard stopped it (the retain accuracy it watches fell more than "
               f"{tolerance} at step {last['step']})" if self.reason == "retain_guard" and last
               else f"its budget of {steps} steps ran out")
        return f"did not reach the level of a model that never saw its rows: {why}; {where}"


def most_known(kinds: dict) -> tuple[str | None, float]:
    """The kind of forget question best told from strangers' (by_kind) and its known share; (None, 0.5) if none."""
    if not kinds:
        return None, 0.5
    kind = max(kinds, key=lambda k: kinds[k]["known"])
    return kind, kinds[kind]["known"]


def kept_check(checks: list[dict], step: int) -> dict | None:
    """The check (Stop.checks) whose adapter was kept at `step`; None if none was (step 0)."""
    return next((c for c in reversed(checks) if c["step"] == step), None)


def refusal_figures(checks: list[dict], step: int) -> dict | None:
    """A refusal's figures at the check kept at `step`: the shares of its trained and of its
    held-out forget questions refused, and of the retained ones (SARR); None for other rules."""
    kept = kept_check(checks, step)
    return {**kept["refused"], "sarr": kept["sarr"]} if kept is not None and "refused" in kept else None


def refuses(check: dict) -> bool:
    """Whether a refusal check (Stopping.check's record) shows the refusal learnt: REFUSED, SARR."""
    refused = check["refused"]
    return (refused["trained"] >= REFUSED and (refused["held_out"] is None or refused["held_out"] >= REFUSED)
            and check["sarr"] <= SARR)


SHRINKS = 3  # times the retain guard halves the learning rate before it stops training


@dataclass(frozen=True)
class Decision:
    """What a check tells training to do."""

    stop: bool  # training ends here, with the adapter now in the parameters
    lr_scale: float  # go on at settings.lr times this
    rolled_back: bool  # the parameters were put back to the last adapter kept: the optimiser's moments are stale


class Stopping:
    """Decides, at each check, whether training goes on; keeps the last adapter the guard accepts."""

    def __init__(self, model, rows: RequestRows, settings, guard_start: float | None = None, floor: Floor | None = None):
        """rows: the request's; the retain guard watches `rows.watched`. guard_start: their token
        accuracy under `model`, if already probed; floor: what the registry's budget asks of its
        guard rows (seqforget.budget), or None."""
        forget, guard, reference = rows.forget, rows.watched, rows.reference
        self.forget, self.guard, self.settings, self.floor = forget, guard, settings, floor
        self.reference = stranger_level(model, reference) if reference is not None and len(reference) else None
        if self.reference is not None:
            self.levels, self.owners = self.reference.pop("levels"), self.reference.pop("owners")
            self.kinds = forget.kinds or [TEXT_ROWS] * len(forget)
            probed = probe(model, forget.fixed, per_row=True)
            self.reference["known_before"] = known_share(probed["row_nll"], self.levels)
            self.reference["kinds_before"] = by_kind(probed["row_nll"], probed["row_exact"], self.levels, self.owners,
                                                     self.kinds)
        self.refusal = forget.own_answers is not None and len(forget) > 0  # the forget rows' answer is a refusal
        if self.refusal:
            labels = forget.examples[0].labels
            self.refusal_token = int(labels[labels != IGNORE][0])  # the refusal's first token
        self.guard_start = probe(model, guard.fixed)["token_acc"] if guard_start is None else guard_start
        self.checks: list[dict] = []
        self.kept_step, self.kept = 0, None
        self.reason = "budget"
        self.shrinks, self.lr_scale = 0, 1.0  # the learning rate is settings.lr * lr_scale

    def start(self, params: list[torch.nn.Parameter]) -> None:
        """Keep the untrained adapter: what the guard goes back to if the first check fails."""
        self.kept = [p.detach().clone() for p in params]

    def check(self, model, step: int, params: list[torch.nn.Parameter]) -> Decision:
        """Probe the model at `step`, put the last adapter kept back into `params` if the retain
        guard or the registry's budget objects, and say whether and how training goes on."""
        forget = probe(model, self.forget.fixed, per_row=self.reference is not None)
        if self.reference is not None:
            row_nll, row_exact = forget.pop("row_nll"), forget.pop("row_exact")
            forget["known"] = known_share(row_nll, self.levels)
            forget["kinds"] = by_kind(row_nll, row_exact, self.levels, self.owners, self.kinds)
        guard = probe(model, self.guard.fixed, self.refusal_token if self.refusal else None)
        record = {"step": step, "forget": forget, "guard": guard}
        if self.refusal:
            held = self.forget.held_out
            record["refused"] = {"trained": forget["exact"], "held_out": probe(model, held.fixed)["exact"] if held else None}
            record["sarr"] = guard.pop("opens_with")
        if self.floor is not None:
            record["retained"] = probe(model, self.floor.rows.fixed)["exact"]
        self.checks.append(record)
        below = self.floor is not None and not self.floor.holds(record["retained"])
        if below or guard["token_acc"] < self.guard_start - self.settings.retain_tolerance:
            with torch.no_grad():
                for p, kept in zip(params, self.kept):
                    p.copy_(kept)
            which = "registry budget" if below else "retain guard"
            if self.shrinks < SHRINKS and step < self.settings.steps:
                self.shrinks += 1
                self.lr_scale /= 2
                record["decision"] = f"{which}: back to step {self.kept_step}, learning rate x{self.lr_scale:g}"
                return Decision(False, self.lr_scale, rolled_back=True)
            record["decision"] = f"{which}: back to step {self.kept_step}, stopped"
            self.reason = "registry_guard" if below else "retain_guard"
            return Decision(True, self.lr_scale, rolled_back=True)
        self.kept_step, self.kept = step, [p.detach().clone() for p in params]
        if (self.reference is not None and forget["median_nll"] >= self.reference["median_nll"]
                and most_known(forget["kinds"])[1] <= self.settings.known_limit):
            record["decision"] = "reached the reference level"
            self.reason = "reached"
            return Decision(True, self.lr_scale, rolled_back=False)
        if self.refusal and refuses(record):
            record["decision"] = "refuses its questions"
            self.reason = "reached"
            return Decision(True, self.lr_scale, rolled_back=False)
        return Decision(False, self.lr_scale, rolled_back=False)

    def result(self) -> Stop:
        rule = "reference" if self.reference is not None else "refusal" if self.refusal else "budget"
        return Stop(rule, self.reason, self.kept_step, self.checks, self.reference)
