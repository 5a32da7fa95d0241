"""What the commands do: init, apply, rollback, export, the live model.

apply follows one path:

    request -> validate -> lock registry -> check model and stored files -> journal "begin"
      -> base model + active adapters (explicit products)
      -> retained activations of the target layers -> extend the null-space bases
      -> train this request's adapter (method loss, projected updates)
      -> probe forget/retain -> stage adapter, basis block, metrics -> commit -> unlock
"""

import json
import os
import resource
import shutil
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from registry import Registry, RegistryError
from registry.adapters import write_lora
from registry.atomic import fsync_tree
from registry.bases import Block, write_blocks
from registry.hashing import sha256_file
from registry.store import BASIS_FILE
from seqforget import data
from seqforget.activations import input_grams
from seqforget.composition import Adapter, compose
from seqforget.errors import SeqforgetError
from seqforget.evaluation import probe
from seqforget.methods import make_method
from seqforget.models import fingerprint, load_model
from seqforget.projection import NullSpace, extend_basis
from seqforget.requests import Request, load_request
from seqforget.targets import match_targets
from seqforget.training import train_adapter

EVAL_BATCH = 16


def init_registry(root: Path, model_dir: Path, default_retain: Path | None = None) -> Registry:
    model_dir = Path(model_dir).absolute()
    base = {"path": str(model_dir), "fingerprint": fingerprint(model_dir)}
    retain = None
    if default_retain is not None:
        problems: list[str] = []
        rows = data.read_rows(Path(default_retain).absolute(), problems, "retain")
        if problems:
            raise SeqforgetError(f"invalid default retain set: {'; '.join(problems[:12])}")
        retain = {"path": str(Path(default_retain).absolute()), "sha256": sha256_file(default_retain), "rows": len(rows)}
    return Registry.create(root, base_model=base, default_retain=retain)


def _model_dir(reg: Registry, model_dir: Path | None) -> Path:
    base = reg.manifest()["base_model"]
    path = Path(model_dir).absolute() if model_dir else Path(base["path"])
    if fingerprint(path) != base["fingerprint"]:
        raise SeqforgetError(f"model folder {path} does not match the registry's base model (fingerprint differs)")
    return path


def stored_adapter(reg: Registry, entry: dict) -> Adapter:
    """A committed request's adapter as torch tensors, after checking its files' hashes."""
    pairs, scale = reg.load_lora(entry)
    tensors = {m: (torch.from_numpy(a), torch.from_numpy(b)) for m, (a, b) in pairs.items()}
    return Adapter(entry["id"], entry["sign"], scale, tensors)


def live_model(reg: Registry, model_dir: Path | None = None):
    """(model, processor): the base model with every active request composed in, in commit order."""
    path = _model_dir(reg, model_dir)
    adapters = [stored_adapter(reg, e) for e in reg.active()]
    model, processor = load_model(path)
    compose(model, adapters)
    return model, processor


def _scoped_rows(request: Request) -> tuple[list[data.Row], list[data.Row], list[str | None]]:
    """Forget rows, retain rows and each forget row's training answer, as the scope means them.

    visual: only image rows are forgotten; text-only forget rows hold knowledge that
            stays, so they join the retain set.
    refuse: forget rows are trained towards the refusal instead of away from their answer.
    """
    forget, retain = list(request.forget), list(request.retain)
    if request.scope == "visual":
        retain += [r for r in forget if r.image is None]
        forget = [r for r in forget if r.image is not None]
    answers = [request.refusal if request.scope == "refuse" else None for _ in forget]
    return forget, retain, answers


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


def apply_request(root: Path, request_path: Path, model_dir: Path | None = None, show_progress: bool = True) -> dict:
    """Apply one deletion request and commit it; return its manifest entry."""
    reg = Registry.open(root)
    default = reg.manifest()["default_retain"]
    request = load_request(request_path, default_retain=default["path"] if default else None)
    if default and request.retain_path == Path(default["path"]) and sha256_file(request.retain_path) != default["sha256"]:
        raise SeqforgetError(f"the default retain set {request.retain_path} changed since `seqforget init`")
    method = make_method(request.method, request.method_args)

    with reg.writer() as writer:
        existing = reg.find(request.id)
        if existing is not None:
            state = existing["state"].replace("_", " ")
            raise SeqforgetError(f"request {request.id} is already in the registry ({state}); nothing to do")
        bases = reg.load_bases()
        model, processor = live_model(reg, model_dir)
        targets = _targets(request, method, model)
        for name in targets:
            if name in bases and bases[name].dim != dict(model.named_modules())[name].in_features:
                raise SeqforgetError(f"stored basis of {name} does not fit the model's layer")
        forget_rows, retain_rows, answers = _scoped_rows(request)
        try:
            forget = [data.encode(processor, r, a) for r, a in zip(forget_rows, answers)]
            retain = [data.encode(processor, r) for r in retain_rows]
        except (ValueError, OSError) as e:
            raise SeqforgetError(f"request {request.id}: the model's processor cannot encode its rows ({e})") from e

        writer.begin(request.id, method=request.method, scope=request.scope)
        try:
            entry = _train_and_commit(writer, request, method, model, processor, targets, bases, forget, retain, show_progress)
        except BaseException as e:
            writer.abort(request.id, f"{type(e).__name__}: {e}")
            if isinstance(e, Exception) and reg.find(request.id) is not None:
                raise SeqforgetError(f"request {request.id} is committed, but finishing the commit failed ({e})") from e
            raise
    return entry


def _targets(request: Request, method, model) -> list[str]:
    """The layers this request trains; every pattern it names must match at least one."""
    if not request.target_modules:
        return method.targets(model, request.scope)
    unmatched = [p for p in request.target_modules if not match_targets(model, [p])]
    if unmatched:
        raise SeqforgetError(f"request {request.id}: no linear layer of the model matches {', '.join(unmatched)}")
    return match_targets(model, request.target_modules)


def _train_and_commit(writer, request, method, model, processor, targets, bases, forget, retain, show_progress) -> dict:
    settings = request.training
    start = time.perf_counter()
    _reset_peak_rss()
    pad = processor.tokenizer.pad_token_id
    forget_eval, retain_eval = data.batches(forget, EVAL_BATCH, pad), data.batches(retain, EVAL_BATCH, pad)

    # Null-space bases: extend each target layer's basis with this request's retained inputs.
    grams = input_grams(model, retain_eval, targets)
    blocks, nullspaces = {}, {}
    for name in targets:
        old = torch.from_numpy(bases[name].columns) if name in bases else None
        ext = extend_basis(old, grams[name], settings.energy_threshold)
        blocks[name] = Block(ext.columns.numpy(), ext.energy.numpy(), ext.captured_before, ext.captured_after, settings.energy_threshold)
        u = ext.columns.float() if old is None else torch.cat([old, ext.columns.float()], dim=1)  # (d, k)
        if settings.projection and u.shape[1]:
            nullspaces[name] = NullSpace(u)
    if nullspaces and all(ns.rank >= ns.dim for ns in nullspaces.values()) and len(nullspaces) == len(targets):
        raise SeqforgetError(f"request {request.id}: retained inputs fill every target layer's input space, so "
                             f"nothing can move; lower energy_threshold (now {settings.energy_threshold})")

    before = {"forget": probe(model, forget_eval), "retain": probe(model, retain_eval)}
    bar = tqdm(total=settings.steps, desc=f"apply {request.id}", unit="step", disable=not show_progress, leave=False)

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        trained = train_adapter(
            model, method,
            data.endless(forget, settings.batch_size, pad, settings.seed),
            data.endless(retain, settings.batch_size, pad, settings.seed + 1),
            targets, nullspaces, settings, progress,
        )
    finally:
        bar.close()
    if not all(torch.isfinite(t).all() for pair in trained.pairs.values() for t in pair):
        raise SeqforgetError(f"request {request.id}: training diverged (non-finite adapter weights); lower lr")
    adapter = Adapter(request.id, method.sign, trained.scale, trained.pairs)
    compose(model, [adapter])
    after = {"forget": probe(model, forget_eval), "retain": probe(model, retain_eval)}

    metrics = {
        "before": before,
        "after": after,
        "rows": {"forget": len(forget), "retain": len(retain)},
        "targets": len(targets),
        "basis": {
            name: {
                "columns_before": int(bases[name].columns.shape[1]) if name in bases else 0,
                "columns_added": int(b.columns.shape[1]),
                "captured_before": b.captured_before,
                "captured_after": b.captured_after,
            }
            for name, b in blocks.items()
        },
        "projection": settings.projection,
        "trajectory": trained.trajectory,
        "train_seconds": trained.seconds,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": _peak_rss_mb(),
    }
    staged = writer.staging(request.id)
    write_lora(staged, {m: (a.numpy(), b.numpy()) for m, (a, b) in trained.pairs.items()}, trained.lora_config)
    write_blocks(staged / BASIS_FILE, blocks)
    (staged / "request.json").write_text(json.dumps({**request.describe(), "data_sha256": {
        "forget": sha256_file(request.forget_path), "retain": sha256_file(request.retain_path)}}, indent=2) + "\n")
    (staged / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = {
        "forget_nll": [before["forget"]["nll"], after["forget"]["nll"]],
        "retain_nll": [before["retain"]["nll"], after["retain"]["nll"]],
        "forget_acc": [before["forget"]["token_acc"], after["forget"]["token_acc"]],
        "retain_acc": [before["retain"]["token_acc"], after["retain"]["token_acc"]],
        "steps": settings.steps,
        "seconds": round(metrics["seconds"], 2),
    }
    entry = {"id": request.id, "state": "active", "method": request.method, "scope": request.scope,
             "sign": method.sign, "kind": "lora", "metrics": summary}
    return writer.commit(entry, staged)


def rollback_request(root: Path, request_id: str) -> dict:
    """Mark a request rolled back; the live model is rebuilt without it. Unknown ids and
    requests already rolled back are refused by the registry."""
    with Registry.open(root).writer() as writer:
        return writer.set_state(request_id, "rolled_back")


def export_model(root: Path, out_dir: Path, model_dir: Path | None = None) -> Path:
    """Write the live model (base + active requests) as a transformers model folder, all at once."""
    reg = Registry.open(root)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SeqforgetError(f"{out_dir} already exists and is not an empty folder")
    model, processor = live_model(reg, model_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.export-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        provenance = {
            "registry": str(reg.root),
            "base_model": reg.manifest()["base_model"],
            "active_requests": [e["id"] for e in reg.active()],
        }
        (tmp / "seqforget.json").write_text(json.dumps(provenance, indent=2) + "\n")
        fsync_tree(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["init_registry", "apply_request", "rollback_request", "export_model", "live_model", "RegistryError"]
