"""The `seqforget` command end to end, as a user runs it, on temporary folders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from click.testing import CliRunner

from conftest import snapshot, write_request
from registry import Registry
from seqforget.cli import cli


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """The command in its own process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "seqforget", *map(str, args)], capture_output=True, text=True, env=env, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def invoke(*args, check=True):
    """The command in this process (no fresh torch import): for the many error cases."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, result.stderr
    return result


def test_end_to_end(world, tmp_path):
    reg = tmp_path / "reg"
    out = run("init", "--model", world / "model", "--registry", reg)
    assert "initialised" in out.stdout
    assert {p.name for p in reg.iterdir()} == {"manifest.json", "journal.jsonl", "lock", "requests", "staging"}

    run("apply", write_request(tmp_path, "req-a", forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl")), "-r", reg)
    folder = reg / "requests" / "req-a"
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "basis.h5", "request.json", "metrics.json"}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["trajectory"]) == 8 and metrics["after"]["forget"]["nll"] > metrics["before"]["forget"]["nll"]

    run("apply", write_request(tmp_path, "req-b", forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"), method="npo"), "-r", reg, "-q")
    table = run("status", "-r", reg).stdout
    assert "req-a" in table and "req-b" in table and "2 request(s), 2 active" in table

    run("rollback", "req-a", "-r", reg)
    status = json.loads(run("status", "-r", reg, "--json").stdout)
    assert [(r["id"], r["state"], r["method"], r["scope"]) for r in status["requests"]] == [
        ("req-a", "rolled_back", "gd", "full"), ("req-b", "active", "npo", "full")]
    for r in status["requests"]:
        assert Path(r["adapter_dir"]).is_dir() and set(r["metrics"]) >= {"forget_nll", "retain_nll"}

    run("export", tmp_path / "live", "-r", reg)
    assert (tmp_path / "live" / "config.json").is_file() and (tmp_path / "live" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "live" / "seqforget.json").read_text())["active_requests"] == ["req-b"]

    assert run("verify", "-r", reg).stdout.startswith("ok: 2 request(s)")
    events = [(r["event"], r.get("id")) for r in Registry.open(reg).journal()]
    assert events == [("init", None), ("begin", "req-a"), ("commit", "req-a"), ("begin", "req-b"),
                      ("commit", "req-b"), ("rolled_back", "req-a")]


@pytest.fixture(scope="module")
def applied(world, tmp_path_factory):
    """A registry holding one applied request, `done`, and a folder to write bad inputs into."""
    tmp = tmp_path_factory.mktemp("bad")
    reg = tmp / "reg"
    invoke("init", "--model", world / "model", "-r", reg)
    invoke("apply", write_request(world, "done"), "-r", reg, "-q")
    return reg


def _bad_inputs(world: Path, tmp: Path, reg: Path) -> dict:
    """name -> (argv, text the error must contain)."""
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (tmp / "bad_image.jsonl").write_text(json.dumps({"question": "who ?", "answer": "x", "image": "broken.png"}) + "\n")
    (tmp / "bad.jsonl").write_text('{"question": "who ?", "answer": "x"}\n{not json\n')
    (tmp / "bad.yaml").write_text("id: [unclosed\nscope: full\n")
    for name in ("forget_a.jsonl", "retain.jsonl"):
        shutil.copy(world / name, tmp / name)
    shutil.copytree(world / "images", tmp / "images", dirs_exist_ok=True)
    req = lambda rid, **f: write_request(tmp, rid, **f)  # noqa: E731
    return {
        "missing request": (["apply", tmp / "nope.yaml"], "not found"),
        "malformed yaml": (["apply", tmp / "bad.yaml"], "not valid YAML"),
        "malformed jsonl": (["apply", req("r1", forget="bad.jsonl")], "line 2: not valid JSON"),
        "unknown method": (["apply", req("r2", method="telepathy")], "unknown 'telepathy'"),
        "unknown scope": (["apply", req("r3", scope="everything")], "scope: expected one of"),
        "image does not decode": (["apply", req("r4", forget="bad_image.jsonl")], "image does not decode"),
        "missing data file": (["apply", req("r5", forget="missing.jsonl")], "file not found"),
        "every problem at once": (["apply", req("r6", scope="nowhere", method="telepathy", forget="missing.jsonl", steps="many")],
                                  "scope: expected"),
        "non-finite method argument": (["apply", req("r7", method_args={"retain_weight": float("nan")})], "expected a finite number"),
        "method argument out of range": (["apply", req("r8", method="npo", method_args={"beta": 0})], "beta: 0 is outside"),
        "seed out of range": (["apply", req("r9", seed=2**64)], "seed: "),
        "forget rows also in retain": (["apply", req("r10", retain="forget_a.jsonl")], "forget and retain share"),
        "unknown target layer": (["apply", req("r11", target_modules=["mlp.fc1", "no_such_layer"])], "matches no_such_layer"),
        "id already applied": (["apply", req("done")], "already in the registry"),
        "unknown rollback": (["rollback", "never-applied"], "no request"),
        "export into a full folder": (["export", world], "not an empty folder"),
    }


@pytest.mark.parametrize("case", [
    "missing request", "malformed yaml", "malformed jsonl", "unknown method", "unknown scope", "image does not decode",
    "missing data file", "every problem at once", "non-finite method argument", "method argument out of range",
    "seed out of range", "forget rows also in retain", "unknown target layer", "id already applied", "unknown rollback",
    "export into a full folder"])
def test_bad_input_is_one_line_and_changes_nothing(world, applied, tmp_path, case):
    argv, expected = _bad_inputs(world, tmp_path, applied)[case]
    before = snapshot(applied)
    result = invoke(*argv, "-r", applied, check=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqforget: error:"), result.stderr
    assert expected in lines[0]
    if case == "every problem at once":
        for part in ("scope:", "method:", "file not found", "steps:"):
            assert part in lines[0]
    assert snapshot(applied) == before


def test_model_folder_that_does_not_match_is_refused(world, applied, tmp_path):
    from seqforget.models import TinySpec, build_tiny_llava
    from seqforget.world import load_world

    build_tiny_llava(tmp_path / "other", load_world(world).corpus(), TinySpec(seed=1))
    before = snapshot(applied)
    result = invoke("apply", write_request(world, "other-model", forget="forget_b.jsonl"), "-r", applied, "--model", tmp_path / "other", check=False)
    assert result.exit_code == 1 and "does not match the registry's base model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(applied) == before


def test_tampered_adapter_is_detected_and_refused(world, applied, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(applied, reg)
    weights = reg / "requests" / "done" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = snapshot(reg)
    result = invoke("apply", write_request(world, "after-tamper", forget="forget_b.jsonl"), "-r", reg, check=False)
    assert result.exit_code == 1 and "sha256 mismatch" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(reg) == before
    result = invoke("verify", "-r", reg, check=False)
    assert result.exit_code == 1 and "adapter_model.safetensors: sha256 mismatch" in result.stdout
    assert invoke("export", tmp_path / "out", "-r", reg, check=False).exit_code == 1
    assert snapshot(reg) == before and not (tmp_path / "out").exists()


def test_kill_during_training_leaves_the_registry_as_it_was(world, applied, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(applied, reg)
    manifest = (reg / "manifest.json").read_bytes()
    request = write_request(world, "killed", forget="forget_b.jsonl", steps=100000)
    env = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "seqforget", "apply", request, "-r", reg], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(c) for c in iter(lambda: proc.stderr.read(1), b"")], daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and b"step/s, loss=" not in stderr:
        time.sleep(0.1)  # the progress bar shows a loss once optimiser steps are running
    assert proc.poll() is None, f"apply ended before it could be killed: {stderr.decode(errors='replace')}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (reg / "manifest.json").read_bytes() == manifest
    assert invoke("verify", "-r", reg).exit_code == 0
    assert [r["id"] for r in json.loads(invoke("status", "--json", "-r", reg).stdout)["requests"]] == ["done"]
    # the next writer clears the remains and the same request applies cleanly
    invoke("apply", write_request(world, "killed", forget="forget_b.jsonl", steps=2), "-r", reg, "-q")
    assert Registry.open(reg).find("killed")["state"] == "active"
    assert ("recovered", "killed", "discarded") in [(r["event"], r.get("id"), r.get("outcome")) for r in Registry.open(reg).journal()]
