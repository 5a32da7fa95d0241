"""A stream killed at random moments loses nothing and applies nothing twice.

    python -m benchmarks.kill_stream [--kills 50] [--seed 0]

On the benchmark's tiny world, `seqforget stream SOURCE --once` runs as its own process and
gets SIGKILL after a random delay (uniform between 0 and --max-delay seconds: while it starts,
trains, writes or commits; the first --aimed kills instead as soon as a request's write has
begun, its staging folder open), then starts again, until --kills kills were dealt; new request
files arrive in the source folder whenever it runs dry. After every kill the registry is
checked: `verify` clean, every request seen committed before still committed with the same
files, no request committed twice, commit numbers without gaps. At the end the last start
drains the source, and the live model is compared with that of one uninterrupted stream over
the same requests: requests train deterministically on the same live model, so the two must be
equal to within TOLERANCE on every weight.

Printed: the kills, how many landed mid-write (an uncommitted folder left for the next start
to remove), the requests committed, the checks passed, and the largest weight difference.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from registry import Registry
from seqforget.bench.world import request_folder
from seqforget.engine import init_registry, live_model

TOLERANCE = 0.0  # largest |weight difference| allowed against the uninterrupted run: requests train deterministically
BATCH = 4  # request files that arrive each time the source runs dry
ENV = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"}


class Broken(AssertionError):
    """A check failed: the registry lost, doubled or damaged something."""


def write_requests(source: Path, world: Path, start: int, n: int) -> None:
    """Requests r<start>..r<start+n-1>: a few steps of `gd` on one of the world's two forget sets each,
    written as a sender does (a dotfile renamed in)."""
    source.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        body = {"id": f"r{i:03d}", "scope": "full", "method": "gd", "forget": str(world / f"forget_{'ab'[i % 2]}.jsonl"),
                "retain": str(world / "retain.jsonl"), "steps": 4, "retain_tolerance": 1.0}
        tmp = source / f".r{i:03d}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(body))
        tmp.rename(source / f"r{i:03d}.yaml")


def stream(source: Path, reg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seqforget", "stream", str(source), "-r", str(reg), "--once", "-q"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def check(reg: Path, seen: dict[str, dict]) -> int:
    """Raise Broken unless the registry is whole and holds every request seen before, unchanged;
    record what it holds now in `seen`. Returns how many uncommitted leftovers it holds."""
    registry = Registry.open(reg)
    state = registry.snapshot()
    problems = registry.verify(state)
    if problems:
        raise Broken(f"verify: {problems}")
    ids = [e["id"] for e in state.requests]
    if len(ids) != len(set(ids)):
        raise Broken(f"a request committed twice: {ids}")
    if [e["seq"] for e in state.requests] != list(range(1, len(ids) + 1)):
        raise Broken(f"commit numbers with gaps: {[e['seq'] for e in state.requests]}")
    now = {e["id"]: e["files"] for e in state.requests}
    lost = [i for i in seen if now.get(i) != seen[i]]
    if lost:
        raise Broken(f"committed requests lost or changed: {lost}")
    seen.update(now)
    return len(registry.leftovers(state))


def wait_for_a_write(proc: subprocess.Popen, reg: Path, timeout: float) -> bool:
    """Wait until `proc` has begun a request's write (a folder in the registry's staging area):
    True then, False if it ended or `timeout` passed first."""
    staging, end = reg / "staging", time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < end:
        if staging.is_dir() and any(staging.iterdir()):
            return True
        time.sleep(0.005)
    return False


def run(world: Path, work: Path, kills: int, max_delay: float, seed: int, aimed: int = 0, log=print) -> dict:
    """`kills` kills; the first `aimed` of them as soon as a write has begun (wait_for_a_write),
    the rest after a random delay."""
    source, reg = work / "source", work / "killed"
    init_registry(reg, world / "model")
    rng, seen = random.Random(seed), {}
    written, dealt, mid_write, starts, start = 0, 0, 0, 0, time.perf_counter()
    while True:
        pending = written - len(seen)
        if pending == 0 and dealt < kills:  # requests keep arriving
            write_requests(source, world, written, BATCH)
            written += BATCH
        proc = stream(source, reg)
        starts += 1
        if dealt < aimed:
            if wait_for_a_write(proc, reg, timeout=60.0):
                proc.kill()
                dealt += 1
        elif dealt < kills:
            try:
                proc.wait(timeout=rng.uniform(0.0, max_delay))
            except subprocess.TimeoutExpired:
                proc.kill()
                dealt += 1
        proc.wait()
        stderr = proc.stderr.read()
        if proc.returncode not in (0, -9):
            raise Broken(f"stream exited with {proc.returncode}: {stderr.strip()}")
        leftovers = check(reg, seen)
        mid_write += leftovers > 0
        if proc.returncode == -9:
            log(f"kill {dealt}/{kills}: {len(seen)} committed, {leftovers} uncommitted leftover(s)")
        elif dealt >= kills and len(seen) == written:
            break
    seconds = time.perf_counter() - start
    reference = work / "uninterrupted"
    init_registry(reference, world / "model")
    proc = stream(source, reference)
    if proc.wait() != 0:
        raise Broken(f"the uninterrupted stream failed: {proc.stderr.read().strip()}")
    killed, _ = live_model(Registry.open(reg).snapshot())
    whole, _ = live_model(Registry.open(reference).snapshot())
    diff = max((a - b).abs().max().item() for a, b in zip(killed.parameters(), whole.parameters()))
    if diff > TOLERANCE:
        raise Broken(f"the killed stream's model differs from the uninterrupted one's by {diff:g} (tolerance {TOLERANCE:g})")
    return {"kills": dealt, "starts": starts, "mid_write": mid_write, "requests": len(seen), "seconds": seconds,
            "max_weight_difference": diff}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--max-delay", type=float, default=10.0, help="seconds: each kill comes uniformly within this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aimed", type=int, default=0, help="of the kills, this many as soon as a request's write has begun")
    parser.add_argument("--cache", type=Path, default=None, help="where the tiny world and its model are kept")
    args = parser.parse_args(argv)
    from benchmarks.forget_retain import PROFILES, prepare
    from seqforget.bench import cache_root

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="kill-stream-") as work:
        bench = prepare(PROFILES["tiny"], args.cache or cache_root() / "bench")
        world = request_folder(bench.world, bench.vanilla, Path(work) / "world")
        result = run(world, Path(work), args.kills, args.max_delay, args.seed, args.aimed)
    print(f"\n{result['kills']} kills over {result['starts']} starts in {result['seconds']:.0f} s; "
          f"{result['mid_write']} left an uncommitted write for the next start; {result['requests']} requests committed, "
          f"each once; verify clean and nothing lost after every kill; largest weight difference from an "
          f"uninterrupted stream {result['max_weight_difference']:g} (tolerance {TOLERANCE:g})")


if __name__ == "__main__":
    main()
