"""Answer likelihoods under the model: the quantities every method's loss is made of."""

import torch
import torch.nn.functional as F

from seqforget.data import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def answer_logprob(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probabilities per row (B,), answer tokens per row (B,), and
    how many answer tokens per row the model ranks first (B,), teacher-forced."""
    logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != IGNORE
    token_logp = -F.cross_entropy(logits.transpose(1, 2).float(), labels.clamp_min(0), reduction="none")  # (B, T-1)
    hits = ((logits.argmax(-1) == labels) & mask).sum(1)
    return (token_logp * mask).sum(1), mask.sum(1), hits


def answer_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of the per-token negative log-likelihood of the answer."""
    logp, n, _ = answer_logprob(model, batch)
    return (-logp / n.clamp_min(1)).mean()
