"""`seqforget report`: the record of one deletion, as a compliance officer files it.

Everything comes from what the registry committed for the request (its manifest entry,
request.json and metrics.json, each file checked against its sha256 first): what was asked
(the request's hash and its data files' hashes), what was stored (the adapter's files and
their hashes), how it was trained and why training stopped, the forget and retain figures
before and after, and when it was applied and rolled back.
"""

import json
from pathlib import Path

from registry import GATE_FILE, Snapshot
from seqforget.budget import budget_line
from seqforget.errors import SeqforgetError


def report(state: Snapshot, request_id: str) -> dict:
    """The record of request `request_id`, after checking every file it names."""
    entry = state.find(request_id)
    if entry is None:
        raise SeqforgetError(f"no request {request_id!r} in the registry")
    request, metrics = state.records(entry, "request.json", "metrics.json")  # hash-checked
    stop = metrics["stop"]
    return {
        "id": entry["id"],
        "state": entry["state"],
        "partial": entry.get("partial", False),
        "registry": str(state.root),
        "base_model": state.base_model,
        "request": {"sha256": entry["sha256"], "scope": entry["scope"], "method": entry["method"],
                    "method_args": request["method_args"], "training": request["training"],
                    "target_modules": request["target_modules"], "source": request["source"],
                    "stream": entry.get("stream")},
        "data": {label: {"path": request[label]["path"], "rows": request[label]["rows"], "sha256": request["data_sha256"][label]}
                 for label in ("forget", "retain", "reference") if request.get(label)},
        "adapter": {"kind": entry["kind"], "sign": entry["sign"], "folder": entry["dir"]},
        "files": entry["files"],  # sha256 of every file the request committed: the adapter's, basis.h5, the records
        "stopping": {"rule": stop["rule"], "reason": stop["reason"], "step": stop["step"], "reached": stop["reached"],
                     "reference_median_nll": stop["reference"]["median_nll"] if stop.get("reference") else None,
                     "refusal": entry["metrics"].get("refusal"),
                     "known": entry["metrics"].get("known"),  # the forget rows told from strangers: AUC before, after
                     "kinds": entry["metrics"].get("kinds"),  # the same per kind of question, and the share still answered
                     "checks": stop.get("checks", [])},
        "figures": {"before": metrics["before"], "after": metrics["after"], "rows": metrics["rows"]},
        "retained": entry["metrics"].get("retained"),  # the registry guard's figures, with the base's and the budget
        "registry_retained": budget_line(state),
        "projection": metrics["projection"],
        "basis": {"layers": metrics["basis"], "bytes": metrics.get("basis_bytes"), "seconds": metrics.get("basis_seconds")},
        "forget_keys": ({"layers": metrics["forget_keys"], "bytes": metrics["forget_keys_bytes"]}
                        if "forget_keys" in metrics else None),  # requests committed before forget keys have none
        "gate": metrics.get("gate"),  # in a gated registry: the gate's threshold and how it sits against the retain images
        "room": metrics.get("room"),  # per target layer: its input width, and the directions the update was free to use
        "times": {"applied_at": entry["applied_at"], "rolled_back_at": entry.get("rolled_back_at"),
                  "seconds": metrics["seconds"], "train_seconds": metrics["train_seconds"],
                  "peak_rss_mb": metrics.get("peak_rss_mb")},
    }


def markdown(record: dict) -> str:
    """The record for people: the same facts as the JSON, less the per-check detail."""
    r, before, after = record["request"], record["figures"]["before"], record["figures"]["after"]
    state = record["state"].replace("_", " ") + (" (partial: committed short of its level)" if record["partial"] else "")
    lines = [
        f"# Deletion record: {record['id']}", "",
        f"- State: {state}",
        f"- Applied: {record['times']['applied_at']}" + (f"; rolled back: {record['times']['rolled_back_at']}"
                                                         if record["times"]["rolled_back_at"] else ""),
        f"- Registry: `{record['registry']}`",
        f"- Base model: `{record['base_model']['path']}` (sha256 `{record['base_model']['sha256']}`)",
        f"- Request: scope `{r['scope']}`, method `{r['method']}`, sha256 `{r['sha256']}`, read from `{r['source']}`",
        "", "## Data", "", "| set | rows | sha256 | path |", "|---|---|---|---|",
        *[f"| {label} | {d['rows']} | `{d['sha256']}` | `{d['path']}` |" for label, d in record["data"].items()],
        "", "## Stored files", "",
        f"Kind `{record['adapter']['kind']}`{' (subtracted: its stored factor is negated)' if record['adapter']['sign'] < 0 else ''}, "
        f"in `{record['adapter']['folder']}`; projected into the retained inputs' null space: "
        f"{'yes' if record['projection'] else 'no'}." + _basis_line(record["basis"]) + _keys_line(record["forget_keys"])
        + _room_line(record["room"]) + _gate_line(record.get("gate")), "",
        "| file | sha256 |", "|---|---|",
        *[f"| {name} | `{digest}` |" for name, digest in sorted(record["files"].items())],
        "", "## Training", "",
        f"Stopped by the {record['stopping']['rule']} rule ({record['stopping']['reason'].replace('_', ' ')}) at step "
        f"{record['stopping']['step']}; level {'reached' if record['stopping']['reached'] else 'not reached'}"
        + (f" (reference median NLL {record['stopping']['reference_median_nll']:.3f})"
           if record["stopping"]["reference_median_nll"] is not None else "")
        + (_refusal_words(record["stopping"]["refusal"]) if record["stopping"].get("refusal") else "") + "."
        + (" By their answers' likelihood against strangers', the forget rows could be told apart with an AUC of "
           "{:.2f} before and {:.2f} after (0.5: not at all).".format(*record["stopping"]["known"])
           if record["stopping"].get("known") else ""),
        *_kinds_table(record["stopping"].get("kinds")),
        f"Settings: {json.dumps(r['training'], sort_keys=True)}; method arguments: {json.dumps(r['method_args'], sort_keys=True)}.",
        f"Time: {record['times']['seconds']:.1f} s in all, {record['times']['train_seconds']:.1f} s training.",
        "", "## Figures before and after", "", "| rows | token accuracy | NLL | median NLL |", "|---|---|---|---|",
    ]
    for label in ("forget", "retain", "guard"):
        if label in before:
            b, a = before[label], after[label]
            lines.append(f"| {label} ({record['figures']['rows'][label]}) | {b['token_acc']:.3f} -> {a['token_acc']:.3f} | "
                         f"{b['nll']:.3f} -> {a['nll']:.3f} | {b['median_nll']:.3f} -> {a['median_nll']:.3f} |")
    kept = record.get("retained")
    if kept:
        lines += ["", f"The registry's guard rows, answered exactly: {kept['before'] / kept['base']:.1%} of the base "
                      f"model's before, {kept['after'] / kept['base']:.1%} after (budget {kept['budget']:.0%})."]
    lines += ["", f"The registry now: {record['registry_retained']}."]
    if before.get("projector_condition") is not None:
        lines += ["", f"Projector Jacobian condition number: {before['projector_condition']:.4g} -> "
                      f"{after['projector_condition']:.4g}."]
    return "\n".join(lines) + "\n"


def _refusal_words(figures: dict) -> str:
    held = "" if figures["held_out"] is None else f", {figures['held_out']:.0%} of those about images it never trained on"
    return (f": it refused {figures['trained']:.0%} of its trained forget questions{held}, and {figures['sarr']:.0%} "
            f"of the retained questions the guard watched")


def _leaders(layers: dict) -> dict:
    """The growth records of the layers that stored their columns: a layer sharing another's has none of its own."""
    return {name: g for name, g in layers.items() if g.get("shares_with", name) == name}


def _basis_line(basis: dict) -> str:
    layers = basis["layers"]
    added = sum(g["columns_added"] for g in _leaders(layers).values())
    line = f" It added {added} basis column(s) over {len(layers)} layer(s)"
    if basis["bytes"] is not None:
        line += f": {basis['bytes']} bytes, grown in {basis['seconds']:.2f} s"
    return line + "; they stay when it is rolled back (they protect retained knowledge, which stays)."


def _keys_line(keys: dict | None) -> str:
    if keys is None:
        return ""
    layers = keys["layers"]
    lead = _leaders(layers)
    added = sum(g["columns_added"] for g in lead.values())
    held = min((g["captured_before"] for g in lead.values()), default=1.0)
    return (f" Its forget keys: {added} column(s) over {len(layers)} layer(s), {keys['bytes']} bytes: the directions its "
            f"forget rows send through those layers beyond the retained basis (which held at least {held:.0%} of those "
            f"inputs' energy); while it is active, a later request with keep_forgotten cannot move the model along them.")


def _room_line(room: dict | None) -> str:
    if not room:
        return ""
    least = min(room, key=lambda name: room[name]["free"])
    full = sum(g["free"] == 0 for g in room.values())
    return (f" Its update was free to move along {room[least]['free']} of the {room[least]['width']} input directions of "
            f"{least}, its least free layer" + (f"; {full} layer(s) had none left and could not change" if full else "")
            + ".")


def _kinds_table(kinds: dict | None) -> list[str]:
    """Each kind of forget question apart, before -> after: how well its rows could be told from
    strangers' (0.5: not at all) and the share still answered as before. Empty without reference rows."""
    if not kinds:
        return []
    return ["", "| forget question | rows | told from strangers (AUC) | still answered |", "|---|---|---|---|",
            *[f"| {kind} | {k['rows']} | {k['known'][0]:.2f} -> {k['known'][1]:.2f} | "
              f"{k['answered'][0]:.0%} -> {k['answered'][1]:.0%} |" for kind, k in sorted(kinds.items())], ""]


def _gate_line(gate: dict | None) -> str:
    if not gate:
        return ""
    return (f" The registry is gated: its term applies only to images its gate picks ({GATE_FILE}, "
            f"{gate.get('bytes', 0)} bytes), fitted on {gate['views']} views of its forget images; it picked "
            f"{gate['retain_picked']:.0%} of the request's retain images.")


def write_report(state: Snapshot, request_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Write `<id>.report.json` and `<id>.report.md` into `out_dir`; return their paths."""
    record = report(state, request_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{request_id}.report.json", out_dir / f"{request_id}.report.md"
    paths[0].write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    paths[1].write_text(markdown(record))
    return paths
