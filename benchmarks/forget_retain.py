"""The forget/retain benchmark: fictitious people, retrain oracles, requests through the real registry.

    python -m benchmarks.forget_retain --out out/bench                  # the default profile
    python -m benchmarks.forget_retain --profile tiny --out out/tiny    # seconds, for a smoke run

Protocols (each request goes through `seqforget.engine.apply_request` on a real registry):
  single    one request forgetting 5, 10 and 15% of the people
  stream    K requests of disjoint people, measured after each
  rollback  the middle request of the stream taken back: its people return, the rest stay forgotten
  leakage   the textual probe (for `full` scope) and the original projector put back
  relearn   fine-tune the unlearned model on half the forgotten people; how much of the other half returns
Every state is compared with retrain oracles: the same training without the forgotten
people's images (the target of `visual` scope) and without any of their data (of `full`).
Writes results.json, results.md and plots into --out.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from registry import Registry
from seqforget import data
from seqforget.engine import apply_request, init_registry, live_model, rollback_request
from seqforget.losses import answer_nll
from seqforget.models import load_model
from seqforget.tiny import TinySpec
from seqforget.bench import cache_root
from seqforget.bench.scoring import accuracy_by_person, choice_accuracy, choice_hits, generation_scores, membership_aucs
from seqforget.bench.vanilla import TrainSpec, cached_model, examples_for, language_side, trainable
from seqforget.bench.world import STYLES, World, WorldSpec, cached_world

KNOWN = 0.9  # the vanilla model must know the forget set this well, or nothing is measured
FORGET_KINDS = {"visual", "identity", "textual", "cloze"}  # what a request sends to be forgotten
MEMBERSHIP = {"": FORGET_KINDS, "_visual": {"visual", "identity"}, "_textual": {"textual", "cloze"}}  # suffix -> kinds


class BenchmarkError(Exception):
    pass


@dataclass(frozen=True)
class Profile:
    world: WorldSpec
    train: TrainSpec
    fractions: tuple[float, ...] = (0.05, 0.10, 0.15)
    stream: int = 10  # requests in the stream
    stream_people: int = 1  # people per stream request
    retain_rows: int = 192  # rows of retained people a request brings
    eval_retain_people: int = 20
    relearn_steps: int = 30
    methods: tuple[str, ...] = ("ga", "gd", "npo")
    thresholds: tuple = (None, 0.9, 0.97)  # None: no projection
    stream_thresholds: tuple = (None, 0.97)
    scopes: tuple[str, ...] = ("full", "visual")
    model: TinySpec = field(default_factory=TinySpec)  # its image_size is the world's


# The size ladder: is a stream's wear a property of the method or of a 0.8M-parameter model?
# Each rung is the default profile with a larger model (and, at the top, larger images and more people).
PROFILES = {
    "default": Profile(WorldSpec(), TrainSpec()),  # 0.8M parameters
    "5m": Profile(WorldSpec(), TrainSpec(), model=TinySpec(vision_hidden=128, vision_layers=4, text_hidden=256, text_layers=6)),
    "25m": Profile(WorldSpec(people=200, image_size=64), TrainSpec(),
                   model=TinySpec(vision_hidden=256, vision_layers=4, vision_heads=8, image_size=64,
                                  text_hidden=512, text_layers=8, text_heads=8)),
    "tiny": Profile(
        WorldSpec(people=8, unseen=4, train_views=3, test_views=1, general=16),
        TrainSpec(vision_epochs=60, scenery=64, lm_epochs=80, scenery_rows=32, batch_size=16),
        fractions=(0.1,), stream=3, retain_rows=64, eval_retain_people=4, relearn_steps=10,
        methods=("ga",), thresholds=(None,), stream_thresholds=(None,), scopes=("full",),
    ),
}


@dataclass
class Bench:
    """Everything the protocols share: the world, the cache, the vanilla model."""

    world: World
    profile: Profile
    cache: Path
    work: Path
    vanilla: Path | None = None  # folder of the vanilla model
    log: callable = print

    def model_dir(self, without_images=(), without_people=()) -> Path:
        return cached_model(self.world, self.cache, without_images, without_people, self.profile.train, self.profile.model,
                            log=lambda s: None)

    def retain_people(self, forgotten) -> list[str]:
        rest = [n for n in self.world.forget_order() if n not in set(forgotten)]
        return rest[::-1][: self.profile.eval_retain_people]  # from the far end of the order: never forgotten


def prepare(profile: Profile, cache: Path, log=print) -> Bench:
    """Build (or load) the world and the vanilla model; refuse a vanilla model that does not know."""
    world = cached_world(profile.world, cache)
    bench = Bench(world, profile, Path(cache), Path(cache), log=log)
    log("training or loading the vanilla model ...")
    bench.vanilla = bench.model_dir()
    return bench


def evaluate(bench: Bench, model, processor, forgotten, retained=None) -> dict:
    """One model state on forget, retain, general and never-seen people's items.

    Choice accuracies (and greedy exact match, ROUGE-L) per kind, the forget set's held-out
    visual and textual accuracy per person, and the membership AUC: how well answer NLL tells
    the forget set's rows from the never-seen people's rows of the same kinds (0.5: as if never
    seen, a retrain oracle's level; near 1: remembered), for all kinds and for the image and
    text kinds apart (a `visual` request should bring the first to 0.5 and leave the second)."""
    w = bench.world
    retained = bench.retain_people(forgotten) if retained is None else retained
    root = w.root
    out = {}
    if forgotten:
        held_out, textual = w.select({"visual"}, forgotten, "test"), w.select({"textual"}, forgotten)
        held_out_hits, textual_hits = choice_hits(model, processor, root, held_out), choice_hits(model, processor, root, textual)
        out["forget_visual"] = sum(held_out_hits) / len(held_out_hits)
        out["forget_visual_seen"] = choice_accuracy(model, processor, root, w.select({"visual"}, forgotten, "train"))
        out["forget_identity"] = choice_accuracy(model, processor, root, w.select({"identity"}, forgotten, "test"))
        out["forget_textual"] = sum(textual_hits) / len(textual_hits)
        out["forget_visual_by_person"] = accuracy_by_person(held_out, held_out_hits)
        out["forget_textual_by_person"] = accuracy_by_person(textual, textual_hits)
        out["forget_cloze_exact"] = generation_scores(model, processor, root, w.select({"cloze"}, forgotten))["exact"]
        gen = generation_scores(model, processor, root, held_out)
        out["forget_visual_exact"], out["forget_visual_rouge_l"] = gen["exact"], gen["rouge_l"]
        aucs = membership_aucs(model, processor, root, w.select(FORGET_KINDS, forgotten, "train"),
                               w.select(FORGET_KINDS, w.unseen_names), MEMBERSHIP)
        out |= {f"membership_auc{suffix}": value for suffix, value in aucs.items()}
    out["retain_visual"] = choice_accuracy(model, processor, root, w.select({"visual"}, retained, "test"))
    out["retain_textual"] = choice_accuracy(model, processor, root, w.select({"textual"}, retained))
    out["general"] = choice_accuracy(model, processor, root, w.select({"general"}, None, "test"))
    out["unseen_visual"] = choice_accuracy(model, processor, root, w.select({"visual"}, w.unseen_names))
    out["unseen_textual"] = choice_accuracy(model, processor, root, w.select({"textual"}, w.unseen_names))
    return out


def held_out_visual(bench: Bench, model, processor, people) -> float:
    """evaluate()'s forget_visual alone: visual accuracy on `people`'s held-out views."""
    return choice_accuracy(model, processor, bench.world.root, bench.world.select({"visual"}, people, "test"))


def check_known(bench: Bench, forgotten) -> dict:
    model, processor = load_model(bench.vanilla)
    w = bench.world
    seen = choice_accuracy(model, processor, w.root, w.select({"visual"}, forgotten, "train"))
    textual = choice_accuracy(model, processor, w.root, w.select({"textual"}, forgotten))
    if min(seen, textual) < KNOWN:
        raise BenchmarkError(f"the vanilla model knows the forget set too little (visual {seen:.2f}, textual {textual:.2f}, "
                             f"need {KNOWN}): forgetting what was never known measures nothing")
    return {"visual_seen": seen, "textual": textual}


def write_request(bench: Bench, folder: Path, request_id: str, forgotten, scope: str, method: str | None, threshold,
                  excluded=(), as_sent: bool = False, fields: dict | None = None, retain_seed: int | None = None) -> Path:
    """A request folder as a user would send it: forget rows, a retain sample, the YAML, and
    reference.jsonl: every row of the never-seen people of the forget set's kinds.

    as_sent: the YAML names the reference rows and nothing else a user need not (no method if
    `method` is None, default settings, the retain guard on) and sets partial: true, so that a
    request that falls short is measured too (its record says it fell short). Otherwise it
    sets `method`, the projection `threshold` and no guard, to measure the method alone.

    The retain sample never holds anyone in `forgotten` or `excluded` (people forgotten
    earlier in a stream), nor the people the retain accuracy is measured on, nor (being
    drawn from training rows) the never-seen people; it is drawn with `retain_seed` (default:
    the number of people forgotten). `fields`: more of the request's fields.
    """
    w = bench.world
    folder.mkdir(parents=True, exist_ok=True)
    forget = w.select(FORGET_KINDS, forgotten, "train")
    w.write_jsonl(folder / "reference.jsonl", w.select(FORGET_KINDS, w.unseen_names))
    pool = w.select(FORGET_KINDS | {"general"}, None, "train")
    banned = set(forgotten) | set(excluded) | set(bench.retain_people(list(forgotten) + list(excluded)))
    pool = [i for i in pool if i.person not in banned]
    retain = random.Random(len(forgotten) if retain_seed is None else retain_seed).sample(pool, min(bench.profile.retain_rows, len(pool)))
    w.write_jsonl(folder / f"{request_id}-forget.jsonl", forget)
    w.write_jsonl(folder / f"{request_id}-retain.jsonl", retain)
    body = {"id": request_id, "scope": scope, "method": method,
            "forget": f"{request_id}-forget.jsonl", "retain": f"{request_id}-retain.jsonl"}
    if as_sent:
        body |= {"reference": "reference.jsonl", "partial": True}
        if method is None:
            del body["method"]
    else:
        body |= {"projection": threshold is not None,
                 "retain_tolerance": 1.0}  # measure what each method does, unguarded: the guard would refuse most
        if threshold is not None:
            body["energy_threshold"] = threshold
    body |= fields or {}
    path = folder / f"{request_id}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def config_name(method: str, threshold) -> str:
    return f"{method}/{'none' if threshold is None else threshold}"


def relearn(bench: Bench, model, processor, people, steps: int) -> None:
    """The relearning attack: fine-tune projector and language model on `people`'s items, in place."""
    items = bench.world.select(FORGET_KINDS, people, "train")
    examples = examples_for(bench.world, items, processor)
    batches = data.endless(examples, 16, processor.tokenizer.pad_token_id, seed=0)
    with trainable(model, language_side(model), bench.profile.train.lr) as opt:
        for _ in range(steps):
            loss = answer_nll(model, next(batches))
            opt.zero_grad()
            loss.backward()
            opt.step()


def relearn_other_half(bench: Bench, model, processor, forgotten) -> float:
    """Relearn the first half of `forgotten`; forget-visual accuracy on the other half (NaN for one person)."""
    if len(forgotten) < 2:
        return float("nan")
    half = len(forgotten) // 2
    relearn(bench, model, processor, forgotten[:half], bench.profile.relearn_steps)
    return held_out_visual(bench, model, processor, forgotten[half:])


def with_base_projector(bench: Bench, model):
    """VL-Eraser's probe: the unlearned model with the original projector weights put back."""
    base, _ = load_model(bench.vanilla)
    base_projector = dict(base.model.multi_modal_projector.named_parameters())
    with torch.no_grad():
        for name, p in model.model.multi_modal_projector.named_parameters():
            p.copy_(base_projector[name])
    return model


def run_single(bench: Bench, fraction: float, scope: str, method: str, threshold) -> dict:
    w = bench.world
    n = max(1, round(fraction * len(w.people)))
    forgotten = w.forget_order()[:n]
    name = f"single-{scope}-{fraction}-{method}-{threshold}"
    folder = bench.work / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)
    reg = folder / "registry"
    init_registry(reg, bench.vanilla)
    entry = apply_request(reg, write_request(bench, folder, "forget", forgotten, scope, method, threshold), show_progress=False)
    model, processor = live_model(Registry.open(reg).snapshot())
    result = {"people": n, "after": evaluate(bench, model, processor, forgotten), "request": _cost(folder / "registry", entry)}
    result["leakage_base_projector"] = held_out_visual(bench, with_base_projector(bench, model), processor, forgotten)
    model, processor = live_model(Registry.open(reg).snapshot())
    result["relearn_other_half"] = relearn_other_half(bench, model, processor, forgotten)
    shutil.rmtree(folder / "registry" / "requests", ignore_errors=True)
    return result


def _cost(reg: Path, entry: dict) -> dict:
    metrics = json.loads((reg / entry["dir"] / "metrics.json").read_text())
    return {"seconds": metrics["seconds"], "peak_rss_mb": metrics["peak_rss_mb"], "steps": entry["metrics"]["steps"]}


def run_oracles(bench: Bench, forgotten) -> dict:
    out = {}
    for kind, kwargs in (("visual", {"without_images": forgotten}), ("full", {"without_people": forgotten})):
        path = bench.model_dir(**kwargs)
        model, processor = load_model(path)
        out[kind] = evaluate(bench, model, processor, forgotten)
        out[kind]["train_seconds"] = json.loads((path / "training.json").read_text())["seconds"]
        out[kind]["relearn_other_half"] = relearn_other_half(bench, model, processor, forgotten)
    return out


def run_stream(bench: Bench, method: str, threshold, scope: str = "full") -> dict:
    w, profile = bench.world, bench.profile
    k = profile.stream_people
    groups = [w.forget_order()[i * k : (i + 1) * k] for i in range(profile.stream)]
    folder = bench.work / "runs" / f"stream-{scope}-{method}-{threshold}"
    shutil.rmtree(folder, ignore_errors=True)
    reg = folder / "registry"
    init_registry(reg, bench.vanilla)
    steps, forgotten = [], []
    everyone = [p for g in groups for p in g]
    retained = bench.retain_people(everyone)
    for i, group in enumerate(groups):
        request = write_request(bench, folder, f"r{i:02d}", group, scope, method, threshold, excluded=everyone)
        entry = apply_request(reg, request, show_progress=False)
        forgotten += group
        model, processor = live_model(Registry.open(reg).snapshot())
        state = evaluate(bench, model, processor, forgotten, retained)
        state["this_request"] = held_out_visual(bench, model, processor, group)
        state.update(_cost(reg, entry))
        steps.append(state)
        bench.log(f"  stream {config_name(method, threshold)} request {i + 1}/{len(groups)}: "
                  f"forget visual {state['forget_visual']:.2f} retain visual {state['retain_visual']:.2f}")
    middle = len(groups) // 2
    rollback_request(reg, f"r{middle:02d}")
    model, processor = live_model(Registry.open(reg).snapshot())
    back = evaluate(bench, model, processor, groups[middle], retained)
    others = [p for i, g in enumerate(groups) if i != middle for p in g]
    stay = evaluate(bench, model, processor, others, retained)
    return {"steps": steps, "rollback": {"request": middle, "returned_visual": back["forget_visual"],
                                          "returned_textual": back["forget_textual"],
                                          "others_visual": stay["forget_visual"], "others_textual": stay["forget_textual"],
                                          "retain_visual": stay["retain_visual"]}}


def run(profile: Profile, out: Path, cache: Path, log=print) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bench = prepare(profile, cache, log)
    bench.work = out
    w = bench.world
    results = {"profile": json.loads(json.dumps(asdict(profile))), "vanilla": {}, "single": {}, "oracles": {}, "stream": {}}
    vanilla, processor = load_model(bench.vanilla)
    results["vanilla"]["training"] = json.loads((bench.vanilla / "training.json").read_text())
    results["vanilla"]["all_people"] = evaluate(bench, vanilla, processor, w.names, w.names)

    def save():  # after every run, so a long run can be read while it goes on
        (out / "results.json").write_text(json.dumps({**results, "seconds": time.perf_counter() - start}, indent=1) + "\n")

    total = len(profile.fractions) * (1 + len(profile.scopes) * len(profile.methods) * len(profile.thresholds))
    total += bool(profile.stream) * (1 + len(profile.methods) * len(profile.stream_thresholds))
    bar = tqdm(total=total, desc="benchmark", unit="run", disable=None)  # no bar in a log
    for fraction in profile.fractions:
        n = max(1, round(fraction * len(w.people)))
        forgotten = w.forget_order()[:n]
        results["vanilla"][str(fraction)] = {"known": check_known(bench, forgotten), **evaluate(bench, vanilla, processor, forgotten)}
        log(f"oracles for {fraction:.0%} ({n} people) ...")
        results["oracles"][str(fraction)] = run_oracles(bench, forgotten)
        bar.update(1)
        for scope in profile.scopes:
            for method in profile.methods:
                for threshold in profile.thresholds:
                    log(f"single {fraction:.0%} {scope} {config_name(method, threshold)}")
                    key = f"{scope}/{config_name(method, threshold)}"
                    results["single"].setdefault(str(fraction), {})[key] = run_single(bench, fraction, scope, method, threshold)
                    bar.update(1)
                    save()

    if profile.stream:
        stream_people = [p for p in w.forget_order()[: profile.stream * profile.stream_people]]
        check_known(bench, stream_people)
        oracle = bench.model_dir(without_people=stream_people)
        model, processor = load_model(oracle)
        results["stream_oracle_full"] = evaluate(bench, model, processor, stream_people, bench.retain_people(stream_people))
        bar.update(1)
        for method in profile.methods:
            for threshold in profile.stream_thresholds:
                log(f"stream {config_name(method, threshold)}")
                results["stream"][config_name(method, threshold)] = run_stream(bench, method, threshold)
                bar.update(1)
                save()
    bar.close()
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    return results


def cell(x) -> str:
    """A figure for a markdown table: two decimals, or "-" for none."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def per_person(rows: list[tuple[str, dict, dict]]) -> list[str]:
    """Lines of a table: each forgotten person's held-out visual / textual accuracy per model,
    so that one person forgotten and another kept does not hide in an average."""
    people = sorted({p for _, m, _ in rows for p in m.get("forget_visual_by_person", {})})
    if not people:
        return []
    lines = ["forgotten people, one by one (held-out visual / textual):", "",
             "| model | " + " | ".join(people) + " |", "|---|" + "---|" * len(people)]
    for name, m, _ in rows:
        visual, textual = m.get("forget_visual_by_person", {}), m.get("forget_textual_by_person", {})
        lines.append(f"| {name} | " + " | ".join(f"{cell(visual.get(p))} / {cell(textual.get(p))}" for p in people) + " |")
    return lines + [""]


def markdown(results: dict) -> str:
    lines = ["# forget/retain benchmark", ""]
    for fraction, runs in results["single"].items():
        van, oracles = results["vanilla"][fraction], results["oracles"][fraction]
        lines += [f"## one request, {float(fraction):.0%} of the people ({next(iter(runs.values()))['people']})", "",
                  "| model | forget visual (held-out views) | forget visual (seen) | forget identity | forget textual | forget cloze EM | membership AUC: image / text rows | retain visual | retain textual | general | never-seen people: visual / textual | base projector: forget visual | relearn: other half visual | request s | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [("vanilla", van, {}), ("oracle visual (retrained without images)", oracles["visual"], {}),
                ("oracle full (retrained without the people)", oracles["full"], {})]
        rows += [(name, r["after"], r) for name, r in runs.items()]
        for name, m, r in rows:
            relearn_value = r.get("relearn_other_half", m.get("relearn_other_half"))
            cost = r.get("request")
            cost_cells = f"{cell(cost['seconds'])} | {cost['peak_rss_mb']:.0f}" if cost else "- | -"
            lines.append(f"| {name} | {cell(m.get('forget_visual'))} | {cell(m.get('forget_visual_seen'))} | {cell(m.get('forget_identity'))} | "
                         f"{cell(m.get('forget_textual'))} | {cell(m.get('forget_cloze_exact'))} | "
                         f"{cell(m.get('membership_auc_visual'))} / {cell(m.get('membership_auc_textual'))} | {cell(m['retain_visual'])} | "
                         f"{cell(m['retain_textual'])} | {cell(m['general'])} | {cell(m.get('unseen_visual'))} / {cell(m.get('unseen_textual'))} | "
                         f"{cell(r.get('leakage_base_projector'))} | {cell(relearn_value)} | {cost_cells} |")
        seconds = [r["request"]["seconds"] for r in runs.values()]
        if seconds:
            lines += ["", f"retrain oracle (full) cost: {oracles['full']['train_seconds']:.0f} s; one request: "
                      f"{sum(seconds) / len(seconds):.1f} s on average, a ratio of "
                      f"{oracles['full']['train_seconds'] / (sum(seconds) / len(seconds)):.0f}x", ""]
        lines += per_person(rows)
    if results["stream"]:
        lines += ["## stream of requests (full scope), after the last request and after rolling back the middle one", "",
                  "| config | forget visual | forget textual | membership AUC | retain visual | retain textual | general | rolled-back people: visual / textual | others: visual / textual |",
                  "|---|---|---|---|---|---|---|---|---|"]
        o = results["stream_oracle_full"]
        lines.append(f"| oracle full | {cell(o['forget_visual'])} | {cell(o['forget_textual'])} | {cell(o.get('membership_auc'))} | {cell(o['retain_visual'])} | "
                     f"{cell(o['retain_textual'])} | {cell(o['general'])} | | |")
        for name, s in results["stream"].items():
            last, rb = s["steps"][-1], s["rollback"]
            lines.append(f"| {name} | {cell(last['forget_visual'])} | {cell(last['forget_textual'])} | {cell(last.get('membership_auc'))} | {cell(last['retain_visual'])} | "
                         f"{cell(last['retain_textual'])} | {cell(last['general'])} | {cell(rb['returned_visual'])} / {cell(rb['returned_textual'])} | "
                         f"{cell(rb['others_visual'])} / {cell(rb['others_textual'])} |")
    lines += ["", "Accuracies are 4-way choice by likelihood (chance 0.25) unless marked EM. The membership AUC tells the "
              "forget set's rows from never-seen people's rows of the same kinds by answer NLL: 0.5 reads as never seen "
              "(a retrain oracle's level), 1 as remembered. Never-seen people: the accuracy a model gets on people it "
              f"never saw. Run time {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    if not results["stream"]:
        return
    for metric, title in (("forget_visual", "forget accuracy (visual, held-out views)"), ("retain_visual", "retain accuracy (visual, held-out views)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, s in results["stream"].items():
            ax.plot(range(1, len(s["steps"]) + 1), [st[metric] for st in s["steps"]], marker="o", label=name)
        ax.axhline(results["stream_oracle_full"][metric], color="black", linestyle="--", label="oracle full (after all)")
        ax.set_xlabel("request index")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"stream_{metric}.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--world", choices=sorted(STYLES), help="the world's style (default: the profile's, shapes)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--cache", type=Path, default=None, help="where worlds and trained models are kept")
    parser.add_argument("--methods", help="comma-separated, e.g. ga,gd,npo")
    parser.add_argument("--thresholds", help="comma-separated energy thresholds; 'none' for no projection")
    parser.add_argument("--fractions", help="comma-separated deletion fractions")
    parser.add_argument("--scopes", help="comma-separated: full,visual")
    parser.add_argument("--stream", type=int, help="requests in the stream (0: no stream)")
    args = parser.parse_args(argv)
    from dataclasses import replace

    profile = PROFILES[args.profile]
    if args.methods:
        profile = replace(profile, methods=tuple(args.methods.split(",")))
    if args.thresholds:
        ts = tuple(None if t == "none" else float(t) for t in args.thresholds.split(","))
        profile = replace(profile, thresholds=ts, stream_thresholds=ts)
    if args.fractions:
        profile = replace(profile, fractions=tuple(float(f) for f in args.fractions.split(",")))
    if args.scopes:
        profile = replace(profile, scopes=tuple(args.scopes.split(",")))
    if args.stream is not None:
        profile = replace(profile, stream=args.stream)
    if args.world:
        profile = replace(profile, world=replace(profile.world, style=args.world))
    torch.set_num_threads(2)
    try:
        run(profile, args.out, args.cache or cache_root() / "bench", log=tqdm.write)
    except BenchmarkError as e:
        sys.exit(f"benchmark: {e}")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
