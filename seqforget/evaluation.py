"""Forget and retain probes: answer likelihood and teacher-forced token accuracy."""

import torch

from seqforget.losses import answer_scores
from seqforget.models import device_of


@torch.no_grad()
def probe(model, batches: list[dict[str, torch.Tensor]], opening: int | None = None, per_row: bool = False) -> dict:
    """{"nll": mean over rows of the answer's per-token NLL, "median_nll": its median,
    "token_acc": share of answer tokens ranked first, "exact": share of rows whose every answer
    token is ranked first, i.e. whose greedy answer is theirs}; with `opening` (a token id, e.g.
    a refusal's first), also "opens_with": share of rows whose greedy answer starts with it;
    with `per_row`, also "row_nll": each row's per-token NLL, and "row_exact": whether its
    greedy answer is its own, in order."""
    row_nll, row_exact, hits, tokens, exact, opened = [], [], 0, 0, 0, 0
    for batch in batches:
        logp, n, h, first = answer_scores(model, batch)
        row_nll.append(-logp / n.clamp_min(1))  # (B,)
        whole = h == n  # (B,) rows whose every answer token is ranked first
        row_exact += whole.tolist()
        hits, tokens, exact = hits + h.sum().item(), tokens + n.sum().item(), exact + whole.sum().item()
        opened += (first == opening).sum().item() if opening is not None else 0
    nll = torch.cat(row_nll) if row_nll else torch.zeros(0)
    out = {"nll": nll.mean().item() if len(nll) else 0.0, "median_nll": nll.median().item() if len(nll) else 0.0,
           "token_acc": hits / max(tokens, 1), "exact": exact / max(len(nll), 1)}
    if opening is not None:
        out["opens_with"] = opened / max(len(nll), 1)
    if per_row:
        out["row_nll"], out["row_exact"] = nll.tolist(), row_exact
    return out


@torch.no_grad()
def answer(model, processor, row, max_new_tokens: int = 8) -> str:
    """The model's greedy answer to one row's question."""
    from seqforget.data import load_image, prompt_text

    image = load_image(row.image) if row.image else None
    enc = processor(
        text=[prompt_text(processor, row.question, image is not None)],
        images=[image] if image is not None else None,
        return_tensors="pt",
    ).to(device_of(model))
    tokenizer = processor.tokenizer
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
