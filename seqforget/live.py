"""The live model, kept equal to a registry's base model plus its active requests.

A `Live` holds the loaded model and processor, a copy of the base weight of every layer a
request has touched, and per layer the exact sum of the active requests' terms
(seqforget.composition). `sync(state)` brings it to what a snapshot of the registry says by
differences: a request that became active adds its term, one that was rolled back takes
its own term off, and every layer they touch is rewritten as base + sum, rounded once. The
cost is that of the requests that changed, not of the history, and the weights are the same
bits as a model composed from scratch: the sums are exact, so the path does not matter.

It also keeps the null-space bases of the registry's requests, read once each.
"""

import hashlib
import json
from pathlib import Path

import torch

from registry import Adapter, Basis, Snapshot
from seqforget.composition import added, terms
from seqforget.models import load_model


def entry_key(entry: dict) -> str:
    """What identifies a committed request's term: its id and the sha256 of its files."""
    files = hashlib.sha256(json.dumps(entry["files"], sort_keys=True).encode()).hexdigest()
    return f"{entry['id']}:{files}"


class Live:
    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.active: list[str] = []  # entry keys of the terms composed in, in the order they were added
        self._base: dict[str, torch.Tensor] = {}  # layer -> its base weight, kept once a term touches it
        self._sums: dict[str, torch.Tensor] = {}  # layer -> exact sum of the active terms (int64 quanta)
        self._bases: dict[str, dict[str, Basis]] = {}  # entry key -> the basis columns that request added
        self._pending: dict[str, Adapter] = {}  # terms added before their request committed

    @classmethod
    def load(cls, state: Snapshot, model_dir: Path) -> "Live":
        """The base model of `model_dir` with every request active in `state` composed in."""
        model, processor = load_model(model_dir)
        live = cls(model, processor)
        live.sync(state)
        return live

    def sync(self, state: Snapshot) -> None:
        """Make the model base + the requests active in `state`, by differences."""
        known = {entry_key(e): e for e in state.requests}
        wanted = {key: e for key, e in known.items() if e["state"] == "active"}
        for key in [k for k in self.active if k not in wanted]:
            if key in known:
                self._change(key, state.adapter(known[key]), -1)
            elif key in self._pending:
                self._change(key, self._pending.pop(key), -1)
            else:  # a term from a registry that is gone: start again from the base
                self.reset()
                break
        for key, entry in wanted.items():
            if key not in self.active:
                self._change(key, state.adapter(entry), +1)
        self._pending.clear()

    def add(self, key: str, adapter: Adapter) -> None:
        """Compose a request that is not committed yet; `sync` takes it off again unless the
        snapshot it is given lists it (by `entry_key`)."""
        self._change(key, adapter, +1)
        self._pending[key] = adapter

    def commit(self, key: str, entry: dict) -> None:
        """The pending term `key` committed as `entry`: it is now known by the entry's key."""
        self.active[self.active.index(key)] = entry_key(entry)
        self._pending.pop(key, None)

    def reset(self) -> None:
        """Every touched layer back to its base weight, no term active."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, base in self._base.items():
                modules[name].weight.copy_(base)
        self._sums.clear()
        self.active.clear()
        self._pending.clear()

    @torch.no_grad()
    def _change(self, key: str, adapter: Adapter, direction: int) -> None:
        modules = dict(self.model.named_modules())
        for name, t in terms(self.model, [adapter]).items():
            if name not in self._base:
                self._base[name] = modules[name].weight.detach().clone()
                self._sums[name] = torch.zeros_like(t)
            self._sums[name] += direction * t
            modules[name].weight.copy_(added(self._base[name], self._sums[name]))
        if direction > 0:
            self.active.append(key)
        else:
            self.active.remove(key)

    def bases(self, state: Snapshot) -> dict[str, Basis]:
        """`state.bases()`, each request's basis file read once over the life of this live model."""
        def read(entry: dict) -> dict[str, Basis]:
            key = entry_key(entry)
            if key not in self._bases:
                self._bases[key] = state.basis(entry)
            return self._bases[key]

        return state.bases(read=read)
