"""One request trained by two processes under `accelerate launch` (seqforget.distributed): sharing
each batch, or with --shard the model's weights."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import snapshot, write_request
from registry import Registry
from seqforget.composition import delta
from seqforget.distributed import block_stacks, registry_writer
from seqforget.engine import apply_request, init_registry
from seqforget.errors import SeqforgetError
from seqforget.models import load_model
from seqforget.tiny import build_tiny_idefics3

# the same update as one process, up to the order floating-point sums take across processes
# (measured: at most 2e-6 of each layer's update, after 6 AdamW steps)
TOLERANCE = 1e-4


def launch(request: Path, reg: Path, tag: str = "", *options: str, mode: str = "--multi_gpu", **popen) -> subprocess.Popen:
    """`seqforget apply` in two CPU processes, as accelerate launches them on several GPUs
    (`mode`: accelerate's --multi_gpu, or --use_fsdp)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "seqforget", "apply", str(request), "--registry", str(reg), "--quiet", *options]
    env = {**os.environ, "SEQFORGET_TEST_LAUNCH": tag, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_a_barrier_that_fails_on_entering_leaves_the_registry_unlocked(world, tmp_path):
    class Unreached:  # the main process of a group whose other processes never arrive
        main = True

        def wait(self):
            raise RuntimeError("barrier timed out")

    init_registry(tmp_path / "reg", world / "model")
    reg = Registry.open(tmp_path / "reg")
    writer = registry_writer(reg, Unreached(), wait=False)  # kept, as a traceback keeps it: no garbage collection frees the lock
    with pytest.raises(RuntimeError, match="barrier timed out"):
        with writer:
            pass
    take = "import sys; from registry import Registry\nwith Registry.open(sys.argv[1]).writer(wait=False): pass"
    other = subprocess.run([sys.executable, "-c", take, str(tmp_path / "reg")], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr[-500:]  # the lock was let go: another process takes it at once


def test_two_processes_store_the_adapter_one_process_stores(world, tmp_path):
    request = write_request(tmp_path, "dp", method="gd", steps=6, batch_size=8, forget=str(world / "forget_a.jsonl"),
                            retain=str(world / "retain.jsonl"))
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    for reg in (alone, shared):
        init_registry(reg, world / "model")
    apply_request(alone, request, show_progress=False)
    proc = launch(request, shared)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert out.count("applied dp") == 1  # said once, by the main process

    one, two = (Registry.open(r).snapshot() for r in (alone, shared))
    _same_updates(one, two, "dp")
    assert two.bases().keys() == one.bases().keys()
    assert not Registry.open(shared).verify()  # one request, written once, whole


@pytest.fixture(scope="module")
def first_applied(world, tmp_path_factory) -> Path:
    """A registry with one earlier request committed (`first`, two steps of gd on person b). Tests
    copy it: it trains deterministically, so a copy is the registry applying it again would give."""
    folder = tmp_path_factory.mktemp("first")
    init_registry(folder / "reg", world / "model")
    first = write_request(folder, "first", steps=2, forget=str(world / "forget_b.jsonl"), retain=str(world / "retain.jsonl"))
    apply_request(folder / "reg", first, show_progress=False)
    return folder / "reg"


def _same_updates(one, two, request_id: str) -> None:
    a, b = (s.adapter(s.find(request_id)) for s in (one, two))
    assert sorted(a.modules) == sorted(b.modules)
    for module in a.modules:
        da, db = delta(a, module), delta(b, module)
        assert da.norm() > 0
        assert (da - db).norm() / da.norm() < TOLERANCE, module


@pytest.mark.parametrize("method, mode, options", [("gd", "--multi_gpu", ("--shard", "--gradient-checkpointing")),
                                                  ("sine", "--use_fsdp", ())])
def test_sharded_processes_store_what_one_process_stores(world, first_applied, tmp_path, method, mode, options):
    """Each process holds half of the blocks' weights (and of the live model's exact bookkeeping);
    the adapter, the figures after it and the composed model are those of one process. An earlier
    request is active, so its terms are split with the weights and the new one adds to shares of
    them; `sine` reparametrises its target layers, which stay whole; checkpointing recomputes
    blocks that run twice a step (gd's forget and retain batches) while their weights are split.
    `accelerate launch --use_fsdp` asks for the same as --shard."""
    scope = "visual" if method == "sine" else "full"
    request = write_request(tmp_path, "sh", method=method, scope=scope, steps=4, forget=str(world / "forget_a.jsonl"),
                            retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), partial=True)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    for reg in (alone, shared):
        shutil.copytree(first_applied, reg)
    apply_request(alone, request, show_progress=False)
    proc = launch(request, shared, "", *options, mode=mode)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert out.count("applied sh") == 1

    one, two = (Registry.open(r).snapshot() for r in (alone, shared))
    _same_updates(one, two, "sh")
    m1, m2 = (s.record(s.find("sh"), "metrics.json") for s in (one, two))
    assert m2["processes"]["count"] == 2 and m2["processes"]["sharded"]
    assert m2["processes"]["weights_mb"] < 0.8 * m1["processes"]["weights_mb"]
    for probe in ("forget", "retain"):  # after: probed on the shared model with the new term in its shares
        assert m2["after"][probe]["nll"] == pytest.approx(m1["after"][probe]["nll"], rel=1e-4, abs=1e-6)
    assert not Registry.open(shared).verify()


def test_shard_is_refused_to_a_process_alone_and_deepspeed_to_any_with_nothing_written(world, tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    init_registry(reg, world / "model")
    before = snapshot(reg)
    request = write_request(tmp_path, "alone", steps=2, forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
    with pytest.raises(SeqforgetError, match="runs alone"):
        apply_request(reg, request, show_progress=False, shard=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp: the same as --shard
    with pytest.raises(SeqforgetError, match="runs alone"):
        apply_request(reg, request, show_progress=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SeqforgetError, match="DeepSpeed is not supported"):
        apply_request(reg, request, show_progress=False)
    assert snapshot(reg) == before


def test_the_blocks_sharded_are_each_architectures_stacks_of_layers(world, tiny_bench, tmp_path):
    llava, _ = load_model(world / "model")
    assert [(type(o).__name__, type(s[0]).__name__, len(s)) for o, s in block_stacks(llava)] == [
        ("CLIPEncoder", "CLIPEncoderLayer", llava.config.vision_config.num_hidden_layers),
        ("LlamaModel", "LlamaDecoderLayer", llava.config.text_config.num_hidden_layers)]
    build_tiny_idefics3(tmp_path / "idefics3", tiny_bench.world.corpus())
    idefics3, _ = load_model(tmp_path / "idefics3")  # its class names the vision layers' attention, not the layers
    assert [(type(o).__name__, type(s[0]).__name__) for o, s in block_stacks(idefics3)] == [
        ("Idefics3Encoder", "Idefics3EncoderLayer"), ("LlamaModel", "LlamaDecoderLayer")]


def _worker(tag: str, rank: int) -> int | None:
    """The pid of the launched process of this rank, found by the tag in its environment."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SEQFORGET_TEST_LAUNCH={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def committed(reg: Path) -> dict[str, str]:
    """The registry's committed files, byte for byte: all but the journal, the lock and staging."""
    return {k: v for k, v in snapshot(reg).items() if not k.startswith(("journal", "lock", "staging"))}


def test_a_killed_process_leaves_the_registry_as_it_was(world, first_applied, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(first_applied, reg)
    before = committed(reg)
    request = write_request(tmp_path, "dp", method="gd", steps=400, check_every=400, forget=str(world / "forget_a.jsonl"),
                            retain=str(world / "retain.jsonl"))
    tag = uuid.uuid4().hex
    proc = launch(request, reg, tag, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        journal = reg / "journal.jsonl"
        while '"dp"' not in journal.read_text() and time.monotonic() < deadline:  # the main process began its write
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)  # into the optimiser steps
        follower = _worker(tag, 1)
        assert follower is not None
        os.kill(follower, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert Registry.open(reg).snapshot().find("dp") is None
    assert committed(reg) == before  # byte for byte
    # the next writer clears what the killed write left, and the id is free again; the 400 steps were
    # only there to keep the launched write running until the kill, so its retry takes 2
    again = write_request(tmp_path, "dp", filename="dp-again.yaml", method="gd", steps=2, forget=str(world / "forget_a.jsonl"),
                          retain=str(world / "retain.jsonl"))
    entry = apply_request(reg, again, show_progress=False)
    assert entry["id"] == "dp" and not Registry.open(reg).verify()


def test_a_stream_refuses_to_run_as_one_of_several_processes(world, tmp_path, monkeypatch):
    from seqforget.errors import SeqforgetError
    from seqforget.options import RunOptions
    from seqforget.stream import run_stream

    reg = tmp_path / "reg"
    init_registry(reg, world / "model")
    (tmp_path / "inbox").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SeqforgetError, match="one process"):
        run_stream(reg, tmp_path / "inbox", RunOptions(show_progress=False), once=True, log=lambda s: None)
