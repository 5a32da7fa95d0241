"""Does quality hold over a long stream, and does a rollback inside it take back its own request only?

    python -m benchmarks.stream_quality [--requests 30] [--world shapes:1] [--scope visual]
                                        [--mechanisms default,budget] [--rollbacks 3] [--fresh-retain]
                                        [--quick] [--profile 5m] [--out figures.json] [--plot curves.png]

For each mechanism in --mechanisms (MECHANISMS), one stream of one-person requests on a fresh
registry of the world's vanilla model, through the stream's path (one live model kept by
differences), each request as a user sends it: the scope's default method, the never-seen
people as reference, partial: true, and the same retain sample (--fresh-retain: a new one each,
never holding the stream's people). The forget figure is the scope's: held-out visual accuracy
for `visual`, text-question accuracy for `full`, per person. The oracle is the model retrained
without all of the stream's people's images (visual) or data (full). A person counts as
forgotten while their figure is nearer the oracle's than vanilla's (for that person).

The `budget` mechanism's registry has a guard set (`init --guard`, budget 95%): the held-out
views of people no request forgets, none of them among the people retained accuracy is
measured on, so that the budget's figure and the benchmark's do not share a row.

The `gated` mechanism's registry is gated (`init --gated`, docs/how-it-works.md, "Gated registries"): each
request's term applies only to the images its gate picks, and its requests take a gated
registry's defaults (docs/requests.md): they also train the language model's layers, which read
the term only on the rows whose image a gate picks, stop only when every kind of forget
question is told from strangers' at most 0.6 (`known_limit`; with partial: true, a request that
does not get there commits at its budget), checked every 5 steps, and hold each forget row's
whole own answer at most the target's in log space (`own_ceiling: 1`). Its step lines also give
the share of held-out images some gate picks: of the people forgotten so far (recall), of the
retained people and of the general images (false positives). The other gated mechanisms set
what they change from the defaults, checked every 25 steps: `gated_vision` trains the vision
tower's MLPs and the projector alone, with the median rule (the first gated design). The rest
name their layers by suffix (WITH_LM), which also trains the vision tower's attention (q, v):
`gated_lm` trains towards strangers' answers without the forget row's own (`own_answer: 0`, no
ceiling); `gated_prior` caps the own answer at its share among the retain rows' answers to the
same question (`own_prior: retained`, no ceiling); `gated_ceiling` is `gated_prior` with the
ceiling; `gated_level` takes the defaults' arguments.

Printed after every request: its person's figure against vanilla's and the oracle's; over all
requests so far, the mean figure against the oracle's and how many people are still forgotten;
forget identity ("who is this?" on held-out views) and the image rows' membership AUC of the
people so far; retained visual and textual and general accuracy as shares of vanilla's; with a
budget, the registry's own figure. Targets after the last request: retained accuracy at least
97% of vanilla, every person still forgotten.

--quick: 10 requests and one rollback (of the default and budget mechanisms unless --mechanisms
names others): under 15 minutes on two cores once the world, its vanilla model and the oracle
are cached. --plot draws retained and
forget accuracy against request number, one line per mechanism.

Then --rollbacks requests spread over the stream are rolled back, each alone, on a copy of the
final registry: the rolled-back person's figure as a share of vanilla's (target at least 90%),
and how many of the other people stay forgotten (target: all that were). Last, the same people
are forgotten at once, by one request on a fresh registry of the mechanism's kind, and the
summary gives the stream's gap to it (--no-at-once skips it).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.forget_retain import MEMBERSHIP, PROFILES, check_known, prepare, write_request
from registry import Registry
from seqforget import data
from seqforget.bench import cache_root
from seqforget.bench.scoring import accuracy_by_person, choice_accuracy, choice_hits, membership_aucs
from seqforget.engine import apply_request, init_registry, read_request, rollback_request
from seqforget.errors import OverBudget, SeqforgetError
from seqforget.live import Live
from seqforget.models import load_model

KEEP, BACK = 0.97, 0.90  # retained accuracy kept, and a rolled-back person's accuracy restored, as shares of vanilla
ORACLE = {"visual": "without_images", "full": "without_people"}
# the visual scope's LLaVA layers; with them, by suffix, the attention (q, v) of the vision tower and of the
# language model, and the language model's MLPs (a gated registry's defaults leave the vision tower's attention out)
VISION = ["mlp.fc1", "mlp.fc2", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]
WITH_LM = VISION + ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EVERY_25 = {"check_every": 25}  # the interval of every request but a gated registry's visual ones
# name -> (request fields, registry options: a budget, gated)
MECHANISMS = {
    "default": ({}, {}),
    "budget": ({}, {"budget": 0.95}),
    "gated": ({}, {"gated": True}),
    "gated_vision": ({"target_modules": VISION, "known_limit": 1.0, **EVERY_25, "method_args": {"own_ceiling": 0.0}},
                     {"gated": True}),
    "gated_lm": ({"target_modules": WITH_LM, "known_limit": 0.6, **EVERY_25, "method_args": {"own_answer": 0.0, "own_ceiling": 0.0}},
                 {"gated": True}),
    "gated_prior": ({"target_modules": WITH_LM, "known_limit": 0.6, **EVERY_25,
                     "method_args": {"own_prior": "retained", "own_ceiling": 0.0}}, {"gated": True}),
    "gated_ceiling": ({"target_modules": WITH_LM, "known_limit": 0.6, **EVERY_25,
                       "method_args": {"own_prior": "retained", "own_ceiling": 1.0}}, {"gated": True}),
    "gated_level": ({"target_modules": WITH_LM, "known_limit": 0.6, **EVERY_25, "method_args": {"own_ceiling": 1.0}}, {"gated": True}),
    "dropout": ({"earlier_dropout": 0.5}, {}),
    "from_base": ({"targets_from_base": True}, {}),
    "keep_forgotten": ({"keep_forgotten": True}, {}),
    "anchored": ({"targets_from_base": True, "keep_forgotten": True}, {}),
    "apart": ({"apart_from_earlier": True}, {}),
    "anchored_apart": ({"targets_from_base": True, "keep_forgotten": True, "apart_from_earlier": True}, {}),
}


def figures(bench, model, processor, people: list[str], retained: list[str], scope: str) -> dict:
    """Per person the scope's forget figure; the people's identity accuracy on held-out views and
    the membership AUC of their image rows; retained visual and textual, and general accuracy."""
    w = bench.world
    items = w.select({"visual"}, people, "test") if scope == "visual" else w.select({"textual"}, people)
    members = w.select({"visual", "identity"}, people, "train")
    return {"forget": accuracy_by_person(items, choice_hits(model, processor, w.root, items)),
            "identity": choice_accuracy(model, processor, w.root, w.select({"identity"}, people, "test")),
            "membership_visual": membership_aucs(model, processor, w.root, members,
                                                 w.select({"visual", "identity"}, w.unseen_names),
                                                 {"_visual": MEMBERSHIP["_visual"]})["_visual"],
            "retain_visual": choice_accuracy(model, processor, w.root, w.select({"visual"}, retained, "test")),
            "retain_textual": choice_accuracy(model, processor, w.root, w.select({"textual"}, retained)),
            "general": choice_accuracy(model, processor, w.root, w.select({"general"}, None, "test"))}


def gate_shares(bench, live: Live, people: list[str], retained: list[str]) -> dict[str, float]:
    """In a gated registry, the share of held-out images some gate picks: of the people
    forgotten so far (its recall), of retained people and of images without a person (its
    false positives)."""
    w = bench.world
    groups = {"forgotten": w.select({"identity"}, people, "test"), "retained": w.select({"identity"}, retained, "test"),
              "general": w.select({"general"}, None, "test")}
    out = {}
    for name, items in groups.items():
        paths = sorted({i.example(w.root).image for i in items})
        pixels = torch.stack([data.encode(live.processor, data.Row("?", "?", p)).pixel_values for p in paths])
        picked = live.gating.picked(pixels)
        out[name] = float(torch.stack(list(picked.values())).any(0).float().mean()) if picked else 0.0
    return out


def guard_people(bench, people: list[str]) -> list[str]:
    """People the budget's guard set asks about: neither forgotten nor among those retained accuracy is measured on."""
    measured = set(bench.retain_people(people))
    return [n for n in bench.world.forget_order() if n not in set(people) and n not in measured][-bench.profile.eval_retain_people:]


def forgotten(person: str, figure: float, vanilla: dict, oracle: dict) -> bool:
    return abs(figure - oracle["forget"][person]) < abs(figure - vanilla["forget"][person])


def new_registry(bench, people: list[str], mechanism: str, reg: Path) -> Path:
    """A registry of the world's vanilla model with the mechanism's options (MECHANISMS): with a
    budget, its guard set holds the held-out views of guard_people."""
    options = MECHANISMS[mechanism][1]
    guard = None
    if "budget" in options:
        guard = bench.world.write_jsonl(reg.parent / f"guard-{mechanism}.jsonl",
                                        bench.world.select({"visual", "identity"}, guard_people(bench, people), "test"))
    init_registry(reg, bench.vanilla, guard=guard, budget=options.get("budget", 0.95), gated=options.get("gated", False))
    return reg


def run_stream(bench, people: list[str], scope: str, mechanism: str, vanilla: dict, oracle: dict, rollbacks: int,
               work: Path, fresh_retain: bool = False, simultaneous: bool = True, log=print) -> dict:
    fields = MECHANISMS[mechanism][0]
    retained = bench.retain_people(people)
    reg = new_registry(bench, people, mechanism, work / f"registry-{mechanism}")
    live = Live.load(Registry.open(reg).snapshot(), bench.vanilla)
    steps = []
    for i, person in enumerate(people, start=1):
        path = write_request(bench, work, f"r{i:02d}", [person], scope, None, None, excluded=people, as_sent=True,
                             fields=fields, retain_seed=i if fresh_retain else None)
        start = time.perf_counter()
        try:
            entry = apply_request(reg, read_request(Registry.open(reg).snapshot(), path), show_progress=False, live=live)
        except SeqforgetError as e:  # refused, nothing committed: the stream goes on, as `seqforget stream` does
            reason = "over_budget" if isinstance(e, OverBudget) else "refused"
            entry = {"id": f"r{i:02d}", "metrics": {"stop": {"reason": reason, "message": str(e)}}, "refused": True}
        seconds = time.perf_counter() - start
        now = figures(bench, live.model, live.processor, people[:i], retained, scope)
        if live.gating is not None:
            now["gate"] = gate_shares(bench, live, people[:i], retained)
        steps.append({"request": entry["id"], "person": person, "seconds": seconds, "stop": entry["metrics"]["stop"],
                      "refused": entry.get("refused", False), "registry": entry["metrics"].get("retained"),
                      "free": entry["metrics"].get("room"), "known": entry["metrics"].get("known"), **now})
        log(step_line(i, people, now, vanilla, oracle, seconds, steps[-1]))
    final = steps[-1]
    positions = sorted({round(j * (len(people) - 2) / max(1, rollbacks - 1)) for j in range(rollbacks)})
    taken_back = []
    for k in positions:
        copy = work / f"rollback-{mechanism}-{k}"
        shutil.copytree(reg, copy)
        if Registry.open(copy).snapshot().find(f"r{k + 1:02d}") is None:
            continue  # refused by the budget: nothing to roll back
        rollback_request(copy, f"r{k + 1:02d}")
        live.sync(Registry.open(copy).snapshot())  # the same terms as `reg`'s but one: one term comes off
        after = figures(bench, live.model, live.processor, people, retained, scope)
        live.sync(Registry.open(reg).snapshot())
        shutil.rmtree(copy)
        person, others = people[k], [p for p in people if p != people[k]]
        row = {"position": k + 1, "person": person, "back": after["forget"][person] / vanilla["forget"][person],
               "others_forgotten_before": sum(forgotten(p, final["forget"][p], vanilla, oracle) for p in others),
               "others_forgotten_after": sum(forgotten(p, after["forget"][p], vanilla, oracle) for p in others),
               "others_mean_before": statistics.mean(final["forget"][p] for p in others),
               "others_mean_after": statistics.mean(after["forget"][p] for p in others),
               "retain_visual": after["retain_visual"]}
        taken_back.append(row)
        log(f"  rollback of request {k + 1} ({person}): back to {row['back']:.0%} of vanilla "
            f"(target at least {BACK:.0%}; retained people are at {after['retain_visual'] / vanilla['retain_visual']:.0%}); "
            f"others still forgotten {row['others_forgotten_after']}/{len(others)} "
            f"(before {row['others_forgotten_before']}), their mean {row['others_mean_before']:.2f} -> {row['others_mean_after']:.2f}")
    return {"mechanism": mechanism, "steps": steps, "rollbacks": taken_back,
            "at_once": at_once(bench, people, scope, mechanism, work, log) if simultaneous else None}


def at_once(bench, people: list[str], scope: str, mechanism: str, work: Path, log=print) -> dict:
    """The same people forgotten by one request, on a fresh registry of the same kind: what the
    stream is measured against (its sequential-against-simultaneous gap)."""
    fields = MECHANISMS[mechanism][0]
    reg = new_registry(bench, people, mechanism, work / f"registry-{mechanism}-at-once")
    path = write_request(bench, work, "all", people, scope, None, None, as_sent=True, fields=fields)
    start = time.perf_counter()
    try:
        entry = apply_request(reg, read_request(Registry.open(reg).snapshot(), path), show_progress=False)
        stop, refused = entry["metrics"]["stop"], False
    except SeqforgetError as e:
        stop, refused = {"reason": "over_budget" if isinstance(e, OverBudget) else "refused", "message": str(e)}, True
    seconds = time.perf_counter() - start
    live = Live.load(Registry.open(reg).snapshot(), bench.vanilla)
    out = {"seconds": seconds, "stop": stop, "refused": refused,
           **figures(bench, live.model, live.processor, people, bench.retain_people(people), scope)}
    shutil.rmtree(reg)
    return out


def step_line(i: int, people: list[str], now: dict, vanilla: dict, oracle: dict, seconds: float, step: dict) -> str:
    person, so_far = people[i - 1], people[:i]
    still = sum(forgotten(p, now["forget"][p], vanilla, oracle) for p in so_far)
    mean = statistics.mean(now["forget"][p] for p in so_far)
    oracle_mean = statistics.mean(oracle["forget"][p] for p in so_far)
    done = f"REFUSED ({step['stop']['reason'].replace('_', ' ')})" if step["refused"] else step["stop"]["reason"].replace("_", " ")
    kept = step["registry"]
    budget = f"; registry {kept['after'] / kept['base']:.1%} of base" if kept else ""
    free = f"; fewest free directions {step['free'][0]}/{step['free'][1]}" if step.get("free") else ""
    if "gate" in now:
        g = now["gate"]
        free += (f"; gates pick {g['forgotten']:.0%} of forgotten people's held-out images, {g['retained']:.0%} of "
                 f"retained people's, {g['general']:.0%} of general ones")
    return (f"request {i}/{len(people)} ({seconds:.0f} s, {done}): {person} {now['forget'][person]:.2f} (vanilla "
            f"{vanilla['forget'][person]:.2f}, oracle {oracle['forget'][person]:.2f}); all so far {mean:.2f} against the "
            f"oracle's {oracle_mean:.2f}, still forgotten {still}/{i}; identity {now['identity']:.2f}, membership "
            f"{now['membership_visual']:.2f}; retain visual {now['retain_visual'] / vanilla['retain_visual']:.0%}, textual "
            f"{now['retain_textual'] / vanilla['retain_textual']:.0%}, general {now['general'] / vanilla['general']:.0%} of "
            f"vanilla{budget}{free}")


def summary(runs: list[dict], people: list[str], vanilla: dict, oracle: dict) -> list[str]:
    lines = []
    for run in runs:
        last = run["steps"][-1]
        still = sum(forgotten(p, last["forget"][p], vanilla, oracle) for p in people)
        gap = statistics.mean(abs(last["forget"][p] - oracle["forget"][p]) for p in people)
        refused = sum(s["refused"] for s in run["steps"])
        lines += [f"{run['mechanism']}: after {len(people)} requests ({refused} refused, nothing committed), retain visual "
                  f"{last['retain_visual'] / vanilla['retain_visual']:.1%}, textual "
                  f"{last['retain_textual'] / vanilla['retain_textual']:.1%} and general "
                  f"{last['general'] / vanilla['general']:.1%} of vanilla (target at least {KEEP:.0%}); "
                  f"still forgotten {still}/{len(people)} (target all); mean |forget - oracle| {gap:.2f}; identity "
                  f"{last['identity']:.2f} (oracle {oracle['identity']:.2f}), membership {last['membership_visual']:.2f} "
                  f"(oracle {oracle['membership_visual']:.2f}); {sum(s['seconds'] for s in run['steps']) / len(people):.1f} s "
                  f"per request"]
        once = run.get("at_once")
        if once:
            once_still = sum(forgotten(p, once["forget"][p], vanilla, oracle) for p in people)
            once_gap = statistics.mean(abs(once["forget"][p] - oracle["forget"][p]) for p in people)
            done = "REFUSED" if once["refused"] else once["stop"]["reason"].replace("_", " ")
            lines.append(f"  at once (one request for all {len(people)}, {once['seconds']:.0f} s, {done}): retain visual "
                         f"{once['retain_visual'] / vanilla['retain_visual']:.1%}, general "
                         f"{once['general'] / vanilla['general']:.1%} of vanilla; still forgotten {once_still}/{len(people)}; "
                         f"mean |forget - oracle| {once_gap:.2f}; identity {once['identity']:.2f}, membership "
                         f"{once['membership_visual']:.2f}. The stream's gap: retain visual "
                         f"{(last['retain_visual'] - once['retain_visual']) / vanilla['retain_visual']:+.1%} of vanilla, "
                         f"mean |forget - oracle| {gap - once_gap:+.2f}")
        for rb in run["rollbacks"]:
            lines.append(f"  rollback of request {rb['position']}: its person back to {rb['back']:.0%} of vanilla "
                         f"(target at least {BACK:.0%}; retained visual then {rb['retain_visual'] / vanilla['retain_visual']:.0%}"
                         f" of vanilla); others still forgotten {rb['others_forgotten_after']}/{len(people) - 1} "
                         f"(before {rb['others_forgotten_before']})")
    return lines


def plot(runs: list[dict], people: list[str], vanilla: dict, oracle: dict, path: Path, title: str) -> None:
    """Retained visual and general accuracy (shares of vanilla) and the forgotten people's mean
    figure, against request number, one line per mechanism; the oracle's as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kept, gone) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        n = range(1, len(run["steps"]) + 1)
        line, = kept.plot(n, [s["retain_visual"] / vanilla["retain_visual"] for s in run["steps"]],
                          label=f"{run['mechanism']}: retained visual")
        kept.plot(n, [s["general"] / vanilla["general"] for s in run["steps"]], color=line.get_color(), alpha=0.5,
                  linestyle=":", label=f"{run['mechanism']}: general")
        gone.plot(n, [statistics.mean(s["forget"][p] for p in people[:i]) for i, s in enumerate(run["steps"], start=1)],
                  color=line.get_color(), label=run["mechanism"])
    kept.axhline(oracle["retain_visual"] / vanilla["retain_visual"], color="grey", linestyle="--", label="oracle")
    kept.axhline(KEEP, color="red", linewidth=0.8, label=f"target {KEEP:.0%}")
    n = range(1, len(people) + 1)
    gone.plot(n, [statistics.mean(oracle["forget"][p] for p in people[:i]) for i in n], color="grey", linestyle="--",
              label="oracle")
    gone.plot(n, [statistics.mean(vanilla["forget"][p] for p in people[:i]) for i in n], color="black", linestyle=":",
              label="vanilla")
    kept.set(xlabel="request", ylabel="share of vanilla", title="retained")
    gone.set(xlabel="request", ylabel="accuracy, people forgotten so far", title="forgotten")
    kept.legend(fontsize=7)
    gone.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--world", default="shapes:1", help="style:seed (seqforget/bench/world.py)")
    parser.add_argument("--scope", choices=sorted(ORACLE), default="visual")
    parser.add_argument("--mechanisms", default=None,
                        help=f"comma-separated, one stream each: {', '.join(MECHANISMS)} (default: default,budget)")
    parser.add_argument("--rollbacks", type=int, default=3, help="requests rolled back, one at a time, after each stream")
    parser.add_argument("--fresh-retain", action="store_true",
                        help="each request brings its own retain sample (default: every request the same one)")
    parser.add_argument("--quick", action="store_true", help="10 requests, one rollback")
    parser.add_argument("--no-at-once", dest="at_once", action="store_false",
                        help="skip the one request for all the stream's people that each stream is compared with")
    parser.add_argument("--plot", type=Path, default=None, help="draw the curves into this PNG")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default",
                        help="the world and model size (benchmarks/forget_retain.py PROFILES: the size ladder)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads torch may use")
    parser.add_argument("--cache", type=Path, default=None, help="where worlds and trained models are kept")
    parser.add_argument("--out", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rollbacks = 10, 1
    args.mechanisms = args.mechanisms or "default,budget"
    if args.requests < 2:
        parser.error("--requests: at least 2")
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    if not mechanisms or set(mechanisms) - set(MECHANISMS):
        parser.error(f"--mechanisms: some of {', '.join(MECHANISMS)}")
    style, seed = args.world.split(":")
    profile = PROFILES[args.profile]
    profile = replace(profile, world=replace(profile.world, style=style, seed=int(seed)),
                      train=replace(profile.train, seed=int(seed)))
    torch.set_num_threads(args.threads)
    bench = prepare(profile, args.cache or cache_root() / "bench")
    people = bench.world.forget_order()[: args.requests]
    check_known(bench, people)
    retained = bench.retain_people(people)
    print(f"training or loading the oracle without the stream's {len(people)} people ({ORACLE[args.scope]}) ...")
    vanilla = figures(bench, *load_model(bench.vanilla), people, retained, args.scope)
    oracle = figures(bench, *load_model(bench.model_dir(**{ORACLE[args.scope]: people})), people, retained, args.scope)
    runs = []
    with tempfile.TemporaryDirectory(prefix="stream-quality-") as work:
        for mechanism in mechanisms:
            print(f"\nstream of {len(people)} {args.scope} requests on {args.world}, {mechanism}")
            runs.append(run_stream(bench, people, args.scope, mechanism, vanilla, oracle, args.rollbacks, Path(work),
                                   args.fresh_retain, args.at_once))
    print("\n" + "\n".join(summary(runs, people, vanilla, oracle)))
    if args.plot:
        plot(runs, people, vanilla, oracle, args.plot, f"{len(people)} {args.scope} requests on {args.world}")
        print(f"curves: {args.plot}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "world": args.world, "scope": args.scope,
                                        "people": people, "vanilla": vanilla, "oracle": oracle, "runs": runs}, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
