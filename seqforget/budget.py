"""The registry's budget: the share of the base model's retained ability that no request may take away.

At `init --guard ROWS`, the base model answers the guard rows: questions about what must stay
(people, things and facts no request will ask to forget). The share it answers exactly (its
greedy answer is the row's own: seqforget.evaluation.probe's "exact") is stored with the
budget, the share of that figure the registry keeps (BUDGET unless told). Every request's
stopping rule probes the guard rows at its checks, on the model the registry would hold with
the request composed in. A check below the floor goes back to the last check within it, as the
retain guard does (seqforget.stopping). A request whose training ends there is refused
(OverBudget, its own exit status), or committed at that last check if it says `partial`.

Each request's own retain guard watches the model before it; this one watches the base
model. The small costs of a stream add up against it, where `status` shows them, and stop at
the budget instead of wearing the model down unseen.
"""

from dataclasses import dataclass

from seqforget import data
from seqforget.errors import OverBudget, SeqforgetError
from seqforget.evaluation import probe

BUDGET = 0.95  # share of the base model's exact answers on the guard rows the registry keeps, unless `init --budget`


@dataclass
class Floor:
    """What a request's checks must keep: the guard rows' exact answers at least `budget` times the base model's."""

    rows: data.Rows
    base: float  # the base model's share of exact answers on the rows
    budget: float

    def share(self, exact: float) -> float:
        return exact / self.base

    def holds(self, exact: float) -> bool:
        return self.share(exact) >= self.budget - 1e-9  # shares of rows: equal counts are not below


def read_guard(path, label: str = "guard") -> list[data.Row]:
    problems: list[str] = []
    rows = data.read_rows(path, problems, label)
    if problems:
        raise SeqforgetError(f"invalid {label} set: {'; '.join(problems[:12])}")
    if not rows:
        raise SeqforgetError(f"the {label} set {path} holds no rows")
    return rows


def guard_record(path, sha256: str, rows: list[data.Row], budget: float, model, encoder: data.Encoder, pad: int) -> dict:
    """The manifest's `guard`: where its rows are, the budget, and the base model's figures on them."""
    if not 0 < budget <= 1:
        raise SeqforgetError(f"the budget is a share of the base model's accuracy, above 0 and at most 1 (got {budget})")
    base = probe(model, data.Rows([encoder(r) for r in rows], pad).fixed)
    if base["exact"] == 0:
        raise SeqforgetError(f"the base model answers none of the {len(rows)} guard rows exactly: there is nothing "
                             f"for a budget to keep; give rows about what the model knows and must keep")
    return {"path": str(path), "sha256": sha256, "rows": len(rows), "budget": budget,
            "base": {"exact": base["exact"], "token_acc": base["token_acc"], "nll": base["nll"]}}


def floor(guard: dict, rows: data.Rows) -> Floor:
    return Floor(rows, guard["base"]["exact"], guard["budget"])


def share(guard: dict, exact: float) -> float:
    """`exact` (the guard rows' exact answers under some model) as a share of the base model's."""
    return exact / guard["base"]["exact"]


def refuse_if_below(floor: Floor, exact: float, request_id: str) -> None:
    """Before training: a live model already below the budget leaves a request nothing to spend."""
    if not floor.holds(exact):
        raise OverBudget(f"request {request_id}: the live model already keeps only {floor.share(exact):.1%} of the base "
                         f"model's answers on the registry's guard rows, below its budget of {floor.budget:.0%}: "
                         f"roll a request back first. Nothing was committed")


def running_total(state) -> dict | None:
    """{"share", "budget", "after": the request it was measured after (None: no request
    active, the base model itself), "stale": rollbacks since then may have changed it};
    None when the registry has no budget."""
    guard = state.guard
    if guard is None:
        return None
    active = [e for e in state.active if e["metrics"].get("retained")]
    if not active:
        return {"share": 1.0 if not state.active else None, "budget": guard["budget"], "after": None, "stale": False}
    last = active[-1]
    # the requests after `last` are all rolled back; one before it, active when it was measured
    # and rolled back since, changed the live model
    stale = any(e["state"] == "rolled_back" and e["seq"] < last["seq"] and e["rolled_back_at"] >= last["applied_at"]
                for e in state.requests)
    return {"share": share(guard, last["metrics"]["retained"]["after"]), "budget": guard["budget"],
            "after": last["id"], "stale": stale}


def retained_words(retained: dict) -> str:
    """A request's figure (its metrics' "retained"): "retained 96.4% of base (budget 95%)"."""
    return f"retained {retained['after'] / retained['base']:.1%} of base (budget {retained['budget']:.0%})"


def budget_line(state) -> str:
    """One line for `status` and `report`: the registry's running total against its budget."""
    total = running_total(state)
    if total is None:
        return "no budget: this registry has no guard set (seqforget init --guard ROWS)"
    if total["share"] is None:
        return f"retained: not measured (budget {total['budget']:.0%})"
    where = f"after {total['after']}" if total["after"] else "no request active"
    stale = "; rolled back since, not measured again" if total["stale"] else ""
    return f"retained {total['share']:.1%} of base ({where}{stale}), budget {total['budget']:.0%}"
