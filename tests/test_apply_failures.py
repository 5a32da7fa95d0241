"""Failures inside a real apply: before the commit point nothing shows; after it, the request stands."""

import pytest

import registry.store
from conftest import write_request
from registry import Registry, journal
from seqforget.engine import apply_request, init_registry
from seqforget.errors import SeqforgetError


@pytest.fixture
def reg_dir(world, tmp_path):
    path = tmp_path / "reg"
    init_registry(path, world / "model")
    return path


def test_failure_at_the_manifest_write_leaves_the_registry_as_it_was(world, reg_dir, tmp_path, monkeypatch):
    manifest = (reg_dir / "manifest.json").read_bytes()

    def broken(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(registry.store, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        apply_request(reg_dir, write_request(tmp_path, "r", steps=2, forget=str(world / "forget_a.jsonl"),
                                             retain=str(world / "retain.jsonl")), show_progress=False)
    monkeypatch.undo()
    reg = Registry.open(reg_dir)
    assert (reg_dir / "manifest.json").read_bytes() == manifest
    assert reg.verify() == [] and reg.requests() == []
    assert [r["event"] for r in reg.journal()][-2:] == ["begin", "abort"]
    # the staged folder that was renamed in is invisible, and the next writer removes it
    assert reg.leftovers() != []
    apply_request(reg_dir, write_request(tmp_path, "r", steps=2, forget=str(world / "forget_a.jsonl"),
                                         retain=str(world / "retain.jsonl")), show_progress=False)
    assert reg.leftovers() == [] and reg.find("r")["state"] == "active"


def test_failure_after_the_commit_point_reports_the_request_as_committed(world, reg_dir, tmp_path, monkeypatch):
    real_append = journal.append

    def append(path, event, **fields):
        if event == "commit":
            raise OSError("journal device gone")
        real_append(path, event, **fields)

    monkeypatch.setattr(journal, "append", append)
    with pytest.raises(SeqforgetError, match="r is committed"):
        apply_request(reg_dir, write_request(tmp_path, "r", steps=2, forget=str(world / "forget_a.jsonl"),
                                             retain=str(world / "retain.jsonl")), show_progress=False)
    monkeypatch.undo()
    reg = Registry.open(reg_dir)
    assert reg.find("r")["state"] == "active" and reg.verify() == []
    events = [(r["event"], r.get("id")) for r in reg.journal()]
    assert ("abort", "r") not in events  # the journal must not contradict the manifest
    with reg.writer():  # the next writer closes the open begin as committed
        pass
    assert ("recovered", "r", "committed") in [(r["event"], r.get("id"), r.get("outcome")) for r in reg.journal()]
