"""Shared fixtures: a small world of fictitious people and a tiny LLaVA that knows them.

The model is built with transformers' own config classes, saved with save_pretrained,
taught for a few seconds, and loaded back from its folder like any checkpoint.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from seqforget import example
from seqforget.models import build_tiny_llava

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A folder with portraits, forget/retain JSONL files and a trained tiny model in model/.

    forget_a.jsonl / forget_b.jsonl: everything about one person each;
    retain.jsonl: everything about the other people.
    """
    root = tmp_path_factory.mktemp("world")
    rows = example.write_world(root, n_people=8, views=3, seed=0)
    names = list(rows)
    example.write_jsonl(root / "forget_a.jsonl", rows[names[0]])
    example.write_jsonl(root / "forget_b.jsonl", rows[names[1]])
    example.write_jsonl(root / "retain.jsonl", [r for n in names[2:] for r in rows[n]])
    model, processor = build_tiny_llava(root / "model", example.corpus())
    example.teach(model, processor, [r for n in names for r in rows[n]], root, steps=300)
    model.save_pretrained(root / "model")
    return root


def write_request(folder: Path, request_id: str, **fields) -> Path:
    """A request YAML in `folder`, pointing at the world's data unless told otherwise."""
    body = {"id": request_id, "scope": "full", "method": "gd", "forget": "forget_a.jsonl", "retain": "retain.jsonl", "steps": 8}
    body.update(fields)
    path = Path(folder) / f"{request_id}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file and the name of every folder below `root`: byte-for-byte state."""
    state = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def fixed_batch(world: Path, processor) -> dict:
    """Image and text rows of every person, as one batch: the logits probe of the tests."""
    from seqforget import data

    rows = [json.loads(line) for line in (world / "retain.jsonl").read_text().splitlines()[:6]]
    rows += [json.loads(line) for line in (world / "forget_a.jsonl").read_text().splitlines()[:6]]
    examples = [
        data.encode(processor, data.Row(r["question"], r["answer"], world / r["image"] if "image" in r else None))
        for r in rows
    ]
    return data.collate(examples, processor.tokenizer.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}).logits
