"""Settings that trade time for memory (they must change how a request trains, never what it learns),
and what one request costs as models grow (benchmarks.memory_ladder)."""

import numpy as np
import torch

from conftest import fixed_batch, write_request
from registry import Registry
from seqforget.engine import apply_request, init_registry
from seqforget.live import Live

LAYER = "model.language_model.layers.0.mlp.down_proj"


def test_gradient_checkpointing_recomputes_the_layers_and_learns_the_same_adapter(world, tmp_path):
    adapters, calls = {}, {}
    for checkpointing in (False, True):
        reg = tmp_path / f"reg-{checkpointing}"
        init_registry(reg, world / "model")
        live = Live.load(Registry.open(reg).snapshot(), world / "model")
        request = write_request(tmp_path, "r", steps=3, forget=str(world / "forget_a.jsonl"), retain=str(world / "retain.jsonl"))
        seen = []
        hook = dict(live.model.named_modules())[LAYER].register_forward_hook(lambda *_: seen.append(1))
        entry = apply_request(reg, request, show_progress=False, live=live, checkpointing=checkpointing)
        hook.remove()
        calls[checkpointing] = len(seen)
        state = Registry.open(reg).snapshot()
        assert state.record(entry, "metrics.json")["gradient_checkpointing"] is checkpointing
        adapters[checkpointing] = state.adapter(entry)

        # afterwards the model is as before: no checkpointing, and nothing asks for gradients a frozen model does not need
        assert not live.model.is_activation_checkpointing
        with torch.enable_grad():
            assert not live.model(**fixed_batch(world, live.processor)).logits.requires_grad
    assert calls[True] > calls[False]  # the layer ran again in the backward passes
    plain, recomputed = adapters[False], adapters[True]
    assert plain.modules == recomputed.modules
    for module in plain.modules:
        for part in ("A", "B"):
            np.testing.assert_allclose(recomputed.weights[module][part], plain.weights[module][part], rtol=1e-4, atol=1e-6)
    assert any(np.abs(plain.weights[m]["B"]).max() > 0 for m in plain.modules)


def test_the_memory_ladder_measures_one_request_on_its_smallest_rung(tiny_bench, tmp_path):
    """benchmarks.memory_ladder on the tiny world: its figures are those of the request it ran."""
    from safetensors.torch import load_file

    from benchmarks.memory_ladder import line, measure

    out = measure("1m", tmp_path, tiny_bench.cache, steps=2, dtype="float32", checkpointing=False,
                  world_profile="tiny", log=lambda s: None)
    weights = load_file(tmp_path / "1m" / "model" / "model.safetensors")
    assert out["parameters"] == sum(t.numel() for t in weights.values())
    assert out["steps"] == 2 and out["step_seconds"] > 0 and out["request_seconds"] < out["process_seconds"]
    assert 0 < out["request_peak_rss_mb"] <= out["peak_rss_mb"]
    assert out["registry_bytes"] > out["adapter_bytes"] + out["basis_bytes"] > out["adapter_bytes"] > 0
    assert out["sketched_layers"] == 0 and out["stats_bytes"] == out["stats_as_grams_bytes"] > 0  # no layer is that wide
    assert 0 < out["basis_columns"] <= out["basis_width"]
    assert line(out).startswith("| 1m | 0.8M |")
