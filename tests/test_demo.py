"""`seqforget demo`, end to end, on the tests' tiny world: its visual and full requests commit, its
rollback takes one back, and its refusal is committed only if learnt (on seed 0 of the world it
is, at step 175 of 600)."""

from registry import Registry
from seqforget.bench.demo import run_demo


def test_the_demo_commits_its_requests_rolls_one_back_and_commits_a_refusal_only_if_learnt(tiny_bench, tmp_path, capsys):
    run_demo(tmp_path / "demo", tiny_bench.world, tiny_bench.vanilla)
    out = capsys.readouterr().out
    state = Registry.open(tmp_path / "demo" / "registry").snapshot()
    assert [(e["scope"], e["state"]) for e in state.requests[:2]] == [("visual", "active"), ("full", "rolled_back")]
    assert "was rolled back" in out and "live:" in out
    refuse = state.requests[2:]
    if refuse:  # learnt: its figures meet the rule that stopped it
        figures = refuse[0]["metrics"]["refusal"]
        assert not refuse[0]["partial"] and figures["trained"] >= 0.99 and figures["sarr"] <= 0.1
        assert "refuses 100% of its forget questions" in out
    else:  # not learnt: said so, in the line `seqforget apply` prints
        assert "not committed: request" in out and "did not learn its refusal" in out
