"""The training loop of one request's update, top to bottom.

The request's adapter kind says what trains (seqforget.updates): a PEFT LoRA, a sine residual
or a masked dense delta on the target layers of the live model. Its updates are kept in the
null space of the retained inputs: projected at the start, on every gradient, and again
after every optimiser step (AdamW rescales each coordinate, which would otherwise leave the
null space). A method with a `step_guard` has each step checked on its retain batch: a step
that raises the retain loss by more than the bound is halved, and undone if halving is not
enough (MMUnlearner's guard). With `earlier` switches (seqforget.live.EarlierOff), each step
runs with a fresh random set of the earlier requests' terms switched off, and every check
with all of them on: the model the registry will hold. With `targets_from_base`, the method's
`original()` switches every earlier term off too: its targets come from the base model, while
the stopping rule and the retain guard still start from the live model.
"""

import contextlib
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from registry import Adapter, pause_point
from seqforget.budget import Floor
from seqforget.data import RequestRows
from seqforget.distributed import Group
from seqforget.errors import SeqforgetError
from seqforget.losses import answer_nll
from seqforget.options import RunOptions
from seqforget.progress import Progress
from seqforget.projection import NullSpace
from seqforget.requests import Request
from seqforget.stopping import Stop, Stopping
from seqforget.updates import UPDATES


@dataclass
class Trained:
    adapter: Adapter  # what the model gains: the method's sign is already in its weights
    trajectory: list[dict]  # one record per optimiser step
    stop: Stop  # how training ended
    seconds: float
    step_seconds: float  # of which in the optimiser steps: forward, backward, update, projection


def train_adapter(model, method, request: Request, rows: RequestRows, targets: list[str],
                  nullspaces: dict[str, NullSpace], run: RunOptions = RunOptions(), processes: Group | None = None,
                  earlier=None, guard_start: float | None = None, floor: Floor | None = None, behind=None) -> Trained:
    """Train the method's update for `request` (its training settings) on `model` (left unchanged
    on return) and give back its adapter.

    rows: the request's encoded rows, as the scope means them: forget and retain rows to train on,
    the guard's rows the retain guard watches, reference rows that set the level to stop at
    (seqforget.stopping).
    nullspaces: {module: NullSpace} for the projected layers, or {} for none.
    run: whether to show progress, what to ask once a step whether to stop, and whether to checkpoint
    activations (_attached). processes: the processes sharing each batch (seqforget.distributed), or
    None for this one alone; only the main one shows progress.
    earlier: a seqforget.live.EarlierOff to draw from at every step, or None.
    guard_start: the token accuracy of the guard's rows before training, if already probed.
    floor: what the registry's budget asks of its guard rows at every check (seqforget.budget), or None.
    behind: in a gated registry, a context for the update's LoRA layers ({name: layer}) under which
    they change only the images the request's gate picks (seqforget.gate.Gating.behind); an update
    of another kind trains ungated.
    """
    start = time.perf_counter()
    settings = request.training
    processes = processes or Group()
    processes.check(settings.batch_size)
    torch.manual_seed(settings.seed)
    model.requires_grad_(False)
    update = UPDATES[request.adapter](model, targets, settings, nullspaces)
    net, original = update.model, update.original  # `with original():` runs the model as it was before this request
    if settings.targets_from_base and earlier is not None:
        original = _without(original, earlier)  # ... or as the base model, every earlier request off
    net.eval()
    shown = run.show_progress and processes.main  # the main process speaks for them all
    with (Progress(settings.steps, f"apply {request.id}", shown, stop=run.stop) as progress,
          _attached(model, update, behind, run.checkpointing)):
        method.prepare(net, rows.forget, rows.retain, rows.reference, original, update)
        forget_batches = rows.forget.endless(settings.batch_size, settings.seed)
        retain_batches = rows.retain.endless(settings.batch_size, settings.seed + 1)
        optimizer = torch.optim.AdamW(update.parameters, lr=settings.lr, weight_decay=0.0)
        with torch.no_grad(), update.original():
            stopping = Stopping(net, rows, settings, guard_start, floor)
        stopping.start(update.parameters)
        trajectory, step_seconds = [], 0.0
        bound = method.step_guard
        dropping = earlier is not None and earlier.p > 0  # earlier terms off at random for each step
        net.train()
        for step in range(1, settings.steps + 1):
            began = time.perf_counter()
            if dropping:
                earlier.draw()
            retain_batch = next(retain_batches)
            loss, logs = method.loss(net, processes.share(next(forget_batches)), processes.share(retain_batch), original)
            optimizer.zero_grad(set_to_none=True)
            _refuse_if_unreached(loss, targets)
            loss.backward()
            processes.average(update.parameters)
            if bound is None:
                optimizer.step()
                update.project()
            else:
                logs["step_guard"] = guarded_step(net, update, optimizer, retain_batch, bound)
            step_seconds += time.perf_counter() - began
            trajectory.append({"step": step, "loss": loss.item(), **logs})
            progress.update(loss=loss.item())
            pause_point("training")
            if dropping:
                earlier.all_on()
            if step % settings.check_every == 0 or step == settings.steps:
                net.eval()
                with signed(update.signed, method.sign):  # probe the update the registry will store
                    decision = stopping.check(net, step, update.parameters)
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * decision.lr_scale
                if decision.rolled_back:
                    optimizer.state.clear()  # AdamW's moments would push straight back where the guard undid
                net.train()
                if decision.stop:
                    break
        adapter = update.adapter(method.sign)
    stop = stopping.result()
    del trajectory[stop.step:]  # steps after the kept check were undone by the retain guard (checks say which before it)
    return Trained(adapter, trajectory, stop, time.perf_counter() - start, step_seconds)


def _refuse_if_unreached(loss: torch.Tensor, targets: list[str]) -> None:
    if not loss.requires_grad:
        raise SeqforgetError(f"the method's loss does not depend on the target layers ({', '.join(targets[:3])}"
                             f"{' ...' if len(targets) > 3 else ''}): its rows never reach them, so no weight can change")


@contextmanager
def _attached(model, update, behind, checkpointing: bool):
    """The update's model ready to train: behind its gate (`behind`, LoRA layers only) and, with
    `checkpointing`, the layers' activations recomputed in the backward pass instead of kept
    (transformers' gradient checkpointing: less memory for the same gradients, at about one
    more forward pass's time). On the way out, the update is taken off `model` again."""
    gated = contextlib.ExitStack()
    try:
        if behind is not None and update.kind == "lora":
            gated.enter_context(behind(update.layers))
        if checkpointing:  # after PEFT wrapped the model: wrapping a checkpointed one, it adds input hooks of its own
            _checkpointing_on(model)
        yield
    finally:
        update.model.eval()
        gated.close()
        update.remove()
        if checkpointing:
            model.activation_checkpointing_disable()
            model.disable_input_require_grads()  # enabling made the input embeddings' outputs require grad


@torch.no_grad()
def guarded_step(model, update, optimizer, retain: dict, bound: float) -> str:
    """Take the optimiser's step unless it raises the retain batch's answer NLL by more than
    `bound` (nats per token): then take half of it, or none if half is still too much.
    Returns "taken", "halved" or "undone"."""
    before = [p.detach().clone() for p in update.parameters]
    model.eval()
    start = answer_nll(model, retain).item()
    optimizer.step()
    update.project()
    outcome = "taken"
    if answer_nll(model, retain).item() > start + bound:
        for p, old in zip(update.parameters, before):
            p.copy_(old + 0.5 * (p - old))
        outcome = "halved"
        if answer_nll(model, retain).item() > start + bound:
            for p, old in zip(update.parameters, before):
                p.copy_(old)
            outcome = "undone"
    model.train()
    return outcome


def _checkpointing_on(model) -> None:
    try:
        model.activation_checkpointing_enable({"use_reentrant": False})
    except ValueError as e:
        raise SeqforgetError(f"gradient checkpointing is not available for this model ({e})") from None


def _without(original, earlier):
    """`original`, with every earlier request's term switched off as well: the base model."""
    @contextmanager
    def base():
        with original(), earlier.none():
            yield
    return base


@contextmanager
def signed(parts: list[torch.Tensor], sign: int):
    """The update's signed parts multiplied by `sign` inside the block: what a subtracting method stores."""
    if sign > 0:
        yield
        return
    with torch.no_grad():
        for t in parts:
            t.mul_(-1)
    try:
        yield
    finally:
        with torch.no_grad():
            for t in parts:
                t.mul_(-1)
