"""The engine on a real tiny LLaVA: projection, composition, rollback, PEFT and export parity."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from conftest import fixed_batch, logits, write_request
from registry import Registry
from seqforget.composition import compose
from seqforget.engine import apply_request, export_model, init_registry, live_model, rollback_request, stored_adapter
from seqforget.models import load_model


@pytest.fixture(scope="module")
def two_requests(world, tmp_path_factory):
    """A registry with two committed requests (two people forgotten, one after the other)."""
    reg_dir = tmp_path_factory.mktemp("reg") / "reg"
    init_registry(reg_dir, world / "model")
    apply_request(reg_dir, write_request(world, "req-a", forget="forget_a.jsonl"), show_progress=False)
    apply_request(reg_dir, write_request(world, "req-b", forget="forget_b.jsonl", method="ga"), show_progress=False)
    return Registry.open(reg_dir)


def _base_weights(world):
    model, _ = load_model(world / "model")
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_adapters_lie_in_the_null_space_of_their_bases(two_requests):
    reg = two_requests
    bases = reg.load_bases()
    checked = 0
    for entry in reg.requests():
        adapter = stored_adapter(reg, entry)
        for module, (a, b) in adapter.pairs.items():
            basis = bases[module]
            # the columns that existed when this request trained: its own and earlier ones
            seq_of = {e["id"]: e["seq"] for e in reg.requests()}
            keep = [i for i, owner in enumerate(basis.owners) if seq_of[owner] <= entry["seq"]]
            u = torch.from_numpy(basis.columns[:, keep]).double()  # (d, k)
            dw = adapter.delta(module)  # (d_out, d)
            assert dw.norm() > 0, f"{module} of {entry['id']} did not train"
            assert (dw @ u).norm() / dw.norm() < 1e-5, (entry["id"], module)
            checked += 1
    assert checked >= 10


def test_bases_are_orthonormal_and_grow_only_as_needed(two_requests):
    import json

    reg = two_requests
    bases = reg.load_bases()
    for module, basis in bases.items():
        u = basis.columns.astype(np.float64)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
        assert set(basis.owners) <= {"req-a", "req-b"} and basis.owners[0] == "req-a"
    # req-b retains the same people as req-a: directions are added only where the basis
    # holds less than the threshold of their energy
    metrics = json.loads((reg.folder(reg.find("req-b")) / "metrics.json").read_text())
    for module, info in metrics["basis"].items():
        assert (info["columns_added"] > 0) == (info["captured_before"] < 0.97), module
        assert info["captured_after"] >= 0.97 - 1e-9


def test_live_model_is_base_plus_explicit_products(world, two_requests):
    """Expected weights from the raw files: W + sign * (lora_alpha / r) * B @ A, in float64."""
    import json

    from safetensors.numpy import load_file

    reg = two_requests
    live, _ = live_model(reg)
    _, base = _base_weights(world)
    expected = {n: w.double().clone() for n, w in base.items()}
    for entry in reg.active():
        folder = reg.folder(entry)
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len("base_model.model."):-len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                delta = entry["sign"] * config["lora_alpha"] / config["r"] * (b.astype(np.float64) @ a.astype(np.float64))
                expected[module + ".weight"] += torch.from_numpy(delta)
    touched = 0
    for name, p in live.named_parameters():
        assert torch.allclose(p.double(), expected[name], atol=1e-6, rtol=0), name
        touched += not torch.equal(p, base[name])
    assert touched >= 10


def test_rollback_restores_weights_and_logits(world, two_requests, tmp_path):
    import shutil

    reg_dir = tmp_path / "reg"
    shutil.copytree(two_requests.root, reg_dir)
    reg = Registry.open(reg_dir)
    live, processor = live_model(reg)
    batch = fixed_batch(world, processor)

    # the model without req-a: the base with req-b only
    without, _ = load_model(world / "model")
    compose(without, [stored_adapter(reg, reg.find("req-b"))])

    # removing req-a's term from the live model in place (the incremental path) ...
    compose(live, [stored_adapter(reg, reg.find("req-a"))], direction=-1)
    for (name, p), q in zip(live.named_parameters(), without.parameters()):
        assert (p - q).abs().max() < 1e-6, name
    assert (logits(live, batch) - logits(without, batch)).abs().max() < 1e-5

    # ... and the registry's rollback, which rebuilds the live model from the base
    rollback_request(reg_dir, "req-a")
    assert [e["id"] for e in reg.active()] == ["req-b"]
    rebuilt, _ = live_model(reg)
    for (name, p), q in zip(rebuilt.named_parameters(), without.parameters()):
        assert (p - q).abs().max() < 1e-6, name
    assert (logits(rebuilt, batch) - logits(without, batch)).abs().max() < 1e-5


def test_peft_loads_a_stored_adapter_with_the_engines_logits(world, two_requests):
    reg = two_requests
    entry = reg.find("req-a")
    base, processor = load_model(world / "model")
    batch = fixed_batch(world, processor)
    engine, _ = load_model(world / "model")
    compose(engine, [stored_adapter(reg, entry)])
    peft_model = PeftModel.from_pretrained(base, reg.folder(entry))
    peft_model.eval()
    plain, _ = load_model(world / "model")
    assert (logits(peft_model, batch) - logits(plain, batch)).abs().max() > 1e-4  # the adapter does something
    assert (logits(peft_model, batch) - logits(engine, batch)).abs().max() < 1e-5


def test_export_loads_with_transformers_and_matches_the_engine(world, two_requests, tmp_path):
    out = export_model(two_requests.root, tmp_path / "exported")
    exported = AutoModelForImageTextToText.from_pretrained(out)
    exported.eval()
    live, processor = live_model(two_requests)
    batch = fixed_batch(world, processor)
    assert (logits(exported, batch) - logits(live, batch)).abs().max() < 1e-5
    assert (out / "seqforget.json").is_file() and (out / "config.json").is_file()


def test_forgetting_lowers_likelihood_and_projection_protects_retain(world, tmp_path):
    changes = {}
    for projection in (True, False):
        reg_dir = tmp_path / f"reg-{projection}"
        init_registry(reg_dir, world / "model")
        request = write_request(tmp_path, f"ga-{projection}", method="ga", steps=20, projection=projection,
                                forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
        entry = apply_request(reg_dir, request, show_progress=False)
        m = entry["metrics"]
        assert m["forget_nll"][1] > m["forget_nll"][0] + 0.1, m  # the forget answers became less likely
        changes[projection] = abs(m["retain_nll"][1] - m["retain_nll"][0])
    assert changes[True] < changes[False], changes
