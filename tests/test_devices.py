"""Where the model runs: `--device` on init, apply, stream and export, recorded in the registry.

This machine has no GPU: what runs here is the CPU, "auto" resolving to it, and the refusals
of devices it does not have.
"""

import pytest
import torch

from conftest import invoke, snapshot, write_request
from registry import Registry
from seqforget.errors import SeqforgetError
from seqforget.models import device_of, load_model, torch_device


def test_device_names_resolve_or_are_refused_in_one_line():
    assert torch_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert torch_device("auto").type == "cuda"
    else:
        assert torch_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(SeqforgetError, match="no CUDA device"):
                torch_device(name)
    for bad in ("gpu", "cuda:", "cuda:x", "tpu"):
        with pytest.raises(SeqforgetError, match="unknown device"):
            torch_device(bad)


def test_the_loader_puts_the_model_on_the_device_asked(world):
    model, _ = load_model(world / "model", device="cpu")
    assert device_of(model) == torch.device("cpu")


def test_the_registry_records_the_device_and_a_run_may_name_another(world, tmp_path):
    reg = tmp_path / "reg"
    invoke("init", "--model", world / "model", "--registry", reg)
    assert Registry.open(reg).snapshot().base_model["device"] == "auto"
    fields = {"steps": 2, "forget": str(world / "forget_a.jsonl"), "retain": str(world / "retain.jsonl")}
    invoke("apply", write_request(tmp_path, "a", **fields), "--registry", reg, "--device", "cpu", "-q")
    state = Registry.open(reg).snapshot()
    assert state.record(state.find("a"), "metrics.json")["device"] == "cpu"

    refused = invoke("init", "--model", world / "model", "--registry", tmp_path / "other", "--device", "gpu", check=False)
    assert refused.exit_code != 0 and "unknown device 'gpu'" in refused.output and not (tmp_path / "other").exists()
    if not torch.cuda.is_available():  # a device this machine lacks: one line, nothing written
        before = snapshot(reg)
        request = write_request(tmp_path, "b", **fields)
        for command in (("apply", request), ("export", tmp_path / "out")):
            refused = invoke(*command, "--registry", reg, "--device", "cuda", check=False)
            assert refused.exit_code != 0 and "no CUDA device" in refused.output, refused.output
            assert len(refused.output.strip().splitlines()) == 1
        assert snapshot(reg) == before and not (tmp_path / "out").exists()
