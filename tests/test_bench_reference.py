"""The never-seen people and the membership signal built on them.

The unseen people are the benchmark's reference population: no model may ever train on
them, and the membership AUC (forget set against them) must read 0.5 where nothing tells
the two apart and near 1 where the model remembers.
"""

import json
import re

import pytest
import torch

from benchmarks.forget_retain import FORGET_KINDS, MEMBERSHIP, evaluate, write_request
from seqforget import data
from seqforget.bench.scoring import auc, membership_aucs, rouge_l, stratified_auc
from seqforget.bench.vanilla import TrainSpec, train_model
from seqforget.models import load_model


def test_unseen_people_are_drawn_like_the_others_and_kept_apart(tiny_bench):
    w = tiny_bench.world
    assert len(w.unseen_names) == w.spec.unseen > 0 and not set(w.unseen_names) & set(w.names)
    unseen = w.select(people=w.unseen_names)
    assert {i.kind for i in unseen} == FORGET_KINDS and {i.split for i in unseen} == {"unseen"}
    assert all((w.root / i.image).is_file() for i in unseen if i.image)
    per_person = len(w.select(FORGET_KINDS, [w.names[0]]))
    assert all(len(w.select(FORGET_KINDS, [n])) == per_person for n in w.unseen_names)  # every kind, every view
    for split in ("train", "test"):
        assert not {i.person for i in w.select(split=split)} & set(w.unseen_names)


def test_no_training_ever_reads_an_unseen_person(tiny_bench, tmp_path, monkeypatch):
    """Every image and question a training loads, recorded while a short training runs."""
    w = tiny_bench.world
    touched = []
    encode, load_image = data.encode, data.load_image
    monkeypatch.setattr(data, "encode", lambda processor, row, *a: touched.append(row.question) or encode(processor, row, *a))
    monkeypatch.setattr(data, "load_image", lambda path: touched.append(str(path)) or load_image(path))
    forgotten = w.forget_order()[:1]
    for kwargs in ({}, {"without_images": forgotten}, {"without_people": forgotten}):  # vanilla and both oracles
        train_model(w, tmp_path / str(len(touched)), spec=TrainSpec(vision_epochs=1, scenery=8, lm_epochs=1, scenery_rows=8),
                    log=lambda s: None, **kwargs)
    assert len(touched) > 100
    named = lambda names: [t for t in touched if re.search(rf"\b({'|'.join(names)})\b", t)]  # noqa: E731
    assert not named(w.unseen_names), named(w.unseen_names)[:5]
    assert named(w.names)  # the record does see the people it trains on


def test_request_folders_bring_the_unseen_as_reference_and_never_as_retain(tiny_bench, tmp_path):
    w = tiny_bench.world
    write_request(tiny_bench, tmp_path, "req", w.forget_order()[:2], "full", "ga", None)
    retain = (tmp_path / "req-retain.jsonl").read_text()
    assert retain and not any(name in retain for name in w.unseen_names)
    reference = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    items = w.select(FORGET_KINDS, w.unseen_names)
    assert [(r["question"], r["answer"]) for r in reference] == [(i.question, i.answer) for i in items]
    assert all((tmp_path / r["image"]).resolve() == (w.root / i.image).resolve() for r, i in zip(reference, items) if i.image)


def test_auc_reads_one_half_for_one_distribution_and_one_for_separated_losses():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    assert abs(auc(a, b) - 0.5) < 0.03
    assert auc(a - 3, b) > 0.97  # members' losses lower: remembered
    assert auc(a + 3, b) < 0.03
    assert auc(torch.zeros(5), torch.zeros(7)) == 0.5  # ties count one half


def test_stratified_auc_does_not_read_a_mix_of_kinds_as_membership():
    """Members all of an easy kind, non-members half easy, half hard: pooled, the hard half
    looks like non-membership; within each kind there is none."""
    gen = torch.Generator().manual_seed(1)
    members, easy, hard = torch.randn(400, generator=gen), torch.randn(400, generator=gen), torch.randn(400, generator=gen) + 5
    nonmembers = torch.cat([easy, hard])
    assert auc(members, nonmembers) > 0.7
    assert abs(stratified_auc(members, ["easy"] * 400, nonmembers, ["easy"] * 400 + ["hard"] * 400) - 0.5) < 0.05


@pytest.fixture(scope="module")
def forgotten(tiny_bench):
    return tiny_bench.world.forget_order()[:2]


def test_vanilla_remembers_the_forget_set_and_its_visual_oracle_does_not(tiny_bench, forgotten):
    """Seen image rows of the forget set against never-seen people: the model trained on them
    tells them apart, the model retrained without their images does not."""
    w = tiny_bench.world
    members, reference = w.select({"visual", "identity"}, forgotten, "train"), w.select({"visual", "identity"}, w.unseen_names)
    van = membership_aucs(*load_model(tiny_bench.vanilla), w.root, members, reference, {"visual": {"visual", "identity"}})["visual"]
    oracle = membership_aucs(*load_model(tiny_bench.model_dir(without_images=forgotten)), w.root, members, reference,
                             {"visual": {"visual", "identity"}})["visual"]
    assert van > 0.9, van
    assert abs(oracle - 0.5) < 0.2, oracle
    assert van - oracle > 0.3


def test_two_halves_of_the_never_seen_read_as_one_population(tiny_bench):
    w = tiny_bench.world
    half = len(w.unseen_names) // 2
    model, processor = load_model(tiny_bench.vanilla)
    a, b = w.select(FORGET_KINDS, w.unseen_names[:half]), w.select(FORGET_KINDS, w.unseen_names[half:])
    value = membership_aucs(model, processor, w.root, a, b, {"all": FORGET_KINDS})["all"]
    assert abs(value - 0.5) < 0.2, value


def test_evaluate_reports_per_person_and_membership(tiny_bench, forgotten):
    model, processor = load_model(tiny_bench.vanilla)
    m = evaluate(tiny_bench, model, processor, forgotten)
    assert set(m["forget_visual_by_person"]) == set(forgotten) == set(m["forget_textual_by_person"])
    assert m["forget_visual"] == pytest.approx(sum(m["forget_visual_by_person"].values()) / len(forgotten))
    assert {f"membership_auc{s}" for s in MEMBERSHIP} <= set(m) and m["membership_auc"] > 0.8, m
    # ROUGE-L gives an exact answer 1 and a partly right one some credit: never less than exact match
    assert m["forget_visual_exact"] > 0 and m["forget_visual_rouge_l"] >= m["forget_visual_exact"]
    assert 0 <= m["unseen_visual"] <= 1


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence_of_words():
    assert rouge_l("the red fox", "the fox") == pytest.approx(0.8)  # LCS 2: precision 2/3, recall 1
    assert rouge_l("fox the", "the fox") == pytest.approx(0.5)  # LCS 1 of 2 words each way
    assert rouge_l("a b", "c d") == 0.0 and rouge_l("potter", "potter") == 1.0
