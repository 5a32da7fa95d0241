"""The yardstick of `seqforget apply`'s speed: what a user would write by hand with PEFT.

    python benchmarks/plain_peft.py MODEL FORGET.jsonl RETAIN.jsonl OUT [--steps 30] [--lr 1e-3] [--scope full]

Loads the model, wraps the scope's layers in a PEFT LoRA (r 8, alpha 16), trains gradient
difference (-NLL(forget) + NLL(retain)) for the same steps, batch size and learning rate as
a `gd` request, and saves the adapter. No projection, no stopping checks, no probes, no
registry: the work a request does beyond this is what `apply` costs on top. The rows are
encoded and batched with seqforget's own helpers, the part a user would write the same way.

The quality of the run is not the point; benchmarks/FINDINGS.md, "What a stream costs", has the
timing against `seqforget apply` on the same request.
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from seqforget import data
from seqforget.losses import answer_nll
from seqforget.models import load_model
from seqforget.scopes import scope_layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("forget", type=Path)
    parser.add_argument("retain", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scope", default="full")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, processor = load_model(args.model)
    pad = processor.tokenizer.pad_token_id
    rows = {}
    for label, path in (("forget", args.forget), ("retain", args.retain)):
        problems: list[str] = []
        found = data.read_rows(path, problems, label)
        if problems:
            raise SystemExit("; ".join(problems))
        rows[label] = data.Rows([data.encode(processor, r) for r in found], pad)
    targets = scope_layers(model, args.scope)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    forget, retain = rows["forget"].endless(args.batch_size, 0), rows["retain"].endless(args.batch_size, 1)
    model.train()
    for _ in range(args.steps):
        loss = -answer_nll(model, next(forget)) + answer_nll(model, next(retain))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
