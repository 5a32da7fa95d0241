"""Scoring a model on world items: choice by likelihood, greedy generation, cloze.

  choice      pick the option whose answer the model finds most likely (4 options,
              chance 0.25); the headline accuracy
  generation  greedy answer; exact match and ROUGE-L F1 (rouge-score) against the answer
  cloze       the same greedy scoring on fill-in-the-blank items
"""

import torch

from seqforget import data
from seqforget.evaluation import answer
from seqforget.losses import answer_logprob


@torch.no_grad()
def choice_accuracy(model, processor, root, items, batch_size: int = 64) -> float:
    """Share of items whose answer is the most likely of its options (summed answer log-probability;
    the world's options are single words, so no length normalisation is needed)."""
    if not items:
        return float("nan")
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
            examples.append(data.Example(ids, torch.cat([torch.full((prompt_len,), data.IGNORE), ans]), base.pixel_values))
    scores = []
    for start in range(0, len(examples), batch_size):
        logp, _, _ = answer_logprob(model, data.collate(examples[start : start + batch_size], pad))
        scores.append(logp)
    scores = torch.cat(scores).view(len(items), -1)  # (items, options)
    picks = scores.argmax(-1)
    return sum(item.options[p] == item.answer for item, p in zip(items, picks.tolist())) / len(items)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), as the rouge-score package computes it."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def generation_scores(model, processor, root, items, max_new_tokens: int = 4) -> dict[str, float]:
    """Mean exact match and ROUGE-L of greedy answers."""
    if not items:
        return {"exact": float("nan"), "rouge_l": float("nan")}
    exact = rouge = 0.0
    for item in items:
        got = answer(model, processor, item.example(root), max_new_tokens)
        exact += got == item.answer
        rouge += rouge_l(got, item.answer)
    return {"exact": exact / len(items), "rouge_l": rouge / len(items)}
