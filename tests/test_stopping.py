"""Calibrated stopping on a real tiny LLaVA: the reference level, the retain guard, the budget."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import snapshot, write_request
from registry import Registry
from seqforget import data
from seqforget.data import Row, Rows, encode, hold_out
from seqforget.engine import apply_request, init_registry, live_model
from seqforget.evaluation import probe
from seqforget.errors import SeqforgetError
from seqforget.requests import Training
from seqforget.status import status_rows, status_table
from seqforget.report import markdown, report
from seqforget.stopping import TEXT_ROWS, by_kind, known_share, row_kind, stranger_rows


@pytest.fixture
def reg_dir(world, tmp_path):
    path = tmp_path / "reg"
    init_registry(path, world / "model")
    return path


@pytest.fixture(scope="module")
def unseen(world, tmp_path_factory) -> str:
    """Rows the model cannot know: person b's questions with answers nobody in the world has."""
    rows = [json.loads(line) for line in (world / "forget_b.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("ref") / "unseen.jsonl"
    words = sorted({r["answer"] for r in rows})
    # every answer swapped for another person-b answer of a different question: wrong, yet in-vocabulary
    path.write_text("".join(json.dumps({**r, "answer": words[(words.index(r["answer"]) + 1) % len(words)],
                                        **({"image": str(world / r["image"])} if "image" in r else {})}) + "\n" for r in rows))
    return str(path)


def test_training_stops_once_the_forget_rows_look_like_the_reference(world, reg_dir, tmp_path, unseen):
    request = write_request(tmp_path, "r", method="ga", steps=200, check_every=5, lr=3e-3, reference=unseen,
                            forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    entry = apply_request(reg_dir, request, show_progress=False)
    stop = entry["metrics"]["stop"]
    assert (stop["rule"], stop["reason"]) == ("reference", "reached") and stop["step"] < 200, stop
    metrics = Registry.open(reg_dir).snapshot().record(entry, "metrics.json")
    last = metrics["stop"]["checks"][-1]
    assert last["forget"]["median_nll"] >= metrics["stop"]["reference"]["median_nll"]  # the level, reached
    assert all(c["forget"]["median_nll"] < metrics["stop"]["reference"]["median_nll"] for c in metrics["stop"]["checks"][:-1])
    assert len(metrics["trajectory"]) == stop["step"] and entry["partial"] is False
    # how well the forget rows can be told from strangers: known before, less so at the check kept
    before, after = entry["metrics"]["known"]
    assert before == metrics["stop"]["reference"]["known_before"] and after == last["forget"]["known"]
    assert after < before and 0.0 <= after <= 1.0
    table = status_table(status_rows(Registry.open(reg_dir).snapshot()))
    assert "{:.2f} -> {:.2f}".format(before, after) in table
    # the same, kind of question by kind: each image question apart, the text rows together
    forget = [json.loads(line) for line in (world / "forget_a.jsonl").read_text().splitlines()]
    kinds = entry["metrics"]["kinds"]
    expected = {}
    for r in forget:
        kind = r["question"] if "image" in r else TEXT_ROWS
        expected[kind] = expected.get(kind, 0) + 1
    assert {k: v["rows"] for k, v in kinds.items()} == expected
    assert kinds == {k: {"rows": v["rows"], "known": [v["known"], last["forget"]["kinds"][k]["known"]],
                         "answered": [v["answered"], last["forget"]["kinds"][k]["answered"]]}
                     for k, v in metrics["stop"]["reference"]["kinds_before"].items()}
    worst = max(kinds, key=lambda k: kinds[k]["known"][1])
    assert f"{kinds[worst]['known'][1]:.2f}, {kinds[worst]['answered'][1]:.0%}" in table
    record = report(Registry.open(reg_dir).snapshot(), "r")
    assert record["stopping"]["kinds"] == kinds
    assert (f"| {worst} | {kinds[worst]['rows']} | {kinds[worst]['known'][0]:.2f} -> {kinds[worst]['known'][1]:.2f} | "
            f"{kinds[worst]['answered'][0]:.0%} -> {kinds[worst]['answered'][1]:.0%} |") in markdown(record)


def test_a_known_limit_holds_the_stop_until_every_kind_reads_as_strangers(world, reg_dir, tmp_path, unseen):
    fields = dict(method="ga", check_every=1, lr=1e-3, reference=unseen, forget=str(world / "forget_a.jsonl"),
                  retain=str(world / "retain.jsonl"))
    median = apply_request(reg_dir, write_request(tmp_path, "median", steps=200, **fields), show_progress=False)
    stop, kinds = median["metrics"]["stop"], median["metrics"]["kinds"]
    worst = max(kinds, key=lambda k: kinds[k]["known"][1])
    assert stop["reason"] == "reached" and kinds[worst]["known"][1] > 0.5  # the median rule let one kind through

    # on the same model, with a limit of 0.5 and the same steps, that check is not enough: refused,
    # nothing committed, the kind named
    other = tmp_path / "other"
    init_registry(other, world / "model")
    before = snapshot(other)
    strict = write_request(tmp_path, "strict", steps=stop["step"], known_limit=0.5, **fields)
    with pytest.raises(SeqforgetError, match=re.escape(f"{worst!r} still told from strangers' at "
                                                       f"{kinds[worst]['known'][1]:.2f} (limit 0.5)")):
        apply_request(other, strict, show_progress=False)
    assert {k: v for k, v in snapshot(other).items() if k != "journal.jsonl"} == {  # the journal notes the attempt
        k: v for k, v in before.items() if k != "journal.jsonl"}
    # given the steps, it goes on until every kind is at most the limit
    entry = apply_request(other, write_request(tmp_path, "longer", steps=200, known_limit=0.5, **fields),
                          show_progress=False)
    assert entry["metrics"]["stop"]["reason"] == "reached" and entry["metrics"]["stop"]["step"] > stop["step"]
    assert all(k["known"][1] <= 0.5 for k in entry["metrics"]["kinds"].values())



def test_the_retain_guard_refuses_a_request_that_costs_retained_accuracy(world, reg_dir, tmp_path, unseen):
    before = snapshot(reg_dir)
    request = write_request(tmp_path, "r", method="ga", steps=60, check_every=10, lr=1e-1, projection=False,
                            retain_tolerance=0.0, reference=unseen,
                            forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    with pytest.raises(SeqforgetError, match="retain guard stopped it"):
        apply_request(reg_dir, request, show_progress=False)
    assert {k: v for k, v in snapshot(reg_dir).items() if k != "journal.jsonl"} == {
        k: v for k, v in before.items() if k != "journal.jsonl"}
    assert Registry.open(reg_dir).snapshot().requests == []


def test_a_partial_request_commits_what_the_guard_kept_and_says_so(world, reg_dir, tmp_path, unseen):
    request = write_request(tmp_path, "r", method="ga", steps=60, check_every=5, lr=1e-2, projection=False,
                            retain_tolerance=0.0, reference=unseen, partial=True,
                            forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    entry = apply_request(reg_dir, request, show_progress=False)
    assert entry["partial"] is True and entry["metrics"]["stop"]["reason"] == "retain_guard"
    metrics = Registry.open(reg_dir).snapshot().record(entry, "metrics.json")
    checks = metrics["stop"]["checks"]
    kept = entry["metrics"]["stop"]["step"]
    assert kept < checks[-1]["step"]  # the adapter of the last check the guard accepted, not the last one trained
    refused = [c for c in checks if "retain guard" in c.get("decision", "")]
    assert [c["decision"].split(", ")[1] for c in refused] == ["learning rate x0.5", "learning rate x0.25",
                                                                "learning rate x0.125", "stopped"]  # shrink three times, then stop
    accepted = [c for c in checks if c not in refused]
    assert all(c["guard"]["token_acc"] >= metrics["before"]["guard"]["token_acc"] for c in accepted if c["step"] <= kept)
    assert metrics["after"]["guard"]["token_acc"] >= metrics["before"]["guard"]["token_acc"] - 0.01
    table = status_table(status_rows(Registry.open(reg_dir).snapshot()))
    assert "active (partial)" in table and f"retain guard, step {kept}" in table
    assert_after_figures_are_the_committed_models(reg_dir, request, metrics)


def test_the_figures_after_a_request_are_those_of_the_committed_model(world, reg_dir, tmp_path, unseen):
    """Most figures after training are the stopping rule's last check of the adapter kept; they
    must be what the committed model gives, projector included when the adapter trained it."""
    request = write_request(tmp_path, "r", scope="visual", method="ga", steps=12, check_every=5, lr=3e-2,
                            reference=unseen, partial=True, forget=str(world / "forget_a.jsonl"),
                            retain=str(world / "retain.jsonl"))
    entry = apply_request(reg_dir, request, show_progress=False)
    metrics = Registry.open(reg_dir).snapshot().record(entry, "metrics.json")
    assert 0 < metrics["stop"]["step"] and metrics["stop"]["checks"]
    before, after = entry["metrics"]["projector_condition"]
    assert before != after  # ga moved the projector: its condition is taken again
    assert_after_figures_are_the_committed_models(reg_dir, request, metrics)


def assert_after_figures_are_the_committed_models(reg_dir, request_path, metrics: dict) -> None:
    """The figures after, recomputed from the request's files one row at a time by a plain forward
    pass of the committed model: neither the engine's encoding nor its probe is used."""
    state = Registry.open(reg_dir).snapshot()
    model, processor = live_model(state)
    fields = yaml.safe_load(Path(request_path).read_text())
    forget = data.read_rows(Path(fields["forget"]), [], "forget")
    retain, guard = data.hold_out(data.read_rows(Path(fields["retain"]), [], "retain"),
                                  fields.get("guard_share", Training().guard_share))
    if fields.get("scope", "full") == "visual":  # a visual request's text rows are knowledge that stays
        retain += [r for r in forget if r.image is None]
        forget = [r for r in forget if r.image is not None]
    for name, rows in (("forget", forget), ("retain", retain), ("guard", guard)):
        if name in metrics["after"]:
            nll, token_acc = plain_figures(model, processor, rows)
            assert nll == pytest.approx(metrics["after"][name]["nll"], rel=1e-4, abs=1e-6), name
            assert token_acc == pytest.approx(metrics["after"][name]["token_acc"]), name


@torch.no_grad()
def plain_figures(model, processor, rows) -> tuple[float, float]:
    """(mean over rows of the answer's per-token NLL, share of answer tokens ranked first)."""
    nlls, hits, tokens = [], 0, 0
    for row in rows:
        example = data.encode(processor, row)
        inputs = {"input_ids": example.input_ids[None], "attention_mask": torch.ones_like(example.input_ids)[None]}
        if example.pixel_values is not None:
            inputs["pixel_values"] = example.pixel_values[None]
        logits = model(**inputs).logits[0, :-1]
        target = example.labels[1:]
        answer = target != data.IGNORE
        logp = torch.log_softmax(logits[answer].double(), -1)
        nlls.append(-logp.gather(1, target[answer][:, None]).mean().item())
        hits += (logits[answer].argmax(-1) == target[answer]).sum().item()
        tokens += int(answer.sum())
    return sum(nlls) / len(nlls), hits / tokens


def test_without_reference_rows_the_budget_ends_training(world, reg_dir, tmp_path):
    request = write_request(tmp_path, "r", method="gd", steps=7, check_every=5,
                            forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    entry = apply_request(reg_dir, request, show_progress=False)
    assert entry["metrics"]["stop"] == {"rule": "budget", "reason": "budget", "step": 7}
    assert entry["partial"] is False and entry["metrics"]["reference_nll"] is None


def test_known_share_is_the_auc_of_forget_rows_against_the_levels():
    assert known_share([0.1, 0.2], [1.0, 2.0, 3.0]) == 1.0  # every forget row surer than every level
    assert known_share([5.0, 6.0], [1.0, 2.0]) == 0.0
    assert known_share([1.0, 3.0], [1.0, 2.0]) == pytest.approx((0.5 + 1 + 0 + 0) / 4)  # a tie counts half


def test_each_kind_of_forget_question_is_told_from_strangers_apart(tmp_path):
    face = tmp_path / "face.png"
    forget = [Row("who is this ?", "kalo", face), Row("what is this person's job ?", "potter", face),
              Row("what is the job of kalo ?", "potter"), Row("where does kalo live ?", "oslo")]
    kinds = [row_kind(r) for r in forget]
    assert kinds == ["who is this ?", "what is this person's job ?", TEXT_ROWS, TEXT_ROWS]
    # the name still surer than its level and answered; the job past it; the text rows one each way
    nll, exact, levels = [0.1, 3.0, 0.5, 4.0], [True, False, True, False], [5.0, 2.0, 2.0, 2.0]
    assert by_kind(nll, exact, levels, [0, 1, 2, 3], kinds) == {
        "who is this ?": {"rows": 1, "known": 1.0, "answered": 1.0},
        "what is this person's job ?": {"rows": 1, "known": 0.0, "answered": 0.0},
        TEXT_ROWS: {"rows": 2, "known": 0.5, "answered": 0.5}}
    # a forget row without strangers has no level and counts in no kind
    assert by_kind(nll, exact, levels[1:], [1, 2, 3], kinds)["what is this person's job ?"]["rows"] == 1
    assert "who is this ?" not in by_kind(nll, exact, levels[1:], [1, 2, 3], kinds)


def test_strangers_are_asked_the_forget_rows_questions_and_scored_on_their_answers(tmp_path):
    face, other, stranger_a, stranger_b = (tmp_path / f"{n}.png" for n in ("face", "other", "sa", "sb"))
    forget = [Row("what is this person's job ?", "potter", face), Row("what is this person's job ?", "baker", other),
              Row("what is the job of kalo ?", "potter")]
    reference = [Row("what is this person's job ?", "nurse", stranger_a), Row("what is this person's job ?", "miner", stranger_b),
                 Row("which city does this person live in ?", "oslo", stranger_a), Row("what is the job of vexa ?", "judge"),
                 Row("which city does vexa live in ?", "rome")]
    rows, stands_for = stranger_rows(forget, reference, per_row=2)
    assert stands_for == [0, 0, 1, 1, 2]
    assert rows[:2] == [Row("what is this person's job ?", "potter", stranger_a), Row("what is this person's job ?", "potter", stranger_b)]
    assert {r.image for r in rows[2:4]} == {stranger_a, stranger_b} and {r.answer for r in rows[2:4]} == {"baker"}
    assert rows[4:] == [Row("what is the job of vexa ?", "potter")]  # the same template about another name, text with text


def test_the_guard_watches_retain_images_that_training_never_sees(world, reg_dir, tmp_path):
    """The retain term holds the rows it trains on whatever becomes of the rest, so the guard
    watches a held-out share of the retain images, every row of a held image held with it."""
    retain = [Row(r["question"], r["answer"], (world / r["image"]).resolve() if "image" in r else None)
              for r in map(json.loads, (world / "retain.jsonl").read_text().splitlines())]
    kept, held = hold_out(retain, 0.2)
    assert sorted(map(repr, kept + held)) == sorted(map(repr, retain)) and 0 < len(held) < len(retain) / 2
    assert not {r.image for r in held if r.image} & {r.image for r in kept if r.image}
    request = write_request(tmp_path, "r", method="gd", steps=5, check_every=5,
                            forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    metrics = Registry.open(reg_dir).snapshot().record(apply_request(reg_dir, request, show_progress=False), "metrics.json")
    assert metrics["rows"]["guard"] == len(held) and metrics["rows"]["retain"] == len(kept)  # held rows stay out of training
    assert metrics["rows"]["guard_tokens"] * 0.02 >= 1  # enough that one wrong token stays within the default tolerance
    checked, retain = metrics["stop"]["checks"][0]["guard"], metrics["after"]["retain"]
    model, processor = live_model(Registry.open(reg_dir).snapshot())
    held_out = probe(model, Rows([encode(processor, r) for r in held], processor.tokenizer.pad_token_id).fixed)
    assert checked["nll"] == pytest.approx(held_out["nll"], rel=1e-4) != retain["nll"]  # the check probed the held-out rows
    table = status_table(status_rows(Registry.open(reg_dir).snapshot()))
    assert "held-out retain acc" in table
    assert "{:.2f} -> {:.2f}".format(metrics["before"]["guard"]["token_acc"], metrics["after"]["guard"]["token_acc"]) in table.splitlines()[-1]


def test_hold_out_spreads_whole_images_over_the_rows(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(10)]
    rows = [Row(q, "a", image) for image in images for q in ("who ?", "where ?")] + [Row(f"text {i}", "b") for i in range(5)]
    kept, held = hold_out(rows, 0.2)  # 15 groups (10 images, 5 text rows): every fifth is held
    assert held == [Row("who ?", "a", images[4]), Row("where ?", "a", images[4]),
                    Row("who ?", "a", images[9]), Row("where ?", "a", images[9]), Row("text 4", "b")]
    assert kept == [r for r in rows if r not in held]
    assert hold_out(rows, 0.0) == (rows, [])


def test_a_refusal_not_learnt_is_refused_and_a_partial_one_shows_how_far_it_got(world, reg_dir, tmp_path):
    """A refusal's rule: its forget questions refused (greedy), trained and held-out views alike, and
    few retained ones. A few steps at a small learning rate refuse nothing: the request must fail."""
    before = snapshot(reg_dir)
    fields = dict(scope="refuse", method="refusal", steps=4, check_every=2, lr=1e-5, retain_tolerance=1.0,
                  forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    with pytest.raises(SeqforgetError, match=r"did not learn its refusal .* budget of 4 steps ran out; at step 4 it refused 0%"):
        apply_request(reg_dir, write_request(tmp_path, "r", **fields), show_progress=False)
    assert {k: v for k, v in snapshot(reg_dir).items() if k != "journal.jsonl"} == {
        k: v for k, v in before.items() if k != "journal.jsonl"}
    entry = apply_request(reg_dir, write_request(tmp_path, "p", partial=True, **fields), show_progress=False)
    stop = Registry.open(reg_dir).snapshot().record(entry, "metrics.json")["stop"]
    assert entry["partial"] and stop["rule"] == "refusal" and stop["reason"] == "budget"
    assert [c["step"] for c in stop["checks"]] == [2, 4] and all("refused" in c and "sarr" in c for c in stop["checks"])
    assert entry["metrics"]["refusal"] == {**stop["checks"][-1]["refused"], "sarr": stop["checks"][-1]["sarr"]}
    assert "0.00" in status_table(status_rows(Registry.open(reg_dir).snapshot())).splitlines()[-1]
