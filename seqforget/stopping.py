"""When a request's training stops: where a model that never saw the forget rows would be.

The oracle's level is estimated without retraining, from reference rows: rows of the same
kinds about people (or things) the model never saw. Their answers' median per-token NLL
under the live model before this request is what "never seen" looks like. Every
`check_every` steps the forget rows are probed, and the request has reached the level
when their median NLL is at least the reference's.

A retain guard probes the retain rows at the same checks: when their token accuracy falls
more than `retain_tolerance` below where it started, the adapter goes back to the last check
that kept it and training stops. With no reference rows there is no level to reach: the
step budget alone ends training, and the record says so.
"""

from dataclasses import asdict, dataclass

import torch

from seqforget.data import Rows
from seqforget.evaluation import probe


@dataclass
class Stop:
    """How training ended, as stored with the request and shown by `status`."""

    rule: str  # "reference" (the oracle's level from reference rows) | "budget" (no reference)
    reason: str  # "reached" | "retain_guard" | "budget"
    step: int  # optimiser steps the adapter kept
    checks: list[dict]  # one record per check: step, forget, retain (and the decision)
    reference: dict | None  # the reference rows' probe before training

    @property
    def reached(self) -> bool:
        """Whether the request did what its rule asks: the reference level, or its whole budget."""
        return self.reason == "reached" or (self.rule == "budget" and self.reason == "budget")

    def record(self) -> dict:
        return asdict(self)


class Stopping:
    """Decides, at each check, whether training goes on; keeps the last adapter the guard accepts."""

    def __init__(self, model, forget: Rows, retain: Rows, reference: Rows | None, settings):
        self.forget, self.retain, self.settings = forget, retain, settings
        self.reference = probe(model, reference.fixed) if reference is not None and len(reference) else None
        self.retain_start = probe(model, retain.fixed)["token_acc"]
        self.checks: list[dict] = []
        self.kept_step, self.kept = 0, None
        self.reason = "budget"

    def start(self, params: list[torch.nn.Parameter]) -> None:
        """Keep the untrained adapter: what the guard goes back to if the first check fails."""
        self.kept = [p.detach().clone() for p in params]

    def check(self, model, step: int, params: list[torch.nn.Parameter]) -> bool:
        """True when training should stop (the adapter in `params` is then the one to keep)."""
        forget, retain = probe(model, self.forget.fixed), probe(model, self.retain.fixed)
        record = {"step": step, "forget": forget, "retain": retain}
        self.checks.append(record)
        if retain["token_acc"] < self.retain_start - self.settings.retain_tolerance:
            record["decision"] = "retain guard: back to step %d" % self.kept_step
            with torch.no_grad():
                for p, kept in zip(params, self.kept):
                    p.copy_(kept)
            self.reason = "retain_guard"
            return True
        self.kept_step, self.kept = step, [p.detach().clone() for p in params]
        if self.reference is not None and forget["median_nll"] >= self.reference["median_nll"]:
            record["decision"] = "reached the reference level"
            self.reason = "reached"
            return True
        return False

    def result(self) -> Stop:
        rule = "reference" if self.reference is not None else "budget"
        return Stop(rule, self.reason, self.kept_step, self.checks, self.reference)
