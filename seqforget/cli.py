"""The `seqforget` command.

Known errors print as one line and exit 1; set SEQFORGET_DEBUG=1 for the traceback.
Heavy imports (torch, transformers) happen inside the commands that need them, so
`--help`, `status` and `verify` start at once.
"""

import json
import os
from pathlib import Path

import click

from registry import Registry, RegistryError
from seqforget.errors import SeqforgetError

registry_option = click.option(
    "--registry",
    "-r",
    "registry_path",
    required=True,
    envvar="SEQFORGET_REGISTRY",
    type=click.Path(file_okay=False, path_type=Path),
    help="Registry folder (or set SEQFORGET_REGISTRY).",
)
model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Base model folder, if it moved since `init` (its fingerprint must match).",
)


class _Commands(click.Group):
    """Every error a command raises ends as one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if os.environ.get("SEQFORGET_DEBUG"):
                raise
            click.echo(_one_line(e), err=True)
            ctx.exit(1)


@click.group(cls=_Commands)
@click.version_option(package_name="seqforget")
def cli():
    """Continual unlearning for vision-language models: one reversible adapter per deletion request."""


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local folder of the base model (transformers format).")
@click.option("--retain", "retain", type=click.Path(dir_okay=False, path_type=Path),
              help="Default retain set (JSONL) for requests that name none.")
@registry_option
def init(model_dir, retain, registry_path):
    """Bind a new registry to a local base model."""
    from seqforget.engine import init_registry

    reg = init_registry(registry_path, model_dir, retain)
    click.echo(f"initialised registry {reg.root} for model {model_dir}")


@cli.command()
@click.argument("request", type=click.Path(path_type=Path))
@registry_option
@model_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def apply(request, registry_path, model_dir, quiet):
    """Apply one deletion request (YAML or JSON file)."""
    from seqforget.engine import apply_request

    entry = apply_request(registry_path, request, model_dir, show_progress=not quiet)
    m = entry["metrics"]
    click.echo(
        f"applied {entry['id']} ({entry['method']}, {entry['scope']}): "
        f"forget NLL {m['forget_nll'][0]:.3f} -> {m['forget_nll'][1]:.3f}, "
        f"retain NLL {m['retain_nll'][0]:.3f} -> {m['retain_nll'][1]:.3f} in {m['seconds']:.1f}s"
    )


@cli.command()
@click.argument("request_id")
@registry_option
def rollback(request_id, registry_path):
    """Take one applied request back, exactly."""
    from seqforget.engine import rollback_request

    rollback_request(registry_path, request_id)
    click.echo(f"rolled back {request_id}")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@registry_option
@model_option
def export(out_dir, registry_path, model_dir):
    """Write the live model (base + active requests) as a transformers model folder."""
    from seqforget.engine import export_model

    path = export_model(registry_path, out_dir, model_dir)
    click.echo(f"exported the live model to {path}")


@cli.command()
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(registry_path, as_json):
    """What is applied, active and rolled back."""
    reg = Registry.open(registry_path)
    manifest = reg.manifest()
    rows = status_rows(reg)
    if as_json:
        click.echo(json.dumps({"registry": str(reg.root), "base_model": manifest["base_model"], "requests": rows}, indent=2))
        return
    click.echo(f"registry {reg.root}")
    click.echo(f"base model {manifest['base_model']['path']}")
    active = sum(r["state"] == "active" for r in rows)
    click.echo(f"{len(rows)} request(s), {active} active\n")
    if rows:
        click.echo(status_table(rows))


def status_rows(reg: Registry) -> list[dict]:
    """One record per request, as `status --json` prints it."""
    return [
        {
            "id": e["id"],
            "seq": e["seq"],
            "state": e["state"],
            "method": e["method"],
            "scope": e["scope"],
            "sign": e["sign"],
            "metrics": e["metrics"],
            "adapter_dir": str(reg.folder(e)),
            "applied_at": e["applied_at"],
            "rolled_back_at": e.get("rolled_back_at"),
        }
        for e in reg.requests()
    ]


def status_table(rows: list[dict]) -> str:
    header = ["#", "id", "state", "method", "scope", "forget NLL", "retain NLL", "forget acc", "retain acc", "applied"]
    lines = [header]
    for r in rows:
        m = r["metrics"]
        lines.append([
            str(r["seq"]), r["id"], r["state"].replace("_", " "), r["method"], r["scope"],
            "{:.2f} -> {:.2f}".format(*m["forget_nll"]), "{:.2f} -> {:.2f}".format(*m["retain_nll"]),
            "{:.2f} -> {:.2f}".format(*m["forget_acc"]), "{:.2f} -> {:.2f}".format(*m["retain_acc"]),
            r["applied_at"],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("seqforget-demo"), show_default=True,
              help="Folder for the demo's requests and registry (a previous demo there is replaced).")
def demo(out):
    """Apply three requests to a tiny LLaVA that knows 60 fictitious people, roll one back."""
    from seqforget.demo import run_demo

    run_demo(out)


@cli.command()
@registry_option
def verify(registry_path):
    """Re-hash every committed file and report damage (exit 1 if any)."""
    reg = Registry.open(registry_path)
    problems = reg.verify()
    leftovers = reg.leftovers()
    for path in leftovers:
        click.echo(f"note: uncommitted leftover {path.relative_to(reg.root)} (removed by the next writer)")
    if problems:
        for p in problems:
            click.echo(f"damaged: {p}")
        raise SeqforgetError(f"registry {reg.root} has {len(problems)} problem(s)")
    n = len(reg.requests())
    click.echo(f"ok: {n} request(s), every file matches its sha256")


def _one_line(e: Exception) -> str:
    known = isinstance(e, (SeqforgetError, RegistryError))
    message = " ".join(str(e).split())
    if known:
        return f"seqforget: error: {message}"
    return f"seqforget: error: {type(e).__name__}: {message} (set SEQFORGET_DEBUG=1 for the traceback)"


main = cli

if __name__ == "__main__":
    main()
