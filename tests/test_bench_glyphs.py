"""The second world, "glyphs": drawn, named, worded and tokenized differently, and learnable."""

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_profile
from seqforget.bench.scoring import choice_accuracy, generation_scores
from seqforget.bench.vanilla import cached_model
from seqforget.bench.world import ATTRIBUTES, STYLES, cached_world
from seqforget.models import load_model

TINY = tiny_profile()


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    return cached_world(replace(TINY.world, style="glyphs"), tmp_path_factory.mktemp("glyphs"))


def test_the_two_styles_share_no_wording_names_or_pictures(glyphs, tiny_bench):
    shapes = tiny_bench.world
    for kind in ("visual", "textual", "cloze"):
        ours, theirs = getattr(glyphs.style, kind), getattr(shapes.style, kind)
        assert not set(ours.values()) & set(theirs.values()), kind
    assert glyphs.style.identity != shapes.style.identity
    assert not set(glyphs.names + glyphs.unseen_names) & set(shapes.names + shapes.unseen_names)
    assert set(glyphs.style.general) != set(shapes.style.general)  # asks about other features
    one = np.asarray(Image.open(glyphs.root / glyphs.select({"identity"})[0].image))
    assert one.shape == (glyphs.spec.image_size, glyphs.spec.image_size, 3)
    assert {i.kind for i in glyphs.select(people=glyphs.unseen_names)} == {"visual", "identity", "textual", "cloze"}


def test_a_style_draws_the_same_look_differently_per_view_and_looks_apart():
    rng = np.random.default_rng(0)
    for style in STYLES.values():
        looks = style.looks(random.Random(0), 40)
        assert len({tuple(sorted(look.items())) for look in looks}) == 40
        a, b = style.draw(looks[0], rng, 32), style.draw(looks[0], rng, 32)
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and not np.array_equal(a, b)


def test_the_bpe_tokenizer_splits_answers_into_several_tokens_and_joins_them_back(glyphs):
    tok = glyphs.tokenizer()
    answers = [v for pool in ATTRIBUTES.values() for v in pool] + glyphs.names
    lengths = [len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert max(lengths) >= 3 and min(lengths) == 1  # multi-token answers, of different lengths
    for a in answers:
        assert tok.decode(tok(" " + a, add_special_tokens=False)["input_ids"]).strip() == a
    prompt = tok("USER: <image>\nwho ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert prompt.count(tok.convert_tokens_to_ids("<image>")) == 1  # the image placeholder stays one token


def test_a_tiny_vanilla_model_learns_the_glyph_world(glyphs, tmp_path_factory):
    """Choice scoring and training over multi-token answers: the model knows what it was taught."""
    model, processor = load_model(cached_model(glyphs, tmp_path_factory.mktemp("models"), spec=TINY.train, log=lambda s: None))
    names = glyphs.names
    multi = [i for i in glyphs.select({"textual"}, names) if len(processor.tokenizer(" " + i.answer)["input_ids"]) > 1]
    assert multi
    assert choice_accuracy(model, processor, glyphs.root, glyphs.select({"visual"}, names, "train")) >= 0.95
    assert choice_accuracy(model, processor, glyphs.root, glyphs.select({"textual"}, names)) >= 0.95
    assert choice_accuracy(model, processor, glyphs.root, multi) >= 0.95
    assert generation_scores(model, processor, glyphs.root, multi)["exact"] >= 0.9  # greedy decoding spells them out
    assert choice_accuracy(model, processor, glyphs.root, glyphs.select({"visual"}, glyphs.unseen_names)) <= 0.6
