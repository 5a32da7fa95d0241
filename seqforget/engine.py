"""What the commands do: init, apply, rollback, export, and the live model they share.

`apply_request` is the recipe of one deletion:

    load and validate the request -> lock the registry -> refuse an id already used
      -> check the base model -> live model (base + active adapters, exact sums; a stream
         keeps one and brings it up to date by differences: seqforget.live)
      -> probe forget/retain before (the pass over the retained rows also gathers their
         inputs' statistics: Gram matrices, or sketches for wide layers) -> extend the null-space bases with them
      -> begin -> in a gated registry, a visual request's gate (seqforget.gate), fitted on its
         forget images' views and set against its retain images
      -> train this request's adapter (behind its gate, if it has one) -> forget/retain after
         (the stopping rule's last check gave most of them)
      -> gather the forget keys: the directions its forget rows send through each target
         layer of the model after it, beyond the retained basis
      -> put adapter, bases, forget keys, gate and records -> commit (the one commit point) -> unlock
"""

import contextlib
import json
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from registry import FORGET_KEYS_FILE, GATE_FILE, Basis, Registry, Snapshot, new_folder, sha256_file
from seqforget import data
from seqforget.activations import InputStats
from seqforget.budget import BUDGET, Floor, floor, guard_record, read_guard, refuse_if_below
from seqforget.composition import changes
from seqforget.conditioning import IMAGES, projector_condition, projector_name
from seqforget.distributed import Group, held_bytes, registry_writer
from seqforget.errors import AlreadyDone, OverBudget, SeqforgetError
from seqforget.evaluation import probe
from seqforget.gate import VIEWS, Gate, fit, image_features, views_features
from seqforget.live import Live, registry_device, registry_gated
from seqforget.losses import model_inputs
from seqforget.methods import make_method
from seqforget.models import (check_device, device_of, load_model, model_sha256, model_signature, torch_device,
                              torch_dtype)
from seqforget.options import RunOptions
from seqforget.projection import Factor, NullSpace, Sketch, extend_basis
from seqforget.requests import Request, load_request, parse_request
from seqforget.scopes import ARCHITECTURES, SCOPES, match_layers, scope_layers
from seqforget.stopping import Stop, kept_check, refusal_figures, row_kind, stranger_rows
from seqforget.training import train_adapter
from seqforget.updates import UPDATES

def init_registry(root: Path, model_dir: Path, default_retain: Path | None = None,
                  default_reference: Path | None = None, dtype: str = "float32", device: str = "auto",
                  guard: Path | None = None, budget: float = BUDGET, gated: bool = False) -> Registry:
    """A new registry bound to the model in `model_dir`, fingerprinted once, here; requests that
    name no retain or reference rows use the defaults given here. `dtype`: the precision the
    live model is loaded, trained and composed in (seqforget.models.DTYPES); `device`: where it
    runs (seqforget.models.DEVICES). `guard`: rows about what must stay, on which no request may
    take the model below `budget` times the base model's exact answers (seqforget.budget); the
    base model answers them here, once. `gated`: visual requests' terms apply only to the images
    their gates pick (seqforget.gate)."""
    model_dir = Path(model_dir).absolute()
    torch_dtype(dtype)  # an unknown name is refused before anything is written
    check_device(device)
    base = {"path": str(model_dir), "sha256": model_sha256(model_dir), "signature": model_signature(model_dir),
            "dtype": dtype, "device": device, **({"gated": True} if gated else {})}
    if gated:
        _check_gateable(model_dir)
    retain, reference = _default_rows(default_retain, "retain"), _default_rows(default_reference, "reference")
    kept = None
    if guard is not None:
        guard = Path(guard).absolute()
        rows = read_guard(guard)
        model, processor = load_model(model_dir, dtype, device)
        kept = guard_record(guard, sha256_file(guard), rows, budget, model, data.Encoder(processor),
                            processor.tokenizer.pad_token_id)
    return Registry.create(root, base_model=base, default_retain=retain, default_reference=reference, guard=kept)


def _check_gateable(model_dir: Path) -> None:
    """A gated registry needs a model whose vision tower seqforget knows (seqforget.scopes.ARCHITECTURES)."""
    from transformers import AutoConfig

    kind = AutoConfig.from_pretrained(model_dir).model_type
    if kind not in ARCHITECTURES:
        raise SeqforgetError(f"a gated registry needs a model whose vision tower seqforget knows "
                             f"({', '.join(ARCHITECTURES)}); {model_dir} holds a {kind}")


def _default_rows(path: Path | None, label: str) -> dict | None:
    if path is None:
        return None
    path = Path(path).absolute()
    problems: list[str] = []
    rows = data.read_rows(path, problems, label)
    if problems:
        raise SeqforgetError(f"invalid default {label} set: {'; '.join(problems[:12])}")
    return {"path": str(path), "sha256": sha256_file(path), "rows": len(rows)}


def base_model_dir(state: Snapshot, model_dir: Path | None = None) -> Path:
    """The base model's folder, after checking its signature against the one taken at `init`."""
    path = Path(model_dir).absolute() if model_dir else Path(state.base_model["path"])
    if not path.is_dir():
        raise SeqforgetError(f"the registry's base model folder {path} is missing (pass --model if it moved)")
    if model_signature(path) != state.base_model["signature"]:
        raise SeqforgetError(f"model folder {path} does not match the registry's base model (signature differs)")
    return path


def live_model(state: Snapshot, model_dir: Path | None = None, dtype: str | None = None, device: str | None = None):
    """(model, processor): the base model with every request active in `state` composed in,
    in `dtype` on `device` (default: the registry's)."""
    live = Live.load(state, base_model_dir(state, model_dir), dtype, device)
    return live.model, live.processor


def apply_request(root: Path, request: Path | Request, run: RunOptions = RunOptions(), live: Live | None = None,
                  source: dict | None = None, **options) -> dict:
    """Apply one deletion request (a request file, or one `read_request` read) and commit it;
    return its manifest entry. `run`: how to run it (seqforget.options.RunOptions); keyword
    `options` set single fields of it, e.g. show_progress=False. When `run.stop` says so during
    training, the request is abandoned (seqforget.errors.Stopped) and nothing commits. `live`: a
    live model of this registry to use and keep up to date (a stream's), instead of loading one
    (`run`'s model_dir, dtype and device then have no effect). `source`: where a stream read the
    request ({"source", "digest"}), kept in the entry."""
    run = replace(run, **options)
    reg = Registry.open(root)
    if not isinstance(request, Request):
        request = read_request(reg.snapshot(), request)
    method = make_method(request.method, request.method_args)
    group = Group(run.shard)  # several processes under torchrun or accelerate: only the main one writes
    with registry_writer(reg, group, run.wait) as writer:  # the processes meet at its barriers (seqforget.distributed)
        state = writer.snapshot()
        _refuse_if_present(state, request)
        if live is None:
            live = group.in_turn(lambda: _load_live(state, run, group, request, method))
        else:
            live.sync(state)
        model, processor = live.model, live.processor
        targets = _targets(request, method, model, registry_gated(state))
        rows = _encode(request, processor, live.encoder)
        keep = _floor(state, request, live.encoder, processor.tokenizer.pad_token_id)
        start = time.perf_counter()
        _reset_peak_rss()
        bases = live.bases(state)
        retained = InputStats(model, targets, request.training.sketch_rank)  # the guard's rows are retained inputs too
        before = _probes(model, rows, retained, keep)
        if keep is not None:
            refuse_if_below(keep, before["registry_guard"]["exact"], request.id)
        grown = time.perf_counter()
        added, growth = _grow_bases(model, retained, targets, bases, request)
        basis_seconds = time.perf_counter() - grown
        nullspaces = _nullspaces(request, targets, bases, added, _held(request, live, state))
        with writer.begin(request.id, method=request.method, scope=request.scope) as txn:
            adapter, gate, metrics = _unlearn(live, method, request, before, rows, targets, nullspaces, run, group, keep)
            keys, metrics["forget_keys"] = _forget_keys(model, rows.forget, targets, bases, added, request)
            metrics["room"] = _room(model, targets, nullspaces)
            metrics.update(basis=growth, seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(),
                           dtype=str(model.dtype).removeprefix("torch."), device=str(device_of(model)),
                           processes={"count": group.world, "sharded": group.sharded,
                                      "weights_mb": held_bytes(model) / 2**20})
            txn.put_adapter(adapter)
            metrics.update(basis_seconds=basis_seconds, basis_bytes=txn.put_bases(added),
                           forget_keys_bytes=txn.put_bases(keys, FORGET_KEYS_FILE))
            if gate is not None:
                metrics["gate"]["bytes"] = txn.put_arrays(GATE_FILE, gate.arrays())
            txn.put_record("request.json", request.describe())
            txn.put_record("metrics.json", metrics)
            entry = txn.commit({"state": "active", "method": request.method, "scope": request.scope, "sign": method.sign,
                                "sha256": request.sha256(), "partial": not metrics["stop"]["reached"],
                                "metrics": _summary(metrics, state.guard), **({"stream": source} if source else {})})
        live.commit(_pending_key(request), entry)
        return entry


def _load_live(state: Snapshot, run: RunOptions, group: Group, request: Request, method) -> Live:
    """The live model for a request; with the group's weights sharded, composed whole on the CPU,
    then split, the request's target layers whole if its update needs them so."""
    if not group.sharded:
        return Live.load(state, base_model_dir(state, run.model_dir), run.dtype, run.device)
    if registry_gated(state):
        raise SeqforgetError("a gated registry's model cannot be sharded across processes; run without --shard")
    live = Live.load(state, base_model_dir(state, run.model_dir), run.dtype, "cpu")
    targets = _targets(request, method, live.model, gated=False)
    live.shard(group, torch_device(run.device or registry_device(state)),
               keep=targets if UPDATES[request.adapter].whole_layers else ())
    return live


def rollback_request(root: Path, request_id: str, wait: bool = True) -> dict:
    """Mark a request rolled back: the live model is the base plus the requests still active.
    Unknown ids and requests already rolled back are refused by the registry."""
    with Registry.open(root).writer(wait=wait) as writer:
        entry = writer.snapshot().find(request_id)
        if entry is not None and entry["state"] == "rolled_back":
            raise AlreadyDone(f"request {request_id} is already rolled back; nothing to do")
        return writer.set_state(request_id, "rolled_back")


def export_model(root: Path, out_dir: Path, model_dir: Path | None = None, dtype: str | None = None,
                 device: str | None = None) -> Path:
    """Write the live model (base + active requests) as a transformers model folder, all at once,
    in `dtype` (default: the registry's), composed on `device` (default: the registry's)."""
    state = Registry.open(root).snapshot()
    if any(GATE_FILE in e["files"] for e in state.active):
        raise SeqforgetError("this registry is gated: its visual requests change only the images their gates pick, "
                             "which a transformers folder cannot hold; serve it with seqforget.engine.live_model")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SeqforgetError(f"{out_dir} already exists and is not an empty folder")
    model, processor = live_model(state, model_dir, dtype, device)
    with new_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        provenance = {"registry": str(state.root), "base_model": state.base_model,
                      "active_requests": [e["id"] for e in state.active]}
        (tmp / "seqforget.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir


# ---- the steps of apply ---------------------------------------------------------------------


def read_request(state: Snapshot, request_path: Path, raw: dict | None = None, source: str | None = None) -> Request:
    """The request in `request_path` (or the mapping `raw` read from it, e.g. a JSONL line, named
    `source`), with the registry's default retain and reference sets where it names none, and a
    gated registry's defaults (seqforget.scopes.Gated) where it sets none of its own."""
    retain, reference = state.default_retain, state.default_reference
    defaults = {"default_retain": retain["path"] if retain else None,
                "default_reference": reference["path"] if reference else None, "gated": registry_gated(state)}
    request = (load_request(request_path, **defaults) if raw is None else
               parse_request(raw, request_path, source or str(request_path), **defaults))
    for label, default, path in (("retain", retain, request.retain_path), ("reference", reference, request.reference_path)):
        if default and path == Path(default["path"]) and request.data_sha256[label] != default["sha256"]:
            raise SeqforgetError(f"the default {label} set {path} changed since `seqforget init`")
    return request


def _refuse_if_present(state: Snapshot, request: Request) -> None:
    existing = state.find(request.id)
    if existing is None:
        return
    if existing.get("sha256") != request.sha256():
        raise SeqforgetError(f"request id {request.id} is already used by a different request; choose a new id")
    if existing["state"] == "active":
        raise AlreadyDone(f"request {request.id} is already applied and active; nothing to do")
    raise SeqforgetError(f"request {request.id} was applied and then rolled back; to apply it again, give it a new id")


def _targets(request: Request, method, model, gated: bool) -> list[str]:
    """The layers this request trains: those it names (every pattern must match at least one),
    else the method's own, else its adapter kind's, else, in a gated registry (`gated`), its
    scope's `Gated` layers, else its scope's."""
    if not request.target_modules:
        behind = SCOPES[request.scope].gated if gated else None
        roles = method.layers or UPDATES[request.adapter].roles or (behind.layers if behind else None)
        return scope_layers(model, request.scope, roles)
    unmatched = [p for p in request.target_modules if not match_layers(model, [p])]
    if unmatched:
        raise SeqforgetError(f"request {request.id}: no linear layer of the model matches {', '.join(unmatched)}")
    return match_layers(model, request.target_modules)


def _floor(state: Snapshot, request: Request, encoder: data.Encoder, pad: int) -> Floor | None:
    """What the registry's budget asks of this request (seqforget.budget); None without one.
    The guard rows must be those the budget was measured on, and none of them may be a row
    the request asks to forget."""
    guard = state.guard
    if guard is None:
        return None
    path = Path(guard["path"])
    if not path.is_file() or sha256_file(path) != guard["sha256"]:
        raise SeqforgetError(f"the registry's guard set {path} is missing or changed since `seqforget init`")
    rows = read_guard(path)
    asked = {(r.question, r.answer, r.image) for r in request.forget}
    both = sum((r.question, r.answer, r.image) in asked for r in rows)
    if both:
        raise SeqforgetError(f"request {request.id} asks to forget {both} of the registry's guard rows, which the "
                             f"registry keeps by its budget; the guard set must hold only what stays")
    return floor(guard, data.Rows([encoder(r) for r in rows], pad))


REFUSAL_HELD_OUT = 0.25  # share of a refuse request's forget images kept out of training: its stopping rule's unseen views


def _encode(request: Request, processor, encoder: data.Encoder) -> data.RequestRows:
    """Forget, retain, guard and reference rows as the scope means them: a `visual` request
    keeps text-only knowledge (those forget rows join the retain set, and only image rows of the
    reference count); a `refuse` request trains its forget rows towards the refusal, but for a
    share of its images (REFUSAL_HELD_OUT), whose rows its stopping rule checks. The guard
    rows are the share of the request's retain rows (whole images) that the loss never sees:
    the retain guard watches them, as it would watch retained data the request did not bring.
    None when the share is 0, or when they hold too few answer tokens for one wrong token to
    stay within a `retain_tolerance` above 0 (the guard then watches the trained rows)."""
    scope = SCOPES[request.scope]
    forget, reference = list(request.forget), list(request.reference)
    retain, guard = data.hold_out(list(request.retain), request.training.guard_share)
    if not scope.forgets_text_rows:
        retain += [r for r in forget if r.image is None]
        forget = [r for r in forget if r.image is not None]
        reference = [r for r in reference if r.image is not None]
    reference, stands_for = stranger_rows(forget, reference) if not scope.answers_refusal else ([], [])
    answer = request.refusal if scope.answers_refusal else None
    held: list[data.Row] = []  # a refusal's check: some of its forget images, kept out of training
    if answer is not None and len({r.image for r in forget if r.image is not None}) > 1:
        images, held = data.hold_out([r for r in forget if r.image is not None], REFUSAL_HELD_OUT)
        forget = images + [r for r in forget if r.image is None]
    pad = processor.tokenizer.pad_token_id
    try:
        encoder.next_request()
        own = [encoder(r) for r in forget] if answer is not None else None
        checked = data.Rows([encoder(r, answer) for r in held], pad) if held else None
        forget, retain, guard, reference = (data.Rows([encoder(r, answer) for r in forget], pad, own_answers=own,
                                                      held_out=checked, kinds=[row_kind(r) for r in forget]),
                                            data.Rows([encoder(r) for r in retain], pad),
                                            data.Rows([encoder(r) for r in guard], pad),
                                            data.Rows([encoder(r) for r in reference], pad, stands_for=stands_for))
    except (ValueError, OSError) as e:
        raise SeqforgetError(f"request {request.id}: the model's processor cannot encode its rows ({e})") from e
    tolerance = request.training.retain_tolerance
    if 0 < tolerance and guard.answer_tokens * tolerance < 1:
        retain, guard = data.Rows(retain.examples + guard.examples, pad), data.Rows([], pad)
    return data.RequestRows(forget, retain, guard if len(guard) else None, reference if len(reference) else None)


def _unlearn(live: Live, method, request: Request, before: dict, rows: data.RequestRows, targets: list[str],
             nullspaces: dict[str, NullSpace], run: RunOptions, group: Group, keep: Floor | None = None):
    """Train the adapter under the null spaces, probe after (`before`: the probes before):
    (adapter, gate, metrics). The live model ends with the adapter composed in (in a gated
    registry, a visual request's behind its gate), pending until the request commits.
    `keep`: the registry budget's floor, which every check must hold."""
    settings = request.training
    model = live.model
    if live.gating is not None and run.checkpointing:
        raise SeqforgetError("gradient checkpointing is not offered in a gated registry: it recomputes the vision "
                             "tower's layers after their gates' picks are gone; apply without it")
    gate, gate_figures = None, None
    if live.gating is not None and request.scope == "visual":
        live.gating.refuse_rows_unknown(targets)
        gate, gate_figures = _gate(live, rows.forget, rows.retain, settings.seed)  # the request trains behind it
    earlier = (live.earlier_off(settings.earlier_dropout, settings.seed)
               if settings.earlier_dropout > 0 or settings.targets_from_base else None)
    try:
        trained = train_adapter(model, method, request, rows, targets, nullspaces, run, group, earlier,
                                guard_start=before["guard" if rows.guard is not None else "retain"]["token_acc"],
                                floor=keep, behind=(lambda layers: live.gating.behind(gate, layers)) if gate is not None else None)
    finally:
        if earlier is not None:
            earlier.remove()
    _refuse_if_diverged(request, trained.adapter)
    _refuse_if_short(request, trained.stop, keep)
    _refuse_if_unchanged(request, trained.adapter)
    live.add(_pending_key(request), trained.adapter, gate)
    after = _after(model, trained, before, rows)
    guard = rows.guard
    metrics = {"before": before, "after": after,
               "rows": {"forget": len(rows.forget), "retain": len(rows.retain), "guard": len(guard) if guard else 0,
                        "guard_tokens": guard.answer_tokens if guard else 0},
               "targets": len(targets), "projection": settings.projection and UPDATES[request.adapter].projected,
               "stop": {**trained.stop.record(), "reached": trained.stop.reached}, "gradient_checkpointing": run.checkpointing,
               "trajectory": trained.trajectory, "train_seconds": trained.seconds, "step_seconds": trained.step_seconds,
               **({"gate": gate_figures} if gate is not None else {})}
    return trained.adapter, gate, metrics


def _gate(live: Live, forget: data.Rows, retain: data.Rows, seed: int) -> tuple[Gate, dict]:
    """The request's gate: fitted on its forget images and VIEWS random views of each, its
    threshold set against its retain images; and its figures (seqforget.gate.fit)."""
    return fit(views_features(live.gating, _images(forget), VIEWS, seed), image_features(live.gating, _images(retain)))


def _images(rows: data.Rows, most: int | None = None) -> list[torch.Tensor]:
    """The distinct images of the rows, in order (a forget set asks several questions of each)."""
    images: list[torch.Tensor] = []
    for e in rows.examples:
        if e.pixel_values is not None and not any(torch.equal(e.pixel_values, seen) for seen in images):
            images.append(e.pixel_values)
            if most is not None and len(images) >= most:
                break
    return images


def _pending_key(request: Request) -> str:
    return f"pending:{request.id}"


def _grow_bases(model, retained: InputStats, targets: list[str], bases: dict[str, Basis], request: Request):
    """The basis columns this request adds per target layer, and how much they capture, from the
    statistics of its retained inputs. Layers that read the same input and have the same
    basis so far share their new columns (one Basis object, stored once)."""
    layers = dict(model.named_modules())
    for name in targets:
        if name in bases and bases[name].dim != layers[name].in_features:
            raise SeqforgetError(f"stored basis of {name} does not fit the model's layer")
    groups: dict[str, list[str]] = {}
    for name in targets:
        leader = retained.leader.get(name, name)
        lead = leader if bases.get(leader) is bases.get(name) else name  # histories that differ stay apart
        groups.setdefault(lead, []).append(name)
    threshold = request.training.energy_threshold
    added, growth = {}, {}
    for lead, members in groups.items():
        stats = retained.stats(lead)
        part, before, after = extend_basis(bases.get(lead), stats, threshold, request.id)
        for name in members:
            added[name] = part
            growth[name] = {"columns_before": bases[name].rank if name in bases else 0, "columns_added": part.rank,
                            "captured_before": before, "captured_after": after, "shares_with": lead,
                            "sketched": isinstance(stats, Sketch)}
    return added, growth


def _joined(targets: list[str], bases: dict[str, Basis], added: dict[str, Basis]) -> dict[str, Basis]:
    """Each target's basis with this request's columns; layers that shared both share the join."""
    shared: dict[tuple[int, int], Basis] = {}
    joined = {}
    for name in targets:
        key = (id(bases.get(name)), id(added[name]))
        if key not in shared:
            shared[key] = bases[name].join(added[name]) if name in bases else added[name]
        joined[name] = shared[key]
    return joined


def _forget_keys(model, forget: data.Rows, targets: list[str], bases: dict[str, Basis], added: dict[str, Basis],
                 request: Request) -> tuple[dict[str, Basis], dict]:
    """The request's forget keys and how much they capture: per target layer, the directions its
    forget rows send through it under the model after the request, beyond the retained basis (this
    request's columns included), grown to the basis's energy threshold. They are what a later
    request with keep_forgotten holds still. A subspace per layer, d x k, never the rows."""
    with torch.no_grad(), InputStats(model, targets, request.training.sketch_rank) as stats:
        for batch in forget.fixed:
            model(**model_inputs(model, batch))
    return _grow_bases(model, stats, targets, _joined(targets, bases, added), request)


def _held(request: Request, live: Live, state: Snapshot) -> dict[str, list[Factor]]:
    """Per layer, what the request's update must leave alone besides the retained inputs: the
    forget keys of every earlier active request (keep_forgotten), and the input directions of
    their terms (apart_from_earlier)."""
    held: dict[str, list[Factor]] = {}
    if request.training.keep_forgotten:
        for layer, keys in live.forget_keys(state).items():
            held.setdefault(layer, []).append(Factor.of(keys))
    if request.training.apart_from_earlier:
        for layer, factors in live.term_inputs().items():
            held.setdefault(layer, []).extend(Factor(f) for f in factors)
    return held


def _nullspaces(request: Request, targets: list[str], bases: dict[str, Basis], added: dict[str, Basis],
                held: dict[str, list[Factor]] | None = None) -> dict[str, NullSpace]:
    """Per target, the null space of its retained basis (this request's columns included) and
    of what `held` gives for it (_held): joined to the retained basis where it leaves it, to
    within 1e-3 of its energy, each part weighing the same."""
    if not request.training.projection:
        return {}
    held = held or {}
    joined = _joined(targets, bases, added)
    shared: dict[tuple, NullSpace] = {}  # layers that share their basis, and hold nothing more, share the null space
    nullspaces = {}
    for name in targets:
        parts = [f for f in held.get(name, []) if f.total > 0]
        key = (id(joined[name]), name if parts else None)
        if key not in shared:
            basis = joined[name]
            if parts:
                unit = Factor(torch.cat([f.factor() / f.total ** 0.5 for f in parts], dim=1))
                basis = basis.join(extend_basis(basis, unit, 1 - 1e-3, "held")[0])
            shared[key] = NullSpace(basis)
        if shared[key].rank:
            nullspaces[name] = shared[key]
    if len(nullspaces) == len(targets) and all(ns.rank >= ns.dim for ns in nullspaces.values()):
        what = "retained inputs and what earlier requests hold" if held else "retained inputs"
        raise SeqforgetError(f"request {request.id}: {what} fill every target layer's input space, so nothing "
                             f"can move; lower energy_threshold (now {request.training.energy_threshold})")
    return nullspaces


def _room(model, targets: list[str], nullspaces: dict[str, NullSpace]) -> dict[str, dict]:
    """Per target layer, its input width and the input directions its update was free to use:
    those outside the null space's basis (all of them without projection)."""
    layers = dict(model.named_modules())
    return {name: {"width": layers[name].in_features,
                   "free": layers[name].in_features - (nullspaces[name].rank if name in nullspaces else 0)}
            for name in targets}


def _probes(model, rows: data.RequestRows, retained: InputStats | None = None, keep: Floor | None = None) -> dict:
    """Forget, retain and guard figures, the registry's guard rows' (with `keep`), and the
    projector's condition. `retained`: gathers the statistics of the retained rows' inputs
    while they are probed (forget rows are not, nor the registry's guard rows: the budget
    watches the model on them, and protecting them would only hide what it costs elsewhere)."""
    with retained or contextlib.nullcontext():
        out = {"retain": probe(model, rows.retain.fixed)}
        if rows.guard is not None:
            out["guard"] = probe(model, rows.guard.fixed)
    if keep is not None:
        out["registry_guard"] = probe(model, keep.rows.fixed)
    out["forget"] = probe(model, rows.forget.fixed)
    out["projector_condition"] = _projector_condition(model, rows.forget, rows.retain)
    return out


def _after(model, trained, before: dict, rows: data.RequestRows) -> dict:
    """The figures after training, as `_probes` gives them. The stopping rule probed the forget
    rows and the guard's rows (the retain rows when there is no guard) on the very adapter kept,
    at its check (none kept: the model as before); only what no check saw is probed again, and
    the projector's condition only if the adapter changed the projector."""
    stop = trained.stop
    kept = stop.kept
    seen = {"forget": before["forget"], "guard": before.get("guard", before["retain"])} if kept is None else kept
    after = {"forget": seen["forget"]}
    if "registry_guard" in before:
        after["registry_guard"] = {"exact": kept["retained"] if kept is not None else before["registry_guard"]["exact"]}
    if rows.guard is not None:
        after["retain"], after["guard"] = probe(model, rows.retain.fixed), seen["guard"]
    else:
        after["retain"] = seen["guard"]
    projector = projector_name(model)
    moved = projector is not None and any(t.startswith(projector + ".") for t in trained.adapter.modules)
    after["projector_condition"] = (_projector_condition(model, rows.forget, rows.retain) if moved
                                    else before["projector_condition"])
    return after


def _projector_condition(model, forget: data.Rows, retain: data.Rows) -> float | None:
    """The projector's condition (seqforget.conditioning) at the first distinct images of the rows."""
    images = (_images(forget, IMAGES) + _images(retain, IMAGES))[:IMAGES]
    return projector_condition(model, torch.stack(images)) if images else None


def _refuse_if_diverged(request: Request, adapter) -> None:
    if not all(torch.isfinite(torch.from_numpy(w)).all() for parts in adapter.weights.values() for w in parts.values()):
        raise SeqforgetError(f"request {request.id}: training diverged (non-finite adapter weights); lower lr")


def _refuse_if_unchanged(request: Request, adapter) -> None:
    """An update that moves no weight (its rows never reach the target layers, a mask freed
    nothing, the guards undid every step) is not a deletion, partial or not."""
    if any(changes(adapter, module) for module in adapter.modules):
        return
    raise SeqforgetError(f"request {request.id} changed no weight: its update is zero on every target layer (do its rows "
                         f"reach {', '.join(adapter.modules[:3])}{' ...' if len(adapter.modules) > 3 else ''}? did the "
                         f"guards undo every step?). Nothing was committed")


def _refuse_if_short(request: Request, stop: Stop, keep: Floor | None = None) -> None:
    """A request that did not reach its level is not committed silently; one that the registry's
    budget stopped is refused with its own exit status, partial or not if it kept no step."""
    if stop.reached or (request.partial and not (stop.reason == "registry_guard" and stop.step == 0)):
        return
    why = stop.shortfall(request.training.steps, request.training.retain_tolerance, keep, request.training.known_limit)
    if stop.reason == "registry_guard":
        raise OverBudget(f"request {request.id} {why}. Nothing was committed: "
                         + ("lower its lr, or roll back an earlier request" if stop.kept is None else
                            "set partial: true to commit that step, or roll back an earlier request"))
    raise SeqforgetError(f"request {request.id} {why}. Nothing was committed: raise steps or lr, or set partial: true "
                         f"to commit it as it is")


def _summary(metrics: dict, guard: dict | None = None) -> dict:
    """The figures the manifest keeps for `status`: before -> after of each probe, and the stop;
    with the registry's `guard`, its exact answers before and after, the base's and the budget."""
    before, after, stop = metrics["before"], metrics["after"], metrics["stop"]
    return {
        **({"retained": {"before": before["registry_guard"]["exact"], "after": after["registry_guard"]["exact"],
                         "base": guard["base"]["exact"], "budget": guard["budget"]}} if guard else {}),
        "forget_nll": [before["forget"]["nll"], after["forget"]["nll"]],
        "forget_median_nll": [before["forget"]["median_nll"], after["forget"]["median_nll"]],
        "retain_nll": [before["retain"]["nll"], after["retain"]["nll"]],
        "forget_acc": [before["forget"]["token_acc"], after["forget"]["token_acc"]],
        "retain_acc": [before["retain"]["token_acc"], after["retain"]["token_acc"]],
        "held_out_retain_acc": [before["guard"]["token_acc"], after["guard"]["token_acc"]] if "guard" in before else None,
        "projector_condition": [before.get("projector_condition"), after.get("projector_condition")],
        "reference_nll": stop["reference"]["median_nll"] if stop["reference"] else None,
        "known": _known(stop),
        "kinds": _kinds(stop),
        "refusal": refusal_figures(stop["checks"], stop["step"]),
        "stop": {"rule": stop["rule"], "reason": stop["reason"], "step": stop["step"]},
        "basis": {"columns_added": sum(g["columns_added"] for lead, g in metrics["basis"].items() if g["shares_with"] == lead),
                  "bytes": metrics["basis_bytes"], "seconds": round(metrics["basis_seconds"], 3)},
        "room": min(([g["free"], g["width"], name] for name, g in metrics["room"].items()), default=None),
        **({"gate": {"retain_picked": metrics["gate"]["retain_picked"]}} if "gate" in metrics else {}),
        "steps": stop["step"],
        "seconds": round(metrics["seconds"], 2),
    }


def _known(stop: dict) -> list[float] | None:
    """How well the forget rows could be told from strangers (seqforget.stopping.known_share)
    before training and at the check kept; None without reference rows."""
    reference = stop["reference"]
    if not reference or "known_before" not in reference:
        return None
    kept = kept_check(stop["checks"], stop["step"])
    return [reference["known_before"], kept["forget"]["known"] if kept else reference["known_before"]]


def _kinds(stop: dict) -> dict | None:
    """Per kind of forget question (seqforget.stopping.by_kind): its rows, how well they could be
    told from strangers and the share still answered as before, before training and at the check
    kept; None without reference rows."""
    reference = stop["reference"]
    if not reference or "kinds_before" not in reference:
        return None
    kept = kept_check(stop["checks"], stop["step"])
    after = kept["forget"]["kinds"] if kept else reference["kinds_before"]
    return {kind: {"rows": b["rows"], "known": [b["known"], after[kind]["known"]],
                   "answered": [b["answered"], after[kind]["answered"]]} for kind, b in reference["kinds_before"].items()}


def _reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak resident memory since the last reset (Linux), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
