"""The live model, kept equal to a registry's base model plus its active requests.

A `Live` holds the loaded model and processor, the adapter of every active request, a copy of
the base weight of every layer a request has touched, and per layer the exact sum of the
active requests' terms (seqforget.composition). `sync(state)` brings it to what a snapshot of
the registry says by differences: a request that became active adds its term, one that was rolled back takes
its own term off, and every layer they touch is rewritten as base + sum, rounded once. The
cost is that of the requests that changed, not of the history, and the weights are the same
bits as a model composed from scratch: the sums are exact, so the path does not matter.
Once its weights are sharded across processes (`shard`), each process keeps the rows of the
base copies and sums that it holds of the weights.

In a gated registry (`init --gated`), a request that stored a gate is not composed into the
weights: seqforget.gate.Gating adds its term, by forward hooks, to the images its gate picks.

It also keeps the null-space bases and forget keys of the registry's requests, read once each, and lets a
new request train with the earlier requests' terms switched off (`EarlierOff`): at random for
its steps (earlier_dropout), or all of them for its targets (targets_from_base).
"""

import hashlib
import json
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from registry import GATE_FILE, Adapter, Basis, Snapshot
from seqforget.composition import added, delta, low_rank, summed_terms
from seqforget.data import Encoder
from seqforget.distributed import own, rows
from seqforget.errors import SeqforgetError
from seqforget.gate import Gate, Gating
from seqforget.models import load_model


def registry_dtype(state: Snapshot) -> str:
    """The precision the registry's live model is kept in: chosen at `init`, float32 before there was a choice."""
    return state.base_model.get("dtype", "float32")


def registry_device(state: Snapshot) -> str:
    """Where the registry's live model runs: chosen at `init`, "auto" before there was a choice."""
    return state.base_model.get("device", "auto")


def registry_gated(state: Snapshot) -> bool:
    """Whether the registry applies its visual requests' terms only where their gates pick (`init --gated`)."""
    return bool(state.base_model.get("gated", False))


def entry_key(entry: dict) -> str:
    """What identifies a committed request's term: its id and the sha256 of its files."""
    files = hashlib.sha256(json.dumps(entry["files"], sort_keys=True).encode()).hexdigest()
    return f"{entry['id']}:{files}"


class Live:
    def __init__(self, model, processor, gated: bool = False):
        self.model, self.processor = model, processor
        self.gating = Gating(model) if gated else None  # the gated terms, applied by hooks
        self.encoder = Encoder(processor)  # requests' rows, encoded (a stream's requests share most of theirs)
        self._terms: dict[str, Adapter] = {}  # entry key -> the adapter of each term composed in
        self._uncommitted: set[str] = set()  # keys of terms added before their request committed
        self._base_weights: dict[str, torch.Tensor] = {}  # layer -> its base weight, kept once a term touches it
        self._sums: dict[str, torch.Tensor] = {}  # layer -> exact sum of the active terms (int64 quanta)
        self._bases: dict[str, dict[str, Basis]] = {}  # entry key -> the basis columns that request added
        self._keys: dict[str, dict[str, Basis]] = {}  # entry key -> that request's forget keys

    @classmethod
    def load(cls, state: Snapshot, model_dir: Path, dtype: str | None = None, device: str | None = None) -> "Live":
        """The base model of `model_dir` with every request active in `state` composed in, its
        weights in `dtype` on `device` (default: the registry's, chosen at `init`)."""
        model, processor = load_model(model_dir, dtype or registry_dtype(state), device or registry_device(state))
        live = cls(model, processor, registry_gated(state))
        live.sync(state)
        return live

    def sync(self, state: Snapshot) -> None:
        """Make the model base + the requests active in `state`, by differences. A term comes
        off with the adapter it went in with, so nothing is read to take it off."""
        wanted = {key: e for key, e in ((entry_key(e), e) for e in state.requests) if e["state"] == "active"}
        for key in [k for k in self._terms if k not in wanted]:
            self._take_off(key)
        for key, entry in wanted.items():
            if key not in self._terms:
                arrays = state.arrays(entry, GATE_FILE)
                self._put_on(key, state.adapter(entry), Gate.from_arrays(arrays) if arrays is not None else None)
        self._uncommitted.clear()

    def add(self, key: str, adapter: Adapter, gate: Gate | None = None) -> None:
        """Compose a request that is not committed yet (with `gate`: apply it where the gate
        picks); `sync` takes it off again unless the snapshot it is given lists it (by `entry_key`)."""
        self._put_on(key, adapter, gate)
        self._uncommitted.add(key)

    def commit(self, key: str, entry: dict) -> None:
        """The pending term `key` committed as `entry`: it is now known by the entry's key."""
        self._terms[entry_key(entry)] = self._terms.pop(key)
        if self.gating is not None and key in self.gating.keys:
            self.gating.rename(key, entry_key(entry))
        self._uncommitted.discard(key)

    def _put_on(self, key: str, adapter: Adapter, gate: Gate | None) -> None:
        if gate is None:
            self._change(key, adapter, +1)
            return
        if self.gating is None:
            raise SeqforgetError("a request with a gate is in a registry that is not gated; its manifest was altered")
        self.gating.add(key, adapter, gate)
        self._terms[key] = adapter

    def _take_off(self, key: str) -> None:
        if self.gating is not None and key in self.gating.keys:
            self.gating.remove(key)
            del self._terms[key]
            return
        self._change(key, self._terms[key], -1)

    @torch.no_grad()
    def _change(self, key: str, adapter: Adapter, direction: int) -> None:
        modules = dict(self.model.named_modules())
        for name, t in summed_terms(self.model, [adapter]).items():
            weight = modules[name].weight
            t = rows(weight, t)  # of a sharded weight, the rows this process holds
            if name not in self._base_weights:
                self._base_weights[name] = own(weight).detach().to("cpu", copy=True)  # kept off the model's device
                self._sums[name] = torch.zeros_like(t)
            self._sums[name] += direction * t
            own(weight).copy_(added(self._base_weights[name], self._sums[name]))
        if direction > 0:
            self._terms[key] = adapter
        else:
            del self._terms[key]

    def shard(self, group, device, keep=()) -> None:
        """Split the model's weights across `group`'s processes (seqforget.distributed.Group.shard),
        and keep of each base copy and sum only the rows this process holds."""
        group.shard(self.model, device, keep)
        modules = dict(self.model.named_modules())
        for name in self._base_weights:
            weight = modules[name].weight
            self._base_weights[name] = rows(weight, self._base_weights[name])
            self._sums[name] = rows(weight, self._sums[name])

    def earlier_off(self, p: float, seed: int) -> "EarlierOff":
        """Switches for the committed active terms, each off with probability `p` at every draw."""
        gated = set(self.gating.keys) if self.gating is not None else set()
        committed = {key: a for key, a in self._terms.items() if key not in self._uncommitted and key not in gated}
        return EarlierOff(self.model, committed, p, seed)

    def bases(self, state: Snapshot) -> dict[str, Basis]:
        """`state.bases()`, each request's basis file read once over the life of this live model."""
        return state.bases(read=lambda entry: _read_once(self._bases, entry, state.basis))

    def term_inputs(self) -> dict[str, list[torch.Tensor]]:
        """Per layer, for every committed term composed in, a factor F (d_in, m) of the input side
        of its change D: D^T D = F F^T, so span(F) holds every input direction the term reads."""
        out: dict[str, list[torch.Tensor]] = {}
        for key, adapter in self._terms.items():
            if key in self._uncommitted:
                continue
            for name in adapter.modules:
                factors = low_rank(adapter, name)
                if factors is None:
                    out.setdefault(name, []).append(delta(adapter, name).T)
                    continue
                b, a = factors  # D = B A: D^T D = A^T R^T R A with B = Q R
                r = torch.linalg.qr(b.double())[1]
                out.setdefault(name, []).append(a.double().T @ r.T)
        return out

    def forget_keys(self, state: Snapshot) -> dict[str, list[Basis]]:
        """Per layer, the forget keys of every request active in `state` that stored some, in
        commit order, each file read once: a rolled-back request's are not among them."""
        out: dict[str, list[Basis]] = {}
        for entry in state.active:
            for layer, keys in _read_once(self._keys, entry, state.forget_keys).items():
                if keys.rank:
                    out.setdefault(layer, []).append(keys)
        return out


def _read_once(cache: dict, entry: dict, read):
    """`read(entry)`, kept in `cache` under the entry's key: a committed request's files never change."""
    key = entry_key(entry)
    if key not in cache:
        cache[key] = read(entry)
    return cache[key]


class EarlierOff:
    """Earlier requests' terms switched off while a new request trains.

    Each `draw()` switches every term off with probability p, independently, until the next
    draw; `all_on()` switches them all back; inside `with none():` every term is off (the base
    model), for a request's targets under targets_from_base. A term is switched off by subtracting its
    contribution from the outputs of its layers (a forward hook per layer): the live weights
    are never written, so they stay exact. The aim: a new adapter that does not lean on the
    earlier ones, so that rolling one back brings back its own rows only. On this project's
    benchmark it did the opposite: rollbacks brought their person back less far
    (benchmarks/FINDINGS.md, "Long streams and rollbacks inside them"), so a request's
    `earlier_dropout` is 0 unless it asks.

    The terms switched off in a layer are combined once per draw, as stacked LoRA factors or
    as one dense delta, whichever costs less per token: a forward pass costs at most one more
    product the size of the layer, however many earlier requests there are.
    """

    def __init__(self, model, adapters: dict[str, Adapter], p: float, seed: int):
        self.keys, self.p, self.off = sorted(adapters), p, frozenset()
        self._rng = random.Random(seed)
        self._terms: dict[str, list] = {}  # layer -> [(key, (B', A) or a dense delta)]
        for key in self.keys:
            for name in adapters[key].weights:
                factors = low_rank(adapters[key], name)
                self._terms.setdefault(name, []).append((key, factors or delta(adapters[key], name).float()))
        self._now: dict[str, tuple] = {}  # layer -> what to subtract now: ("factors", B, A) or ("dense", D)
        self._all: dict[str, tuple] | None = None  # the same with every term off, made once
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(name)) for name in self._terms]

    def draw(self) -> None:
        self.switch_off(k for k in self.keys if self._rng.random() < self.p)

    def all_on(self) -> None:
        self.switch_off(())

    def switch_off(self, keys) -> None:
        """Exactly the terms of `keys` off, every other on."""
        self.off = frozenset(keys)
        self._now = {}
        for name, terms_ in self._terms.items():
            parts = [t for key, t in terms_ if key in self.off]
            if not parts:
                continue
            if all(isinstance(t, tuple) for t in parts):
                b, a = torch.cat([t[0] for t in parts], dim=1), torch.cat([t[1] for t in parts])  # (d_out, R), (R, d_in)
                if b.shape[1] * (b.shape[0] + a.shape[1]) < b.shape[0] * a.shape[1]:
                    self._now[name] = ("factors", b, a)
                    continue
            self._now[name] = ("dense", sum(t[0] @ t[1] if isinstance(t, tuple) else t for t in parts))  # (d_out, d_in)

    @contextmanager
    def none(self):
        """Every term off inside the block (the base model), the draw before it back after."""
        was, now = self.off, self._now
        if self._all is None:
            self.switch_off(self.keys)
            self._all = self._now
        self.off, self._now = frozenset(self.keys), self._all
        try:
            yield
        finally:
            self.off, self._now = was, now

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            now = self._now.get(name)
            if now is None:
                return output
            x = inputs[0]  # (..., d_in)
            if now[0] == "factors":
                return output - (x @ now[2].to(x).T) @ now[1].to(x).T
            return output - x @ now[1].to(x).T
        return hook
