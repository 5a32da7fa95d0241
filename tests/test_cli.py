"""The `seqforget` command end to end, as a user runs it, on temporary folders."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import invoke, snapshot, write_request
from registry import Registry


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """The command in its own process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "seqforget", *map(str, args)], capture_output=True, text=True, env=env, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_end_to_end(world, tmp_path):
    reg = tmp_path / "reg"
    out = run("init", "--model", world / "model", "--registry", reg)
    assert "initialised" in out.stdout
    assert {p.name for p in reg.iterdir()} == {"manifest.json", "journal.jsonl", "lock", "requests", "staging"}

    run("apply", write_request(tmp_path, "req-a", forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl")), "-r", reg)
    folder = reg / "requests" / "req-a"
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "basis.h5", "forget_keys.h5", "request.json",
            "metrics.json"}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["trajectory"]) == 8 and metrics["after"]["forget"]["nll"] > metrics["before"]["forget"]["nll"]

    as_json = tmp_path / "req-b.json"  # a request may be JSON as well as YAML
    as_json.write_text(json.dumps({"id": "req-b", "scope": "full", "method": "npo", "steps": 8,
                                   "forget": str(world / "forget_b.jsonl"), "retain": str(world / "retain.jsonl")}))
    run("apply", as_json, "-r", reg, "-q")
    table = run("status", "-r", reg).stdout
    assert "req-a" in table and "req-b" in table and "2 request(s), 2 active" in table

    run("rollback", "req-a", "-r", reg)
    status = json.loads(run("status", "-r", reg, "--json").stdout)
    assert [(r["id"], r["state"], r["method"], r["scope"], r["kind"]) for r in status["requests"]] == [
        ("req-a", "rolled_back", "gd", "full", "lora"), ("req-b", "active", "npo", "full", "lora")]
    for r in status["requests"]:
        assert Path(r["adapter_dir"]).is_dir() and set(r["metrics"]) >= {"forget_nll", "retain_nll"}

    run("export", tmp_path / "live", "-r", reg)
    assert (tmp_path / "live" / "config.json").is_file() and (tmp_path / "live" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "live" / "seqforget.json").read_text())["active_requests"] == ["req-b"]

    assert run("verify", "-r", reg).stdout.startswith("ok: 2 request(s) and the base model")
    events = [(r["event"], r.get("id")) for r in Registry.open(reg).journal()]
    assert events == [("init", None), ("begin", "req-a"), ("commit", "req-a"), ("begin", "req-b"),
                      ("commit", "req-b"), ("rolled_back", "req-a")]


@pytest.fixture(scope="module")
def applied(world, tmp_path_factory):
    """A registry holding `done` (active) and `gone` (rolled back)."""
    tmp = tmp_path_factory.mktemp("bad")
    reg = tmp / "reg"
    invoke("init", "--model", world / "model", "-r", reg)
    invoke("apply", write_request(world, "done", steps=2), "-r", reg, "-q")
    invoke("apply", write_request(world, "gone", steps=2, forget="forget_b.jsonl"), "-r", reg, "-q")
    invoke("rollback", "gone", "-r", reg)
    return reg


def _bad_inputs(world: Path, tmp: Path) -> dict:
    """name -> (argv, text the error must contain, exit status)."""
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (tmp / "bad_image.jsonl").write_text(json.dumps({"question": "who ?", "answer": "x", "image": "broken.png"}) + "\n")
    (tmp / "missing_image.jsonl").write_text(json.dumps({"question": "who ?", "answer": "x", "image": "nowhere.png"}) + "\n")
    (tmp / "bad.jsonl").write_text('{"question": "who ?", "answer": "x"}\n{not json\n')
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "text_only.jsonl").write_text(json.dumps({"question": "what is the job of x ?", "answer": "baker"}) + "\n")
    (tmp / "bad.yaml").write_text("id: [unclosed\nscope: full\n")
    (tmp / "bad.json").write_text('{"id": "j", "scope": "full",')
    for name in ("forget_a.jsonl", "forget_b.jsonl", "retain.jsonl"):
        shutil.copy(world / name, tmp / name)
    shutil.copytree(world / "images", tmp / "images", dirs_exist_ok=True)
    req = lambda rid, **f: write_request(tmp, rid, **f)  # noqa: E731
    lines = (world / "reference.jsonl").read_text().splitlines()
    (tmp / "reference_images.jsonl").write_text("".join(line + "\n" for line in lines if '"image"' in line))

    def default_method(path: Path) -> Path:
        body = yaml.safe_load(path.read_text())
        del body["method"]
        path.write_text(yaml.safe_dump(body))
        return path
    return {
        "missing request file": (["apply", tmp / "nope.yaml"], "not found", 1),
        "malformed yaml": (["apply", tmp / "bad.yaml"], "not valid YAML", 1),
        "malformed json": (["apply", tmp / "bad.json"], "not valid JSON", 1),
        "unknown field": (["apply", req("r0", colour="blue")], "unknown field 'colour'", 1),
        "malformed id": (["apply", req("no spaces allowed")], "id: required, 1-128 letters", 1),
        "unknown method": (["apply", req("r2", method="telepathy")], "unknown 'telepathy'", 1),
        "method not valid for the scope": (["apply", req("r2b", scope="refuse", method="ga")], "ga does not serve scope 'refuse' (ga serves: visual, full;", 1),
        "unknown scope": (["apply", req("r3", scope="everything")], "scope: expected one of", 1),
        "unknown method argument": (["apply", req("r3b", method="ga", method_args={"beta": 0.1})], "ga has no argument 'beta'", 1),
        "empty data file": (["apply", req("r3c", forget="empty.jsonl")], "empty.jsonl has no rows", 1),
        "malformed jsonl line": (["apply", req("r1", forget="bad.jsonl")], "line 2: not valid JSON", 1),
        "visual request without images": (["apply", req("r3d", scope="visual", forget="text_only.jsonl")], "needs rows with an image", 1),
        "image does not decode": (["apply", req("r4", forget="bad_image.jsonl")], "image does not decode", 1),
        "missing image file": (["apply", req("r4b", forget="missing_image.jsonl")], "image not found", 1),
        "missing data file": (["apply", req("r5", forget="missing.jsonl")], "file not found", 1),
        "every problem at once": (["apply", req("r6", scope="nowhere", method="telepathy", forget="missing.jsonl", steps="many")],
                                  "scope: expected", 1),
        "non-finite method argument": (["apply", req("r7", method_args={"retain_weight": float("nan")})], "expected a finite number", 1),
        "method argument out of range": (["apply", req("r8", method="npo", method_args={"beta": 0})], "beta: 0 is outside", 1),
        "seed out of range": (["apply", req("r9", seed=2**64)], "seed: ", 1),
        "forget rows also in retain": (["apply", req("r10", retain="forget_a.jsonl")], "forget and retain share", 1),
        "unknown target layer": (["apply", req("r11", target_modules=["mlp.fc1", "no_such_layer"])], "matches no_such_layer", 1),
        "id used by a different request": (["apply", req("done", steps=3, filename="done-edited.yaml")], "already used by a different request", 1),
        "the same request again": (["apply", req("done", steps=2)], "already applied and active; nothing to do", 3),
        "a rolled-back request sent again": (["apply", req("gone", steps=2, forget="forget_b.jsonl", filename="gone-again.yaml")],
                                             "was applied and then rolled back; to apply it again, give it a new id", 1),
        "unknown rollback": (["rollback", "never-applied"], "no request 'never-applied'", 1),
        "rollback of a rolled-back request": (["rollback", "gone"], "already rolled back; nothing to do", 3),
        "export into a full folder": (["export", world], "not an empty folder", 1),
        "the default method without reference rows": (["apply", default_method(req("r12", scope="visual"))],
                                                      "method stranger (the default for visual) answers the forgotten as", 1),
        "text rows to forget, reference rows with images only": (
            ["apply", req("r13", method="stranger", reference="reference_images.jsonl")], "needs such rows with text only", 1),
    }


CASES = [
    "missing request file",
    "malformed yaml",
    "malformed json",
    "unknown field",
    "malformed id",
    "unknown method",
    "method not valid for the scope",
    "unknown scope",
    "unknown method argument",
    "empty data file",
    "malformed jsonl line",
    "visual request without images",
    "the default method without reference rows",
    "text rows to forget, reference rows with images only",
    "image does not decode",
    "missing image file",
    "missing data file",
    "every problem at once",
    "non-finite method argument",
    "method argument out of range",
    "seed out of range",
    "forget rows also in retain",
    "unknown target layer",
    "id used by a different request",
    "the same request again",
    "a rolled-back request sent again",
    "unknown rollback",
    "rollback of a rolled-back request",
    "export into a full folder",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_changes_nothing(world, applied, tmp_path, case):
    argv, expected, status = _bad_inputs(world, tmp_path)[case]
    before = snapshot(applied)
    result = invoke(*argv, "-r", applied, check=False)
    assert result.exit_code == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqforget: error:"), result.stderr
    assert expected in lines[0]
    if case == "every problem at once":
        for part in ("scope:", "method:", "file not found", "steps:"):
            assert part in lines[0]
    assert snapshot(applied) == before


def test_apply_to_a_folder_that_is_no_registry_is_refused_and_creates_nothing(world, tmp_path):
    result = invoke("apply", write_request(world, "x"), "-r", tmp_path / "nowhere", check=False)
    assert result.exit_code == 1 and "no registry at" in result.stderr and "seqforget init" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_model_folder_that_does_not_match_is_refused(world, applied, tmp_path):
    from seqforget.bench.world import load_world
    from seqforget.tiny import TinySpec, build_tiny_llava

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
    assert result.exit_code == 5 and "sha256 mismatch" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(reg) == before
    result = invoke("verify", "-r", reg, check=False)
    assert result.exit_code == 5 and "adapter_model.safetensors: sha256 mismatch" in result.stdout
    assert invoke("export", tmp_path / "out", "-r", reg, check=False).exit_code == 5
    assert snapshot(reg) == before and not (tmp_path / "out").exists()


def test_verify_hashes_the_whole_base_model_that_other_commands_check_cheaply(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    reg = tmp_path / "reg"
    invoke("init", "--model", model, "-r", reg)
    assert invoke("verify", "-r", reg).exit_code == 0
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 4096 + 8] ^= 0x01  # one bit of one weight, outside the sampled blocks
    weights.write_bytes(bytes(data))
    result = invoke("verify", "-r", reg, check=False)
    assert result.exit_code == 5 and "base model folder" in result.stdout and "sha256 differs" in result.stdout


def test_a_busy_registry_is_refused_at_once_with_no_wait(world, applied, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(applied, reg)
    hold = "import sys, time\nfrom registry import Registry\nwith Registry.open(sys.argv[1]).writer():\n    print('locked', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(reg)
        for argv in (["apply", write_request(world, "busy", forget="forget_b.jsonl"), "--no-wait"], ["rollback", "done", "--no-wait"]):
            result = invoke(*argv, "-r", reg, check=False)
            assert result.exit_code == 4 and "registry is busy" in result.stderr, result.stderr
        assert snapshot(reg) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("point", ["training", "staged", "renamed", "manifest", "journaled"])
def test_kill_at_each_step_of_apply_leaves_the_request_whole_or_absent(world, applied, tmp_path, point):
    reg = tmp_path / "reg"
    shutil.copytree(applied, reg)
    manifest = (reg / "manifest.json").read_bytes()
    request = write_request(world, f"killed-{point}", forget="forget_b.jsonl", steps=3)
    env = {k: v for k, v in os.environ.items() if k != "SEQFORGET_DEBUG"} | {"SEQFORGET_PAUSE_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "seqforget", "apply", request, "-r", reg, "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the process stops itself at `point`
    stopped = os.WIFSTOPPED(status)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait() if stopped else None
    assert stopped, f"apply ended before reaching {point}: {proc.stderr.read().decode(errors='replace')}"
    proc.stderr.close()

    committed = point in ("manifest", "journaled")
    assert ((reg / "manifest.json").read_bytes() != manifest) == committed
    assert invoke("verify", "-r", reg).exit_code == 0
    ids = [r["id"] for r in json.loads(invoke("status", "--json", "-r", reg).stdout)["requests"]]
    assert ids == ["done", "gone"] + ([f"killed-{point}"] if committed else [])
    # the next writer clears the remains: the same request applies, or is known as applied
    result = invoke("apply", request, "-r", reg, "-q", check=False)
    assert result.exit_code == (3 if committed else 0), result.stderr
    state = Registry.open(reg).snapshot()
    assert state.find(f"killed-{point}")["state"] == "active" and Registry.open(reg).leftovers() == []
    if point != "journaled":
        outcome = "committed" if committed else "discarded"
        assert ("recovered", f"killed-{point}", outcome) in [(r["event"], r.get("id"), r.get("outcome")) for r in Registry.open(reg).journal()]


def test_methods_lists_every_method_with_its_scopes_kind_arguments_and_source():
    from seqforget.methods import METHODS, served
    from seqforget.scopes import SCOPES

    listed = json.loads(invoke("methods", "--json").output)
    assert sorted(m["name"] for m in listed) == sorted(METHODS)
    for m in listed:
        assert m["scopes"] == [s for s in SCOPES if m["name"] in served(s)] and m["scopes"]
        assert m["adapters"] == list(METHODS[m["name"]].adapters) and m["source"] and m["summary"]
        assert [a["name"] for a in m["args"]] == [f.name for f in dataclasses.fields(METHODS[m["name"]])]
    stranger = next(m for m in listed if m["name"] == "stranger")
    assert stranger["default_for"] == ["visual", "full"] and stranger["budget"] == {"steps": 600, "lr": 3e-3}
    assert {"name": "retain_weight", "default": 3.0, "range": [0.0, None]} in stranger["args"]  # None: unbounded
    assert (stranger["gated_args"], stranger["gated_scopes"]) == ({"own_ceiling": 1.0}, ["visual"])
    table = invoke("methods").output
    assert "stranger: Answer about the forgotten" in table and "scopes: visual (default), full (default)" in table
    assert "budget: 30 steps at lr 0.001" in table  # a method without a budget of its own: the request's defaults
    assert table.count("in a gated registry's visual requests: own_ceiling=1\n") == 1
    assert {m["name"]: m["adapters"] for m in listed if m["adapters"] != ["lora", "sine"]} == {
        "mmunlearner": ["masked"], "vleraser": ["lora"]}  # any other loss trains a LoRA or a sine residual
    assert "adapters: lora, sine\n" in table
    assert next(m for m in listed if m["name"] == "vleraser")["sign"] == -1 and "adapters: lora (subtracted)" in table


def test_a_method_argument_with_choices_takes_only_those():
    from seqforget.methods import method_problems

    assert method_problems("stranger", "visual", {"own_prior": "retained"}) == []
    assert method_problems("stranger", "visual", {"own_prior": "everyone"}) == [
        "method_args.own_prior: expected one of strangers, retained, got 'everyone'"]
    assert method_problems("refusal", "refuse", {"objective": 1.0})[0].startswith("method_args.objective: expected one of ce, dpo")
    assert "vleraser does not serve scope 'visual' (vleraser serves: full;" in method_problems("vleraser", "visual", {})[0]


def test_status_draws_each_requests_figures_in_commit_order(world, tmp_path):
    from seqforget.engine import apply_request, init_registry
    from seqforget.status import status_rows, status_series

    reg = tmp_path / "reg"
    init_registry(reg, world / "model")
    for request_id, forget in (("a", "forget_a.jsonl"), ("b", "forget_b.jsonl")):
        apply_request(reg, write_request(tmp_path, request_id, forget=str(world / forget), retain=str(world / "retain.jsonl")),
                      show_progress=False)
    invoke("rollback", "a", "-r", reg)
    png = tmp_path / "status.png"
    assert "2 request(s), 1 active" in invoke("status", "-r", reg, "--plot", png).stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = status_rows(Registry.open(reg).snapshot())
    series = status_series(rows)
    assert series["labels"] == ["a (rolled back)", "b"]
    assert series["forget_before"] == [r["metrics"]["forget_acc"][0] for r in rows]
    assert series["forget_after"] == [r["metrics"]["forget_acc"][1] for r in rows]
    assert series["retain_after"] == [r["metrics"]["retain_acc"][1] for r in rows]
    assert series["retained_of_base"] == [None, None]  # no budget: nothing to draw
    # a plot that cannot be written: one line, exit 1, nothing left behind
    before = snapshot(tmp_path)
    bad = invoke("status", "-r", reg, "--plot", tmp_path / "missing" / "status.png", check=False)
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "cannot write the plot" in bad.stderr, bad.stderr
    assert snapshot(tmp_path) == before
