"""`seqforget demo`: three deletion requests and a rollback on the built-in example world.

The world (portraits, questions) and the tiny LLaVA taught on it are cached under
$SEQFORGET_CACHE (default ~/.cache/seqforget), keyed by a hash of their settings,
and built atomically on first use.
"""

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import click

from seqforget import example

WORLD = {"n_people": 8, "views": 3, "seed": 0, "teach_steps": 300, "format": 1}


def cache_root() -> Path:
    return Path(os.environ.get("SEQFORGET_CACHE", Path.home() / ".cache" / "seqforget"))


def demo_world() -> Path:
    """The cached example world: images/, people.json and a trained tiny model in model/."""
    from seqforget.models import build_tiny_llava

    key = hashlib.sha256(json.dumps(WORLD, sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root() / f"demo-world-{key}"
    if (final / "people.json").is_file():
        return final
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    try:
        click.echo(f"building the example world and teaching a tiny LLaVA (once, cached in {final}) ...")
        rows = example.write_world(tmp, WORLD["n_people"], WORLD["views"], WORLD["seed"])
        model, processor = build_tiny_llava(tmp / "model", example.corpus())
        everything = [r for person in rows.values() for r in person]
        example.teach(model, processor, everything, tmp, steps=WORLD["teach_steps"])
        model.save_pretrained(tmp / "model")
        (tmp / "people.json").write_text(json.dumps(rows, indent=1) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "people.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_demo(out: Path) -> None:
    import yaml

    from registry import Registry
    from seqforget.data import Row
    from seqforget.engine import apply_request, init_registry, live_model, rollback_request
    from seqforget.evaluation import answer
    from seqforget.models import load_model

    world = demo_world()
    rows = json.loads((world / "people.json").read_text())
    names = list(rows)
    out = Path(out).absolute()
    if out.exists():
        if not (out / "demo.json").is_file():
            raise click.ClickException(f"{out} exists and is not a previous demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"world": str(world)}) + "\n")
    shutil.copytree(world / "images", out / "images")
    retain = [r for n in names[3:] for r in rows[n]]
    example.write_jsonl(out / "retain.jsonl", retain)

    requests = [  # id, scope, method, person, training settings
        (f"forget-{names[0]}-visual", "visual", "ga", names[0], {"lr": 3e-3}),
        (f"forget-{names[1]}-full", "full", "npo", names[1], {"lr": 3e-3}),
        (f"refuse-{names[2]}", "refuse", "refusal", names[2], {"lr": 1e-2}),
    ]
    reg_dir = out / "registry"
    init_registry(reg_dir, world / "model", default_retain=out / "retain.jsonl")
    for request_id, scope, method, person, settings in requests:
        example.write_jsonl(out / f"{person}.jsonl", rows[person])
        path = out / f"{request_id}.yaml"
        body = {"id": request_id, "scope": scope, "method": method, "forget": f"{person}.jsonl", "steps": 30, **settings}
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        click.echo(f"$ seqforget apply {path.name}")
        entry = apply_request(reg_dir, path, show_progress=False)
        m = entry["metrics"]
        click.echo(f"  forget NLL {m['forget_nll'][0]:.2f} -> {m['forget_nll'][1]:.2f}, "
                   f"retain NLL {m['retain_nll'][0]:.2f} -> {m['retain_nll'][1]:.2f}")
    click.echo(f"$ seqforget rollback {requests[1][0]}")
    rollback_request(reg_dir, requests[1][0])

    reg = Registry.open(reg_dir)
    base_model, processor = load_model(world / "model")
    live, _ = live_model(reg)
    click.echo("\nwhat the base model and the live model answer:")
    probes = [(person, r) for _, _, _, person, _ in requests for r in rows[person][:3:2]] + [(names[3], rows[names[3]][0])]
    for person, r in probes:
        row = Row(r["question"], r["answer"], out / r["image"] if r.get("image") else None)
        q = ("[image of " + person + "] " if row.image else "") + row.question
        click.echo(f"  {q:48s} base: {answer(base_model, processor, row):12s} live: {answer(live, processor, row)}")
    click.echo("")
    from seqforget.cli import status_rows, status_table

    click.echo(status_table(status_rows(reg)))
    click.echo(f"\nregistry: {reg_dir}  (try: seqforget status -r {reg_dir})")
