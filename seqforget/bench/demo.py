"""`seqforget demo`: three deletion requests and a rollback on the benchmark's world.

The world of 60 fictitious people and the tiny LLaVA that knows them (the forget/retain
benchmark's default profile) are built on first use and cached under
$SEQFORGET_CACHE (default ~/.cache/seqforget), keyed by a hash of their settings.
The command reaches the CLI through the `seqforget.commands` entry point.
"""

import json
import random
import shutil
import time
from pathlib import Path

import click

from seqforget.bench import cache_root

# id suffix, scope, method (None: the scope's default), settings. partial: true commits a request
# that stops short of the never-seen level (benchmarks/RESULTS.md: on this world they do), and
# `status` marks it partial. A refusal has no such level: its budget alone ends it.
REQUESTS = [
    ("visual", "visual", None, {"partial": True}),
    ("full", "full", None, {"partial": True}),
    ("refuse", "refuse", "refusal", {}),
]


def default_world(log=lambda s: None):
    """(world, vanilla model folder) of the benchmark's default profile, built once and cached;
    `log` hears each training epoch while the model is built."""
    from seqforget.bench.vanilla import TrainSpec, cached_model
    from seqforget.bench.world import WorldSpec, cached_world

    world = cached_world(WorldSpec(), cache_root() / "bench")
    model = cached_model(world, cache_root() / "bench", spec=TrainSpec(), log=log)
    return world, model


def _epochs(out=click.echo):
    """A log for the vanilla model's training: each epoch's line, with the time since the first."""
    start = time.monotonic()

    def log(line: str) -> None:
        elapsed = int(time.monotonic() - start)
        out(f"  [{elapsed // 60:2d}:{elapsed % 60:02d}] {line}")
    return log


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the demo's requests and registry, replaced if a previous demo is there "
                   "[default: $SEQFORGET_CACHE/demo].")
def demo(out):
    """Apply three requests to a tiny LLaVA that knows 60 fictitious people, roll one back."""
    run_demo(out or cache_root() / "demo")


def run_demo(out: Path) -> None:
    import yaml

    from registry import Registry
    from seqforget.engine import apply_request, init_registry, live_model, rollback_request
    from seqforget.evaluation import answer
    from seqforget.models import load_model
    from seqforget.status import status_rows, status_table

    click.echo(f"loading the world of fictitious people and its tiny LLaVA (built once, cached in {cache_root()}) ...")
    click.echo("  (the first run trains the model: its vision tower, then its language side, each until it knows "
               "the world, some minutes on 2 cores)")
    world, model_dir = default_world(_epochs())
    out = Path(out).absolute()
    if out.exists():
        if not (out / "demo.json").is_file():
            raise click.ClickException(f"{out} exists and is not a previous demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"world": str(world.root), "model": str(model_dir)}) + "\n")

    people = world.forget_order()[: len(REQUESTS)]
    pool = [i for i in world.select(split="train") if i.person not in people]
    world.write_jsonl(out / "retain.jsonl", random.Random(0).sample(pool, 192))
    reg_dir = out / "registry"
    world.write_jsonl(out / "reference.jsonl", world.select({"visual", "identity", "textual", "cloze"}, world.unseen_names))
    init_registry(reg_dir, model_dir, default_retain=out / "retain.jsonl", default_reference=out / "reference.jsonl")
    ids = []
    for person, (suffix, scope, method, settings) in zip(people, REQUESTS):
        request_id = f"{person}-{suffix}"
        ids.append(request_id)
        world.write_jsonl(out / f"{person}.jsonl", world.select({"visual", "identity", "textual", "cloze"}, [person], "train"))
        path = out / f"{request_id}.yaml"
        body = {"id": request_id, "scope": scope, **({"method": method} if method else {}), "forget": f"{person}.jsonl", **settings}
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        click.echo(f"$ seqforget apply {path.name}")
        entry = apply_request(reg_dir, path, show_progress=False)
        m = entry["metrics"]
        click.echo(f"  forget NLL {m['forget_nll'][0]:.2f} -> {m['forget_nll'][1]:.2f}, "
                   f"retain NLL {m['retain_nll'][0]:.2f} -> {m['retain_nll'][1]:.2f} ({m['seconds']:.0f} s)")
    click.echo(f"$ seqforget rollback {ids[1]}")
    rollback_request(reg_dir, ids[1])

    state = Registry.open(reg_dir).snapshot()
    base, processor = load_model(model_dir)
    live, _ = live_model(state)
    click.echo("\nanswers of the base model and of the live model (held-out views of each person):")
    bystander = world.forget_order()[-1]
    for person in people + [bystander]:
        for item in world.select({"visual"}, [person], "test")[:1] + world.select({"textual"}, [person])[:1]:
            row = item.example(world.root)
            question = (f"[photo of {person}] " if item.image else "") + item.question
            click.echo(f"  {question:52s} base: {answer(base, processor, row):9s} live: {answer(live, processor, row)}")
    click.echo("")
    click.echo(status_table(status_rows(state)))
    click.echo(f"\n{ids[1]} was rolled back: its adapter is out of the live model, whose answers for its person "
               f"are now what the other active requests leave them. Registry: {reg_dir}")
