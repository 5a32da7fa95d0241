"""Loading a vision-language model from a local folder, the precisions and devices it may run in,
and its fingerprint.

Everything loads with `from_pretrained(path)`: the tiny models the tests build (seqforget.tiny)
are saved with `save_pretrained` and read back through the same path a 7B checkpoint takes.
"""

import hashlib
import json
import re
from pathlib import Path

from seqforget.errors import SeqforgetError

def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


DTYPES = ("float32", "bfloat16", "float16")  # the precisions a model is loaded, trained and composed in


def torch_dtype(name):
    """The torch dtype of one of DTYPES (a torch dtype itself passes as it is), or a one-line error."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SeqforgetError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    return getattr(torch, name)


DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # where a model runs; auto: this process's GPU if there is one, else the CPU


def torch_device(name: str | None = "auto"):
    """The torch device `name` (one of DEVICES) means here, or a one-line error. Under a launcher
    (torchrun, accelerate), "auto" and "cuda" mean this process's own GPU (LOCAL_RANK)."""
    import os

    import torch

    name = check_device(name or "auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SeqforgetError(f"device {name} asked for, but torch finds no CUDA device here")
    index = int(name.split(":")[1]) if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise SeqforgetError(f"device {name} asked for, but torch finds {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def check_device(name: str) -> str:
    """`name` if it is one of DEVICES, else a one-line error (whether the machine has it is not asked)."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise SeqforgetError(f"unknown device {name!r} (one of {', '.join(DEVICES)})")
    return name


def device_of(model):
    """The device of a model's parameters (inputs go there)."""
    return next(model.parameters()).device


def load_model(path: Path, dtype="float32", device="cpu"):
    """(model, processor) from a local folder; the model in eval mode, its weights in `dtype` (one of
    DTYPES, or a torch dtype), on `device` (one of DEVICES)."""
    quiet_transformers()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SeqforgetError(f"{path} is not a model folder (no config.json)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype or "float32"))
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SeqforgetError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
    model.to(torch_device(device)).eval()
    return model, processor


def _model_files(path: Path) -> list[Path]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SeqforgetError(f"{path} is not a model folder (no config.json)")
    return sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and not p.name.upper().startswith("README")
    )


def model_sha256(path: Path) -> str:
    """sha256 over the names and contents of the model folder's files (weights, config, tokenizer).

    Every byte is read (about 20-30 s for a 7B checkpoint): computed once at `init`, and
    again only by `verify`.
    """
    from registry import sha256_file

    listing = [(p.relative_to(path).as_posix(), sha256_file(p)) for p in _model_files(path)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def base_model_problems(base: dict) -> list[str]:
    """The registry's base model (as `init` recorded it) against its files now, every byte read."""
    path = Path(base["path"])
    if not path.is_dir():
        return [f"base model folder {path} is missing"]
    if model_sha256(path) != base["sha256"]:
        return [f"base model folder {path}: sha256 differs from the one taken at init"]
    return []


SMALL_FILE = 1 << 20  # read whole
SAMPLES, SAMPLE_BYTES = 16, 4096  # of a larger file, beyond its header


def model_signature(path: Path) -> str:
    """A cheap fingerprint, checked by every command: the whole of every small file (config,
    tokenizer), and of each weight file its size, its header (a safetensors header lists every
    tensor's name, dtype, shape and offsets) and 16 samples of 4 KiB spread over its data.
    A different architecture, size or checkpoint changes it; `verify` does the full hash."""
    h = hashlib.sha256()
    for p in _model_files(path):
        size = p.stat().st_size
        h.update(f"{p.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= SMALL_FILE:
                h.update(f.read())
                continue
            head = f.read(8)
            header = int.from_bytes(head, "little") if p.suffix == ".safetensors" else 0
            h.update(head + f.read(min(header, size - 8) if header else 65536))
            for k in range(SAMPLES):
                f.seek(size * k // SAMPLES)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
