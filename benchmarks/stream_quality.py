"""Does quality hold over a long stream, and does a rollback inside it take back its own request only?

    python -m benchmarks.stream_quality [--requests 30] [--world shapes:1] [--scope visual] [--dropout 0,0.5] [--rollbacks 3]
                                        [--fresh-retain] [--targets-from-base]

For each value of `earlier_dropout` in --dropout, one stream of one-person requests on a fresh
registry of the world's vanilla model, through the stream's path (one live model kept by
differences), each request as a user sends it: the scope's default method, the never-seen
people as reference, partial: true, and the same retain sample (--fresh-retain: a new one each,
never holding the stream's people; --targets-from-base: targets_from_base: true in each). The
forget figure is the scope's: held-out visual accuracy for `visual`, text-question accuracy for
`full`, per person. The oracle is the model retrained
without all of the stream's people's images (visual) or data (full). A person counts as
forgotten while their figure is nearer the oracle's than vanilla's (for that person).

Printed after every request: its person's figure against vanilla's and the oracle's; over all
requests so far, the mean figure against the oracle's and how many people are still forgotten;
retained visual and textual accuracy as shares of vanilla's. Targets after the last request:
retained accuracy at least 97% of vanilla, every person still forgotten.

Then --rollbacks requests spread over the stream are rolled back, each alone, on a copy of the
final registry: the rolled-back person's figure as a share of vanilla's (target at least 90%),
and how many of the other people stay forgotten (target: all that were).
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

from benchmarks.forget_retain import PROFILES, check_known, prepare, write_request
from registry import Registry
from seqforget.bench import cache_root
from seqforget.bench.scoring import accuracy_by_person, choice_accuracy, choice_hits
from seqforget.engine import apply_request, init_registry, read_request, rollback_request
from seqforget.live import Live
from seqforget.models import load_model

KEEP, BACK = 0.97, 0.90  # retained accuracy kept, and a rolled-back person's accuracy restored, as shares of vanilla
ORACLE = {"visual": "without_images", "full": "without_people"}


def figures(bench, model, processor, people: list[str], retained: list[str], scope: str) -> dict:
    """Per person the scope's forget figure, and retained visual and textual accuracy."""
    w = bench.world
    items = w.select({"visual"}, people, "test") if scope == "visual" else w.select({"textual"}, people)
    return {"forget": accuracy_by_person(items, choice_hits(model, processor, w.root, items)),
            "retain_visual": choice_accuracy(model, processor, w.root, w.select({"visual"}, retained, "test")),
            "retain_textual": choice_accuracy(model, processor, w.root, w.select({"textual"}, retained))}


def forgotten(person: str, figure: float, vanilla: dict, oracle: dict) -> bool:
    return abs(figure - oracle["forget"][person]) < abs(figure - vanilla["forget"][person])


def run_stream(bench, people: list[str], scope: str, dropout: float, vanilla: dict, oracle: dict, rollbacks: int,
               work: Path, fresh_retain: bool = False, from_base: bool = False, log=print) -> dict:
    retained = bench.retain_people(people)
    reg = work / f"registry-{dropout}"
    init_registry(reg, bench.vanilla)
    live = Live.load(Registry.open(reg).snapshot(), bench.vanilla)
    steps = []
    for i, person in enumerate(people, start=1):
        path = write_request(bench, work, f"r{i:02d}", [person], scope, None, None, excluded=people, as_sent=True,
                             fields={"earlier_dropout": dropout, "targets_from_base": from_base}, retain_seed=i if fresh_retain else None)
        start = time.perf_counter()
        entry = apply_request(reg, read_request(Registry.open(reg).snapshot(), path), show_progress=False, live=live)
        seconds = time.perf_counter() - start
        now = figures(bench, live.model, live.processor, people[:i], retained, scope)
        steps.append({"request": entry["id"], "person": person, "seconds": seconds, "stop": entry["metrics"]["stop"],
                      **now})
        log(step_line(i, people, now, vanilla, oracle, seconds))
    final = steps[-1]
    positions = sorted({round(j * (len(people) - 2) / max(1, rollbacks - 1)) for j in range(rollbacks)})
    taken_back = []
    for k in positions:
        copy = work / f"rollback-{dropout}-{k}"
        shutil.copytree(reg, copy)
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
    return {"dropout": dropout, "steps": steps, "rollbacks": taken_back}


def step_line(i: int, people: list[str], now: dict, vanilla: dict, oracle: dict, seconds: float) -> str:
    person, so_far = people[i - 1], people[:i]
    still = sum(forgotten(p, now["forget"][p], vanilla, oracle) for p in so_far)
    mean = statistics.mean(now["forget"][p] for p in so_far)
    oracle_mean = statistics.mean(oracle["forget"][p] for p in so_far)
    return (f"request {i}/{len(people)} ({seconds:.0f} s): {person} {now['forget'][person]:.2f} (vanilla "
            f"{vanilla['forget'][person]:.2f}, oracle {oracle['forget'][person]:.2f}); all so far {mean:.2f} against the "
            f"oracle's {oracle_mean:.2f}, still forgotten {still}/{i}; retain visual {now['retain_visual'] / vanilla['retain_visual']:.0%}"
            f", textual {now['retain_textual'] / vanilla['retain_textual']:.0%} of vanilla")


def summary(runs: list[dict], people: list[str], vanilla: dict, oracle: dict) -> list[str]:
    lines = []
    for run in runs:
        last = run["steps"][-1]
        still = sum(forgotten(p, last["forget"][p], vanilla, oracle) for p in people)
        gap = statistics.mean(abs(last["forget"][p] - oracle["forget"][p]) for p in people)
        lines += [f"earlier_dropout {run['dropout']}: after {len(people)} requests, retain visual "
                  f"{last['retain_visual'] / vanilla['retain_visual']:.1%} and textual "
                  f"{last['retain_textual'] / vanilla['retain_textual']:.1%} of vanilla (target at least {KEEP:.0%}); "
                  f"still forgotten {still}/{len(people)} (target all); mean |forget - oracle| {gap:.2f}; "
                  f"{sum(s['seconds'] for s in run['steps']) / len(people):.1f} s per request"]
        for rb in run["rollbacks"]:
            lines.append(f"  rollback of request {rb['position']}: its person back to {rb['back']:.0%} of vanilla "
                         f"(target at least {BACK:.0%}; retained visual then {rb['retain_visual'] / vanilla['retain_visual']:.0%}"
                         f" of vanilla); others still forgotten {rb['others_forgotten_after']}/{len(people) - 1} "
                         f"(before {rb['others_forgotten_before']})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--world", default="shapes:1", help="style:seed (seqforget/bench/world.py)")
    parser.add_argument("--scope", choices=sorted(ORACLE), default="visual")
    parser.add_argument("--dropout", default="0,0.5", help="comma-separated earlier_dropout values, one stream each")
    parser.add_argument("--rollbacks", type=int, default=3, help="requests rolled back, one at a time, after each stream")
    parser.add_argument("--fresh-retain", action="store_true",
                        help="each request brings its own retain sample (default: every request the same one)")
    parser.add_argument("--targets-from-base", action="store_true",
                        help="requests compute their targets under the base model (targets_from_base: true)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--cache", type=Path, default=None, help="where worlds and trained models are kept")
    parser.add_argument("--out", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.requests < 3:
        parser.error("--requests: at least 3")
    dropouts = [float(x) for x in args.dropout.split(",") if x]
    style, seed = args.world.split(":")
    profile = PROFILES[args.profile]
    profile = replace(profile, world=replace(profile.world, style=style, seed=int(seed)),
                      train=replace(profile.train, seed=int(seed)))
    torch.set_num_threads(2)
    bench = prepare(profile, args.cache or cache_root() / "bench")
    people = bench.world.forget_order()[: args.requests]
    check_known(bench, people)
    retained = bench.retain_people(people)
    print(f"training or loading the oracle without the stream's {len(people)} people ({ORACLE[args.scope]}) ...")
    vanilla = figures(bench, *load_model(bench.vanilla), people, retained, args.scope)
    oracle = figures(bench, *load_model(bench.model_dir(**{ORACLE[args.scope]: people})), people, retained, args.scope)
    runs = []
    with tempfile.TemporaryDirectory(prefix="stream-quality-") as work:
        for dropout in dropouts:
            print(f"\nstream of {len(people)} {args.scope} requests on {args.world}, earlier_dropout {dropout}")
            runs.append(run_stream(bench, people, args.scope, dropout, vanilla, oracle, args.rollbacks, Path(work),
                                   args.fresh_retain, args.targets_from_base))
    print("\n" + "\n".join(summary(runs, people, vanilla, oracle)))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "world": args.world, "scope": args.scope,
                                        "people": people, "vanilla": vanilla, "oracle": oracle, "runs": runs}, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
