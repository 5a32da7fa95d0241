"""What the commands do: init, apply, rollback, export, and the live model they share.

`apply_request` is the recipe of one deletion:

    load and validate the request -> lock the registry -> refuse an id already used
      -> check the base model -> live model (base + active adapters, explicit products)
      -> begin -> extend the null-space bases with the retained inputs
      -> train this request's adapter -> probe forget/retain before and after
      -> put adapter, bases and records -> commit (the one commit point) -> unlock
"""

import json
import resource
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from registry import Basis, Registry, Snapshot, new_folder, sha256_file
from seqforget import data
from seqforget.activations import input_grams
from seqforget.composition import compose
from seqforget.errors import AlreadyApplied, SeqforgetError
from seqforget.evaluation import probe
from seqforget.methods import make_method
from seqforget.models import load_model, model_sha256, model_signature
from seqforget.progress import Progress
from seqforget.projection import NullSpace, extend_basis
from seqforget.requests import Request, load_request
from seqforget.scopes import SCOPES, match_layers, scope_layers
from seqforget.training import train_adapter

EVAL_BATCH = 16


def init_registry(root: Path, model_dir: Path, default_retain: Path | None = None) -> Registry:
    """A new registry bound to the model in `model_dir`, fingerprinted once, here."""
    model_dir = Path(model_dir).absolute()
    base = {"path": str(model_dir), "sha256": model_sha256(model_dir), "signature": model_signature(model_dir)}
    retain = None
    if default_retain is not None:
        problems: list[str] = []
        rows = data.read_rows(Path(default_retain).absolute(), problems, "retain")
        if problems:
            raise SeqforgetError(f"invalid default retain set: {'; '.join(problems[:12])}")
        retain = {"path": str(Path(default_retain).absolute()), "sha256": sha256_file(default_retain), "rows": len(rows)}
    return Registry.create(root, base_model=base, default_retain=retain)


def base_model_dir(state: Snapshot, model_dir: Path | None = None) -> Path:
    """The base model's folder, after checking its signature against the one taken at `init`."""
    path = Path(model_dir).absolute() if model_dir else Path(state.base_model["path"])
    if not path.is_dir():
        raise SeqforgetError(f"the registry's base model folder {path} is missing (pass --model if it moved)")
    if model_signature(path) != state.base_model["signature"]:
        raise SeqforgetError(f"model folder {path} does not match the registry's base model (signature differs)")
    return path


def live_model(state: Snapshot, model_dir: Path | None = None):
    """(model, processor): the base model with every request active in `state` composed in."""
    path = base_model_dir(state, model_dir)
    adapters = [state.adapter(e) for e in state.active]
    model, processor = load_model(path)
    compose(model, adapters)
    return model, processor


def apply_request(root: Path, request_path: Path, model_dir: Path | None = None, show_progress: bool = True,
                  wait: bool = True) -> dict:
    """Apply one deletion request and commit it; return its manifest entry."""
    reg = Registry.open(root)
    request = _load(reg.snapshot(), request_path)
    method = make_method(request.method, request.method_args)
    with reg.writer(wait=wait) as writer:
        state = writer.snapshot()
        _refuse_if_present(state, request)
        model, processor = live_model(state, model_dir)
        targets = _targets(request, model)
        forget, retain = _encode(request, processor)
        bases = state.bases()
        with writer.begin(request.id, method=request.method, scope=request.scope) as txn:
            adapter, added, metrics = _unlearn(model, method, request, forget, retain, targets, bases, show_progress)
            txn.put_adapter(adapter)
            txn.put_bases(added)
            txn.put_record("request.json", request.describe())
            txn.put_record("metrics.json", metrics)
            return txn.commit({"state": "active", "method": request.method, "scope": request.scope, "sign": method.sign,
                               "sha256": request.sha256(), "metrics": _summary(metrics, request)})


def rollback_request(root: Path, request_id: str, wait: bool = True) -> dict:
    """Mark a request rolled back: the live model is the base plus the requests still active.
    Unknown ids and requests already rolled back are refused by the registry."""
    with Registry.open(root).writer(wait=wait) as writer:
        return writer.set_state(request_id, "rolled_back")


def export_model(root: Path, out_dir: Path, model_dir: Path | None = None) -> Path:
    """Write the live model (base + active requests) as a transformers model folder, all at once."""
    state = Registry.open(root).snapshot()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SeqforgetError(f"{out_dir} already exists and is not an empty folder")
    model, processor = live_model(state, model_dir)
    with new_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        provenance = {"registry": str(state.root), "base_model": state.base_model,
                      "active_requests": [e["id"] for e in state.active]}
        (tmp / "seqforget.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir


# ---- the steps of apply ---------------------------------------------------------------------


@dataclass
class _Rows:
    """Encoded rows of one side (forget or retain), and fixed batches of them for probing."""

    examples: list[data.Example]
    pad_id: int

    @cached_property
    def fixed(self) -> list[dict]:
        return data.batches(self.examples, EVAL_BATCH, self.pad_id)

    def endless(self, settings, offset: int):
        return data.endless(self.examples, settings.batch_size, self.pad_id, settings.seed + offset)


def _load(state: Snapshot, request_path: Path) -> Request:
    default = state.default_retain
    request = load_request(request_path, default_retain=default["path"] if default else None)
    if default and request.retain_path == Path(default["path"]) and request.data_sha256["retain"] != default["sha256"]:
        raise SeqforgetError(f"the default retain set {request.retain_path} changed since `seqforget init`")
    return request


def _refuse_if_present(state: Snapshot, request: Request) -> None:
    existing = state.find(request.id)
    if existing is None:
        return
    if existing.get("sha256") == request.sha256():
        raise AlreadyApplied(f"request {request.id} is already in the registry ({existing['state'].replace('_', ' ')}); nothing to do")
    raise SeqforgetError(f"request id {request.id} is already used by a different request; choose a new id")


def _targets(request: Request, model) -> list[str]:
    """The layers this request trains; every pattern it names must match at least one."""
    if not request.target_modules:
        return scope_layers(model, request.scope)
    unmatched = [p for p in request.target_modules if not match_layers(model, [p])]
    if unmatched:
        raise SeqforgetError(f"request {request.id}: no linear layer of the model matches {', '.join(unmatched)}")
    return match_layers(model, request.target_modules)


def _encode(request: Request, processor) -> tuple[_Rows, _Rows]:
    """Forget and retain rows as the scope means them: a `visual` request keeps text-only
    knowledge (those forget rows join the retain set); a `refuse` request trains its forget
    rows towards the refusal."""
    scope = SCOPES[request.scope]
    forget, retain = list(request.forget), list(request.retain)
    if not scope.forgets_text_rows:
        retain += [r for r in forget if r.image is None]
        forget = [r for r in forget if r.image is not None]
    answer = request.refusal if scope.answers_refusal else None
    pad = processor.tokenizer.pad_token_id
    try:
        return (_Rows([data.encode(processor, r, answer) for r in forget], pad),
                _Rows([data.encode(processor, r) for r in retain], pad))
    except (ValueError, OSError) as e:
        raise SeqforgetError(f"request {request.id}: the model's processor cannot encode its rows ({e})") from e


def _unlearn(model, method, request: Request, forget: _Rows, retain: _Rows, targets: list[str],
             bases: dict[str, Basis], show_progress: bool):
    """Grow the bases, train the adapter under them, probe before and after.

    Returns (adapter, the basis columns this request adds, metrics); `model` ends with the
    adapter composed in."""
    start = time.perf_counter()
    _reset_peak_rss()
    settings = request.training
    added, growth = _grow_bases(model, retain, targets, bases, request)
    nullspaces = _nullspaces(request, targets, bases, added)
    before = _probes(model, forget, retain)
    with Progress(settings.steps, f"apply {request.id}", show_progress) as progress:
        trained = train_adapter(model, method, forget.endless(settings, 0), retain.endless(settings, 1),
                                targets, nullspaces, settings, progress)
    _refuse_if_diverged(request, trained.adapter)
    compose(model, [trained.adapter])
    after = _probes(model, forget, retain)
    metrics = {"before": before, "after": after, "rows": {"forget": len(forget.examples), "retain": len(retain.examples)},
               "targets": len(targets), "basis": growth, "projection": settings.projection,
               "trajectory": trained.trajectory, "train_seconds": trained.seconds,
               "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}
    return trained.adapter, added, metrics


def _grow_bases(model, retain: _Rows, targets: list[str], bases: dict[str, Basis], request: Request):
    """The basis columns this request adds per target layer, and how much they capture."""
    layers = dict(model.named_modules())
    for name in targets:
        if name in bases and bases[name].dim != layers[name].in_features:
            raise SeqforgetError(f"stored basis of {name} does not fit the model's layer")
    grams = input_grams(model, retain.fixed, targets)
    threshold = request.training.energy_threshold
    added, growth = {}, {}
    for name in targets:
        added[name], before, after = extend_basis(bases.get(name), grams[name], threshold, request.id)
        growth[name] = {"columns_before": bases[name].rank if name in bases else 0, "columns_added": added[name].rank,
                        "captured_before": before, "captured_after": after}
    return added, growth


def _nullspaces(request: Request, targets: list[str], bases: dict[str, Basis], added: dict[str, Basis]) -> dict[str, NullSpace]:
    if not request.training.projection:
        return {}
    full = {name: bases[name].join(added[name]) if name in bases else added[name] for name in targets}
    nullspaces = {name: NullSpace(b) for name, b in full.items() if b.rank}
    if len(nullspaces) == len(targets) and all(ns.rank >= ns.dim for ns in nullspaces.values()):
        raise SeqforgetError(f"request {request.id}: retained inputs fill every target layer's input space, so nothing "
                             f"can move; lower energy_threshold (now {request.training.energy_threshold})")
    return nullspaces


def _probes(model, forget: _Rows, retain: _Rows) -> dict:
    return {"forget": probe(model, forget.fixed), "retain": probe(model, retain.fixed)}


def _refuse_if_diverged(request: Request, adapter) -> None:
    if not all(torch.isfinite(torch.from_numpy(w)).all() for parts in adapter.weights.values() for w in parts.values()):
        raise SeqforgetError(f"request {request.id}: training diverged (non-finite adapter weights); lower lr")


def _summary(metrics: dict, request: Request) -> dict:
    """The figures the manifest keeps for `status`: before -> after of each probe."""
    before, after = metrics["before"], metrics["after"]
    return {
        "forget_nll": [before["forget"]["nll"], after["forget"]["nll"]],
        "retain_nll": [before["retain"]["nll"], after["retain"]["nll"]],
        "forget_acc": [before["forget"]["token_acc"], after["forget"]["token_acc"]],
        "retain_acc": [before["retain"]["token_acc"], after["retain"]["token_acc"]],
        "steps": request.training.steps,
        "seconds": round(metrics["seconds"], 2),
    }


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
