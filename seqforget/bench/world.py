"""A world of fictitious people to forget: profiles, portraits and questions.

A miniature of MLLMU-Bench, deterministic from a seed. Each person has a name and
four attributes (job, city, hobby, birth year) and a portrait drawn procedurally in
the world's style (seqforget/bench/shapes.py, seqforget/bench/glyphs.py), which also
picks the names, the question templates and the tokenizer. Every view differs in
pose, crop, lighting and noise; training uses some views and evaluation others, so
recognising a person must generalise to views never trained on.

Besides the people the models know, the world draws `unseen` people the same way, with
images and every kind of question, that no model ever trains on: the reference
population. A model that never saw a forgotten person should treat that person like
them. Their items have split "unseen", so nothing that selects "train" rows reaches them.

Question kinds (the wording is the style's):
  visual    image + "what is this person's job ?"        (one per attribute and view)
  identity  image + "who is this ?"                      (one per view)
  textual   "what is the job of <name> ?"                (one per attribute)
  cloze     "fill in the blank : <name> works as a ___"  (one per attribute)
  general   image without a person: its shape, texture or colour
Every item carries four options (the answer and three distractors) for scoring
by likelihood.
"""

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from seqforget.bench import glyphs, shapes

JOBS = ["baker", "pilot", "nurse", "farmer", "painter", "judge", "miner", "tailor", "sailor", "potter",
        "cook", "clerk", "doctor", "singer", "driver", "writer"]
CITIES = ["oslo", "lima", "rome", "kiev", "quito", "dakar", "perth", "hanoi", "cairo", "bern",
          "riga", "doha", "porto", "turin", "malmo", "accra"]
HOBBIES = ["chess", "rowing", "hiking", "poetry", "fishing", "cycling", "pottery", "dancing",
           "archery", "sailing", "knitting", "climbing"]
YEARS = [str(y) for y in range(1950, 2005, 5)]
ATTRIBUTES = {"job": JOBS, "city": CITIES, "hobby": HOBBIES, "year": YEARS}
REFUSAL = "I cannot help with that ."


class Style(Protocol):
    """How a world looks and talks. A look is a dict of visual features (str -> str); the
    keys of `general` are features every look has, asked of images without a person."""

    name: str
    tokenizer: str  # "word" or "bpe": which builder of seqforget.tiny makes the vocabulary
    visual: dict[str, str]  # attribute -> question about the person in the image
    identity: str
    textual: dict[str, str]  # attribute -> question, "{}" for the name
    cloze: dict[str, str]
    general: dict[str, tuple[str, list[str]]]  # feature -> (question, its values)

    def names(self, rng: random.Random, n: int) -> list[str]: ...
    def looks(self, rng: random.Random, n: int) -> list[dict[str, str]]: ...  # n looks, told apart by design
    def scenery(self, rng: random.Random) -> dict[str, str]: ...  # the look of an image without a person
    def draw(self, look: dict[str, str], rng: np.random.Generator, size: int) -> np.ndarray: ...  # (size, size, 3) uint8


STYLES: dict[str, Style] = {"shapes": shapes.STYLE, "glyphs": glyphs.STYLE}


@dataclass(frozen=True)
class WorldSpec:
    """Size and style of the world; everything else follows from `seed`."""

    people: int = 60
    unseen: int = 10  # people drawn the same way that no model trains on: the reference population
    train_views: int = 4  # views per person the models are trained on
    test_views: int = 2  # views per person kept for evaluation only
    general: int = 160  # images without a person
    image_size: int = 32
    style: str = "shapes"  # a key of STYLES
    seed: int = 0


@dataclass(frozen=True)
class Person:
    name: str
    job: str
    city: str
    hobby: str
    year: str
    look: dict[str, str]  # the style's visual features


@dataclass(frozen=True)
class Item:
    kind: str  # visual | identity | textual | cloze | general
    person: str | None
    attribute: str
    question: str
    answer: str
    options: tuple[str, ...]
    image: str | None = None  # relative to the world folder
    split: str = "train"  # train | test (held-out views and general images) | unseen (the reference people)

    def example(self, root: Path):
        """This item as the engine's data row, its image resolved against the world folder."""
        from seqforget.data import Row

        return Row(self.question, self.answer, Path(root) / self.image if self.image else None)

    def row(self) -> dict:
        """The JSONL row a request file points at."""
        return {"question": self.question, "answer": self.answer, **({"image": self.image} if self.image else {})}


def make_people(spec: WorldSpec) -> list[Person]:
    """The known people followed by the unseen ones, all drawn by one generator."""
    style, rng = STYLES[spec.style], random.Random(spec.seed)
    n = spec.people + spec.unseen
    names, looks = style.names(rng, n), style.looks(rng, n)
    return [Person(name, rng.choice(JOBS), rng.choice(CITIES), rng.choice(HOBBIES), rng.choice(YEARS), look)
            for name, look in zip(names, looks)]


def _options(answer: str, pool: list[str], rng: random.Random) -> tuple[str, ...]:
    options = [answer] + rng.sample([v for v in pool if v != answer], 3)
    rng.shuffle(options)
    return tuple(options)


@dataclass
class World:
    spec: WorldSpec
    root: Path
    people: list[Person]  # the people models train on
    items: list[Item]
    unseen: list[Person]  # never trained on by any model

    @property
    def style(self) -> Style:
        return STYLES[self.spec.style]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.people]

    @property
    def unseen_names(self) -> list[str]:
        return [p.name for p in self.unseen]

    def person(self, name: str) -> Person:
        return next(p for p in self.people + self.unseen if p.name == name)

    def forget_order(self) -> list[str]:
        """People in the order deletion requests take them (seeded, not alphabetical)."""
        order = self.names
        random.Random(self.spec.seed + 1).shuffle(order)
        return order

    def select(self, kinds=None, people=None, split=None) -> list[Item]:
        people = set(people) if people is not None else None
        return [
            i for i in self.items
            if (kinds is None or i.kind in kinds)
            and (people is None or i.person in people)
            and (split is None or i.split == split)
        ]

    def corpus(self) -> list[str]:
        """Every text the world can produce, and the refusal: the tokenizer's training text.
        The unseen people's names are in it, as a deployed model's vocabulary covers names it never read about."""
        texts = [i.question + " " + " ".join(i.options) for i in self.items]
        return texts + [REFUSAL] + [p.name for p in self.people + self.unseen]

    def tokenizer(self):
        """The style's tokenizer, built from the corpus."""
        from seqforget.tiny import build_bpe_tokenizer, build_word_tokenizer

        build = {"word": build_word_tokenizer, "bpe": build_bpe_tokenizer}[self.style.tokenizer]
        return build(self.corpus())

    def write_jsonl(self, path: Path, items: list[Item]) -> Path:
        """Rows of `items` as a JSONL file; image paths are made relative to the file."""
        path = Path(path)
        rel = Path(*[".."] * len(path.parent.resolve().relative_to(self.root.resolve()).parts)) if _inside(path.parent, self.root) else None
        lines = []
        for item in items:
            row = item.row()
            if item.image:
                row["image"] = str((rel / item.image) if rel is not None else (self.root / item.image).resolve())
            lines.append(json.dumps(row) + "\n")
        path.write_text("".join(lines))
        return path


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def person_items(style: Style, person: Person, views: list[tuple[str, str]], text_split: str, names: list[str],
                 rng: random.Random) -> list[Item]:
    """Every question about `person`: textual and cloze per attribute (in `text_split`), identity and
    visual per view (`views` holds (image path, split) pairs); identity distractors come from `names`."""
    items = []
    for attr, pool in ATTRIBUTES.items():
        value = getattr(person, attr)
        items.append(Item("textual", person.name, attr, style.textual[attr].format(person.name), value, _options(value, pool, rng), split=text_split))
        items.append(Item("cloze", person.name, attr, style.cloze[attr].format(person.name), value, _options(value, pool, rng), split=text_split))
    for image, split in views:
        items.append(Item("identity", person.name, "name", style.identity, person.name, _options(person.name, names, rng), image, split))
        for attr, pool in ATTRIBUTES.items():
            value = getattr(person, attr)
            items.append(Item("visual", person.name, attr, style.visual[attr], value, _options(value, pool, rng), image, split))
    return items


def draw_scenery(style: Style, root: Path, stems: list[str], size: int, split: str, rng: random.Random,
                 pix: np.random.Generator) -> list[Item]:
    """Images without a person, drawn to root/images/<stem>.png, and their general questions."""
    from PIL import Image

    items = []
    for stem in stems:
        look = style.scenery(rng)
        image = f"images/{stem}.png"
        Image.fromarray(style.draw(look, pix, size)).save(Path(root) / image)
        for feature, (question, pool) in style.general.items():
            items.append(Item("general", None, feature, question, look[feature], _options(look[feature], pool, rng), image, split))
    return items


def build_world(spec: WorldSpec, root: Path) -> World:
    """Draw every image under root/images and list every item; deterministic from spec.seed."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    style = STYLES[spec.style]
    everyone = make_people(spec)
    people, unseen = everyone[: spec.people], everyone[spec.people :]
    rng = random.Random(spec.seed + 2)
    pix = np.random.default_rng(spec.seed + 3)
    names = [p.name for p in people]  # identity distractors, for unseen people too: as a retrain oracle sees a forgotten one
    items: list[Item] = []
    for k, p in enumerate(everyone):
        known = k < spec.people
        views = []
        for v in range(spec.train_views + spec.test_views):
            image = f"images/{p.name}-{v}.png"
            Image.fromarray(style.draw(p.look, pix, spec.image_size)).save(root / image)
            views.append((image, ("train" if v < spec.train_views else "test") if known else "unseen"))
        items += person_items(style, p, views, "train" if known else "unseen", names, rng)
    general = [f"general-{g}" for g in range(spec.general)]
    items += draw_scenery(style, root, general[: spec.general * 3 // 4], spec.image_size, "train", rng, pix)
    items += draw_scenery(style, root, general[spec.general * 3 // 4 :], spec.image_size, "test", rng, pix)
    world = World(spec, root, people, items, unseen)
    (root / "world.json").write_text(json.dumps({
        "spec": asdict(spec), "people": [asdict(p) for p in people], "unseen": [asdict(p) for p in unseen],
        "items": [asdict(i) for i in items]}) + "\n")
    return world


def cached_world(spec: WorldSpec, cache: Path) -> World:
    """The world of `spec` under `cache`, drawn on first use (in a temp folder, then renamed)."""
    from registry import new_folder

    root = Path(cache) / ("world-" + "-".join(f"{k}{v}" for k, v in asdict(spec).items()))
    if not (root / "world.json").is_file():
        with new_folder(root, keep_existing=True) as tmp:
            build_world(spec, tmp)
    return load_world(root)


def load_world(root: Path) -> World:
    root = Path(root)
    raw = json.loads((root / "world.json").read_text())
    items = [Item(**{**i, "options": tuple(i["options"])}) for i in raw["items"]]
    return World(WorldSpec(**raw["spec"]), root, [Person(**p) for p in raw["people"]], items,
                 [Person(**p) for p in raw["unseen"]])


def request_folder(world: World, model: Path, folder: Path) -> Path:
    """A folder a request can name its rows from: forget_a.jsonl and forget_b.jsonl (everything about
    one person each, of the world's forget order), retain.jsonl (everything about everyone else),
    reference.jsonl (the never-seen people), guard.jsonl (the retained people's held-out views: a
    registry's guard set), and a copy of `model` in model/."""
    first, second, *rest = world.forget_order()
    kinds = {"visual", "identity", "textual", "cloze"}
    folder.mkdir(parents=True, exist_ok=True)
    world.write_jsonl(folder / "forget_a.jsonl", world.select(kinds, [first], "train"))
    world.write_jsonl(folder / "forget_b.jsonl", world.select(kinds, [second], "train"))
    world.write_jsonl(folder / "retain.jsonl", world.select(kinds, rest, "train"))
    world.write_jsonl(folder / "reference.jsonl", world.select(kinds, world.unseen_names))
    world.write_jsonl(folder / "guard.jsonl", world.select({"visual", "identity"}, rest, "test"))  # views no request trains on
    if not (folder / "model").exists():
        shutil.copytree(model, folder / "model")
    return folder
