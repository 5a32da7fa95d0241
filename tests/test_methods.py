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
    method.prepare(model, forget, retain, reference, nullcontext, None)
    with torch.no_grad():
        _, logs = method.loss(model, next(forget.endless(5, seed=3)), next(retain.endless(5, seed=4)), nullcontext)
    return logs["forget_kl"]


def test_each_forget_row_is_trained_towards_its_own_strangers(world):
    # a row that is its own stranger is already at its target, whatever order the batch comes in
    assert _first_kl(world, 0) < 1e-5
    assert _first_kl(world, 1) > 1e-2  # pair each row with another row's answers: far from its target


def test_the_stopping_level_is_the_median_of_each_rows_mean_stranger_probability(world):
    import math

    from seqforget.losses import answer_logprob
    from seqforget.stopping import stranger_level

    model, processor = load_model(world / "model")
    strangers = _rows(world, processor, "reference.jsonl", True)
    owners = [k % 5 for k in range(len(strangers))]  # five forget rows, strangers dealt round-robin
    level = stranger_level(model, data.Rows(strangers.examples, strangers.pad_id, stands_for=owners))
    per_row = {}
    with torch.no_grad():
        for example, k in zip(strangers.examples, owners):  # one row at a time, in float64
            logp, n, _ = answer_logprob(model, data.collate([example], strangers.pad_id))
            per_row.setdefault(k, []).append((float(logp), int(n)))
    expected = [-math.log(sum(math.exp(lp) for lp, _ in rows) / len(rows)) / rows[0][1] for rows in per_row.values()]
    assert level["rows"] == 5 and level["strangers"] == len(strangers)
    assert abs(level["median_nll"] - sorted(expected)[(len(expected) - 1) // 2]) < 1e-4, (level, expected)


def test_own_answer_takes_the_forget_rows_answer_out_of_its_strangers_target(world):
    model, processor = load_model(world / "model")
    forget = _rows(world, processor, "forget_a.jsonl", True)
    n = len(forget)
    reference = data.Rows(forget.examples, forget.pad_id, stands_for=list(range(n)))  # each row its own stranger
    full, without = StrangerTarget(augment=0.0), StrangerTarget(augment=0.0, own_answer=0.0)
    full.prepare(model, forget, None, reference, nullcontext, None)
    without.prepare(model, forget, None, reference, nullcontext, None)
    for example, kept, taken in zip(forget.examples, full._targets, without._targets):
        own = int(example.labels[example.labels != data.IGNORE][0])
        assert kept[0, own].exp() > 0.5  # the model knows the row: its own stranger's target gives the answer
        assert taken[0, own].exp() < 1e-10 and abs(float(taken[0].exp().sum()) - 1.0) < 1e-5
        others = torch.ones_like(kept[0], dtype=torch.bool)
        others[own] = False  # every other answer keeps its share of what is left
        assert torch.allclose(taken[0, others].exp(), kept[0, others].exp() / kept[0, others].exp().sum(), atol=1e-6)
        assert torch.equal(taken[1:], kept[1:])  # later tokens follow the answer as before
