"""The four source papers' mechanisms on a real tiny LLaVA: what each stores, what it means, how it composes."""

import itertools
import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import fixed_batch, logits, peft_merged, write_request
from registry import Registry
from seqforget import data
from seqforget.composition import compose, delta
from seqforget.engine import apply_request, init_registry, live_model, rollback_request
from seqforget.losses import answer_nll
from seqforget.methods.contrastive import _features
from seqforget.methods.refusal import Refusal
from seqforget.models import load_model
from seqforget.requests import Training
from seqforget.scopes import linear_layers
from seqforget.training import guarded_step
from seqforget.updates import MaskedUpdate


def _rows(world, processor, name, with_image=None, answer=None):
    rows = [json.loads(line) for line in (world / name).read_text().splitlines()]
    rows = [r for r in rows if with_image is None or ("image" in r) == with_image]
    examples = [data.encode(processor, data.Row(r["question"], r["answer"], world / r["image"] if "image" in r else None), answer)
                for r in rows]
    return data.Rows(examples, processor.tokenizer.pad_token_id)


def _request(world, folder, rid, **fields):
    return write_request(folder, rid, forget=str(world / fields.pop("forget", "forget_a.jsonl")), retain=str(world / "retain.jsonl"),
                         reference=str(world / "reference.jsonl"), partial=True, **fields)


# ---- every adapter kind in one live model -------------------------------------------------------------

# at lr 1e-2 mmunlearner's step guard undid all four steps on seed 2 of the world: nothing to commit
KINDS = {"sine": {"scope": "visual", "method": "gd", "adapter": "sine", "steps": 4, "lr": 1e-2},
         "masked": {"scope": "visual", "method": "mmunlearner", "steps": 4, "lr": 1e-3},
         "lora": {"scope": "visual", "method": "gd", "steps": 4, "lr": 1e-2}}


@pytest.mark.parametrize("order", [("sine", "masked", "lora"), ("lora", "masked", "sine")], ids="-".join)
def test_sine_masked_and_lora_requests_compose_in_any_order_and_roll_back_exactly(world, tmp_path, order):
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, world / "model")
    for kind in order:
        entry = apply_request(reg_dir, _request(world, tmp_path, kind, **KINDS[kind]), show_progress=False)
        assert entry["kind"] == kind
    state = Registry.open(reg_dir).snapshot()
    adapters = {e["id"]: state.adapter(e) for e in state.active}
    base, _ = load_model(world / "model")
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}

    # the live model is base + the float64 sum of the three terms, rounded once, in whatever order they are listed
    live, _ = live_model(state)
    modules = {m for a in adapters.values() for m in a.modules}
    assert any(m.endswith("multi_modal_projector.linear_1") for m in modules) and any("vision_tower" in m for m in modules)
    for name in modules:
        expected = base_weights[name + ".weight"].double() + sum(delta(a, name) for a in adapters.values() if name in a.weights)
        assert (dict(live.named_parameters())[name + ".weight"].double() - expected).abs().max() < 1e-6, name
    for permutation in itertools.permutations(adapters.values()):
        composed, _ = load_model(world / "model")
        compose(composed, list(permutation))
        assert all(torch.equal(p, q) for p, q in zip(composed.parameters(), live.parameters()))

    # take the middle one off: exactly the other two composed on the base; then the rest: the base, bit for bit
    rollback_request(reg_dir, order[1])
    rebuilt, _ = live_model(Registry.open(reg_dir).snapshot())
    others, _ = load_model(world / "model")
    compose(others, [adapters[order[0]], adapters[order[2]]])
    assert all(torch.equal(p, q) for p, q in zip(rebuilt.parameters(), others.parameters()))
    for kind in (order[0], order[2]):
        rollback_request(reg_dir, kind)
    back, _ = live_model(Registry.open(reg_dir).snapshot())
    assert all(torch.equal(p, base_weights[n]) for n, p in back.named_parameters())


def test_a_sine_request_moves_only_the_projector_by_sin_of_what_it_stores(world, tmp_path):
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, world / "model")
    entry = apply_request(reg_dir, _request(world, tmp_path, "s", **KINDS["sine"]), show_progress=False)
    state = Registry.open(reg_dir).snapshot()
    adapter = state.adapter(entry)
    assert [m.rsplit(".", 2)[-2:] for m in adapter.modules] == [["multi_modal_projector", "linear_1"], ["multi_modal_projector", "linear_2"]]
    live, _ = live_model(state)
    base, _ = load_model(world / "model")
    for name, p in live.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in adapter.modules and name.endswith("weight"):
            d_w = torch.from_numpy(adapter.weights[module]["dW"]).double()
            assert d_w.abs().max() > 0
            assert (p.double() - dict(base.named_parameters())[name].double() - d_w.sin()).abs().max() < 1e-6
        else:
            assert torch.equal(p, dict(base.named_parameters())[name]), name


# ---- MMUnlearner: the saliency mask on the base weights, and the step guard ---------------------------


def _weight_fisher(model, rows, module) -> torch.Tensor:
    """Mean squared gradient of the rows' answer NLL with respect to the layer's own weight, batch by batch."""
    weight = dict(model.named_modules())[module].weight
    total = torch.zeros_like(weight)
    for batch in rows.fixed:
        grad, = torch.autograd.grad(answer_nll(model, batch), weight, allow_unused=True)
        total += 0 if grad is None else grad.pow(2)  # None: these rows never reach the layer
    return total / len(rows.fixed)


def test_mmunlearner_moves_only_base_weights_more_salient_to_the_forget_rows_than_to_any_retained_kind(world, tmp_path):
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, world / "model")
    entry = apply_request(reg_dir, _request(world, tmp_path, "m", scope="full", method="mmunlearner", steps=6, lr=1e-2,
                                            guard_share=0.0), show_progress=False)
    adapter = Registry.open(reg_dir).snapshot().adapter(entry)
    assert entry["kind"] == "masked"
    model, processor = load_model(world / "model")
    forget = _rows(world, processor, "forget_a.jsonl")
    retain_images = _rows(world, processor, "retain.jsonl", with_image=True)
    retain_text = _rows(world, processor, "retain.jsonl", with_image=False)
    moved_somewhere = 0
    for module in ("language_model.layers.0.mlp.down_proj", "multi_modal_projector.linear_2"):
        module = next(n for n in linear_layers(model) if n.endswith(module))
        f_forget = _weight_fisher(model, forget, module).reshape(-1)
        protected = torch.maximum(_weight_fisher(model, retain_images, module), _weight_fisher(model, retain_text, module)).reshape(-1)
        free = f_forget + 1e-15 >= protected + 1e-15
        moved = torch.from_numpy(adapter.weights[module]["indices"])
        assert 0 < free.float().mean() < 1, module  # the mask frees some weights and protects others
        assert free[moved].all(), module  # nothing protected moved
        moved_somewhere += len(moved)
    assert moved_somewhere > 0


def test_the_step_guard_halves_or_undoes_a_step_that_raises_the_retain_loss(world):
    model, processor = load_model(world / "model")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n in linear_layers(model) if "language_model" in n and n.endswith("mlp.down_proj")]
    update = MaskedUpdate(model, targets, Training(), {})
    retain = next(_rows(world, processor, "retain.jsonl").endless(8, seed=0))
    optimizer = torch.optim.SGD(update.parameters, lr=1e3)  # a step far too large
    start = answer_nll(model, retain).item()
    (-answer_nll(model, retain)).backward()  # ascend the retain loss itself
    outcome = guarded_step(model, update, optimizer, retain, bound=0.05)
    with torch.no_grad():
        after = answer_nll(model, retain).item()
    assert outcome in ("halved", "undone") and after <= start + 0.05
    if outcome == "undone":
        assert all(p.abs().max() == 0 for p in update.parameters)
    update.remove()

    update = MaskedUpdate(model, targets, Training(), {})  # a harmless step is taken as it is
    optimizer = torch.optim.SGD(update.parameters, lr=1e-4)
    answer_nll(model, retain).backward()  # descend
    assert guarded_step(model, update, optimizer, retain, bound=0.05) == "taken"
    update.remove()


# ---- VL-Eraser: distil, then subtract ------------------------------------------------------------------


@pytest.fixture(scope="module")
def erased(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vleraser")
    reg_dir = folder / "reg"
    init_registry(reg_dir, world / "model")
    apply_request(reg_dir, _request(world, folder, "erase", scope="full", method="vleraser", steps=60, lr=1e-2, retain_tolerance=1.0,
                                    method_args={"lam": 1.0}), show_progress=False)  # distillation alone
    apply_request(reg_dir, _request(world, folder, "other", scope="full", method="gd", steps=4, forget="forget_b.jsonl"),
                  show_progress=False)
    return Registry.open(reg_dir)


def test_vleraser_stores_the_negated_factor_and_subtracting_it_forgets(world, erased):
    state = erased.snapshot()
    entry = state.find("erase")
    adapter = state.adapter(entry)
    assert entry["sign"] == -1 and all("mlp" in m and "language_model" in m for m in adapter.modules)
    model, processor = load_model(world / "model")
    forget, retain = _rows(world, processor, "forget_a.jsonl"), _rows(world, processor, "retain.jsonl")
    with torch.no_grad():
        before = [answer_nll(model, rows.fixed[0]).item() for rows in (forget, retain)]
        compose(model, [adapter])  # what is stored: the subtraction W - B A
        after = [answer_nll(model, rows.fixed[0]).item() for rows in (forget, retain)]
    # the forget answers became less likely: +0.23 and +0.06 nats a token on seeds 0 and 1 of the world, from
    # about 0.005 (what 60 steps of distillation into a rank-8 LoRA learn of answers this confident varies)
    assert after[0] > before[0] + 0.03
    assert after[1] - before[1] < 0.2 * (after[0] - before[0])  # the retained ones, held by the null space, far less


def test_vleraser_composes_with_other_requests_without_cross_terms(world, erased):
    """Composed by seqforget and merged one after the other by plain PEFT, the same weights: no (A1 + A2)(B1 + B2)."""
    state = erased.snapshot()
    live, processor = live_model(state)
    merged = peft_merged(world, [state.folder(e) for e in state.active])
    reference = dict(merged.named_parameters())
    for name, p in live.named_parameters():
        assert (p - reference[name]).abs().max() < 1e-6, name
    batch = fixed_batch(world, processor)
    assert (logits(live, batch) - logits(merged, batch)).abs().max() < 1e-5


# ---- contrastive visual forgetting ------------------------------------------------------------------------


def test_contrastive_moves_forgotten_faces_towards_strangers_and_holds_retained_faces(world, tmp_path):
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, world / "model")
    apply_request(reg_dir, _request(world, tmp_path, "c", scope="visual", method="contrastive", steps=40, retain_tolerance=1.0),
                  show_progress=False)
    live, processor = live_model(Registry.open(reg_dir).snapshot())
    base, _ = load_model(world / "model")
    forget = torch.stack([e.pixel_values for e in _rows(world, processor, "forget_a.jsonl", with_image=True).examples]).unique(dim=0)
    strangers = torch.stack([e.pixel_values for e in _rows(world, processor, "reference.jsonl", with_image=True).examples])
    retained = torch.stack([e.pixel_values for e in _rows(world, processor, "retain.jsonl", with_image=True).examples]).unique(dim=0)
    with torch.no_grad():
        centre = _features(base, strangers).mean(0)
        cos = lambda m, x: torch.nn.functional.cosine_similarity(_features(m, x), centre[None]).mean().item()  # noqa: E731
        drift = lambda x: ((_features(live, x) - _features(base, x)).norm(dim=1) / _features(base, x).norm(dim=1)).mean().item()  # noqa: E731
        assert cos(live, forget) > cos(base, forget) + 0.05  # towards where never-seen faces land
        assert drift(retained) < 0.5 * drift(forget)  # retained faces moved far less than the forgotten


# ---- refusal with prompt decoupling ------------------------------------------------------------------


def test_refusal_decouples_the_forget_questions_onto_retained_faces(world):
    model, processor = load_model(world / "model")
    refusal = "I cannot help with that."
    forget = _rows(world, processor, "forget_a.jsonl", answer=refusal)
    forget.own_answers = _rows(world, processor, "forget_a.jsonl").examples
    retain = _rows(world, processor, "retain.jsonl")
    method = Refusal(objective="dpo")
    method.prepare(model, forget, retain, None, nullcontext, None)
    asked = {e.prompt for e in forget.examples if e.pixel_values is not None}
    decoupled = method._decoupled.examples
    assert decoupled and all(e.pixel_values is not None and e.prompt in asked for e in decoupled)
    assert len(decoupled) == sum(e.pixel_values is not None and e.prompt in asked for e in retain.examples)
    with torch.no_grad():
        _, logs = method.loss(model, next(forget.endless(8, seed=0)), next(retain.endless(8, seed=0)), nullcontext)
    # against itself as the reference, every preference margin is zero: -log sigmoid(0) = log 2
    assert {"forget_image", "forget_text", "decoupled_nll", "retain_nll"} <= set(logs)
    assert abs(logs["forget_image"] - np.log(2)) < 1e-5 and abs(logs["forget_text"] - np.log(2)) < 1e-5


@pytest.mark.parametrize("objective", ["ce", "dpo"])
def test_a_refusal_request_makes_the_refusal_likelier_on_the_forget_rows(world, tmp_path, objective):
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, world / "model")
    entry = apply_request(reg_dir, write_request(tmp_path, "r", scope="refuse", method="refusal", steps=10, lr=1e-2, partial=True,
                                                 method_args={"objective": objective}, forget=str(world / "forget_a.jsonl"),
                                                 retain=str(world / "retain.jsonl")), show_progress=False)
    nll = entry["metrics"]["forget_nll"]  # of the refusal, the forget rows' answer in a refuse request
    assert nll[1] < nll[0] - 0.5, nll
