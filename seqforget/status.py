"""What `seqforget status` shows: one record per request, and the table of them."""

from registry import Snapshot
from seqforget.errors import SeqforgetError


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


def status_series(rows: list[dict]) -> dict[str, list]:
    """What `status --plot` draws, one value per request in commit order: its forget rows' token
    accuracy before and after it, its retain rows' after it, how well its forget rows are told
    from strangers' after it (None without reference rows), and the registry guard's exact
    answers as a share of the base model's after it (None without a budget)."""
    def after(m, key):
        return m[key][1] if m.get(key) else None

    return {"labels": [r["id"] + (" (rolled back)" if r["state"] == "rolled_back" else "") for r in rows],
            "forget_before": [r["metrics"]["forget_acc"][0] for r in rows],
            "forget_after": [r["metrics"]["forget_acc"][1] for r in rows],
            "retain_after": [r["metrics"]["retain_acc"][1] for r in rows],
            "known_after": [after(r["metrics"], "known") for r in rows],
            "retained_of_base": [r["metrics"]["retained"]["after"] / r["metrics"]["retained"]["base"]
                                 if r["metrics"].get("retained") else None for r in rows]}


def plot_status(rows: list[dict], path) -> dict[str, list]:
    """Draw status_series(rows) into a PNG at `path`; return the series. Needs matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise SeqforgetError("status --plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = status_series(rows)
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 3), 4))
    ax.plot(x, series["forget_before"], marker=".", linestyle=":", color="tab:red", label="forget rows, before")
    ax.plot(x, series["forget_after"], marker="o", color="tab:red", label="forget rows, after")
    ax.plot(x, series["retain_after"], marker="s", color="tab:blue", label="retain rows, after")
    for key, label, style in (("known_after", "forget told from strangers (AUC), after", "tab:orange"),
                              ("retained_of_base", "registry guard, share of base", "black")):
        if any(v is not None for v in series[key]):
            ax.plot(x, [float("nan") if v is None else v for v in series[key]], marker="^", color=style, label=label)
    ax.set_xticks(x, series["labels"], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(-0.05, 1.1)
    ax.set_ylabel("token accuracy (answers), share")
    ax.set_title("each request, in commit order", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SeqforgetError(f"cannot write the plot to {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return series
