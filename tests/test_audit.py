"""`seqforget report` (the record of a deletion) and `seqforget gc` (what nothing references)."""

import json

import pytest
from click.testing import CliRunner

from conftest import snapshot, write_request
from registry import Registry, sha256_file
from seqforget.cli import cli
from seqforget.engine import apply_request, init_registry, rollback_request


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def applied(world, tmp_path_factory):
    reg = tmp_path_factory.mktemp("audit") / "reg"
    init_registry(reg, world / "model")
    request = write_request(reg.parent, "erase-a", forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"),
                            steps=4)
    apply_request(reg, request, show_progress=False)
    rollback_request(reg, "erase-a")
    return reg


def test_report_gives_the_hashes_settings_stop_figures_and_times_of_a_deletion(world, applied, tmp_path):
    result = invoke("report", "erase-a", "-r", applied, "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "erase-a.report.json").read_text())
    entry = Registry.open(applied).snapshot().find("erase-a")
    assert record["request"]["sha256"] == entry["sha256"] and record["state"] == "rolled_back"
    assert record["data"]["forget"]["sha256"] == sha256_file(world / "forget_a.jsonl")
    assert record["data"]["retain"]["sha256"] == sha256_file(world / "retain.jsonl")
    folder = applied / entry["dir"]
    assert record["files"] == {p.name: sha256_file(p) for p in folder.iterdir()}
    assert "adapter_model.safetensors" in record["files"] and record["adapter"]["kind"] == "lora"
    assert record["stopping"]["step"] == 4 and record["request"]["training"]["steps"] == 4
    for label in ("forget", "retain"):
        assert set(record["figures"]["before"][label]) == set(record["figures"]["after"][label]) >= {"token_acc", "nll"}
    assert record["times"]["applied_at"] and record["times"]["rolled_back_at"] and record["times"]["train_seconds"] > 0
    text = (tmp_path / "erase-a.report.md").read_text()
    assert text.startswith("# Deletion record: erase-a") and entry["sha256"] in text and "rolled back" in text
    assert record["files"]["adapter_model.safetensors"] in text
    keys = record["forget_keys"]
    assert keys["bytes"] == (folder / "forget_keys.h5").stat().st_size and set(keys["layers"]) == set(record["basis"]["layers"])
    assert set(record["room"]) == set(keys["layers"]) and all(0 <= g["free"] <= g["width"] for g in record["room"].values())
    assert "input directions of" in text
    assert f"Its forget keys: {sum(g['columns_added'] for n, g in keys['layers'].items() if g['shares_with'] == n)} column(s)" in text


def test_report_refuses_an_unknown_id_and_a_tampered_record(applied, tmp_path):
    result = invoke("report", "nobody", "-r", applied, "--out", tmp_path)
    assert result.exit_code == 1 and "no request 'nobody'" in result.stderr
    reg = tmp_path / "reg"
    import shutil

    shutil.copytree(applied, reg)
    metrics = reg / "requests" / "erase-a" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"train_seconds": ', '"train_seconds": 1'))
    result = invoke("report", "erase-a", "-r", reg, "--out", tmp_path / "out")
    assert result.exit_code == 5 and "sha256 mismatch" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gc_removes_the_remains_of_interrupted_writes_and_says_how_many_bytes(applied, tmp_path):
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(applied, reg)
    committed = snapshot(reg)
    (reg / "staging" / "late.1a2b3c4d").mkdir()
    (reg / "staging" / "late.1a2b3c4d" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (reg / ".manifest.json.tmp-4242").write_bytes(b"y" * 24)
    result = invoke("gc", "-r", reg)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "freed 1024 bytes in 2 item(s)"
    assert snapshot(reg) == committed and Registry.open(reg).leftovers() == []
    again = invoke("gc", "-r", reg)
    assert again.stdout.splitlines()[-1] == "freed 0 bytes in 0 item(s)"
    assert invoke("verify", "-r", reg).exit_code == 0
