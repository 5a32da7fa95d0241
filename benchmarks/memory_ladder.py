"""What does one request cost as the model grows? One request on a ladder of LLaVA sizes.

    python -m benchmarks.memory_ladder [--rungs 1m,14m,99m,345m,613m] [--steps 4] [--dtype float32]
                                       [--scope full] [--method gd] [--gradient-checkpointing]
                                       [--processes N [--shard]] [--json out.json]

Each rung is a randomly initialised LLaVA (CLIP vision tower, two-layer projector, Llama
language model, MLP width twice the hidden width) with the default world's tokenizer, built
with transformers' config classes and saved with save_pretrained. On each, one request (`full`
and `gd` unless told, --steps optimiser steps of 8 forget and 8 retain rows, 64 retain rows, one
person's forget rows, the never-seen people's rows as reference; the guard off, one stopping
check at the last step and partial: true, so every rung does the same work) is applied by
`seqforget init` and `seqforget apply` in a fresh process, as a user runs them (with
--processes N, `apply` runs in N processes under torchrun, sharing each batch, or with --shard
the model's weights). Printed per rung:

- parameters, and the model's bytes on disk;
- peak resident memory of the whole `apply` process, and of the request itself (from reading the
  request to its commit, as metrics.json records it), the largest of its processes' if several
  (the request's: the main process's);
- the model weights one process holds during the request (its share of them, sharded);
- wall time of the `apply` process, of the request, and per optimiser step;
- registry bytes the request added (adapter, bases, records), and the basis columns it added
  against the summed width of the layers (one per group reading one input);
- the retained-input statistics the request held: Gram matrices for layers up to twice
  `sketch_rank` wide, sketches for wider ones (and what Gram matrices would have held).

Images are 32 x 32 pixels in patches of 8 (16 image tokens a row), at every rung: the ladder
measures how cost grows with parameters, not with image resolution.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.forget_retain import PROFILES, Bench, write_request
from seqforget.bench import cache_root
from seqforget.bench.world import cached_world
from seqforget.tiny import TinySpec
from seqforget.requests import Training

RUNGS = {  # name -> the sizes of the model (heads of 64 dimensions, as LLaVA's)
    "1m": TinySpec(),
    "14m": TinySpec(vision_hidden=256, vision_layers=4, vision_heads=4, text_hidden=512, text_layers=4, text_heads=8),
    "99m": TinySpec(vision_hidden=512, vision_layers=6, vision_heads=8, text_hidden=1024, text_layers=8, text_heads=16),
    "345m": TinySpec(vision_hidden=768, vision_layers=12, vision_heads=12, text_hidden=1536, text_layers=12, text_heads=24),
    "613m": TinySpec(vision_hidden=1024, vision_layers=12, vision_heads=16, text_hidden=2048, text_layers=12, text_heads=32),
}
RETAIN_ROWS = 64


def build(rung: str, out: Path, cache: Path, profile: str = "default") -> None:
    """Save rung's model to `out` (run in a process of its own: the model is not kept)."""
    from seqforget.tiny import build_tiny_llava

    world = cached_world(PROFILES[profile].world, cache)
    build_tiny_llava(out, world.corpus(), RUNGS[rung], tokenizer=world.tokenizer())


def measure(rung: str, work: Path, cache: Path, steps: int, dtype: str, checkpointing: bool, scope: str = "full",
            method: str = "gd", world_profile: str = "default", processes: int = 1, shard: bool = False, log=print) -> dict:
    """Build rung's model, init a registry on it, apply one request; the figures of that apply.
    `world_profile`: the benchmark profile whose world gives the tokenizer and the rows."""
    profile = PROFILES[world_profile]
    world = cached_world(profile.world, cache)
    model = work / rung / "model"
    _run([sys.executable, "-m", "benchmarks.memory_ladder", "--build", rung, "--out", str(model), "--cache", str(cache),
          "--world", world_profile])
    reg = work / rung / "registry"
    _run([sys.executable, "-m", "seqforget", "init", "--registry", str(reg), "--model", str(model), "--dtype", dtype])
    bench = Bench(world, replace(profile, retain_rows=RETAIN_ROWS), cache, work)
    person = world.forget_order()[0]
    request = write_request(bench, work / rung / "request", "ladder", [person], scope, method, 0.97,
                            fields={"steps": steps, "check_every": steps, "partial": True, "reference": "reference.jsonl"})
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "seqforget", "apply", str(request), "--registry", str(reg), "--quiet"]
    command += ["--gradient-checkpointing"] * checkpointing + ["--shard"] * shard
    wall, peak = _run(command)
    from registry import Registry

    state = Registry.open(reg).snapshot()
    entry = state.find("ladder")
    metrics = state.record(entry, "metrics.json")
    bases = state.bases()
    stats, widths = {"held": 0, "as_grams": 0, "columns": 0, "width": 0}, set()
    for name, growth in metrics["basis"].items():
        if growth["shares_with"] == name:  # one statistic per group of layers reading one input
            d = bases[name].dim
            stats["columns"], stats["width"] = stats["columns"] + growth["columns_added"], stats["width"] + d
            stats["as_grams"] += 8 * d * d
            stats["held"] += 8 * Training.sketch_rank * d * (1 + (d not in widths)) if growth["sketched"] else 8 * d * d
            widths |= {d} if growth["sketched"] else set()  # one Omega per width
    files = sum(p.stat().st_size for p in (reg / entry["dir"]).iterdir())
    out = {"rung": rung, "parameters": _parameters(model), "model_bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")),
           "dtype": metrics["dtype"], "gradient_checkpointing": checkpointing, "scope": scope, "method": method,
           "processes": processes, "sharded": shard, "weights_mb": metrics["processes"]["weights_mb"],
           "peak_rss_mb": peak, "request_peak_rss_mb": metrics["peak_rss_mb"], "process_seconds": wall,
           "request_seconds": metrics["seconds"], "step_seconds": metrics["step_seconds"] / max(metrics["stop"]["step"], 1),
           "steps": metrics["stop"]["step"], "registry_bytes": files,
           "adapter_bytes": (reg / entry["dir"] / "adapter_model.safetensors").stat().st_size,
           "basis_bytes": metrics["basis_bytes"], "basis_columns": stats["columns"], "basis_width": stats["width"],
           "stats_bytes": stats["held"], "stats_as_grams_bytes": stats["as_grams"],
           "sketched_layers": sum(g["sketched"] for g in metrics["basis"].values()), "target_layers": len(metrics["basis"])}
    log(line(out))
    return out


def _parameters(model: Path) -> int:
    """Parameters in the model folder's safetensors files, from their headers."""
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(path, framework="numpy") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _run(command: list[str]) -> tuple[float, float]:
    """Run a command to its end; (wall seconds, peak resident MiB of its process, or of the
    largest of the processes it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed ({proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    return wall, usage.ru_maxrss / 1024.0


HEADER = ("| model | params | on disk | weights / process | peak RSS, process | peak RSS, request | process s | request s | s / step | "
          "registry / request | adapter | bases (columns / width) | statistics held (as Gram matrices) |")


def line(r: dict) -> str:
    mb = 1 << 20
    return (f"| {r['rung']} | {r['parameters'] / 1e6:.1f}M | {r['model_bytes'] / mb:.0f} MB | {r['weights_mb']:.0f} MiB | "
            f"{r['peak_rss_mb']:.0f} MiB | {r['request_peak_rss_mb']:.0f} MiB | {r['process_seconds']:.1f} | {r['request_seconds']:.1f} | "
            f"{r['step_seconds']:.2f} | {r['registry_bytes'] / mb:.2f} MB | {r['adapter_bytes'] / mb:.2f} MB | "
            f"{r['basis_bytes'] / mb:.2f} MB ({r['basis_columns']} / {r['basis_width']}) | {r['stats_bytes'] / mb:.0f} MB ({r['stats_as_grams_bytes'] / mb:.0f} MB), "
            f"{r['sketched_layers']}/{r['target_layers']} layers sketched |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rungs", default=",".join(RUNGS), help=f"comma-separated, of {', '.join(RUNGS)}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--scope", default="full")
    parser.add_argument("--method", default="gd")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="apply in this many processes (torchrun)")
    parser.add_argument("--shard", action="store_true", help="with --processes: split the weights across them")
    parser.add_argument("--cache", type=Path, default=None, help="where the world is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--build", choices=sorted(RUNGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--world", choices=sorted(PROFILES), default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache = args.cache or cache_root() / "bench"
    if args.build:
        build(args.build, args.out, cache, args.world)
        return
    rungs = args.rungs.split(",")
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        parser.error(f"--rungs: unknown {', '.join(unknown)} (one of {', '.join(RUNGS)})")
    if args.processes < 1 or (args.shard and args.processes < 2):
        parser.error("--processes must be at least 1, and at least 2 with --shard")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-ladder-") as work:
        for rung in rungs:
            results.append(measure(rung, Path(work), cache, args.steps, args.dtype, args.gradient_checkpointing,
                                   args.scope, args.method, processes=args.processes, shard=args.shard))
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
