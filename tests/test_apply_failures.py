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


@pytest.mark.parametrize("method", ["ga", "mmunlearner"])
def test_an_update_that_changes_no_weight_is_refused_in_one_line_and_nothing_is_written(world, reg_dir, tmp_path, method):
    """Text-only forget rows never reach the projector, so an update trained there stays zero: ascent's
    LoRA keeps B = 0, and MMUnlearner's saliency mask frees no weight (only retained rows reach it).
    The request did nothing, partial or not, and must not be committed."""
    import json

    from conftest import snapshot
    from seqforget.errors import SeqforgetError

    rows = [line for line in (world / "forget_a.jsonl").read_text().splitlines() if "image" not in json.loads(line)]
    (tmp_path / "text_only.jsonl").write_text("\n".join(rows) + "\n")
    request = write_request(tmp_path, "nothing", method=method, steps=4, partial=True, target_modules=["linear_1"],
                            forget=str(tmp_path / "text_only.jsonl"), retain=str(world / "retain.jsonl"))
    before = snapshot(reg_dir)
    with pytest.raises(SeqforgetError, match="changed no weight|never reach") as failure:
        apply_request(reg_dir, request, show_progress=False)
    assert "\n" not in str(failure.value)
    after = snapshot(reg_dir)
    assert {k: v for k, v in after.items() if "journal" not in k} == {k: v for k, v in before.items() if "journal" not in k}
    assert Registry.open(reg_dir).snapshot().requests == []
