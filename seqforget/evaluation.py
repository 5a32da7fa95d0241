"""Forget and retain probes: answer likelihood and teacher-forced token accuracy."""

import torch

from seqforget.losses import answer_logprob


@torch.no_grad()
def probe(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """{"nll": mean answer-token NLL per row, "token_acc": share of answer tokens ranked first}."""
    nll, hits, tokens, rows = 0.0, 0, 0, 0
    for batch in batches:
        logp, n, h = answer_logprob(model, batch)
        nll += (-logp / n.clamp_min(1)).sum().item()
        hits, tokens, rows = hits + h.sum().item(), tokens + n.sum().item(), rows + len(n)
    return {"nll": nll / max(rows, 1), "token_acc": hits / max(tokens, 1)}
