"""The projector's Jacobian condition number against the chain rule written out in float64."""

import json

import torch
import torch.nn.functional as F

from conftest import write_request
from registry import Registry
from seqforget import data
from seqforget.conditioning import find_projector, projector_condition, projector_inputs
from seqforget.engine import apply_request, init_registry
from seqforget.models import load_model
from seqforget.status import status_rows, status_table


def _images(world, processor, n=2) -> torch.Tensor:
    rows = [json.loads(line) for line in (world / "forget_a.jsonl").read_text().splitlines() if "image" in line][:n]
    return torch.stack([data.encode(processor, data.Row(r["question"], r["answer"], world / r["image"])).pixel_values for r in rows])


def test_the_condition_number_is_that_of_w2_diag_act_w1_at_the_image_tokens(world):
    model, processor = load_model(world / "model")
    images = _images(world, processor, n=1)
    projector = find_projector(model)
    first, second = projector.linear_1, projector.linear_2
    tokens = projector_inputs(model, projector, images)[0].double()  # (T, d_in)
    picks = torch.linspace(0, tokens.shape[0] - 1, 4).round().long()
    expected = []
    for x in tokens[picks]:
        h = x.requires_grad_(True) @ first.weight.double().T + first.bias.double()
        slope = torch.autograd.grad(F.gelu(h).sum(), h)[0]  # the activation's derivative at each unit
        jacobian = second.weight.double() @ torch.diag(slope) @ first.weight.double()  # (d_out, d_in)
        s = torch.linalg.svdvals(jacobian)
        expected.append((s[0] / s[-1]).item())
    assert type(projector.act).__name__ == "GELUActivation" and projector.act.act is F.gelu  # the derivative above is the model's
    assert abs(projector_condition(model, images) - torch.tensor(expected).median().item()) < 1e-3 * max(expected)


def test_every_request_records_the_condition_number_before_and_after_and_status_shows_it(world, tmp_path):
    reg = tmp_path / "reg"
    init_registry(reg, world / "model")
    request = write_request(tmp_path, "r", scope="visual", method="ga", steps=5, forget=str(world / "forget_a.jsonl"),
                            retain=str(world / "retain.jsonl"))
    entry = apply_request(reg, request, show_progress=False)
    before, after = entry["metrics"]["projector_condition"]
    assert 1 < before < 1e8 and 1 < after < 1e8 and before != after  # ga moved the projector
    table = status_table(status_rows(Registry.open(reg).snapshot()))
    assert "projector cond." in table and f"{before:.3g} -> {after:.3g}" in table
