"""Shared fixtures: the benchmark's tiny world of fictitious people and a tiny LLaVA that knows them.

The model is built with transformers' own config classes, saved with save_pretrained,
trained for about half a minute, and loaded back from its folder like any checkpoint.
"""

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from benchmarks.forget_retain import PROFILES, prepare
from seqforget.bench.world import request_folder
from seqforget.cli import cli

torch.set_num_threads(2)

# Another seed draws another world and trains another model: what a machine whose arithmetic
# differs from this one's builds. Bounds on trained models are checked on seeds 0, 1 and 2:
#   SEQFORGET_TEST_SEED=1 python3 -m pytest -q
WORLD_SEED = int(os.environ.get("SEQFORGET_TEST_SEED", "0"))


def tiny_profile():
    """The benchmark's tiny profile, drawn and trained from WORLD_SEED."""
    profile = PROFILES["tiny"]
    return replace(profile, world=replace(profile.world, seed=WORLD_SEED), train=replace(profile.train, seed=WORLD_SEED))


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """The benchmark's tiny profile: a world of 8 people and the vanilla model that knows them,
    trained afresh in every run (SEQFORGET_TEST_CACHE names a folder to keep them in between runs)."""
    cache = os.environ.get("SEQFORGET_TEST_CACHE")
    return prepare(tiny_profile(), Path(cache) if cache else tmp_path_factory.mktemp("cache"), log=lambda s: None)


@pytest.fixture(scope="session")
def world(tiny_bench, tmp_path_factory) -> Path:
    """A folder with forget/retain JSONL files and a copy of the trained tiny model in model/.

    forget_a.jsonl / forget_b.jsonl: everything about one person each;
    retain.jsonl: everything about the other people;
    reference.jsonl: everything about people the model never saw.
    """
    return request_folder(tiny_bench.world, tiny_bench.vanilla, tiny_bench.world.root)


def write_request(folder: Path, request_id: str, filename: str | None = None, **fields) -> Path:
    """A request YAML in `folder` (named after its id unless told), pointing at the world's data unless told otherwise.

    The retain guard is off unless asked for: these requests test the plumbing, and a few
    steps of loss ascent on a tiny model cost retained accuracy (tests/test_stopping.py
    tests the guard)."""
    body = {"id": request_id, "scope": "full", "method": "gd", "forget": "forget_a.jsonl", "retain": "retain.jsonl", "steps": 8,
            "retain_tolerance": 1.0}
    body.update(fields)
    path = Path(folder) / (filename or f"{request_id}.yaml")
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

    rows = []
    for name in ("retain.jsonl", "forget_a.jsonl"):
        lines = [json.loads(line) for line in (world / name).read_text().splitlines()]
        rows += [r for r in lines if "image" not in r][:3] + [r for r in lines if "image" in r][:3]
    examples = [
        data.encode(processor, data.Row(r["question"], r["answer"], world / r["image"] if "image" in r else None))
        for r in rows
    ]
    return data.collate(examples, processor.tokenizer.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}).logits


# PEFT runs the LoRA as a path beside the weights, the engine merges it into them: float32 rounds
# the two differently, by up to a few 1e-5 on logits of size 10 (measured against the same model in
# float64: each path is up to 4.2e-5 from it, and the two up to 3.3e-5 apart;
# test_peft_and_the_engine_are_each_float32_roundings_of_the_float64_model checks it)
UNMERGED = 5e-5


def peft_merged(world, folders):
    """The base model with each adapter folder merged in by PEFT itself: seqforget's code is not used."""
    model = AutoModelForImageTextToText.from_pretrained(world / "model", dtype=torch.float32)
    for folder in folders:
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model.eval()


def invoke(*args, check=True):
    """The command in this process (no fresh torch import): for the many error cases."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, result.stderr
    return result
