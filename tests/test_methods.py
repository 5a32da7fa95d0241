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


def _example(prompt: list[int], answer: list[int]) -> data.Example:
    return data.Example(torch.tensor(prompt + answer), torch.tensor([data.IGNORE] * len(prompt) + answer), None)


def test_own_prior_caps_the_whole_own_answer_at_its_share_among_the_retain_rows():
    from seqforget.methods.stranger import _cap_own_answers

    def target(*rows):  # probabilities over a vocabulary of 6, one row per answer token
        return torch.tensor(rows, dtype=torch.float32)

    before = target([0.1, 0.1, 0.1, 0.6, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    rare, common, unasked = before.clone(), before.clone(), before.clone()
    forget = data.Rows([_example([1, 2], [3, 4, 5]), _example([1, 2], [3, 4, 5]), _example([9, 2], [3, 4, 5])], 0)
    # the name "3 4 5" is no retained person's; "3 1 5" begins like it and must keep its share
    retain = data.Rows([_example([1, 2], [3, 1, 5]), _example([1, 2], [3, 1, 5]), _example([1, 2], [2, 5])], 0)
    _cap_own_answers([rare], data.Rows(forget.examples[:1], 0), retain)
    assert rare[1, 4] == 0 and torch.equal(rare[0], before[0]) and torch.equal(rare[2], before[2])  # cut where it parts
    assert torch.allclose(rare[1, [0, 1, 2, 3, 5]], before[1, [0, 1, 2, 3, 5]] / 0.5) and abs(float(rare[1].sum()) - 1) < 1e-6
    # a common answer, one retain row in four: the whole answer (0.6 * 0.5 before) keeps 0.25
    retain = data.Rows(retain.examples + [_example([1, 2], [3, 4, 5])], 0)
    _cap_own_answers([common], data.Rows(forget.examples[1:2], 0), retain)
    whole = common[0, 3] * common[1, 4] * common[2, 5]
    assert abs(float(whole) - 0.25) < 1e-6 and torch.equal(common[0], before[0]) and abs(float(common[1].sum()) - 1) < 1e-6
    # at or under its share, or asked by no retain row: left as the strangers give it
    _cap_own_answers([unasked], data.Rows(forget.examples[2:], 0), retain)
    assert torch.equal(unasked, before)
    generous = before.clone()
    _cap_own_answers([generous], data.Rows(forget.examples[1:2], 0), data.Rows(retain.examples[-1:], 0))
    assert torch.equal(generous, before)


def test_own_prior_on_a_real_model_takes_a_name_no_retained_person_has_out_of_the_target(world):
    model, processor = load_model(world / "model")
    forget = _rows(world, processor, "forget_a.jsonl", True)
    retain = _rows(world, processor, "retain.jsonl", True)
    reference = data.Rows(forget.examples, forget.pad_id, stands_for=list(range(len(forget))))  # each row its own stranger
    plain, capped = StrangerTarget(augment=0.0), StrangerTarget(augment=0.0, own_prior="retained")
    plain.prepare(model, forget, retain, reference, nullcontext, None)
    capped.prepare(model, forget, retain, reference, nullcontext, None)
    given = {}
    for example in retain.examples:
        given.setdefault(example.prompt, set()).add(tuple(example.labels[example.labels != data.IGNORE].tolist()))
    cut = 0
    for example, kept, taken in zip(forget.examples, plain._targets, capped._targets):
        own = example.labels[example.labels != data.IGNORE]
        whole = lambda t: float(t[torch.arange(len(own)), own].sum().exp())  # noqa: E731
        if tuple(own.tolist()) in given.get(example.prompt, set()):  # an answer retained people give too: never raised
            assert whole(taken) <= whole(kept) + 1e-6
        elif example.prompt in given:  # an answer of the forgotten person's alone: no probability left
            assert whole(kept) > 0.5 and whole(taken) < 1e-10
            cut += 1
    assert cut > 0  # the world's forget rows include answers only the forgotten person gives


def test_own_ceiling_holds_each_whole_own_answer_at_most_the_targets_in_log_space(world):
    from seqforget.losses import answer_logprob

    model, processor = load_model(world / "model")
    forget = _rows(world, processor, "forget_a.jsonl", True)
    retain = _rows(world, processor, "retain.jsonl", True)
    reference = data.Rows(forget.examples, forget.pad_id, stands_for=list(range(len(forget))))  # each row its own stranger
    batch, retain_batch = next(forget.endless(len(forget), seed=3)), next(retain.endless(5, seed=4))
    # at the strangers' own target the model is at its ceiling already: nothing to hold
    plain = StrangerTarget(augment=0.0, own_ceiling=1.0)
    plain.prepare(model, forget, retain, reference, nullcontext, None)
    with torch.no_grad():
        assert plain.loss(model, batch, retain_batch, nullcontext)[1]["own_over_ceiling"] < 1e-4
    # capped: a name only the forgotten person has is far above its ceiling, and the term is the
    # mean over the batch's rows of how far each whole answer's log-probability lies above it
    capped = StrangerTarget(augment=0.0, own_prior="retained", own_ceiling=1.0)
    capped.prepare(model, forget, retain, reference, nullcontext, None)
    with torch.no_grad():
        own, _, _ = answer_logprob(model, batch)
    over = (own.double() - capped._ceilings[batch["rows"]].double()).clamp_min(0)
    assert over.max() > 5
    loss, logs = capped.loss(model, batch, retain_batch, nullcontext)
    assert abs(logs["own_over_ceiling"] - float(over.mean())) < 1e-3 * max(1.0, float(over.mean()))
    # and a step down its gradient lowers those answers
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
        after, _, _ = answer_logprob(model, batch)
    above = over > 0
    assert float(after[above].sum()) < float(own[above].sum())
