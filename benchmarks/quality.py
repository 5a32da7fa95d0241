"""Does a deletion match the retrain oracle? Requests as a user sends them, on several worlds.

    python -m benchmarks.quality --worlds shapes:0,glyphs:0,shapes:1,shapes:2 --deep shapes:0,glyphs:0 --jobs 2 --out benchmarks/RESULTS.md

For each world (style:seed, see seqforget/bench/world.py) the vanilla model and the retrain
oracles are trained (or loaded from the cache), then:
  single   one request forgetting 10% of the people, for every method under every scope it
           serves, written as a user would: the forget rows, a retain sample and the never-seen
           people's rows as `reference`, no other setting (the method named only where it is not
           the scope's default), partial: true so that a request that falls short is measured too
  stream   --stream one-person requests in a row, for each scope in --stream-scopes, measured
           after every request; the oracle (retrained without all of the stream's people) after
           the last. The scope's default method on every world; every method on --deep worlds
  variants on --deep worlds, the same single request with one thing changed (VARIANTS): what
           else was tried, and what each did
Worlds run --jobs at a time, each in its own process with its share of the CPU threads.
Each state is scored by benchmarks.forget_retain.evaluate, plus the relearning attack (fine-tune
on half of the forgotten people; the other half's held-out visual accuracy), and checked against
the target: forget accuracy within 5 points of the scope's oracle (visual: held-out image
questions; full: text questions), retain visual, retain textual and general accuracy at least
97% of vanilla, and for `visual` the forgotten people's text knowledge at least 97% of vanilla.
Writes the markdown to --out and every figure to the JSON beside it.
"""

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from registry import Registry
from seqforget.bench import cache_root
from seqforget.engine import apply_request, init_registry, live_model
from seqforget.bench.scoring import refusal_rate
from seqforget.models import load_model
from seqforget.requests import Request
from seqforget.methods import served
from seqforget.scopes import SCOPES
from benchmarks.forget_retain import (PROFILES, BenchmarkError, check_known, evaluate, prepare, relearn_other_half,
                                      write_request)

FRACTION = 0.1
SCOPES_MEASURED = ("visual", "full")  # `refuse` answers with a refusal: no oracle to match
FORGET_METRIC = {"visual": "forget_visual", "full": "forget_textual"}  # what the oracle of each scope is matched on
ORACLE = {"visual": "without_images", "full": "without_people"}
SHOWN = ["forget_visual", "forget_visual_rouge_l", "forget_identity", "forget_textual", "membership_auc_visual", "membership_auc_textual",
         "retain_visual", "retain_textual", "general"]
CLOSE, KEEP = 0.05, 0.97  # the target: within 5 points of the oracle, at least 97% of vanilla
REFUSALS = {"refuse/refusal": {}, "refuse/refusal (dpo)": {"method_args": {"objective": "dpo"}}}  # the refuse requests measured
REFUSED = ["refused_forget_visual", "refused_forget_textual", "refused_benign_visual", "refused_benign_textual",
           "refused_general", "retain_visual", "retain_textual", "general"]


LANGUAGE_MLPS = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # every language-model MLP (the vision tower's are fc1, fc2)
VARIANTS = {  # name -> (scope, what the request sets besides): what else was tried, run on --deep worlds
    "gd, no retain guard": ("visual", {"method": "gd", "retain_tolerance": 1.0}),
    "stranger, no retain guard": ("visual", {"retain_tolerance": 1.0}),
    "stranger, no retain term": ("visual", {"retain_tolerance": 1.0, "method_args": {"retain_weight": 0.0}}),
    "stranger on the language model's MLPs": ("visual", {"target_modules": LANGUAGE_MLPS}),
    "target on the language model's MLPs": ("visual", {"method": "target", "target_modules": LANGUAGE_MLPS}),
    "full: gd, no retain guard": ("full", {"method": "gd", "retain_tolerance": 1.0}),
    "full: stranger, no retain guard": ("full", {"retain_tolerance": 1.0}),
    "stranger, guard on the trained retain rows": ("visual", {"guard_share": 0.0}),
    "stranger + retain term on image features (weight 10)": ("visual", {"method_args": {"feature_weight": 10.0}}),
    "gd with stranger's budget (600 steps, lr 3e-3), no retain guard": (
        "visual", {"method": "gd", "steps": 600, "lr": 3e-3, "retain_tolerance": 1.0}),
}


def measured(scope: str) -> tuple[str, ...]:
    """The methods measured under `scope`: those that serve it, and for `visual` also `sine`, which
    a request reads as the default loss trained as SineProject's sine residual on the projector
    (`adapter: sine`)."""
    return served(scope) + (("sine",) if scope == "visual" else ())


def target_check(scope: str, state: dict, vanilla: dict, oracle: dict) -> dict:
    """{criterion: passed} of the target for one state."""
    metric = FORGET_METRIC[scope]
    out = {"forget": abs(state[metric] - oracle[metric]) <= CLOSE}
    for key in ("retain_visual", "retain_textual", "general"):
        out[key] = state[key] >= KEEP * vanilla[key]
    if scope == "visual":
        out["text_kept"] = state["forget_textual"] >= KEEP * vanilla["forget_textual"]
    return out


def _outcome(entry: dict) -> dict:
    """How the request ended: reached its level (or stopped short), steps kept, seconds."""
    m = entry["metrics"]
    return {"reached": not entry["partial"], "stop": m["stop"]["reason"], "steps": m["steps"], "seconds": m["seconds"],
            "level": m["reference_nll"], "forget_median_nll": m["forget_median_nll"][1],
            "projector_condition": (m.get("projector_condition") or [None, None])[1]}


def run_single(bench, scope: str, method: str | None, forgotten: list[str], work: Path, fields: dict | None = None) -> dict:
    """One request as sent (fields: anything to set besides); its state, relearning, how it ended."""
    folder = work / f"single-{scope}-{method or 'default'}"
    shutil.rmtree(folder, ignore_errors=True)
    reg = folder / "registry"
    init_registry(reg, bench.vanilla)
    path = write_request(bench, folder, "forget", forgotten, scope, method, None, as_sent=True, fields=fields)
    entry = apply_request(reg, path, show_progress=False)
    model, processor = live_model(Registry.open(reg).snapshot())
    result = {"state": evaluate(bench, model, processor, forgotten), "request": _outcome(entry)}
    result["state"]["relearn_other_half"] = relearn_other_half(bench, model, processor, forgotten)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def run_refuse(bench, forgotten: list[str], work: Path, fields: dict) -> dict:
    """One `refuse` request as sent (fields: anything to set besides): how often the model now refuses the
    forgotten people's questions, and how often benign ones (SineProject's SARR), beside retained accuracy."""
    folder = work / "single-refuse"
    shutil.rmtree(folder, ignore_errors=True)
    reg = folder / "registry"
    init_registry(reg, bench.vanilla)
    path = write_request(bench, folder, "forget", forgotten, "refuse", None, None, as_sent=True, fields=fields)
    entry = apply_request(reg, path, show_progress=False)
    model, processor = live_model(Registry.open(reg).snapshot())
    result = {"state": refusal_state(bench, model, processor, forgotten), "request": _outcome(entry)}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def refusal_state(bench, model, processor, forgotten: list[str]) -> dict:
    """Refusal rates on the forgotten people's held-out image questions and their text questions, and on
    benign ones: the same image questions of retained faces (the prompt-decoupled pairs), retained names,
    general questions; with evaluate()'s retained accuracies."""
    w, refusal = bench.world, Request.refusal
    retained = bench.retain_people(forgotten)
    out = {key: evaluate(bench, model, processor, [], retained)[key] for key in ("retain_visual", "retain_textual", "general")}
    for key, items in (("refused_forget_visual", w.select({"visual"}, forgotten, "test")),
                       ("refused_forget_textual", w.select({"textual"}, forgotten)),
                       ("refused_benign_visual", w.select({"visual"}, retained, "test")),
                       ("refused_benign_textual", w.select({"textual"}, retained)),
                       ("refused_general", w.select({"general"}, None, "test"))):
        out[key] = refusal_rate(model, processor, w.root, items, refusal)
    return out


def run_stream(bench, scope: str, method: str | None, people: list[str], work: Path) -> list[dict]:
    """One-person requests for `people` in a row (method None: the scope's default), each state measured."""
    folder = work / f"stream-{scope}-{method or 'default'}"
    shutil.rmtree(folder, ignore_errors=True)
    reg = folder / "registry"
    init_registry(reg, bench.vanilla)
    retained, forgotten, steps = bench.retain_people(people), [], []
    for i, person in enumerate(people):
        request = write_request(bench, folder, f"r{i:02d}", [person], scope, method, None, excluded=people, as_sent=True)
        entry = apply_request(reg, request, show_progress=False)
        forgotten.append(person)
        model, processor = live_model(Registry.open(reg).snapshot())
        state = evaluate(bench, model, processor, forgotten, retained)
        steps.append({"state": state, "request": _outcome(entry)})
        bench.log(f"  stream {scope}/{method or 'default'} {i + 1}/{len(people)}: forget visual {state['forget_visual']:.2f} "
                  f"textual {state['forget_textual']:.2f} retain visual {state['retain_visual']:.2f} general {state['general']:.2f}")
    shutil.rmtree(folder, ignore_errors=True)
    return steps


def run_world(profile_name: str, world: str, stream: int, stream_scopes: tuple[str, ...], deep: bool,
              cache: Path, work: Path, threads: int = 2, methods: tuple[str, ...] | None = None, log=print) -> dict:
    """Every measurement of one world ("style:seed"); `deep` adds the variants and every method's stream;
    `methods` (None: all) limits the requests to those methods."""
    torch.set_num_threads(threads)
    style, seed = world.split(":")
    seed = int(seed)
    work = work / f"{style}-{seed}"
    profile = PROFILES[profile_name]
    profile = replace(profile, world=replace(profile.world, style=style, seed=seed), train=replace(profile.train, seed=seed))
    bench = prepare(profile, cache, log)
    w = bench.world
    forgotten = w.forget_order()[: max(1, round(FRACTION * len(w.people)))]
    check_known(bench, forgotten)
    vanilla, processor = load_model(bench.vanilla)
    out = {"world": world, "people": forgotten, "vanilla": evaluate(bench, vanilla, processor, forgotten),
           "oracles": {}, "single": {}, "variants": {}, "stream": {}, "refuse": {}}
    out["vanilla"]["relearn_other_half"] = relearn_other_half(bench, vanilla, processor, forgotten)
    vanilla, processor = load_model(bench.vanilla)  # the attack fine-tuned it in place
    for scope in SCOPES_MEASURED:
        model, processor = load_model(bench.model_dir(**{ORACLE[scope]: forgotten}))
        out["oracles"][scope] = evaluate(bench, model, processor, forgotten)
        out["oracles"][scope]["relearn_other_half"] = relearn_other_half(bench, model, processor, forgotten)
        for method in measured(scope):
            if methods is not None and method not in methods:
                continue
            log(f"{world} single {scope}/{method}")
            r = run_single(bench, scope, None if method == SCOPES[scope].default else method, forgotten, work)
            r["target"] = target_check(scope, r["state"], out["vanilla"], out["oracles"][scope])
            out["single"][f"{scope}/{method}"] = r
    if methods is None or "refusal" in methods:
        out["refuse"]["vanilla"] = refusal_state(bench, vanilla, processor, forgotten)
        for key, fields in REFUSALS.items():
            log(f"{world} single {key}")
            out["refuse"][key] = run_refuse(bench, forgotten, work, fields)
    for name, (scope, fields) in VARIANTS.items() if deep else ():
        log(f"{world} variant {name}")
        r = run_single(bench, scope, None, forgotten, work, fields)
        r["target"] = target_check(scope, r["state"], out["vanilla"], out["oracles"][scope])
        out["variants"][name] = r
    if stream:
        people = w.forget_order()[:stream]
        check_known(bench, people)
        retained = bench.retain_people(people)
        vanilla_state = evaluate(bench, vanilla, processor, people, retained)
        for scope in stream_scopes:
            model, processor = load_model(bench.model_dir(**{ORACLE[scope]: people}))
            oracle = evaluate(bench, model, processor, people, retained)
            for method in measured(scope)[: None if deep else 1]:
                if methods is not None and method not in methods:
                    continue
                log(f"{world} stream {scope}/{method} of {stream}")
                steps = run_stream(bench, scope, None if method == SCOPES[scope].default else method, people, work)
                out["stream"][f"{scope}/{method}"] = {"vanilla": vanilla_state, "oracle": oracle, "steps": steps,
                                                      "target": target_check(scope, steps[-1]["state"], vanilla_state, oracle)}
    return out


# ---- the report -----------------------------------------------------------------------------------

def _spread(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if min(values) == max(values):
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _row(name: str, states: list[dict], extra: list[str] = ()) -> str:
    cells = [_spread([s.get(k) for s in states]) for k in SHOWN + ["relearn_other_half"]]
    return f"| {name} | " + " | ".join(cells + list(extra)) + " |"


HEADER = ("| model | forget visual (held-out views) | ROUGE-L of its greedy answers | forget identity | forget textual | membership AUC image rows | "
          "membership AUC text rows | retain visual | retain textual | general | relearn: other half visual |")


def _head(header: str) -> list[str]:
    """A table's header line and its separator."""
    return [header, "|---" * (header.count("|") - 1) + "|"]


def markdown(results: dict, command: str) -> str:
    worlds = results["worlds"]
    lines = ["# Quality of deletions against the retrain oracles", "",
             "Written by `benchmarks.quality`, which rewrites this file whole, so findings written by hand live "
             "elsewhere. What these tables say, with the findings of the other benchmarks, is in "
             "[FINDINGS.md](FINDINGS.md); what each figure means, in [README.md](README.md).", "",
             "Regenerate with:", "", f"    {command}", "",
             *([f"Measured at commit {results['commit']}.", ""] if results.get("commit") else []),
             *([results["erratum"], ""] if results.get("erratum") else []),
             f"Worlds: {', '.join(w['world'] for w in worlds)}. Figures are means over the worlds with their range "
             "(min-max) in brackets. One request forgets 10% of the people "
             f"({len(worlds[0]['people'])}). Choice accuracy over 4 options "
             "(chance 0.25). Membership AUC: how well answer NLL tells the forget rows from never-seen people's rows "
             "(0.5: indistinguishable).", "",
             f"Target (issue of record): forget within {CLOSE:.2f} of the scope's oracle (visual: forget visual; full: forget "
             f"textual); retain visual, retain textual and general at least {KEEP:.0%} of vanilla; for visual, forget "
             f"textual at least {KEEP:.0%} of vanilla.", ""]
    for scope in SCOPES_MEASURED:
        lines += [f"## {scope} scope, one request", "", *_head(HEADER + " reached the level | steps | seconds | projector condition number | target met (worlds) |")]
        lines.append(_row("vanilla", [w["vanilla"] for w in worlds], [""] * 5))
        for oracle_scope in SCOPES_MEASURED:
            lines.append(_row(f"oracle {oracle_scope} (retrained)", [w["oracles"][oracle_scope] for w in worlds], [""] * 5))
        for key in worlds[0]["single"]:
            if not key.startswith(scope + "/"):
                continue
            runs = [w["single"][key] for w in worlds if key in w["single"]]
            lines.append(_row(key + (" (default)" if key.split("/")[1] == SCOPES[scope].default else ""), [r["state"] for r in runs], [
                f"{sum(r['request']['reached'] for r in runs)}/{len(runs)}", _spread([r["request"]["steps"] for r in runs], 0),
                _spread([r["request"]["seconds"] for r in runs], 0),
                _spread([r["request"].get("projector_condition") for r in runs], 0), _met(runs)]))
        lines.append("")
    lines += _refuse_table(worlds)
    names = [n for n in VARIANTS if any(n in w.get("variants", {}) for w in worlds)]
    if names:
        lines += ["## What else was tried: variants of one request", "",
                  "The same single request with one thing changed (see VARIANTS in benchmarks/quality.py).", "",
                  *_head(HEADER.replace("| model |", "| variant | scope |") + " reached the level | steps | target met (worlds) |")]
        for name in names:
            runs = [w["variants"][name] for w in worlds if name in w.get("variants", {})]
            row = _row(name, [r["state"] for r in runs], [
                f"{sum(r['request']['reached'] for r in runs)}/{len(runs)}", _spread([r["request"]["steps"] for r in runs], 0),
                _met(runs)])
            lines.append(row.replace(f"| {name} |", f"| {name} | {VARIANTS[name][0]} |", 1))
        lines.append("")
    for scope in SCOPES_MEASURED:
        default = f"{scope}/{SCOPES[scope].default}"
        runs = [w["stream"][default] for w in worlds if default in w["stream"]]
        if not runs:
            continue
        n = len(runs[0]["steps"])
        lines += [f"## {scope} scope, a stream of {n} one-person requests ({SCOPES[scope].default}, the default)", "",
                  "After each request, on everyone forgotten so far; the oracle is retrained without all of them.", "",
                  *_head(HEADER.replace("| model |", "| after request |") + " reached the level |")]
        lines.append(_row("vanilla (all)", [r["vanilla"] for r in runs], [""]))
        lines.append(_row("oracle (all)", [r["oracle"] for r in runs], [""]))
        for i in range(n):
            lines.append(_row(str(i + 1), [r["steps"][i]["state"] for r in runs],
                              [f"{sum(r['steps'][i]['request']['reached'] for r in runs)}/{len(runs)}"]))
        lines += ["", f"Worlds where the target holds after the last request: {_met(runs)}.", ""]
        keys = [k for k in worlds[0]["stream"] if k.startswith(scope + "/")]
        keys += [k for w in worlds for k in w["stream"] if k.startswith(scope + "/") and k not in keys]
        if len(keys) > 1:
            lines += [f"### every {scope} method's stream: after the first and the last request", "",
                      *_head(HEADER.replace("| model |", "| method | after request |") + " reached the level | target met (worlds) |")]
            for key in keys:
                runs = [w["stream"][key] for w in worlds if key in w["stream"]]
                for i, label in ((0, "1"), (n - 1, str(n))):
                    extra = [f"{sum(r['steps'][i]['request']['reached'] for r in runs)}/{len(runs)}", _met(runs) if i else ""]
                    lines.append(_row(key, [r["steps"][i]["state"] for r in runs], extra).replace(f"| {key} |", f"| {key} | {label} |", 1))
            lines.append("")
    lines += _by_world(worlds)
    lines += _by_person(worlds)
    lines += [f"Total time: {results['seconds'] / 60:.0f} min.", ""]
    return "\n".join(lines)


def _refuse_table(worlds: list[dict]) -> list[str]:
    """The refuse requests: refusal rates on forget and benign questions, retained accuracy, how the request ended."""
    keys = [k for k in REFUSALS if any(k in w.get("refuse", {}) for w in worlds)]
    if not keys:
        return []
    lines = ["## refuse scope, one request", "",
             f"Refusal rate: share of greedy answers that are the refusal ({Request.refusal!r}). Benign image questions are "
             "the forgotten people's questions asked of retained faces (SineProject's SARR); benign text questions ask about "
             "retained people by name. The refusal has no oracle: the aim is forget questions refused, benign ones answered.", "",
             *_head("| model | refused: forget image questions (held-out views) | refused: forget text questions | "
                    "refused: benign image questions (SARR) | refused: benign text questions | refused: general questions | "
                    "retain visual | retain textual | general | steps | seconds | projector condition number |")]
    rows = [("vanilla", [w["refuse"]["vanilla"] for w in worlds if "vanilla" in w.get("refuse", {})], None)]
    rows += [(k, [w["refuse"][k]["state"] for w in worlds if k in w.get("refuse", {})],
              [w["refuse"][k]["request"] for w in worlds if k in w.get("refuse", {})]) for k in keys]
    for name, states, requests in rows:
        cells = [_spread([s.get(k) for s in states]) for k in REFUSED]
        extra = ["", "", ""] if requests is None else [_spread([r["steps"] for r in requests], 0),
                                                      _spread([r["seconds"] for r in requests], 0),
                                                      _spread([r.get("projector_condition") for r in requests], 0)]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return lines + [""]


def _by_person(worlds: list[dict]) -> list[str]:
    """Each forgotten person's accuracy on the scope's forget metric, one request with the default."""
    lines = ["## Per person: one request with each scope's default", "",
             "Visual: accuracy on the person's held-out views; full: on questions about the person in text.", "",
             *_head("| world | scope | model | " + " | ".join(f"person {i + 1}" for i in range(len(worlds[0]["people"]))) + " |")]
    for w in worlds:
        for scope in SCOPES_MEASURED:
            key, metric = f"{scope}/{SCOPES[scope].default}", FORGET_METRIC[scope] + "_by_person"
            models = [("vanilla", w["vanilla"]), ("oracle", w["oracles"].get(scope)), (key, w["single"].get(key, {}).get("state"))]
            for name, state in models:
                if state and metric in state:
                    cells = [f"{person} {value:.2f}" for person, value in state[metric].items()]
                    lines.append(f"| {w['world']} | {scope} | {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _met(runs: list[dict]) -> str:
    met = sum(all(r["target"].values()) for r in runs)
    missed = sorted({c for r in runs for c, ok in r["target"].items() if not ok})
    return f"{met}/{len(runs)}" + (f" (missed: {', '.join(missed)})" if missed else "")


def _by_world(worlds: list[dict]) -> list[str]:
    """The scopes' defaults world by world: each figure the target compares, beside what it is compared with."""
    lines = ["## The defaults world by world", "",
             "Forget: the scope's forget metric (visual: forget visual; full: forget textual) against the oracle's; "
             "the rest against vanilla. Streams: after the last request, on all of the stream's people.", "",
             *_head("| world | scope | request | forget (oracle) | retain visual (vanilla) | retain textual (vanilla) | "
                    "general (vanilla) | forget textual (vanilla) | target missed on |")]
    for w in worlds:
        for scope in SCOPES_MEASURED:
            key = f"{scope}/{SCOPES[scope].default}"
            runs = [("one request", w["single"].get(key), w["vanilla"], w["oracles"].get(scope))]
            if key in w["stream"]:
                st = w["stream"][key]
                runs.append((f"stream of {len(st['steps'])}", {**st, "state": st["steps"][-1]["state"]}, st["vanilla"], st["oracle"]))
            for label, run, vanilla, oracle in runs:
                if run is None:
                    continue
                state, metric = run["state"], FORGET_METRIC[scope]
                cells = [f"{state[metric]:.2f} ({oracle[metric]:.2f})"] + [
                    f"{state[k]:.2f} ({vanilla[k]:.2f})" for k in ("retain_visual", "retain_textual", "general", "forget_textual")]
                missed = ", ".join(c for c, ok in run["target"].items() if not ok) or "-"
                lines.append(f"| {w['world']} | {scope} | {label} | " + " | ".join(cells) + f" | {missed} |")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="shapes:0,glyphs:0", help="comma-separated style:seed")
    parser.add_argument("--deep", default="shapes:0,glyphs:0",
                        help="comma-separated worlds that also get the variants and every method's stream")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default", help="world and training sizes")
    parser.add_argument("--stream", type=int, default=10, help="one-person requests in the stream (0: none)")
    parser.add_argument("--stream-scopes", default="visual,full", help="comma-separated scopes to stream")
    parser.add_argument("--jobs", type=int, default=1, help="worlds measured at once, each in its own process")
    parser.add_argument("--methods", default=None, help="comma-separated methods to measure (default: every method)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--cache", type=Path, default=None, help="where worlds and trained models are kept")
    parser.add_argument("--work", type=Path, default=Path("out/quality"), help="scratch folder for registries")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: write the markdown of figures saved by an earlier run")
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        args.out.write_text(markdown(saved, saved.get("command", "python -m benchmarks.quality")))
        return
    worlds = [w for w in args.worlds.split(",") if w]
    bad = [w for w in worlds if len(w.split(":")) != 2 or not w.split(":")[1].isdigit()]
    if bad or args.jobs < 1:
        parser.error(f"worlds are style:seed, jobs at least 1 (got {', '.join(bad) or args.jobs})")
    deep = {w for w in args.deep.split(",") if w}
    if deep - set(worlds):
        parser.error(f"--deep names worlds not in --worlds: {', '.join(sorted(deep - set(worlds)))}")
    start = time.perf_counter()
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    calls = {w: (args.profile, w, args.stream, tuple(s for s in args.stream_scopes.split(",") if s), w in deep,
                 args.cache or cache_root() / "bench", args.work, threads,
                 tuple(args.methods.split(",")) if args.methods else None) for w in worlds}
    done: dict[str, dict] = {}
    json_path = args.out.with_suffix(".json")

    def save():
        results = {"commit": commit, "command": command, "worlds": [done[w] for w in worlds if w in done], "seconds": time.perf_counter() - start}
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        return results

    try:
        if args.jobs == 1:
            for w in worlds:
                done[w] = run_world(*calls[w])
                save()
        else:
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(run_world, *calls[w]): w for w in worlds}
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    save()
    except BenchmarkError as e:
        sys.exit(f"benchmark: {e}")
    args.out.write_text(markdown(save(), command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
