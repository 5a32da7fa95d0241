"""Question/answer rows, read from JSONL, encoded with the model's processor, batched.

A row is {"question": str, "answer": str, "image": optional path relative to the
JSONL file}. Rows without an image are text-only probes.
"""

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
# what a processor gives per image, and a batch carries one entry of per image row: the pixels,
# and where an architecture takes them, Idefics3's pixel mask and LLaVA-NeXT's image sizes
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes")


@dataclass(frozen=True)
class Row:
    question: str
    answer: str
    image: Path | None = None


def read_rows(path: Path, problems: list[str], label: str) -> list[Row]:
    """Rows of a JSONL file; every problem found is appended to `problems` as one phrase."""
    path = Path(path)
    if not path.is_file():
        problems.append(f"{label}: file not found: {path}")
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{label}: {path.name} line {n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{label}: {path.name} line {n}: expected an object")
                continue
            bad = [k for k in ("question", "answer") if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
            if bad:
                problems.append(f"{label}: {path.name} line {n}: missing or empty {' and '.join(bad)}")
                continue
            image = obj.get("image")
            if image is not None:
                if not isinstance(image, str):
                    problems.append(f"{label}: {path.name} line {n}: image must be a path")
                    continue
                image = (path.parent / image).resolve()
                _check_image(image, problems, f"{label}: {path.name} line {n}")
            rows.append(Row(obj["question"].strip(), obj["answer"].strip(), image))
    if not rows and not any(p.startswith(f"{label}:") for p in problems):
        problems.append(f"{label}: {path.name} has no rows")
    return rows


def _check_image(path: Path, problems: list[str], where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        problems.append(f"{where}: image not found: {path}")
        return
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        problems.append(f"{where}: image does not decode: {path.name} ({type(e).__name__})")


def load_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def prompt_text(processor, question: str, has_image: bool) -> str:
    """The user turn and the assistant cue, through the processor's chat template."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = "<image>\n" if has_image else ""  # LLaVA-1.5's documented prompt format
    return f"USER: {image}{question} ASSISTANT:"


def hold_out(rows: list[Row], share: float) -> tuple[list[Row], list[Row]]:
    """(kept, held): about `share` of the rows held out, whole images at a time (every row that
    shows a held image is held; a text row is its own group), spread evenly over the rows' order."""
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.image if row.image is not None else i, []).append(row)
    kept, held = [], []
    for g, members in enumerate(groups.values()):
        (held if int((g + 1) * share) > int(g * share) else kept).extend(members)
    return kept, held


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) IGNORE on the prompt
    pixel_values: torch.Tensor | None  # the row's image as the processor gives it: (3, H, W), or (n, 3, H, W) for crops
    image_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the processor's other IMAGE_INPUTS for it

    @property
    def prompt(self) -> tuple[int, ...]:
        """The prompt's token ids (the question, image tokens included): equal for the same question of any image."""
        return tuple(self.input_ids[self.labels == IGNORE].tolist())


def encode(processor, row: Row, answer: str | None = None) -> Example:
    """Prompt ids from the processor (image tokens expanded) + answer ids + end of sequence."""
    tokenizer = processor.tokenizer
    image = load_image(row.image) if row.image else None
    prompt = prompt_text(processor, row.question, image is not None)
    enc = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    answer_ids = tokenizer(" " + (answer or row.answer), add_special_tokens=False)["input_ids"]
    answer_ids = torch.tensor(answer_ids + [tokenizer.eos_token_id])
    return Example(
        input_ids=torch.cat([prompt_ids, answer_ids]),
        labels=torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids]),
        pixel_values=enc["pixel_values"][0] if image is not None else None,
        image_extras={k: enc[k][0] for k in IMAGE_INPUTS[1:] if k in enc} if image is not None else {},
    )


class Encoder:
    """`encode` with one processor, remembering the rows of the request before: a stream's
    requests mostly bring the same retain and reference rows. A row is known by its fields,
    the answer it is encoded with, and its image file's size and modification time; what the
    request before did not use again is let go, so it holds at most two requests' rows."""

    def __init__(self, processor):
        self.processor = processor
        self._before: dict = {}  # rows of the request before
        self._now: dict = {}  # rows of this request

    def next_request(self) -> None:
        self._before, self._now = self._now, {}

    def __call__(self, row: Row, answer: str | None = None) -> Example:
        key = (row, answer, _stamp(row.image))
        example = self._now.get(key) or self._before.get(key) or encode(self.processor, row, answer)
        self._now[key] = example
        return example


def _stamp(image: Path | None) -> tuple | None:
    if image is None:
        return None
    st = image.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; pixel_values (and the other IMAGE_INPUTS) stack the images of the rows that
    have one (has_image), in order, zero-padded where their crops differ in number or size."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    has_image = torch.tensor([e.pixel_values is not None for e in examples])  # (B,)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "has_image": has_image}
    images = [e for e in examples if e.pixel_values is not None]
    if images:
        batch["pixel_values"] = _stack([e.pixel_values for e in images])  # (n_images, 3, H, W) or (n_images, n, 3, H, W)
        for key in images[0].image_extras:
            batch[key] = _stack([e.image_extras[key] for e in images])
    return batch


def subset(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of `batch` where `rows` (B,) is True; the image inputs keep the images of the rows kept."""
    out = {k: v[rows] for k, v in batch.items() if k not in IMAGE_INPUTS and v.dim() and v.shape[0] == len(rows)}
    keep = rows[batch["has_image"]]  # of the images, those whose row is kept
    if keep.any():
        out |= {k: batch[k][keep] for k in IMAGE_INPUTS if k in batch}
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, zero-padding each tensor to the largest size along every dimension (a zero
    image and a zero pixel mask are what processors pad a batch with)."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), *shape))
    for i, t in enumerate(tensors):
        out[i][tuple(slice(0, n) for n in t.shape)] = t
    return out


def batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Fixed batches in order, for evaluation."""
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def endless(examples: list[Example], batch_size: int, pad_id: int, seed: int):
    """Shuffled batches forever: a new permutation each pass, reproducible from `seed`. Each batch's
    "rows" holds the positions of its examples in `examples`."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        take, order = order[: min(batch_size, len(examples))], order[min(batch_size, len(examples)) :]
        batch = collate([examples[i] for i in take], pad_id)
        batch["rows"] = torch.tensor(take)  # (B,) which examples: for targets computed per row beforehand
        yield batch


@dataclass
class Rows:
    """Encoded rows of one part of a request (forget, retain, guard or reference) and their batches."""

    examples: list[Example]
    pad_id: int
    eval_batch: int = 16
    stands_for: list[int] | None = None  # reference rows: the forget row each one is a stranger's version of
    own_answers: list[Example] | None = None  # forget rows trained towards a refusal: the same rows with their own answers
    kinds: list[str] | None = None  # forget rows: the kind of question each asks (seqforget.stopping.row_kind)
    held_out: "Rows | None" = None  # forget rows trained towards a refusal: their images kept out of training, for its check

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def answer_tokens(self) -> int:
        """Answer tokens over all rows: what a token accuracy of these rows counts."""
        return sum(int((e.labels != IGNORE).sum()) for e in self.examples)

    @cached_property
    def fixed(self) -> list[dict[str, torch.Tensor]]:
        """Every row once, in order: for probes and statistics."""
        return batches(self.examples, self.eval_batch, self.pad_id)

    def endless(self, batch_size: int, seed: int):
        return endless(self.examples, batch_size, self.pad_id, seed)


@dataclass
class RequestRows:
    """A request's rows, encoded as its scope means them (seqforget.engine._encode)."""

    forget: Rows
    retain: Rows  # what the retain term trains on
    guard: Rows | None  # retain rows training never sees, which the retain guard watches (None: it watches `retain`)
    reference: Rows | None  # strangers' versions of the forget rows, which set the level to stop at (None: no level)

    @property
    def watched(self) -> Rows:
        """The rows the retain guard watches."""
        return self.guard if self.guard is not None else self.retain
