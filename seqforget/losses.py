"""Answer likelihoods under the model: the quantities every method's loss is made of."""

import torch
import torch.nn.functional as F

from seqforget.data import IGNORE, IMAGE_INPUTS
from seqforget.models import device_of

MODEL_INPUTS = ("input_ids", "attention_mask") + IMAGE_INPUTS


def model_inputs(model, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the model's forward takes of `batch` (its images replaced by `pixel_values` if given), on the model's device."""
    device = device_of(model)
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(device)
    return inputs


def answer_logprob(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probabilities per row (B,), answer tokens per row (B,), and
    how many answer tokens per row the model ranks first (B,), teacher-forced; on the model's device."""
    return answer_scores(model, batch)[:3]


def answer_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """answer_logprob's three, and the token each row's greedy answer starts with (B,)."""
    logits = model(**model_inputs(model, batch)).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:].to(logits.device)  # (B, T-1)
    mask = labels != IGNORE
    token_logp = -F.cross_entropy(logits.transpose(1, 2).float(), labels.clamp_min(0), reduction="none")  # (B, T-1)
    ranked_first = logits.argmax(-1)  # (B, T-1)
    hits = ((ranked_first == labels) & mask).sum(1)
    opening = ranked_first.gather(1, mask.float().argmax(1, keepdim=True)).squeeze(1)  # (B,) at each first answer position
    return (token_logp * mask).sum(1), mask.sum(1), hits, opening


def answer_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of the per-token negative log-likelihood of the answer."""
    logp, n, _ = answer_logprob(model, batch)
    return (-logp / n.clamp_min(1)).mean()


def answer_logprobs(model, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities over the vocabulary at every answer position, (answer tokens of the batch, V),
    row after row; `pixel_values` (shaped as the batch's), if given, replace the batch's images."""
    logits = model(**model_inputs(model, batch, pixel_values)).logits[:, :-1]  # (B, T-1, V)
    mask = batch["labels"][:, 1:].to(logits.device) != IGNORE  # (B, T-1)
    return F.log_softmax(logits[mask].float(), dim=-1)


def answer_kl(target_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(target || model), from two (tokens, V) log-probability tensors."""
    return (target_logp.exp() * (target_logp - logp)).sum(-1).mean()


def kl_to_original(model, batch: dict[str, torch.Tensor], original, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """answer_kl from the model's answers before this request (`with original():`) to its answers now,
    on `batch` (its images replaced by `pixel_values` if given): the usual retain term."""
    with torch.no_grad(), original():
        held = answer_logprobs(model, batch, pixel_values)
    return answer_kl(held, answer_logprobs(model, batch, pixel_values))
