"""Scopes resolve their layers per model architecture, from one table; an unknown one is refused."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from conftest import UNMERGED, fixed_batch, logits, write_request
from registry import Registry
from seqforget.composition import compose, delta
from seqforget.conditioning import projector_name
from seqforget.engine import apply_request, export_model, init_registry, live_model, rollback_request
from seqforget.errors import SeqforgetError
from seqforget.models import load_model
from seqforget.tiny import build_tiny_idefics3
from seqforget.scopes import SCOPES, architecture, linear_layers, scope_layers


def tiny_paligemma():
    """A vision-language model of a family the table does not hold, named much as LLaVA is."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=8).to_dict(),
        text_config=GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, vocab_size=64).to_dict())
    return PaliGemmaForConditionalGeneration(config)


def test_llava_scopes_keep_their_layers(world):
    from seqforget.models import load_model

    model, _ = load_model(world / "model")
    names = linear_layers(model)
    assert scope_layers(model, "visual") == [n for n in names if "vision_tower" in n and n.endswith(("mlp.fc1", "mlp.fc2"))] + \
        [n for n in names if "multi_modal_projector" in n]
    assert projector_name(model) == "model.multi_modal_projector"


def test_an_unknown_architecture_is_refused_naming_the_layers_it_has():
    model = tiny_paligemma()
    for scope in SCOPES:
        with pytest.raises(SeqforgetError) as e:
            scope_layers(model, scope)
        message = str(e.value)
        assert "\n" not in message
        assert "unknown model architecture 'paligemma'" in message and "llava, idefics3" in message
        assert "model.language_model.layers.N.mlp.down_proj" in message  # what it has, layer numbers folded
        assert "target_modules" in message
    assert projector_name(model) is None  # no condition figure rather than a guess
    with pytest.raises(SeqforgetError):
        architecture(model)


@pytest.fixture(scope="module")
def idefics3(tiny_bench, tmp_path_factory):
    """A tiny Idefics3 whose vocabulary covers the tiny world, saved and loaded back like any checkpoint."""
    out = tmp_path_factory.mktemp("idefics3") / "model"
    build_tiny_idefics3(out, tiny_bench.world.corpus())
    return out


def test_idefics3_scopes_train_its_encoder_mlps_connector_and_text_model(idefics3):
    model, _ = load_model(idefics3)
    names = linear_layers(model)
    vision = [n for n in names if n.startswith("model.vision_model.") and n.endswith(("mlp.fc1", "mlp.fc2"))]
    language = [n for n in names if n.startswith("model.text_model.") and
                n.endswith(("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))]
    assert vision and language
    assert scope_layers(model, "visual") == vision + ["model.connector.modality_projection.proj"]
    assert sorted(scope_layers(model, "full")) == sorted(["model.connector.modality_projection.proj"] + language)
    assert projector_name(model) == "model.connector.modality_projection"


def test_idefics3_applies_under_every_scope_exports_loads_in_peft_and_rolls_back_exactly(world, idefics3, tmp_path):
    """A second architecture, with its own vision path (SigLIP patches without a class token,
    shuffled 2 x 2 into one token, a pixel mask), through the whole engine."""
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, idefics3)
    base, processor = load_model(idefics3)
    batch = fixed_batch(world, processor)
    assert batch["pixel_values"].dim() == 5 and "pixel_attention_mask" in batch  # Idefics3's own image inputs
    for scope in SCOPES:
        method = SCOPES[scope].default
        request = write_request(tmp_path, scope, scope=scope, method=method, steps=3, forget=str(world / "forget_a.jsonl"),
                                retain=str(world / "retain.jsonl"), reference=str(world / "reference.jsonl"), partial=True)
        entry = apply_request(reg_dir, request, show_progress=False)
        state = Registry.open(reg_dir).snapshot()
        adapter = state.adapter(entry)
        assert sorted(adapter.modules) == sorted(scope_layers(base, scope)), scope
        assert any(delta(adapter, m).abs().max() > 0 for m in adapter.modules), scope
        before = state.record(entry, "metrics.json")["before"]
        assert before["projector_condition"] is not None  # taken of the connector's projection
        live, _ = live_model(state)
        if entry["kind"] == "lora":  # plain PEFT reads the stored adapter as the engine composes it
            peft = PeftModel.from_pretrained(load_model(idefics3)[0], state.folder(entry)).eval()
            alone, _ = load_model(idefics3)
            compose(alone, [adapter])
            assert (logits(peft, batch) - logits(alone, batch)).abs().max() < UNMERGED, scope
    assert (logits(live, batch) - logits(base, batch)).abs().max() > 1e-4

    exported = AutoModelForImageTextToText.from_pretrained(export_model(reg_dir, tmp_path / "out")).eval()
    assert type(exported).__name__ == "Idefics3ForConditionalGeneration"
    assert (logits(exported, batch) - logits(live, batch)).abs().max() < 1e-5

    rollback_request(reg_dir, "full")  # the middle one
    state = Registry.open(reg_dir).snapshot()
    rebuilt, _ = live_model(state)
    composed, _ = load_model(idefics3)
    compose(composed, [state.adapter(state.find(i)) for i in ("visual", "refuse")])
    for (name, p), q in zip(rebuilt.named_parameters(), composed.parameters()):
        assert torch.equal(p, q), name
    for rid in ("visual", "refuse"):
        rollback_request(reg_dir, rid)
    back, _ = live_model(Registry.open(reg_dir).snapshot())
    for (name, p), q in zip(back.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name  # nothing active: the base model, bit for bit
