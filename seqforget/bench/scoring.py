"""Scoring a model on world items: choice by likelihood, greedy generation, membership.

  choice      pick the option whose answer the model finds most likely (4 options,
              chance 0.25); the headline accuracy
  generation  greedy answer; exact match and ROUGE-L F1 (rouge-score) against the answer
  membership  how well the answer NLL tells a set of rows (the forget set) from rows of
              people no model ever saw, scored on the same answers, as the AUC of a
              loss-threshold attack: 0.5 when indistinguishable, as for a model retrained
              without them; 1 when every forget row has the lower loss
"""

from collections import defaultdict
from dataclasses import replace

import torch

from seqforget import data
from seqforget.evaluation import answer
from seqforget.losses import answer_logprob


@torch.no_grad()
def choice_hits(model, processor, root, items, batch_size: int = 64) -> list[bool]:
    """Per item, whether its answer is the most likely of its options.

    An option's score is the summed log-probability of its tokens and the end of sequence:
    the model's probability of that whole answer. Options may span different numbers of
    tokens (a BPE world splits rare words), and no length normalisation is applied, on
    purpose: the models are trained on the world's closed set of answers, so once an
    option's first token is chosen its remaining subwords are nearly certain and cost
    almost nothing, and the sum stays the answer's probability (a model that does not
    know picks by its prior over answers, not by their length). Normalising by token
    count would instead reward long options for their easy continuations."""
    if not items:
        return []
    pad = processor.tokenizer.pad_token_id
    if len({len(i.options) for i in items}) != 1:
        raise ValueError("every item must have the same number of options")
    examples = []
    for item in items:
        base = data.encode(processor, item.example(root))
        prompt_len = int((base.labels == data.IGNORE).sum())
        for option in item.options:
            ans = torch.tensor(processor.tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id])
            ids = torch.cat([base.input_ids[:prompt_len], ans])
            examples.append(data.Example(ids, torch.cat([torch.full((prompt_len,), data.IGNORE), ans]), base.pixel_values, base.image_extras))
    scores = []
    for start in range(0, len(examples), batch_size):
        logp, _, _ = answer_logprob(model, data.collate(examples[start : start + batch_size], pad))
        scores.append(logp)
    picks = torch.cat(scores).view(len(items), -1).argmax(-1)  # (items,) over (items, options)
    return [item.options[p] == item.answer for item, p in zip(items, picks.tolist())]


def choice_accuracy(model, processor, root, items, batch_size: int = 64) -> float:
    """Share of items whose answer is the most likely of its options (see choice_hits)."""
    hits = choice_hits(model, processor, root, items, batch_size)
    return sum(hits) / len(hits) if hits else float("nan")


def accuracy_by_person(items, hits: list[bool]) -> dict[str, float]:
    """{person: share of their items hit}, from choice_hits over `items`."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item, hit in zip(items, hits):
        counts[item.person][0] += hit
        counts[item.person][1] += 1
    return {person: h / n for person, (h, n) in counts.items()}


@torch.no_grad()
def answer_nlls(model, processor, root, items, batch_size: int = 64) -> torch.Tensor:
    """(len(items),) each item's answer NLL per token (end of sequence included), teacher-forced."""
    examples = [data.encode(processor, item.example(root)) for item in items]
    out = []
    for batch in data.batches(examples, batch_size, processor.tokenizer.pad_token_id):
        logp, n, _ = answer_logprob(model, batch)
        out.append(-logp / n.clamp_min(1))
    return torch.cat(out) if out else torch.zeros(0)


def auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(a random member's NLL < a random non-member's), ties counting one half: the area under
    the ROC curve of calling low-loss rows members (the Mann-Whitney U statistic, normalised)."""
    if not len(members) or not len(nonmembers):
        return float("nan")
    diff = nonmembers[None, :] - members[:, None]  # (members, nonmembers)
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def stratified_auc(members: torch.Tensor, member_strata: list, nonmembers: torch.Tensor, nonmember_strata: list) -> float:
    """`auc` over the pairs of a member and a non-member of the same stratum only, pooled.

    Rows of different kinds have different losses (a birth year is harder than a job);
    comparing within a stratum keeps a different mix of kinds in the two sets (six views per
    unseen person, four trained views per forgotten one) from reading as membership. Rows
    whose stratum is None are left out; with no pair left, the AUC is NaN."""
    concordant, pairs = 0.0, 0
    for stratum in (set(member_strata) & set(nonmember_strata)) - {None}:  # None: a row left out
        m = members[[k for k, s in enumerate(member_strata) if s == stratum]]
        n = nonmembers[[k for k, s in enumerate(nonmember_strata) if s == stratum]]
        concordant += auc(m, n) * len(m) * len(n)
        pairs += len(m) * len(n)
    return concordant / pairs if pairs else float("nan")


def membership_aucs(model, processor, root, members, nonmembers, groups: dict[str, set[str]]) -> dict[str, float]:
    """{group: how well answer NLL tells `members` from `nonmembers`}, over the items whose kind is
    in the group's kinds. 0.5: indistinguishable; 1: members always have the lower loss.

    Only rows of the same kind and attribute scored on the same answer are compared: every
    non-member row is scored on each answer the members give to its kind of question ("potter"
    after a never-seen face as after a forgotten potter's). Compared on their own answers, the
    two sets also differ in how much the model favours the answers themselves: a model retrained
    without two people's images still favoured the jobs it had read about them, and its
    loss told their image rows from never-seen people's at an AUC of 0.84 (tiny world)."""
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in members:
        answers[item.kind, item.attribute].add(item.answer)
    rescored = [replace(item, answer=a) for item in nonmembers for a in sorted(answers[item.kind, item.attribute])]
    member_nll, nonmember_nll = answer_nlls(model, processor, root, members), answer_nlls(model, processor, root, rescored)
    out = {}
    for name, kinds in groups.items():
        strata = lambda items: [(i.kind, i.attribute, i.answer) if i.kind in kinds else None for i in items]  # noqa: E731
        out[name] = stratified_auc(member_nll, strata(members), nonmember_nll, strata(rescored))
    return out


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), as the rouge-score package computes it."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def generation_scores(model, processor, root, items, max_new_tokens: int = 8) -> dict[str, float]:
    """Mean exact match and ROUGE-L of greedy answers (up to 8 tokens: a BPE answer may take five)."""
    if not items:
        return {"exact": float("nan"), "rouge_l": float("nan")}
    exact = rouge = 0.0
    for item in items:
        got = answer(model, processor, item.example(root), max_new_tokens)
        exact += got == item.answer
        rouge += rouge_l(got, item.answer)
    return {"exact": exact / len(items), "rouge_l": rouge / len(items)}


def refusal_rate(model, processor, root, items, refusal: str) -> float:
    """Share of the items whose greedy answer is the refusal (spacing and case aside): on forget
    questions, how often a `refuse` request does what it asks; on benign ones (SineProject's SARR),
    how often it refuses what it should answer."""
    if not items:
        return float("nan")
    wanted = "".join(refusal.lower().split())
    tokens = len(processor.tokenizer(" " + refusal, add_special_tokens=False)["input_ids"]) + 1
    hits = sum("".join(answer(model, processor, item.example(root), tokens).lower().split()).startswith(wanted) for item in items)
    return hits / len(items)
