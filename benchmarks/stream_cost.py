"""Does a request cost the same after fifty as the first? One stream of one-person requests, timed.

    python -m benchmarks.stream_cost [--requests 50] [--profile default] [--method gd] [--scope full] [--rounds 9]

The requests go through the stream's path (seqforget.stream: one live model kept by
differences, the model loaded once) on a fresh registry of the benchmark's vanilla model,
one person each, in the world's forget order. A copy of the registry is kept after the fifth.
Then the same work is timed on a copy of the registry at 5 requests and on a copy at the
stream's end, alternately, --rounds times (the live model brought to the copy's state first,
untimed), so that the two lengths are measured side by side on a shared, noisy machine:

- apply time (wall, from reading the request to its commit) of one more request, the same
  request at both lengths (target: at N requests at most 1.2 times at 5);
- rollback time (the registry's rollback of the latest request, then the live model brought
  back) at N against at 5 (target at most 1.2).

From the stream itself, printed as well:

- apply time of its last five requests against its first five (one pass: drift on the machine
  shows in it, and the requests differ);
- the share of a request's wall time spent in the optimiser steps: forward, backward, update and
  projection (target at least 80%), and in training as a whole (with the stopping checks);
- registry bytes per request (the request's folder: adapter, bases, records).
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.forget_retain import PROFILES, prepare, write_request
from registry import Registry
from seqforget.engine import apply_request, init_registry, read_request, rollback_request
from seqforget.live import Live
from seqforget.bench import cache_root

EARLY = 5  # the length the end of the stream is compared with


def run(profile: str, requests: int, method: str, scope: str, cache: Path, work: Path, rounds: int = 9, log=print) -> dict:
    bench = prepare(PROFILES[profile], cache, log)
    people = bench.world.forget_order()[: requests + 1]
    if len(people) <= requests:
        raise SystemExit(f"--requests: at most {len(people) - 1} on this world (one more person is the request timed side by side)")
    reg, early = work / "registry", work / f"registry-at-{EARLY}"
    init_registry(reg, bench.vanilla)
    live = Live.load(Registry.open(reg).snapshot(), bench.vanilla)
    rows = []
    for i, person in enumerate(people[:requests], start=1):
        path = write_request(bench, work, f"r{i:03d}", [person], scope, method, 0.97, excluded=people[: i - 1])
        start = time.perf_counter()
        request = read_request(Registry.open(reg).snapshot(), path)
        entry = apply_request(reg, request, show_progress=False, live=live)
        wall = time.perf_counter() - start
        metrics = Registry.open(reg).snapshot().record(entry, "metrics.json")
        folder = reg / entry["dir"]
        rows.append({"n": i, "wall": wall, "train": metrics["train_seconds"], "steps": metrics["step_seconds"],
                     "bytes": sum(p.stat().st_size for p in folder.iterdir())})
        log(f"request {i}/{requests}: {wall:.2f} s, training {metrics['train_seconds']:.2f} s (optimiser steps "
            f"{metrics['step_seconds']:.2f} s), {rows[-1]['bytes']} bytes")
        if i == EARLY:
            shutil.copytree(reg, early)
    extra = write_request(bench, work, "extra", [people[requests]], scope, method, 0.97, excluded=people[:requests])
    _apply(reg, live, extra, work)  # untimed: its rows are encoded once, for both lengths alike
    timed = {n: {"apply": [], "rollback": []} for n in (EARLY, requests)}
    for k in range(rounds):
        for n, source in ((EARLY, early), (requests, reg)):
            timed[n]["apply"].append(_apply(source, live, extra, work))
            timed[n]["rollback"].append(_rollback(source, live, f"r{n:03d}", work))
        log(f"round {k + 1}/{rounds}: apply {timed[EARLY]['apply'][-1]:.2f} s at {EARLY}, {timed[requests]['apply'][-1]:.2f} s "
            f"at {requests}; rollback {timed[EARLY]['rollback'][-1]:.4f} s at {EARLY}, {timed[requests]['rollback'][-1]:.4f} s at {requests}")
    live.sync(Registry.open(reg).snapshot())
    return {"rows": rows, "timed": timed}


def _copy(source: Path, live: Live, work: Path) -> Path:
    """A copy of the registry at `source`, with `live` brought to its state (untimed)."""
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    live.sync(Registry.open(copy).snapshot())
    return copy


def _apply(source: Path, live: Live, request: Path, work: Path) -> float:
    """Seconds to apply `request` to a copy of `source` with the stream's live model."""
    copy = _copy(source, live, work)
    start = time.perf_counter()
    apply_request(copy, read_request(Registry.open(copy).snapshot(), request), show_progress=False, live=live)
    return time.perf_counter() - start


def _rollback(source: Path, live: Live, request_id: str, work: Path) -> float:
    """Seconds to roll `request_id` back on a copy of `source` and bring `live` to it."""
    copy = _copy(source, live, work)
    start = time.perf_counter()
    rollback_request(copy, request_id)
    live.sync(Registry.open(copy).snapshot())
    return time.perf_counter() - start


def summary(result: dict) -> list[str]:
    rows, timed = result["rows"], result["timed"]
    first, last = rows[:EARLY], rows[-EARLY:]
    mean, median = statistics.mean, statistics.median
    n = max(timed)
    wall = sum(r["wall"] for r in rows)
    share, steps = sum(r["train"] for r in rows) / wall, sum(r["steps"] for r in rows) / wall
    rounds = len(timed[n]["apply"])
    lines = []
    for what, digits in (("apply", 2), ("rollback", 4)):
        at_n, early = median(timed[n][what]), median(timed[EARLY][what])
        ratios = sorted(a / b for a, b in zip(timed[n][what], timed[EARLY][what]))
        lines.append(f"{what} time at N={n} against N={EARLY}, side by side: {at_n:.{digits}f} s / {early:.{digits}f} s = "
                     f"{at_n / early:.2f} (medians of {rounds}; per round {ratios[0]:.2f}-{ratios[-1]:.2f}) (target at most 1.2)")
    return lines + [
        f"in the stream itself, requests {last[0]['n']}-{last[-1]['n']} against 1-{EARLY}: {mean(r['wall'] for r in last):.2f} s / "
        f"{mean(r['wall'] for r in first):.2f} s = {mean(r['wall'] for r in last) / mean(r['wall'] for r in first):.2f} (one pass)",
        f"share of a request's wall time in its optimiser steps (forward, backward, update): {steps:.0%} "
        f"(target at least 80%); in training as a whole (with the stopping checks): {share:.0%}",
        f"registry bytes per request: {mean(r['bytes'] for r in rows):.0f}",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--method", default="gd", help="the requests' method (gd: 30 steps, a fixed amount of training)")
    parser.add_argument("--scope", default="full")
    parser.add_argument("--cache", type=Path, default=None, help="where worlds and trained models are kept")
    parser.add_argument("--rounds", type=int, default=9, help="side-by-side rounds of an apply and a rollback at each length")
    args = parser.parse_args(argv)
    if args.requests <= EARLY:
        parser.error(f"--requests: more than {EARLY} (the end of the stream is compared with its first {EARLY})")
    with tempfile.TemporaryDirectory(prefix="stream-cost-") as work:
        result = run(args.profile, args.requests, args.method, args.scope, args.cache or cache_root() / "bench", Path(work),
                     args.rounds)
    print("\n" + "\n".join(summary(result)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
