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
# `status` marks it partial. The refusal is committed only once it is learnt; where it is not
# (it is not learnt on every build of the world yet), the demo shows why and goes on.
REQUESTS = [
    ("visual", "visual", None, {"partial": True}),
    ("full", "full", None, {"partial": True}),
    ("refuse", "refuse", "refusal", {}),
]


def default_world(log=lambda s: None, seed: int = 0):
    """(world, vanilla model folder) of the benchmark's default profile, drawn and trained from
    `seed`, built once and cached; `log` hears each training epoch while the model is built."""
    from seqforget.bench.vanilla import TrainSpec, cached_model
    from seqforget.bench.world import WorldSpec, cached_world

    world = cached_world(WorldSpec(seed=seed), cache_root() / "bench")
    model = cached_model(world, cache_root() / "bench", spec=TrainSpec(seed=seed), log=log)
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
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Draw another world of people, and train another model that knows it.")
def demo(out, seed):
    """Apply three requests to a tiny LLaVA that knows 60 fictitious people, roll one back."""
    click.echo(f"loading the world of fictitious people and its tiny LLaVA (built once, cached in {cache_root()}) ...")
    click.echo("  (the first run trains the model: its vision tower, then its language side, each until it knows "
               "the world; about 20 minutes on 2 cores)")
    world, model_dir = default_world(_epochs(), seed)
    run_demo(out or cache_root() / "demo", world, model_dir)


def run_demo(out: Path, world, model_dir: Path) -> None:
    """The demo's requests, rollback and answers on `world`, whose vanilla model is in `model_dir`."""
    import yaml

    from registry import Registry
    from seqforget.budget import budget_line
    from seqforget.engine import apply_request, init_registry, live_model, rollback_request
    from seqforget.errors import SeqforgetError
    from seqforget.evaluation import answer
    from seqforget.models import load_model
    from seqforget.status import status_rows, status_table

    out = Path(out).absolute()
    if out.exists():
        if not (out / "demo.json").is_file():
            raise click.ClickException(f"{out} exists and is not a previous demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"world": str(world.root), "model": str(model_dir)}) + "\n")

    people = world.forget_order()[: len(REQUESTS)]
    pool = [i for i in world.select(split="train") if i.person not in people]
    world.write_jsonl(out / "retain.jsonl", random.Random(0).sample(pool, min(192, len(pool))))
    reg_dir = out / "registry"
    world.write_jsonl(out / "reference.jsonl", world.select({"visual", "identity", "textual", "cloze"}, world.unseen_names))
    keep = [p for p in world.forget_order() if p not in people][-12:]  # people no request forgets: the budget's guard
    world.write_jsonl(out / "guard.jsonl", world.select({"visual", "identity"}, keep, "test"))
    init_registry(reg_dir, model_dir, default_retain=out / "retain.jsonl", default_reference=out / "reference.jsonl",
                  guard=out / "guard.jsonl")
    click.echo(f"$ seqforget init --model {model_dir} --retain retain.jsonl --reference reference.jsonl "
               f"--guard guard.jsonl --registry registry")
    click.echo("  " + budget_line(Registry.open(reg_dir).snapshot()))
    base, processor = load_model(model_dir)
    steps = [("base model", accuracies(base, processor, world, people, keep))]
    ids = []
    for person, (suffix, scope, method, settings) in zip(people, REQUESTS):
        request_id = f"{person}-{suffix}"
        ids.append(request_id)
        world.write_jsonl(out / f"{person}.jsonl", world.select({"visual", "identity", "textual", "cloze"}, [person], "train"))
        path = out / f"{request_id}.yaml"
        body = {"id": request_id, "scope": scope, **({"method": method} if method else {}), "forget": f"{person}.jsonl", **settings}
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        click.echo(f"$ seqforget apply {path.name}")
        try:
            entry = apply_request(reg_dir, path, show_progress=False)
        except SeqforgetError as e:  # what `seqforget apply` prints, exiting 1: the request did not do what it asks
            click.echo(f"  not committed: {e}")
            continue
        click.echo("  " + _outcome(entry))
        steps.append((f"+ {request_id}", accuracies(*live_model(Registry.open(reg_dir).snapshot()), world, people, keep)))
    click.echo(f"$ seqforget rollback {ids[1]}")
    rollback_request(reg_dir, ids[1])

    state = Registry.open(reg_dir).snapshot()
    live, _ = live_model(state)
    steps.append((f"- {ids[1]}", accuracies(live, processor, world, people, keep)))
    click.echo("\nanswers of the base model and of the live model (held-out views of each person):")
    bystander = world.forget_order()[-1]
    for person in people + [bystander]:
        for item in world.select({"visual"}, [person], "test")[:1] + world.select({"textual"}, [person])[:1]:
            row = item.example(world.root)
            question = (f"[photo of {person}] " if item.image else "") + item.question
            click.echo(f"  {question:52s} base: {answer(base, processor, row):9s} live: {answer(live, processor, row)}")
    click.echo("\naccuracy after each step, on views no request trained on (choice among the world's answers):")
    click.echo(steps_table(steps, people))
    picture = plot_steps(steps, people, out / "demo.png")
    click.echo(f"picture: {picture}" if picture else "picture: none (matplotlib is not installed; pip install '.[bench]')")
    click.echo("")
    click.echo(budget_line(state))
    click.echo(status_table(status_rows(state)))
    click.echo(f"\n{ids[1]} was rolled back: its adapter is out of the live model, whose answers for its person "
               f"are now what the other active requests leave them. Registry: {reg_dir}")


def accuracies(model, processor, world, people: list[str], keep: list[str]) -> dict:
    """What the demo shows after each step: per requested person, the share of their held-out
    image questions and of their text questions answered right; and of the held-out image
    questions of `keep`, people no request forgets."""
    from seqforget.bench.scoring import choice_accuracy

    def share(kinds, who, split=None):
        return choice_accuracy(model, processor, world.root, world.select(kinds, who, split))

    return {"images": {p: share({"visual", "identity"}, [p], "test") for p in people},
            "text": {p: share({"textual"}, [p]) for p in people},
            "retained": share({"visual", "identity"}, keep, "test")}


def steps_table(steps: list[tuple[str, dict]], people: list[str]) -> str:
    """One line per step: each person's image and text questions, then the retained people's images."""
    head = ["step"] + [f"{p}: images, text" for p in people] + ["retained people: images"]
    rows = [[name] + [f"{a['images'][p]:.0%}, {a['text'][p]:.0%}" for p in people] + [f"{a['retained']:.0%}"]
            for name, a in steps]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows)


def plot_steps(steps: list[tuple[str, dict]], people: list[str], path: Path) -> Path | None:
    """Draw the steps' accuracies into a PNG at `path`; None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(steps))
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in people:
        (line,) = ax.plot(x, [a["images"][p] for _, a in steps], marker="o", label=f"{p}: image questions")
        ax.plot(x, [a["text"][p] for _, a in steps], marker=".", linestyle=":", color=line.get_color(),
                label=f"{p}: text questions")
    ax.plot(x, [a["retained"] for _, a in steps], marker="s", color="black", label="retained people: image questions")
    ax.axhline(steps[0][1]["retained"], color="grey", linestyle="--", linewidth=0.8, label="retained, base model")
    ax.set_xticks(list(x), [name for name, _ in steps], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("answered right (held-out views)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _outcome(entry: dict) -> str:
    """One line on what a committed request did."""
    from seqforget.budget import retained_words

    m = entry["metrics"]
    stop = {"reached": "reached its level", "retain_guard": "stopped by the retain guard",
            "registry_guard": "stopped at the registry's budget",
            "budget": "ran all its steps"}[m["stop"]["reason"]] + (", committed as partial" if entry["partial"] else "")
    if m.get("refusal"):
        r = m["refusal"]
        held = "" if r["held_out"] is None else f" ({r['held_out']:.0%} on views it never trained on)"
        did = f"refuses {r['trained']:.0%} of its forget questions{held} and {r['sarr']:.0%} of retained ones"
    else:
        did = (f"forget answers ranked first {m['forget_acc'][0]:.0%} -> {m['forget_acc'][1]:.0%}, "
               f"retain rows {m['retain_acc'][0]:.0%} -> {m['retain_acc'][1]:.0%}")
    if m.get("retained"):
        did += f"; {retained_words(m['retained'])}"
    return f"{stop} at step {m['stop']['step']}: {did} ({m['seconds']:.0f} s)"
