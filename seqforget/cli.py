"""The `seqforget` command.

Known errors print as one line; set SEQFORGET_DEBUG=1 for the traceback. Heavy imports
(torch, transformers) happen inside the commands that need them, so `--help`, `status`
and `verify` start at once. Installed packages may add commands through the
`seqforget.commands` entry-point group (the benchmark's `demo` is one).

Exit status:
  0   done
  1   bad input or a problem seqforget found (nothing changed)
  2   command-line usage mistake (reported by click)
  3   nothing to do: the request is already applied and active (same id, same content), or
      already rolled back
  4   the registry is busy: another process holds its lock (with --no-wait)
  5   integrity failure: a committed file or the base model is damaged
  6   over budget: the request would take the registry below the share of the base model's
      answers on its guard rows that it keeps (init --guard, --budget); nothing committed
  70  an unexpected failure (the message names it); the registry holds what it held
      before, or the request fully committed
"""

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import click

from registry import CommittedUnfinished, Registry, RegistryBusy, RegistryDamaged, RegistryError
from seqforget.errors import AlreadyDone, OverBudget, SeqforgetError
from seqforget.models import DTYPES

EXIT_BAD_INPUT, EXIT_NOTHING_TO_DO, EXIT_BUSY, EXIT_DAMAGED, EXIT_OVER_BUDGET, EXIT_UNEXPECTED = 1, 3, 4, 5, 6, 70
EXIT_CODES = [  # most specific first
    (CommittedUnfinished, EXIT_UNEXPECTED),
    (AlreadyDone, EXIT_NOTHING_TO_DO),
    (OverBudget, EXIT_OVER_BUDGET),
    (RegistryBusy, EXIT_BUSY),
    (RegistryDamaged, EXIT_DAMAGED),
    ((SeqforgetError, RegistryError), EXIT_BAD_INPUT),
]

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
    help="Base model folder, if it moved since `init` (it must be the same model).",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="Precision to load, train and compose the model in (default: the registry's, chosen at init).",
)
device_option = click.option(
    "--device",
    help="Where the model runs: auto, cpu, cuda or cuda:N (default: the registry's, chosen at init).",
)
checkpointing_option = click.option(
    "--gradient-checkpointing",
    "checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass instead of keeping them: less memory, slower steps.",
)
wait_option = click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="If another process holds the registry, wait for it, or exit at once with status 4.",
)


class _Commands(click.Group):
    """Every error a command raises ends as one line on stderr and its exit status."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if os.environ.get("SEQFORGET_DEBUG"):
                raise
            click.echo(_one_line(e), err=True)
            ctx.exit(next((code for kind, code in EXIT_CODES if isinstance(e, kind)), EXIT_UNEXPECTED))

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in _plugins():
            command = _plugins()[name].load()
        return command


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group="seqforget.commands")}


@click.group(cls=_Commands)
@click.version_option(package_name="seqforget")
def cli():
    """Continual unlearning for vision-language models: one reversible adapter per deletion request."""


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local folder of the base model (transformers format).")
@click.option("--retain", "retain", type=click.Path(dir_okay=False, path_type=Path),
              help="Default retain set (JSONL) for requests that name none.")
@click.option("--reference", "reference", type=click.Path(dir_okay=False, path_type=Path),
              help="Default reference set (JSONL): rows the model never saw, the level requests stop at.")
@click.option("--guard", "guard", type=click.Path(dir_okay=False, path_type=Path),
              help="Guard set (JSONL): rows about what must stay. The base model answers them now; no request may "
                   "take the model below --budget of its exact answers on them.")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="With --guard: the share of the base model's exact answers on the guard rows the registry keeps.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Precision the live model is loaded, trained and composed in; adapters are stored in float32.")
@click.option("--device", default="auto", show_default=True,
              help="Where the live model runs: auto (this process's GPU if there is one, else the CPU), cpu, cuda, cuda:N.")
@click.option("--gated", is_flag=True,
              help="Apply each visual request only to the images its gate finds near its forget set; other images see "
                   "the base model's vision side. Serving then needs seqforget (export refuses).")
@registry_option
def init(model_dir, retain, reference, guard, budget, dtype, device, gated, registry_path):
    """Bind a new registry to a local base model (its files are hashed once, here)."""
    from seqforget.budget import budget_line
    from seqforget.engine import init_registry

    reg = init_registry(registry_path, model_dir, retain, reference, dtype, device, guard, budget, gated)
    click.echo(f"initialised registry {reg.root} for model {model_dir} ({dtype}, device {device}"
               f"{', gated' if gated else ''})")
    kept = reg.snapshot().guard
    if kept:
        click.echo(f"guard: {kept['rows']} rows, the base model answers {kept['base']['exact']:.1%} exactly; "
                   f"budget {kept['budget']:.0%} of that")
    else:
        click.echo(budget_line(reg.snapshot()))


@cli.command()
@click.argument("request", type=click.Path(path_type=Path))
@registry_option
@model_option
@dtype_option
@device_option
@checkpointing_option
@click.option("--shard", is_flag=True,
              help="Under torchrun or accelerate launch: split the model's weights across the processes (FSDP) "
                   "instead of each holding all of them.")
@wait_option
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def apply(request, registry_path, model_dir, dtype, device, checkpointing, shard, wait, quiet):
    """Apply one deletion request (YAML or JSON file). Under torchrun or `accelerate launch`, the
    processes share each batch, or with --shard the model's weights, and only the main one
    writes (seqforget.distributed)."""
    from seqforget.budget import retained_words
    from seqforget.distributed import is_main_process
    from seqforget.engine import apply_request
    from seqforget.options import RunOptions

    run = RunOptions(model_dir=model_dir, dtype=dtype, device=device, checkpointing=checkpointing, shard=shard,
                     show_progress=not quiet, wait=wait)
    entry = apply_request(registry_path, request, run)
    if not is_main_process():
        return  # the main process of several says what was applied
    m = entry["metrics"]
    click.echo(
        f"applied {entry['id']} ({entry['method']}, {entry['scope']}): "
        f"forget NLL {m['forget_nll'][0]:.3f} -> {m['forget_nll'][1]:.3f}, "
        f"retain NLL {m['retain_nll'][0]:.3f} -> {m['retain_nll'][1]:.3f} in {m['seconds']:.1f}s"
        + (f"; {retained_words(m['retained'])}" if m.get("retained") else "")
    )


@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@registry_option
@model_option
@dtype_option
@device_option
@checkpointing_option
@click.option("--once", is_flag=True, help="Apply what SOURCE holds now, then exit (default: keep watching it).")
@click.option("--poll", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between looks at SOURCE when it holds nothing new.")
@wait_option
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def stream(source, registry_path, model_dir, dtype, device, checkpointing, once, poll, wait, quiet):
    """Apply the requests of SOURCE as they arrive: a folder of request files, or a JSONL file.

    Each request is applied once; after a stop or a kill, the next start goes on where it
    stopped. Refused requests are recorded (see `status`) and skipped. SIGTERM or Ctrl-C
    stops after the request in hand (one still training is abandoned, nothing committed)."""
    from seqforget.options import RunOptions
    from seqforget.stream import StopSignal, run_stream

    with StopSignal() as stop:
        run = RunOptions(model_dir=model_dir, dtype=dtype, device=device, checkpointing=checkpointing,
                         show_progress=not quiet, wait=wait, stop=stop)
        tally = run_stream(registry_path, source, run, once=once, poll=poll, log=click.echo)
    ended = f"stopped by {stop.signal}" if stop.signal else "drained"
    click.echo(f"stream {ended}: {tally.applied} applied, {tally.skipped} already done, {tally.rejected} rejected"
               + (f"; {tally.abandoned} abandoned, to be applied by the next start" if tally.abandoned else ""))


@cli.command()
@click.argument("request_id")
@registry_option
@wait_option
def rollback(request_id, registry_path, wait):
    """Take one applied request back, exactly."""
    from seqforget.engine import rollback_request

    rollback_request(registry_path, request_id, wait=wait)
    click.echo(f"rolled back {request_id}")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@registry_option
@model_option
@dtype_option
@device_option
def export(out_dir, registry_path, model_dir, dtype, device):
    """Write the live model (base + active requests) as a transformers model folder."""
    from seqforget.engine import export_model

    path = export_model(registry_path, out_dir, model_dir, dtype, device)
    click.echo(f"exported the live model to {path}")


@cli.command()
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw each request's forget and retain figures, in commit order, into this PNG (needs matplotlib).")
def status(registry_path, as_json, plot):
    """What is applied, active and rolled back."""
    from seqforget.budget import budget_line, running_total
    from seqforget.status import plot_status, status_rows, status_table

    state = Registry.open(registry_path).snapshot()
    rows = status_rows(state)
    if plot is not None:
        plot_status(rows, plot)
    if as_json:
        click.echo(json.dumps({"registry": str(state.root), "base_model": state.base_model, "guard": state.guard,
                               "retained": running_total(state), "requests": rows, "rejected": state.rejected}, indent=2))
        return
    click.echo(f"registry {state.root}")
    click.echo(f"base model {state.base_model['path']}")
    click.echo(budget_line(state))
    active = sum(r["state"] == "active" for r in rows)
    click.echo(f"{len(rows)} request(s), {active} active\n")
    if rows:
        click.echo(status_table(rows))
    if state.rejected:
        click.echo(f"\n{len(state.rejected)} request(s) rejected by a stream:")
        for r in state.rejected:
            click.echo(f"  {r['rejected_at']}  {r['source']}{' (' + r['id'] + ')' if r['id'] else ''}: {r['reason']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
def methods(as_json):
    """List the unlearning methods: scopes, adapter kind, arguments, source."""
    from seqforget.methods import describe
    from seqforget.requests import Training

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for m in rows:
        scopes = ", ".join(s + (" (default)" if s in m["default_for"] else "") for s in m["scopes"])
        budget = {"steps": Training.steps, "lr": Training.lr, **m["budget"]}
        args = ", ".join(f"{a['name']}={a['default']:g}" if "choices" not in a else
                         f"{a['name']}={a['default']} (of {'|'.join(a['choices'])})" for a in m["args"]) or "none"
        click.echo(f"{m['name']}: {m['summary']}\n  scopes: {scopes}\n  adapters: {', '.join(m['adapters'])}"
                   f"{' (subtracted)' if m['sign'] < 0 else ''}\n  budget: {budget['steps']} steps at lr {budget['lr']:g}"
                   f"{'; needs reference rows' if m['needs_reference'] else ''}\n  method_args: {args}\n"
                   + (f"  in a gated registry's {' and '.join(m['gated_scopes'])} requests: "
                      f"{', '.join(f'{k}={v:g}' for k, v in m['gated_args'].items())}\n" if m["gated_args"] and m["gated_scopes"] else "")
                   + f"  source: {m['source']}\n")


@cli.command()
@click.argument("request_id")
@registry_option
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write ID.report.json and ID.report.md into.")
def report(request_id, registry_path, out_dir):
    """Write the record of one deletion (JSON and Markdown): hashes, settings, stopping, figures, times."""
    from seqforget.report import write_report

    for path in write_report(Registry.open(registry_path).snapshot(), request_id, out_dir):
        click.echo(f"wrote {path}")


@cli.command()
@registry_option
@wait_option
def gc(registry_path, wait):
    """Remove what no committed request references (remains of interrupted writes); say how much it freed.

    Rolled-back requests stay: the audit record needs them, and their basis columns still
    protect what they retained."""
    with Registry.open(registry_path).writer(wait=wait, thorough=True) as writer:
        removed = writer.removed
    for path, size in removed:
        click.echo(f"removed {path.relative_to(writer.root)} ({size} bytes)")
    click.echo(f"freed {sum(size for _, size in removed)} bytes in {len(removed)} item(s)")


@cli.command()
@registry_option
def verify(registry_path):
    """Re-hash every committed file and the base model; report damage (exit 5 if any)."""
    from seqforget.models import base_model_problems

    reg = Registry.open(registry_path)
    state = reg.snapshot()
    problems = reg.verify(state) + base_model_problems(state.base_model)
    for leftover in reg.leftovers(state):
        click.echo(f"note: uncommitted {leftover.relative_to(reg.root)}: a write in flight, or the remains of one "
                   f"that was interrupted (`seqforget gc` removes them)")
    if problems:
        for p in problems:
            click.echo(f"damaged: {p}")
        raise RegistryDamaged(f"registry {reg.root} has {len(problems)} problem(s)")
    n = len(state.requests)
    click.echo(f"ok: {n} request(s) and the base model, every file matches its sha256")


def _one_line(e: Exception) -> str:
    known = isinstance(e, (SeqforgetError, RegistryError))
    message = " ".join(str(e).split())
    if known:
        return f"seqforget: error: {message}"
    return f"seqforget: error: {type(e).__name__}: {message} (set SEQFORGET_DEBUG=1 for the traceback)"


main = cli

if __name__ == "__main__":
    main()
