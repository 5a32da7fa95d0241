"""`seqforget stream` and the live model it keeps: exactly once, resumable, in step with the registry."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fixed_batch, invoke, logits, write_request
from registry import Registry
from seqforget.engine import apply_request, init_registry, live_model, rollback_request
from seqforget.live import Live, entry_key
from seqforget.models import load_model
from seqforget.stream import read_source

ENV = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"}


def stream(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "seqforget", "stream", *map(str, args), "--once", "-q"],
                          capture_output=True, text=True, env=ENV | (env or {}))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# What the registry holds is read in this process: the stream under test runs in its own, and a
# fresh process for each look would only add its start-up (a torch import) to every check.
def status(reg: Path) -> dict:
    return json.loads(invoke("status", "--json", "-r", reg).stdout)


def verify(reg: Path) -> None:
    out = invoke("verify", "-r", reg, check=False)
    assert out.exit_code == 0, out.output


def request_body(world: Path, request_id: str, **fields) -> dict:
    body = {"id": request_id, "scope": "full", "method": "gd", "forget": str(world / "forget_a.jsonl"),
            "retain": str(world / "retain.jsonl"), "steps": 4, "retain_tolerance": 1.0}
    return body | fields


@pytest.fixture
def reg(world, tmp_path) -> Path:
    init_registry(tmp_path / "reg", world / "model")
    return tmp_path / "reg"


def test_a_folder_is_applied_in_name_order_once_and_a_restart_applies_only_what_is_new(world, reg, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_request(inbox, "b-second", filename="02.yaml", forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"))
    write_request(inbox, "a-first", filename="01.yaml", forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    (inbox / "03.yaml").write_text("id: broken\nscope: everything\n")  # refused, never blocks the stream
    write_request(inbox, "a-first", filename="04.yaml", forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"))
    (inbox / ".05.yaml.tmp").write_text("half written")  # being written: not read
    (inbox / "notes.txt").write_text("not a request")

    first = stream(inbox, "-r", reg)
    lines = first.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["applied", "applied", "rejected", "rejected"], first.stdout
    assert "a-first" in lines[0] and "b-second" in lines[1] and "scope" in lines[2] and "already used" in lines[3]
    assert lines[-1] == "stream drained: 2 applied, 0 already done, 2 rejected"
    seen = status(reg)
    assert [r["id"] for r in seen["requests"]] == ["a-first", "b-second"]
    assert [(r["source"], r["id"]) for r in seen["rejected"]] == [("03.yaml", "broken"), ("04.yaml", "a-first")]

    # a restart: nothing is applied twice, nothing rejected twice; a new file and a fixed one are taken
    write_request(inbox, "c-third", filename="00.yaml", forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"))
    (inbox / "03.yaml").write_text(yaml.safe_dump(request_body(world, "broken", forget=str(world / "forget_b.jsonl"))))
    again = stream(inbox, "-r", reg)
    assert again.stdout.splitlines()[-1] == "stream drained: 2 applied, 0 already done, 0 rejected", again.stdout
    seen = status(reg)
    assert [r["id"] for r in seen["requests"]] == ["a-first", "b-second", "c-third", "broken"]
    assert len(seen["rejected"]) == 2
    human = invoke("status", "-r", reg).stdout
    assert "2 request(s) rejected by a stream" in human and "04.yaml (a-first)" in human
    verify(reg)


def test_a_jsonl_source_reads_whole_lines_and_an_equal_resent_request_is_done_once(world, reg, tmp_path):
    source = tmp_path / "requests.jsonl"
    one = json.dumps(request_body(world, "one"))
    source.write_text(one + "\n" + "not json\n" + json.dumps(request_body(world, "two", forget=str(world / "forget_b.jsonl")))[:40])
    assert [i.source for i in read_source(source)] == ["requests.jsonl:1", "requests.jsonl:2"]  # the third line is not whole
    out = stream(source, "-r", reg)
    assert out.stdout.splitlines()[-1] == "stream drained: 1 applied, 0 already done, 1 rejected", out.stdout

    # the line finished, and the first request sent again, with its fields in another order
    resent = json.dumps(dict(reversed(list(request_body(world, "one").items()))))
    source.write_text(one + "\n" + "not json\n" + json.dumps(request_body(world, "two", forget=str(world / "forget_b.jsonl")))
                      + "\n" + resent + "\n")
    out = stream(source, "-r", reg)
    assert out.stdout.splitlines()[-1] == "stream drained: 1 applied, 1 already done, 0 rejected", out.stdout
    assert [r["id"] for r in status(reg)["requests"]] == ["one", "two"]


def test_the_live_model_kept_by_differences_is_the_composed_model_bit_for_bit(world, reg, tmp_path):
    base, _ = load_model(world / "model")
    state = Registry.open(reg).snapshot()
    live = Live.load(state, world / "model")
    for name, forget in (("p", "forget_a.jsonl"), ("q", "forget_b.jsonl")):
        apply_request(reg, write_request(tmp_path, name, forget=str(world / forget), retain=str(world / "retain.jsonl")),
                      show_progress=False, live=live)
    rollback_request(reg, "p")  # by another process, as far as `live` knows
    apply_request(reg, write_request(tmp_path, "r", forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"),
                                     method="npo"), show_progress=False)
    for rolled_back in ("q", "r"):
        state = Registry.open(reg).snapshot()
        live.sync(state)
        fresh, _ = live_model(state)
        assert all(torch.equal(a, b) for a, b in zip(live.model.parameters(), fresh.parameters()))
        assert not all(torch.equal(a, b) for a, b in zip(live.model.parameters(), base.parameters()))
        rollback_request(reg, rolled_back)
    live.sync(Registry.open(reg).snapshot())
    assert all(torch.equal(a, b) for a, b in zip(live.model.parameters(), base.parameters()))  # the base, exactly


def test_earlier_terms_switched_off_run_the_model_as_if_they_were_not_there(world, reg, tmp_path):
    """EarlierOff subtracts a term's contribution from its layers' outputs: with a term off the
    model answers as the model composed without it; the weights are never written."""
    for name, forget in (("p", "forget_a.jsonl"), ("q", "forget_b.jsonl")):
        apply_request(reg, write_request(tmp_path, name, forget=str(world / forget), retain=str(world / "retain.jsonl"),
                                         earlier_dropout=0.0), show_progress=False)
    state = Registry.open(reg).snapshot()
    live = Live.load(state, world / "model")
    batch = fixed_batch(world, live.processor)
    weights = [p.detach().clone() for p in live.model.parameters()]
    both, base = logits(live.model, batch), logits(load_model(world / "model")[0], batch)
    key = {e["id"]: entry_key(e) for e in state.requests}
    rollback_request(reg, "p")
    only_q = logits(live_model(Registry.open(reg).snapshot())[0], batch)
    assert (both - only_q).abs().max() > 1e-2  # p's term changes what the model says

    switches = live.earlier_off(0.0, seed=0)
    switches.draw()
    assert torch.equal(logits(live.model, batch), both)
    switches.switch_off([key["p"]])
    torch.testing.assert_close(logits(live.model, batch), only_q, rtol=0, atol=1e-4)
    with switches.none():  # the base model, what targets_from_base holds a request to
        torch.testing.assert_close(logits(live.model, batch), base, rtol=0, atol=1e-4)
    assert switches.off == {key["p"]}  # the draw before is back
    torch.testing.assert_close(logits(live.model, batch), only_q, rtol=0, atol=1e-4)
    switches.all_on()
    assert torch.equal(logits(live.model, batch), both)
    switches = live.earlier_off(1.0, seed=0)
    switches.draw()
    assert switches.off == {key["p"], key["q"]}
    torch.testing.assert_close(logits(live.model, batch), base, rtol=0, atol=1e-4)
    switches.remove()
    assert torch.equal(logits(live.model, batch), both)
    assert all(torch.equal(a, b) for a, b in zip(live.model.parameters(), weights))


@pytest.mark.parametrize("field", [{"earlier_dropout": 1.0}, {"targets_from_base": True}])
def test_a_request_trained_with_earlier_terms_switched_off_learns_another_adapter(world, reg, tmp_path, field):
    """earlier_dropout switches them off for the steps; targets_from_base for what the method
    holds the model to, here NPO's reference model. The earlier request
    forgets the same rows, so the model with it and the model without it differ on them."""
    apply_request(reg, write_request(tmp_path, "p", forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl")),
                  show_progress=False)
    twin = tmp_path / "twin"
    shutil.copytree(reg, twin)  # the same history, so the same bases: only the switches differ
    adapters = []
    for registry, fields in ((reg, {}), (twin, field)):
        entry = apply_request(registry, write_request(tmp_path, "q", forget=str(world / "forget_b.jsonl"),
                                                      retain=str(world / "retain.jsonl"), method="npo", **fields),
                              show_progress=False)
        adapters.append(Registry.open(registry).snapshot().adapter(entry).weights)
    a, b = adapters
    assert a.keys() == b.keys()
    assert max(abs(a[m]["B"] - b[m]["B"]).max() for m in a) > 1e-4  # the switches were in the loop


def _paused_stream(source: Path, reg: Path, point: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "seqforget", "stream", str(source), "-r", str(reg), "--once", "-q"],
                            env=ENV | {"SEQFORGET_PAUSE_AT": point}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status_ = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the stream stops itself at `point`
    assert os.WIFSTOPPED(status_), proc.stderr.read()
    return proc


def test_sigterm_abandons_the_request_in_training_and_the_next_start_applies_it(world, reg, tmp_path):
    source = tmp_path / "requests.jsonl"
    # the stream stops itself after the first step, so a request of more than one step is still training
    # when SIGTERM comes: 4 steps do, and keep short the next start, which trains it in full
    source.write_text(json.dumps(request_body(world, "long", steps=4)) + "\n")
    proc = _paused_stream(source, reg, "training")
    proc.send_signal(signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "abandoned long (SIGTERM): nothing of it was committed" in out
    assert out.splitlines()[-1].startswith("stream stopped by SIGTERM: 0 applied")
    assert status(reg)["requests"] == [] and Registry.open(reg).leftovers() == []
    verify(reg)
    out = stream(source, "-r", reg)
    assert out.stdout.splitlines()[-1] == "stream drained: 1 applied, 0 already done, 0 rejected"


@pytest.mark.parametrize("point", ["staged", "manifest"])
def test_a_stream_killed_mid_commit_resumes_with_every_request_applied_once(world, reg, tmp_path, point):
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(request_body(world, f"r{i}", forget=str(world / f"forget_{'ab'[i % 2]}.jsonl")))
                              + "\n" for i in range(3)))
    proc = _paused_stream(source, reg, point)
    proc.kill()  # SIGKILL while the first request is half committed
    proc.communicate()
    committed = [r["id"] for r in status(reg)["requests"]]
    assert committed == (["r0"] if point == "manifest" else [])
    out = stream(source, "-r", reg)
    assert out.stdout.splitlines()[-1] == f"stream drained: {3 - len(committed)} applied, 0 already done, 0 rejected"
    assert [r["id"] for r in status(reg)["requests"]] == ["r0", "r1", "r2"]
    verify(reg)


def test_a_stream_asked_not_to_wait_on_a_busy_registry_exits_with_status_4_and_applies_nothing(world, reg, tmp_path):
    source = tmp_path / "requests.jsonl"
    source.write_text(json.dumps(request_body(world, "later")) + "\n")
    hold = "import sys, time\nfrom registry import Registry\nwith Registry.open(sys.argv[1]).writer():\n    print('locked', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        out = stream(source, "-r", reg, "--no-wait", check=False)
        assert out.returncode == 4 and "registry is busy" in out.stderr, out.stderr
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert status(reg)["requests"] == [] and status(reg)["rejected"] == []
