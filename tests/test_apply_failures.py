"""Failures inside a real apply: before the commit point nothing shows; after it, the request stands."""

import os

import pytest

from conftest import write_request
from registry import Registry, RegistryError
from seqforget.engine import apply_request, init_registry


@pytest.fixture
def reg_dir(world, tmp_path):
    path = tmp_path / "reg"
    init_registry(path, world / "model")
    return path


def _request(world, tmp_path, request_id="r"):
    return write_request(tmp_path, request_id, steps=2, forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))


def test_failure_at_the_manifest_write_leaves_the_registry_as_it_was(world, reg_dir, tmp_path, monkeypatch):
    manifest = (reg_dir / "manifest.json").read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("manifest.json"):
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        apply_request(reg_dir, _request(world, tmp_path), show_progress=False)
    monkeypatch.undo()
    reg = Registry.open(reg_dir)
    assert (reg_dir / "manifest.json").read_bytes() == manifest
    assert reg.verify() == [] and reg.snapshot().requests == []
    assert [r["event"] for r in reg.journal()][-2:] == ["begin", "abort"]
    # the abort removed the folder that was renamed in before the manifest write failed
    assert reg.leftovers() == [] and not (reg_dir / "requests" / "r").exists()
    apply_request(reg_dir, _request(world, tmp_path), show_progress=False)
    assert reg.leftovers() == [] and reg.snapshot().find("r")["state"] == "active"


def test_failure_after_the_commit_point_reports_the_request_as_committed(world, reg_dir, tmp_path, monkeypatch):
    real_write = os.write

    def write(fd, data):
        if b'"event": "commit"' in data:
            raise OSError("journal device gone")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(RegistryError, match="r is committed"):
        apply_request(reg_dir, _request(world, tmp_path), show_progress=False)
    monkeypatch.undo()
    reg = Registry.open(reg_dir)
    assert reg.snapshot().find("r")["state"] == "active" and reg.verify() == []
    events = [(r["event"], r.get("id")) for r in reg.journal()]
    assert ("abort", "r") not in events  # the journal must not contradict the manifest
    with reg.writer():  # the next writer closes the open begin as committed
        pass
    assert ("recovered", "r", "committed") in [(r["event"], r.get("id"), r.get("outcome")) for r in reg.journal()]
