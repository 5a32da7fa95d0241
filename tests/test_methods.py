"""Methods on a real tiny LLaVA: what their losses mean, row by row."""

import json
from contextlib import nullcontext

import torch

from seqforget import data
from seqforget.methods.stranger import StrangerTarget
from seqforget.models import load_model


def _rows(world, processor, name, with_image):
    rows = [json.loads(line) for line in (world / name).read_text().splitlines()]
    rows = [r for r in rows if ("image" in r) == with_image]
    examples = [data.encode(processor, data.Row(r["question"], r["answer"], world / r["image"] if with_image else None)) for r in rows]
    return data.Rows(examples, processor.tokenizer.pad_token_id)


def _first_kl(world, stands_for_shift: int) -> float:
    """The stranger method's forget KL on a shuffled batch, for a model whose strangers are the
    forget rows themselves (shifted by `stands_for_shift` rows)."""
    model, processor = load_model(world / "model")
    forget = _rows(world, processor, "forget_a.jsonl", True)
    retain = _rows(world, processor, "retain.jsonl", True)
    n = len(forget)
    reference = data.Rows(forget.examples, forget.pad_id, stands_for=[(k - stands_for_shift) % n for k in range(n)])
    method = StrangerTarget(augment=0.0)
    method.prepare(model, forget, retain, reference, nullcontext)
    with torch.no_grad():
        _, logs = method.loss(model, next(forget.endless(5, seed=3)), next(retain.endless(5, seed=4)), nullcontext)
    return logs["forget_kl"]


def test_each_forget_row_is_trained_towards_its_own_strangers(world):
    # a row that is its own stranger is already at its target, whatever order the batch comes in
    assert _first_kl(world, 0) < 1e-5
    assert _first_kl(world, 1) > 1e-2  # pair each row with another row's answers: far from its target
