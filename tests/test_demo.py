"""`seqforget demo`, end to end, on the tests' tiny world: its visual and full requests commit, within
the registry's budget, its rollback takes one back, and its refusal is committed only if learnt
within the budget."""

from registry import Registry
from seqforget.bench.demo import run_demo


def test_the_demo_commits_its_requests_rolls_one_back_and_commits_a_refusal_only_if_learnt(tiny_bench, tmp_path, capsys):
    run_demo(tmp_path / "demo", tiny_bench.world, tiny_bench.vanilla)
    out = capsys.readouterr().out
    state = Registry.open(tmp_path / "demo" / "registry").snapshot()
    assert [(e["scope"], e["state"]) for e in state.requests[:2]] == [("visual", "active"), ("full", "rolled_back")]
    assert "was rolled back" in out and "live:" in out
    assert "retained 100.0% of base (no request active), budget 95%" in out
    # a table of what each step did, on views no request trained on, and its picture
    table = out[out.index("accuracy after each step"):out.index("picture:")].strip().splitlines()[2:]
    ids = [e["id"] for e in state.requests]
    assert [line.strip().split("  ")[0] for line in table] == ["base model"] + [f"+ {i}" for i in ids] + [f"- {ids[1]}"]
    assert all(line.count("%") == 2 * 3 + 1 for line in table)  # each person's images and text, the retained people's
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert f"picture: {tmp_path / 'demo' / 'demo.png'}" in out
    for entry in state.requests:
        kept = entry["metrics"]["retained"]
        assert kept["after"] / kept["base"] >= kept["budget"]
    refuse = state.requests[2:]
    if refuse:  # learnt: its figures meet the rule that stopped it
        figures = refuse[0]["metrics"]["refusal"]
        assert not refuse[0]["partial"] and figures["trained"] >= 0.99 and figures["sarr"] <= 0.1
        assert "refuses 100% of its forget questions" in out
    else:  # not learnt, or not within the budget: said so, in the line `seqforget apply` prints
        assert "not committed: request" in out and ("did not learn its refusal" in out or "below its budget" in out)
