"""What `seqforget status` shows: one record per request, and the table of them."""

from registry import Snapshot


def status_rows(state: Snapshot) -> list[dict]:
    """One record per request, as `status --json` prints it."""
    return [
        {
            "id": e["id"],
            "seq": e["seq"],
            "state": e["state"],
            "partial": e.get("partial", False),
            "method": e["method"],
            "scope": e["scope"],
            "sign": e["sign"],
            "kind": e["kind"],
            "metrics": e["metrics"],
            "adapter_dir": str(state.folder(e)),
            "applied_at": e["applied_at"],
            "rolled_back_at": e.get("rolled_back_at"),
        }
        for e in state.requests
    ]


def _refusal(figures: dict | None) -> str:
    if not figures:
        return "-"
    held = "" if figures["held_out"] is None else f" ({figures['held_out']:.2f})"
    return f"{figures['trained']:.2f}{held}, {figures['sarr']:.2f}"


def _retained(figures: dict | None) -> str:
    """The registry guard's exact answers as a share of the base model's, before -> after the request."""
    if not figures:
        return "-"
    return f"{figures['before'] / figures['base']:.1%} -> {figures['after'] / figures['base']:.1%}"


def _room(least: list | None) -> str:
    """The fewest input directions any of the request's layers was free to move along, of its width."""
    return "-" if not least else f"{least[0]}/{least[1]}"


def _least_forgotten(kinds: dict | None) -> str:
    """The kind of forget question most easily told from strangers' after the request: its
    question, its known share, and the share of its rows still answered as before."""
    if not kinds:
        return "-"
    kind = max(kinds, key=lambda k: kinds[k]["known"][1])
    short = kind if len(kind) <= 24 else kind[:23] + "~"
    return f"{short}: {kinds[kind]['known'][1]:.2f}, {kinds[kind]['answered'][1]:.0%}"


def status_table(rows: list[dict]) -> str:
    header = ["#", "id", "state", "method", "scope", "stopped", "forget median NLL", "reference", "known vs strangers",
              "least forgotten kind: known, answered",
              "retain NLL", "forget acc", "retain acc", "held-out retain acc", "refused (held-out), SARR",
              "retained of base", "free dirs", "gate: retain picked", "projector cond.", "applied"]
    lines = [header]
    for r in rows:
        m = r["metrics"]
        state = r["state"].replace("_", " ") + (" (partial)" if r["partial"] else "")
        stop = m["stop"]
        stopped = {"reached": "at level", "retain_guard": "retain guard", "registry_guard": "registry budget",
                   "budget": "budget"}[stop["reason"]]
        lines.append([
            str(r["seq"]), r["id"], state, r["method"], r["scope"], f"{stopped}, step {stop['step']}",
            "{:.2f} -> {:.2f}".format(*m["forget_median_nll"]),
            "-" if m["reference_nll"] is None else f"{m['reference_nll']:.2f}",
            "{:.2f} -> {:.2f}".format(*m["known"]) if m.get("known") else "-",
            _least_forgotten(m.get("kinds")),
            "{:.2f} -> {:.2f}".format(*m["retain_nll"]),
            "{:.2f} -> {:.2f}".format(*m["forget_acc"]), "{:.2f} -> {:.2f}".format(*m["retain_acc"]),
            "{:.2f} -> {:.2f}".format(*m["held_out_retain_acc"]) if m.get("held_out_retain_acc") else "-",  # what the guard watched
            _refusal(m.get("refusal")),
            _retained(m.get("retained")),
            _room(m.get("room")),
            f"{m['gate']['retain_picked']:.2f}" if m.get("gate") else "-",
            "{:.3g} -> {:.3g}".format(*m["projector_condition"]) if None not in m.get("projector_condition", [None]) else "-",
            r["applied_at"],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
