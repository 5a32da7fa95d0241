"""Forget keys: every request stores the directions its forget rows send through its target layers
beyond the retained basis; a later request with keep_forgotten cannot move the model along them,
and a rollback takes them out of what later requests hold still. With apart_from_earlier, a later
request reads no input direction an earlier request's term reads."""

import shutil

import pytest
import torch

from conftest import write_request
from registry import Registry
from seqforget import data
from seqforget.activations import input_stats
from seqforget.composition import delta
from seqforget.engine import apply_request, init_registry, live_model, rollback_request
from seqforget.errors import SeqforgetError
from seqforget.live import Live
from seqforget.requests import load_request


def apply(tmp_path, world, reg, request_id: str, forget: str, **fields) -> dict:
    path = write_request(tmp_path, request_id, scope="visual", method="stranger", forget=str(world / forget),
                         retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), steps=10, check_every=10,
                         partial=True, **fields)
    return apply_request(reg, path, show_progress=False)


@pytest.fixture(scope="module")
def first_applied(world, tmp_path_factory) -> tuple:
    """(a registry holding one visual request, `first`, on person a; its entry): both tests below
    begin with it, and the one that goes on from it copies it."""
    folder = tmp_path_factory.mktemp("first")
    init_registry(folder / "reg", world / "model")
    return folder / "reg", apply(folder, world, folder / "reg", "first", "forget_a.jsonl")


def test_a_requests_forget_keys_lie_outside_its_basis_and_hold_its_forget_inputs(world, first_applied):
    reg, entry = first_applied
    state = Registry.open(reg).snapshot()
    keys, basis = state.forget_keys(entry), state.basis(entry)
    assert "forget_keys.h5" in entry["files"] and set(keys) == set(basis)
    assert sum(k.rank for k in keys.values()) > 0
    metrics = state.record(entry, "metrics.json")

    # what the keys are of: the forget rows' (image rows', for a visual request) inputs under the model after the request
    model, processor = live_model(state)
    rows = [r for r in data.read_rows(world / "forget_a.jsonl", [], "forget") if r.image is not None]
    batches = data.Rows([data.encode(processor, r) for r in rows], processor.tokenizer.pad_token_id).fixed
    stats = input_stats(model, batches, list(keys))
    for layer, k in keys.items():
        u, f = torch.from_numpy(basis[layer].columns).double(), torch.from_numpy(k.columns).double()
        assert torch.allclose(f.T @ f, torch.eye(k.rank, dtype=torch.float64), atol=1e-5)  # orthonormal
        assert (u.T @ f).abs().max() < 1e-4  # beyond the retained basis
        both = torch.cat([u, f], dim=1)
        gram = stats[layer]
        held = torch.trace(both.T @ gram @ both) / torch.trace(gram)
        grown = metrics["forget_keys"][layer]
        assert held.item() == pytest.approx(grown["captured_after"], abs=2e-3)
        assert held >= 0.97 - 2e-3 and grown["captured_before"] < grown["captured_after"] or k.rank == 0


def test_keep_forgotten_and_apart_from_earlier_hold_what_the_first_request_made_still(world, first_applied, tmp_path):
    """The same second request, three ways: plain; with keep_forgotten (off the first request's
    forget keys); with apart_from_earlier (off the input directions the first request's term reads)."""
    reg = tmp_path / "reg"
    shutil.copytree(first_applied[0], reg)
    first = first_applied[1]
    roots = {name: tmp_path / name for name in ("plain", "apart")}
    for root in roots.values():
        shutil.copytree(reg, root)
    second = {"keys": apply(tmp_path, world, reg, "second", "forget_b.jsonl", keep_forgotten=True),
              "plain": apply(tmp_path, world, roots["plain"], "second", "forget_b.jsonl"),
              "apart": apply(tmp_path, world, roots["apart"], "second", "forget_b.jsonl", apart_from_earlier=True)}
    roots["keys"] = reg
    state = Registry.open(reg).snapshot()
    keys = {layer: torch.from_numpy(k.columns).double() for layer, k in state.forget_keys(first).items() if k.rank}
    reads = {layer: delta(state.adapter(first), layer).T for layer in state.adapter(first).modules}  # (d_in, d_out)

    def moved(how: str, along: dict) -> float:
        """The largest share of the second request's update, over the layers, that acts along `along`."""
        adapter = Registry.open(roots[how]).snapshot().adapter(second[how])
        return max((torch.linalg.norm(delta(adapter, layer) @ f) / torch.linalg.norm(delta(adapter, layer))
                    / torch.linalg.norm(f, 2)).item() for layer, f in along.items())

    assert moved("keys", keys) < 1e-4
    assert moved("plain", keys) > 1e-2  # without the option the same request does move along them
    assert moved("apart", reads) < 0.05  # to within the 1e-3 of the first term's energy left out
    assert moved("plain", reads) > 0.1
    room = {how: Registry.open(roots[how]).snapshot().record(second[how], "metrics.json")["room"] for how in second}
    assert all(room["apart"][layer]["free"] < room["plain"][layer]["free"] for layer in reads)

    def owners(root) -> set[str]:
        """Whose forget keys a next request of this registry would hold still."""
        snap = Registry.open(root).snapshot()
        return {k.owners[0] for layer_keys in Live.load(snap, world / "model").forget_keys(snap).values() for k in layer_keys}

    assert owners(reg) == {"first", "second"}
    rollback_request(reg, "first")
    assert owners(reg) == {"second"}


@pytest.mark.parametrize("option", ["keep_forgotten", "apart_from_earlier"])
def test_the_options_need_projection(world, tmp_path, option):
    path = write_request(tmp_path, "r", scope="visual", method="stranger", forget=str(world / "forget_a.jsonl"),
                         retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), projection=False,
                         **{option: True})
    with pytest.raises(SeqforgetError, match=f"{option}: works by projection"):
        load_request(path)
