"""The registry's budget: measured against the base model on the registry's guard rows, shown by
`status`, and never crossed by a committed request unless it says partial (and then only up to
its last step within the budget)."""

import json

import pytest
from click.testing import CliRunner

from conftest import snapshot, write_request
from registry import Registry
from seqforget import data
from seqforget.budget import read_guard
from seqforget.cli import EXIT_OVER_BUDGET, cli
from seqforget.engine import live_model
from seqforget.evaluation import probe


def unchanged(reg, before: dict) -> bool:
    """The registry as it was, but for its journal (which records the abort)."""
    after = snapshot(reg)
    return {k: v for k, v in after.items() if "journal" not in k} == {k: v for k, v in before.items() if "journal" not in k}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def guard_share(reg) -> float:
    """The live model's exact answers on the registry's guard rows as a share of the base model's,
    measured afresh: the registry's live model composed from its files, probed here."""
    state = Registry.open(reg).snapshot()
    model, processor = live_model(state)
    rows = data.Rows([data.encode(processor, r) for r in read_guard(state.guard["path"])], processor.tokenizer.pad_token_id)
    return probe(model, rows.fixed)["exact"] / state.guard["base"]["exact"]


def status_lines(reg) -> list[str]:
    result = invoke("status", "-r", reg)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_the_running_total_is_the_live_models_and_follows_rollbacks(world, tmp_path):
    reg = tmp_path / "reg"
    # a budget both requests fit in on any build of the tiny world (one request may spend 10 points of
    # it there: on seed 2 the second request of this test could keep no step within 95%)
    result = invoke("init", "--model", world / "model", "--retain", world / "retain.jsonl", "--reference",
                    world / "reference.jsonl", "--guard", world / "guard.jsonl", "--budget", "0.5", "-r", reg)
    assert result.exit_code == 0, result.output
    guard = Registry.open(reg).snapshot().guard
    assert guard["rows"] == len((world / "guard.jsonl").read_text().splitlines()) and guard["budget"] == 0.5
    assert 0 < guard["base"]["exact"] <= 1 and "guard: " in result.output
    assert "retained 100.0% of base (no request active), budget 50%" in status_lines(reg)

    for request_id, forget in (("first", "forget_a.jsonl"), ("second", "forget_b.jsonl")):
        path = write_request(tmp_path, request_id, scope="visual", method="stranger", forget=str(world / forget), retain=str(world / "retain.jsonl"),
                             steps=40, partial=True)
        result = invoke("apply", path, "-r", reg, "-q")
        assert result.exit_code == 0, result.output
        entry = Registry.open(reg).snapshot().find(request_id)
        kept = entry["metrics"]["retained"]
        assert kept["after"] / kept["base"] >= kept["budget"]  # committed within the budget, partial or not
        assert kept["after"] / kept["base"] == pytest.approx(guard_share(reg), abs=1e-6)  # what the live model answers
        assert f"retained {kept['after'] / kept['base']:.1%} of base (after {request_id}), budget 50%" in status_lines(reg)

    assert invoke("rollback", "second", "-r", reg).exit_code == 0
    first = Registry.open(reg).snapshot().find("first")["metrics"]["retained"]
    lines = status_lines(reg)  # the live model is again the one `first` was measured on
    assert f"retained {first['after'] / first['base']:.1%} of base (after first), budget 50%" in lines
    assert invoke("rollback", "first", "-r", reg).exit_code == 0
    assert "retained 100.0% of base (no request active), budget 50%" in status_lines(reg)


@pytest.fixture
def strict(world, tmp_path):
    """A registry that keeps every exact answer of the base model on its guard rows."""
    reg = tmp_path / "strict"
    result = invoke("init", "--model", world / "model", "--guard", world / "guard.jsonl", "--budget", "1", "-r", reg)
    assert result.exit_code == 0, result.output
    return reg


def test_a_request_that_would_cross_the_budget_exits_6_and_changes_nothing(world, strict, tmp_path):
    # loss ascent at a learning rate no retained answer survives: every check falls below the budget
    path = write_request(tmp_path, "harsh", method="ga", lr=0.3, steps=20, check_every=1,
                         forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    before = snapshot(strict)
    result = invoke("apply", path, "-r", strict, "-q")
    assert result.exit_code == EXIT_OVER_BUDGET, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "below its budget of 100%" in message and "Nothing was committed" in message
    assert [r["event"] for r in Registry.open(strict).journal()][-1] == "abort"
    assert unchanged(strict, before)


def test_a_partial_request_commits_its_last_step_within_the_budget(world, strict, tmp_path):
    path = write_request(tmp_path, "harsh", method="ga", lr=0.3, steps=20, check_every=1, partial=True,
                         forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    result = invoke("apply", path, "-r", strict, "-q")
    assert result.exit_code == 0, result.output
    entry = Registry.open(strict).snapshot().find("harsh")
    assert entry["partial"] and entry["metrics"]["stop"]["reason"] == "registry_guard"
    kept = entry["metrics"]["retained"]
    assert kept["after"] >= kept["base"]  # a budget of 100%: at least as many guard rows answered exactly as by the base model
    assert guard_share(strict) == pytest.approx(kept["after"] / kept["base"], abs=1e-6)
    assert f"retained {kept['after'] / kept['base']:.1%} of base (after harsh), budget 100%" in status_lines(strict)


def test_the_guard_rows_are_not_for_forgetting_and_may_not_change(world, strict, tmp_path):
    own = tmp_path / "guard_rows.jsonl"
    rows = (world / "guard.jsonl").read_text().splitlines()
    own.write_text("\n".join(json.dumps({**json.loads(r), "image": str(world / json.loads(r)["image"])}) for r in rows[:2]) + "\n")
    path = write_request(tmp_path, "mine", forget=str(own), retain=str(world / "retain.jsonl"))
    before = snapshot(strict)
    result = invoke("apply", path, "-r", strict, "-q")
    assert result.exit_code == 1 and "asks to forget 2 of the registry's guard rows" in result.stderr
    assert unchanged(strict, before)

    guard = world / "guard.jsonl"
    text = guard.read_text()
    try:
        guard.write_text(text + text.splitlines()[0] + "\n")
        result = invoke("apply", write_request(tmp_path, "later", retain=str(world / "retain.jsonl"),
                                               forget=str(world / "forget_a.jsonl")), "-r", strict, "-q")
        assert result.exit_code == 1 and "changed since `seqforget init`" in result.stderr
    finally:
        guard.write_text(text)


def test_a_budget_outside_0_to_1_and_a_guard_the_model_cannot_answer_are_refused(world, tmp_path):
    result = invoke("init", "--model", world / "model", "--guard", world / "guard.jsonl", "--budget", "1.5",
                    "-r", tmp_path / "r1")
    assert result.exit_code == 2 and not (tmp_path / "r1").exists()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({**json.loads(r), "answer": "zzzz qqqq", "image": str(world / json.loads(r)["image"])})
                             + "\n" for r in (world / "guard.jsonl").read_text().splitlines()))
    result = invoke("init", "--model", world / "model", "--guard", wrong, "-r", tmp_path / "r2")
    assert result.exit_code == 1 and "answers none of the" in result.stderr and not (tmp_path / "r2").exists()


def test_a_partial_request_that_kept_no_step_within_the_budget_is_refused_over_budget(world, strict, tmp_path):
    path = write_request(tmp_path, "wild", method="ga", lr=1.0, steps=4, check_every=1, partial=True, projection=False,
                         forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    before = snapshot(strict)
    result = invoke("apply", path, "-r", strict, "-q")
    assert result.exit_code == EXIT_OVER_BUDGET, result.output
    assert "its last step within the budget (none)" in result.stderr and unchanged(strict, before)


def test_the_running_total_says_when_a_rollback_made_it_stale(tmp_path):
    from registry import Snapshot
    from seqforget.budget import budget_line, running_total

    def entry(seq, state, applied, rolled=None, after=0.9):
        return {"id": f"r{seq}", "seq": seq, "state": state, "applied_at": applied, "rolled_back_at": rolled,
                "metrics": {"retained": {"before": 1.0, "after": after, "base": 1.0, "budget": 0.8}}}

    guard = {"budget": 0.8, "base": {"exact": 1.0}}
    measured = [entry(1, "active", "2026-01-01T00:00:01Z", after=0.95), entry(2, "active", "2026-01-01T00:00:02Z"),
                entry(3, "rolled_back", "2026-01-01T00:00:03Z", "2026-01-01T00:00:04Z", after=0.5)]
    total = running_total(Snapshot(tmp_path, {"guard": guard, "requests": measured}))
    assert total == {"share": 0.9, "budget": 0.8, "after": "r2", "stale": False}  # r3 off again: the model r2 was measured on
    earlier = [entry(1, "rolled_back", "2026-01-01T00:00:01Z", "2026-01-01T00:00:05Z", after=0.95),
               entry(2, "active", "2026-01-01T00:00:02Z")]
    state = Snapshot(tmp_path, {"guard": guard, "requests": earlier})
    assert running_total(state)["stale"]  # r1 was in the model r2 was measured on, and is gone
    assert budget_line(state) == "retained 90.0% of base (after r2; rolled back since, not measured again), budget 80%"
    assert budget_line(Snapshot(tmp_path, {"requests": []})).startswith("no budget")


def test_every_line_of_a_stream_says_where_the_registry_stands(world, strict, tmp_path):
    import re

    source = tmp_path / "requests.jsonl"
    common = {"scope": "full", "forget": str(world / "forget_a.jsonl"), "retain": str(world / "retain.jsonl"),
              "method": "ga", "steps": 20, "check_every": 1, "retain_tolerance": 1.0, "partial": True}
    lines = [dict(common, id="kept", lr=0.3), dict(common, id="wild", lr=1.0, steps=4, projection=False)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = invoke("stream", source, "--once", "-q", "-r", strict)
    assert result.exit_code == 0, result.output
    applied, rejected = result.output.splitlines()[:2]
    assert "applied kept" in applied and re.search(r"retained \d+\.\d% of base \(budget 100%\)", applied)
    assert "rejected" in rejected and re.search(r"\[retained \d+\.\d% of base \(after kept\), budget 100%\]$", rejected)
