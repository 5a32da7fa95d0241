"""Does a request cost the same after fifty as the first? One stream of one-person requests, timed.

    python -m benchmarks.stream_cost [--requests 50] [--profile default] [--method gd] [--scope full]

The requests go through the stream's path (seqforget.stream: one live model kept by
differences, the model loaded once) on a fresh registry of the benchmark's vanilla model,
one person each, in the world's forget order. Printed from that one run, as ratios where a
ratio is the claim:

- apply time (wall, from reading the request to its commit) of the last five requests against
  the first five (target at most 1.2);
- rollback time (the registry's rollback, then the live model brought back; the median of nine
  rollbacks of the five latest requests, each on a copy of the registry, so that the stream
  goes on with every request active) with 50 requests against with 5 (target at most 1.2);
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


def run(profile: str, requests: int, method: str, scope: str, cache: Path, work: Path, log=print) -> dict:
    bench = prepare(PROFILES[profile], cache, log)
    people = bench.world.forget_order()[:requests]
    reg = work / "registry"
    init_registry(reg, bench.vanilla)
    live = Live.load(Registry.open(reg).snapshot(), bench.vanilla)
    rows, rollbacks = [], {}
    for i, person in enumerate(people, start=1):
        path = write_request(bench, work, f"r{i:03d}", [person], scope, method, 0.97, excluded=people[: i - 1])
        start = time.perf_counter()
        request = read_request(Registry.open(reg).snapshot(), path)
        entry = apply_request(reg, request, show_progress=False, live=live)
        wall = time.perf_counter() - start
        metrics = Registry.open(reg).snapshot().record(entry, "metrics.json")
        folder = reg / entry["dir"]
        rows.append({"n": i, "wall": wall, "train": metrics["train_seconds"], "steps": metrics["step_seconds"],
                     "bytes": sum(p.stat().st_size for p in folder.iterdir())})
        log(f"request {i}/{len(people)}: {wall:.2f} s, training {metrics['train_seconds']:.2f} s (optimiser steps "
            f"{metrics['step_seconds']:.2f} s), {rows[-1]['bytes']} bytes")
        if i in (5, requests):
            rollbacks[i] = statistics.median(_rollback(reg, live, f"r{i - k % 5:03d}", work) for k in range(ROLLBACKS))
            log(f"  rollback at {i}: {rollbacks[i]:.4f} s (median of {ROLLBACKS})")
    return {"rows": rows, "rollbacks": rollbacks}


ROLLBACKS = 9  # rollbacks timed at each of the two lengths, each on its own copy of the registry


def _rollback(reg: Path, live: Live, request_id: str, work: Path) -> float:
    """Seconds to roll `request_id` back on a copy of `reg` and bring `live` to it; then `live`
    goes back to `reg`, whose stream goes on with every request active (neither is timed)."""
    copy = work / "rollback"
    shutil.copytree(reg, copy)
    start = time.perf_counter()
    rollback_request(copy, request_id)
    live.sync(Registry.open(copy).snapshot())
    seconds = time.perf_counter() - start
    live.sync(Registry.open(reg).snapshot())
    shutil.rmtree(copy)
    return seconds


def summary(result: dict) -> list[str]:
    rows, rollbacks = result["rows"], result["rollbacks"]
    first, last = rows[:5], rows[-5:]
    mean = statistics.mean
    n_first, n_last = min(rollbacks), max(rollbacks)
    wall = sum(r["wall"] for r in rows)
    share, steps = sum(r["train"] for r in rows) / wall, sum(r["steps"] for r in rows) / wall
    return [
        f"apply time, requests {last[0]['n']}-{last[-1]['n']} against 1-5: {mean(r['wall'] for r in last):.2f} s / "
        f"{mean(r['wall'] for r in first):.2f} s = {mean(r['wall'] for r in last) / mean(r['wall'] for r in first):.2f} "
        "(target at most 1.2)",
        f"rollback time at N={n_last} against N={n_first}: {rollbacks[n_last]:.4f} s / {rollbacks[n_first]:.4f} s = "
        f"{rollbacks[n_last] / rollbacks[n_first]:.2f} (target at most 1.2)",
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
    args = parser.parse_args(argv)
    if args.requests < 6:
        parser.error("--requests: at least 6 (the ratios compare the first five with the last)")
    with tempfile.TemporaryDirectory(prefix="stream-cost-") as work:
        result = run(args.profile, args.requests, args.method, args.scope, args.cache or cache_root() / "bench", Path(work))
    print("\n" + "\n".join(summary(result)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
