"""Gated registries: a visual request's term applies only to the images its gate picks; every
other image goes through the base model's vision side, bit for bit, and a rollback takes the
term and its gate off exactly."""

from dataclasses import replace

import pytest
import torch

from conftest import write_request
from registry import GATE_FILE, Registry
from seqforget import data
from seqforget.engine import apply_request, export_model, init_registry, live_model, read_request, rollback_request
from seqforget.errors import SeqforgetError
from seqforget.gate import CELLS, TRAINEE, Gate, Gating, fit, pooled
from seqforget.live import Live
from seqforget.models import load_model
from seqforget.requests import Training
from seqforget.scopes import scope_layers
from seqforget.updates import LoraUpdate
from seqforget.report import markdown, report
from seqforget.status import status_rows, status_table


def test_a_gate_takes_every_forget_view_and_sets_its_threshold_between_them_and_the_retain_images():
    g = torch.Generator().manual_seed(0)
    d = 12
    centre = torch.full((d,), 2.0)
    forget = [centre + torch.randn(9, d, generator=g) * 0.3 for _ in range(4)]  # one person: 4 images, 9 views each
    retain = torch.randn(60, d, generator=g)  # other people: spread around the origin
    gate, figures = fit(forget, retain)
    views = torch.cat(forget)
    assert gate.picks(views).all() and not gate.picks(retain).any()
    assert figures["farthest_forget"] <= figures["unseen_forget"]  # an image left out lies farther than those fitted
    takes = (figures["farthest_forget"] * figures["unseen_forget"]) ** 0.5
    assert takes < gate.threshold < figures["nearest_retain"]
    assert gate.threshold == pytest.approx((takes * figures["nearest_retain"]) ** 0.5)
    unseen = centre + torch.randn(20, d, generator=g) * 0.3  # views of the same person it never saw
    assert gate.picks(unseen).float().mean() >= 0.9

    # where retain images lie among the forget views, the threshold still takes every forget view in;
    # the views the retain images stand on are theirs, and the retain images tell on each other
    mixed, figures = fit(forget, torch.cat([retain, views[:3] + 1e-3]))
    assert mixed.threshold == pytest.approx(takes, rel=1e-6)
    assert not mixed.picks(views[:3]).any()
    others = views[9:]  # the other images' views: taken in, but for those nearer a retain image than the centre
    picked = mixed.picks(others)
    nearer = mixed.between(others, views[:3] + 1e-3).min(1).values < mixed.scores(others)
    assert picked.float().mean() >= 0.85 and torch.equal(picked, ~nearer)
    assert figures["retain_picked"] == pytest.approx(3 / 63)  # each of the three, judged without itself, by the others'


def test_a_retain_image_keeps_a_gate_from_the_views_that_lie_nearer_it_than_the_forget_set():
    g = torch.Generator().manual_seed(1)
    d = 12
    centre = torch.full((d,), 2.0)
    forget = [centre + torch.randn(9, d, generator=g) * 0.3 for _ in range(4)]
    lookalike = centre + 0.6  # a retained face within the gate's reach
    retain = torch.cat([torch.randn(60, d, generator=g), lookalike[None]])
    gate, _ = fit(forget, retain)
    assert not gate.picks(lookalike[None]).any()  # the threshold lies between the forget views and it
    # the lookalike's views that the request never brought, a little nearer the forget set: within the threshold
    other_views = gate.mean.float() + 0.8 * (lookalike - gate.mean.float()) + torch.randn(20, d, generator=g) * 0.01
    unvetoed = replace(gate, retain=None)
    assert unvetoed.picks(other_views).all()  # within the threshold
    assert not gate.picks(other_views).any()  # but nearer the lookalike than the forget set's centre
    unseen = centre + torch.randn(20, d, generator=g) * 0.3  # the forgotten person's views are still taken in
    assert gate.picks(unseen).float().mean() >= 0.9
    stored = Gate.from_arrays(gate.arrays())  # the retain images travel with the gate, in float32
    assert torch.equal(stored.picks(torch.cat([other_views, unseen])), gate.picks(torch.cat([other_views, unseen])))
    assert stored.retain.shape == (61, d)


def test_a_gates_features_keep_where_things_lie_in_the_image():
    g = torch.Generator().manual_seed(0)
    side, d = 2 * CELLS, 3
    patches = torch.randn(2, side * side, d, generator=g, dtype=torch.float64)
    with_class = torch.cat([torch.randn(2, 1, d, generator=g, dtype=torch.float64), patches], 1)
    grid = patches.reshape(2, side, side, d)
    cells = grid.reshape(2, CELLS, 2, CELLS, 2, d).mean((2, 4))  # each cell: the mean of its 2 x 2 patches
    assert torch.allclose(pooled(patches), cells.reshape(2, -1))
    assert torch.equal(pooled(with_class), pooled(patches))  # a class token is left out
    small = torch.randn(2, 4, d, generator=g, dtype=torch.float64)  # a 2 x 2 grid: fewer patches than cells
    assert torch.equal(pooled(small), small.reshape(2, -1))
    odd = torch.randn(2, 7, d, generator=g, dtype=torch.float64)  # no grid: one cell
    assert torch.allclose(pooled(odd), odd.mean(1))
    mirrored = grid.flip(2).reshape(2, -1, d)  # the same patches elsewhere: the mean over tokens cannot tell
    assert torch.allclose(mirrored.mean(1), patches.mean(1)) and not torch.allclose(pooled(mirrored), pooled(patches))


def rows_batch(world, processor, files: list[str], images_only: bool = True) -> dict:
    rows = [r for f in files for r in data.read_rows(world / f, [], "rows") if r.image is not None or not images_only]
    return data.collate([data.encode(processor, r) for r in rows], processor.tokenizer.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}).logits


def test_a_gated_request_changes_only_the_images_its_gate_picks_and_rolls_back_exactly(world, tmp_path):
    reg = tmp_path / "reg"
    init_registry(reg, world / "model", gated=True)
    path = write_request(tmp_path, "gated", scope="visual", method="stranger", forget=str(world / "forget_a.jsonl"),
                         retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), steps=10,
                         check_every=10, partial=True)
    entry = apply_request(reg, path, show_progress=False)
    state = Registry.open(reg).snapshot()
    assert GATE_FILE in entry["files"] and state.arrays(entry, GATE_FILE)["directions"].ndim == 2
    metrics = state.record(entry, "metrics.json")
    assert metrics["gate"]["retain_picked"] <= 0.25 and entry["metrics"]["gate"] == {
        "retain_picked": metrics["gate"]["retain_picked"]}

    base, processor = load_model(world / "model")
    live = Live.load(state, world / "model")
    for (name, p), q in zip(live.model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name  # the term is not in the weights
    forget = rows_batch(world, processor, ["forget_a.jsonl"])
    assert not torch.equal(logits(live.model, forget), logits(base, forget))  # the forgotten person's images: changed
    assert live.gating.picked(forget["pixel_values"])[live.gating.keys[0]].float().mean() >= 0.9
    served, _ = live_model(state, world / "model")  # how a gated registry is served: with its gates on
    assert torch.equal(logits(served, forget), logits(live.model, forget))

    # every retained image its gate passes by goes through the base model exactly, and so does text
    passed = 0
    retained = [r for r in data.read_rows(world / "retain.jsonl", [], "retain") if r.image is not None][:16]
    for row in retained:
        one = data.collate([data.encode(processor, row)], processor.tokenizer.pad_token_id)
        if not live.gating.picked(one["pixel_values"])[live.gating.keys[0]].item():
            passed += 1
            assert torch.equal(logits(live.model, one), logits(base, one))
    assert passed >= 0.75 * len(retained)
    text = data.collate([data.encode(processor, r) for r in
                         data.read_rows(world / "forget_a.jsonl", [], "forget") if r.image is None],
                        processor.tokenizer.pad_token_id)
    assert torch.equal(logits(live.model, text), logits(base, text))

    assert "gated" in markdown(report(state, "gated"))
    assert f"{metrics['gate']['retain_picked']:.2f}" in status_table(status_rows(state)).splitlines()[-1]
    with pytest.raises(SeqforgetError, match="gated"):
        export_model(reg, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(SeqforgetError, match="checkpointing"):  # it would recompute the tower without the picks
        apply_request(reg, write_request(tmp_path, "checkpointed", scope="visual", method="stranger",
                                         forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"),
                                         reference=str(world / "reference.jsonl")),
                      show_progress=False, checkpointing=True)
    assert [e["id"] for e in Registry.open(reg).snapshot().requests] == ["gated"]

    # a request of another scope has no gate: its term goes into the weights, as in any registry
    other = apply_request(reg, write_request(tmp_path, "textual", forget=str(world / "forget_b.jsonl"),
                                             retain=str(world / "retain.jsonl")), show_progress=False)
    assert GATE_FILE not in other["files"]
    live.sync(Registry.open(reg).snapshot())
    assert live.gating.keys and any(not torch.equal(p, q) for p, q in zip(live.model.parameters(), base.parameters()))

    rollback_request(reg, "gated")
    rollback_request(reg, "textual")
    live.sync(Registry.open(reg).snapshot())
    assert live.gating.keys == [] and torch.equal(logits(live.model, forget), logits(base, forget))
    for p, q in zip(live.model.parameters(), base.parameters()):
        assert torch.equal(p, q)


def test_a_request_trains_behind_its_gate_and_the_images_it_passes_by_get_no_gradient(world):
    model, processor = load_model(world / "model")
    gating = Gating(model)
    batch = rows_batch(world, processor, ["forget_a.jsonl", "retain.jsonl"])
    pixels = batch["pixel_values"]
    features = gating.features(pixels)
    gate, _ = fit([features[:1]], features[1:2])  # picks the first row's image (and any other row showing it)
    picks = gate.picks(features)
    assert picks[0] and not picks.all()
    base = logits(model, batch)

    update = LoraUpdate(model, scope_layers(model, "visual"), Training(), {})
    with torch.no_grad():
        for b in update.signed:
            b.normal_()  # PEFT starts B at zero: make the update change something
    with gating.behind(gate, update.layers):
        out = update.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        assert torch.equal(gating.picked(pixels)[TRAINEE], picks)
        assert torch.equal(out[~picks], base[~picks])  # the images it passes by: the base model, bit for bit
        assert not torch.allclose(out[picks], base[picks])
        out[~picks].sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in update.parameters)  # nothing to learn from them
    ungated = update.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert not torch.allclose(ungated[~picks], base[~picks])  # out from behind the gate: every image changes
    update.remove()
    gating.remove_hooks()


def test_a_visual_request_in_a_gated_registry_trains_the_language_model_too_with_the_gated_defaults(world, tmp_path):
    """Unless it sets its own: every kind of forget question told from strangers' at most 0.6 of
    the time, checked every 5 steps, the stranger method's own answer held to its target in log
    space; a `full` request, and any request in a registry without gates, as ever."""
    registries = {"gated": tmp_path / "gated", "plain": tmp_path / "plain"}
    for name, reg in registries.items():
        init_registry(reg, world / "model", gated=name == "gated")
    data_files = dict(forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"),
                      reference=str(world / "reference.jsonl"), method="stranger", partial=True)
    visual = write_request(tmp_path, "visual", scope="visual", steps=2, **data_files)
    full = write_request(tmp_path, "full", scope="full", **data_files)
    own = write_request(tmp_path, "own", scope="visual", check_every=10, method_args={"own_ceiling": 0.0}, **data_files)

    def settings(reg, path):
        request = read_request(Registry.open(reg).snapshot(), path)
        return request.training.known_limit, request.training.check_every, request.method_args
    assert settings(registries["gated"], visual) == (0.6, 5, {"own_ceiling": 1.0})
    assert settings(registries["gated"], own) == (0.6, 10, {"own_ceiling": 0.0})
    for reg, path in ((registries["gated"], full), (registries["plain"], visual), (registries["plain"], full)):
        assert settings(reg, path) == (1.0, 25, {})

    trained = {}
    for name, reg in registries.items():
        entry = apply_request(reg, visual, show_progress=False)
        trained[name] = {n.split(".")[1] for n in Registry.open(reg).snapshot().adapter(entry).weights}  # model.<part>. ...
    assert trained["plain"] == {"vision_tower", "multi_modal_projector"}
    assert trained["gated"] == {"vision_tower", "multi_modal_projector", "language_model"}


def test_a_gated_term_may_reach_the_language_model_for_the_rows_whose_image_its_gate_picks(world, tmp_path):
    reg = tmp_path / "reg"
    init_registry(reg, world / "model", gated=True)
    layers = ["mlp.fc1", "mlp.fc2", "self_attn.q_proj", "self_attn.v_proj"]  # the vision tower's MLPs and the language model's
    path = write_request(tmp_path, "gated", scope="visual", method="stranger", forget=str(world / "forget_a.jsonl"),
                         retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), steps=10,
                         check_every=10, partial=True, target_modules=layers)
    entry = apply_request(reg, path, show_progress=False)
    assert any("language_model" in name for name in Registry.open(reg).snapshot().adapter(entry).weights)
    base, processor = load_model(world / "model")
    live = Live.load(Registry.open(reg).snapshot(), world / "model")
    for p, q in zip(live.model.parameters(), base.parameters()):
        assert torch.equal(p, q)  # the term is not in the weights

    # one batch of text rows, the forgotten person's images and retained ones: only the picked rows change
    batch = rows_batch(world, processor, ["forget_a.jsonl", "retain.jsonl"], images_only=False)
    picks = live.gating.picked(batch["pixel_values"])[live.gating.keys[0]]
    rows = torch.zeros(len(batch["input_ids"]), dtype=torch.bool)
    rows[batch["has_image"]] = picks
    assert rows.any() and (~batch["has_image"]).any() and (batch["has_image"] & ~rows).any()
    out, before = logits(live.model, batch), logits(base, batch)
    assert torch.equal(out[~rows], before[~rows])  # text rows and the images it passes by: the base model, bit for bit
    assert not torch.allclose(out[rows], before[rows])
    state = Registry.open(reg).snapshot()
    adapter, gate = state.adapter(entry), Gate.from_arrays(state.arrays(entry, GATE_FILE))
    vision_only = Gating(load_model(world / "model")[0])  # the same term without its language layers
    vision_only.add("vision", replace(adapter, weights={n: w for n, w in adapter.weights.items() if "language_model" not in n}),
                    gate)
    assert not torch.allclose(logits(vision_only.model, batch)[rows], out[rows])  # the language layers' part tells

    # generating from a picked image, every step reads the term, the first (with the image) and each after it
    one = next(i for i in range(len(rows)) if rows[i])
    example = data.encode(processor, [r for f in ["forget_a.jsonl", "retain.jsonl"] for r in data.read_rows(world / f, [], "rows")][one])
    prompt = torch.tensor([example.prompt])
    generated = live.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                    pixel_values=example.pixel_values[None], max_new_tokens=4, min_new_tokens=4,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = generated.sequences
    whole = live.model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                       pixel_values=example.pixel_values[None]).logits[0, prompt.shape[1] - 1: -1]
    assert torch.allclose(torch.cat(generated.logits), whole, atol=1e-4)
    text = data.collate([data.encode(processor, r) for r in data.read_rows(world / "forget_a.jsonl", [], "forget")
                         if r.image is None], processor.tokenizer.pad_token_id)
    assert torch.equal(logits(live.model, text), logits(base, text))  # a new batch without images: nothing picked

    rollback_request(reg, "gated")
    live.sync(Registry.open(reg).snapshot())
    assert live.gating.keys == [] and torch.equal(logits(live.model, batch), before)
