"""Faults: a stream killed at random moments, a write that fails, a registry that cannot be written."""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kill_stream import ENV, run, write_requests
from conftest import snapshot
from registry import Registry
from seqforget.engine import init_registry

def seqforget(*args, preexec_fn=None, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "seqforget", *map(str, args)], capture_output=True, text=True,
                          env=ENV, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def committed_one(world, tmp_path_factory) -> Path:
    """A folder with a registry holding one committed request, and a source folder with two more."""
    folder = tmp_path_factory.mktemp("faults")
    init_registry(folder / "reg", world / "model")
    write_requests(folder / "source", world, 0, 3)
    first = folder / "first"
    first.mkdir()
    (folder / "source" / "r000.yaml").rename(first / "r000.yaml")
    assert seqforget("stream", first, "-r", folder / "reg", "--once", "-q").returncode == 0
    return folder


@pytest.fixture
def reg(committed_one, tmp_path) -> Path:
    """A copy of committed_one's registry and source folder for each test: the tests change them,
    and training the first request once is enough (it trains deterministically)."""
    for name in ("reg", "source"):
        shutil.copytree(committed_one / name, tmp_path / name)
    return tmp_path / "reg"


def test_a_stream_killed_at_random_moments_loses_nothing_and_ends_as_an_uninterrupted_one(world, tmp_path):
    # two kills aimed at a write begun and not ended, three at random moments; raises on any broken check
    result = run(world, tmp_path, kills=5, max_delay=8.0, seed=1, aimed=2, log=lambda s: None)
    assert result["kills"] == 5 and result["requests"] >= 4
    assert result["mid_write"] >= 2  # the aimed kills left a half-written request, which the next start removed
    assert result["max_weight_difference"] == 0.0


def test_a_write_beyond_the_file_size_limit_fails_clearly_and_leaves_nothing_half_written(reg, tmp_path):
    committed = {p: h for p, h in snapshot(reg).items() if p.startswith(("requests", "manifest"))}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the adapter is larger

    for args in (("apply", tmp_path / "source" / "r001.yaml"), ("stream", tmp_path / "source", "--once", "-q")):
        out = seqforget(*args, "-r", reg, preexec_fn=small_files)
        assert out.returncode == 1, out.stderr
        assert out.stderr.count("\n") == 1 and "cannot write the adapter of request r001" in out.stderr, out.stderr
        assert "File too large" in out.stderr and "nothing was committed" in out.stderr
        assert {p: h for p, h in snapshot(reg).items() if p.startswith(("requests", "manifest"))} == committed
        assert not Registry.open(reg).leftovers()  # the staged files went with the abort
    assert [e["id"] for e in Registry.open(reg).snapshot().requests] == ["r000"]
    assert not Registry.open(reg).snapshot().rejected  # not the request's fault: the stream stopped, rejected nothing
    out = seqforget("stream", tmp_path / "source", "-r", reg, "--once", "-q")
    assert out.returncode == 0, out.stderr
    assert [e["id"] for e in Registry.open(reg).snapshot().requests] == ["r000", "r001", "r002"]


def _read_only(reg: Path) -> tuple:
    """The prefix that runs a command seeing `reg` read-only: none where permissions will do."""
    if os.geteuid() != 0:  # permissions hold for everyone but root
        return ()
    mount = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(reg)]
    if shutil.which("unshare") is None or subprocess.run([*mount, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount a read-only view of the registry")
    return tuple(mount)


def test_a_read_only_registry_is_refused_in_one_line_and_left_as_it_was(reg, tmp_path):
    prefix = _read_only(reg)
    before = snapshot(reg)
    if os.geteuid() != 0:
        for p in [reg, *reg.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        for args in (("apply", tmp_path / "source" / "r001.yaml"), ("stream", tmp_path / "source", "--once", "-q"),
                     ("rollback", "r000"), ("gc",)):
            out = seqforget(*args, "-r", reg, prefix=prefix)
            assert out.returncode == 1, (args, out.stderr)
            assert out.stderr.count("\n") == 1 and "cannot take the registry's lock" in out.stderr, out.stderr
            assert "nothing was changed" in out.stderr
    finally:
        if os.geteuid() != 0:
            for p in [reg, *reg.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
    assert snapshot(reg) == before
