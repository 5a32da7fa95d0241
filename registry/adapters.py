"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

`peft.PeftModel.from_pretrained(base_model, adapter_dir)` loads what `write_lora`
writes. Tensor keys follow PEFT's saved form:
`base_model.model.<module>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r).
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def lora_key(module: str, part: str) -> str:
    return f"{_PREFIX}{module}.lora_{part}.weight"


def write_lora(folder: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], config: dict) -> None:
    """Write LoRA factors {module: (A (r, d_in), B (d_out, r))} and their PEFT config."""
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[lora_key(module, "A")] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[lora_key(module, "B")] = np.ascontiguousarray(b, dtype=np.float32)
    folder = Path(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_lora(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Return ({module: (A, B)}, scale) with scale = lora_alpha / r, as PEFT merges it."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    pairs = {}
    for key in tensors:
        if key.startswith(_PREFIX) and key.endswith(".lora_A.weight"):
            module = key[len(_PREFIX) : -len(".lora_A.weight")]
            pairs[module] = (tensors[key], tensors[lora_key(module, "B")])
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA (no rslora, no per-module ranks) is supported")
    return pairs, config["lora_alpha"] / config["r"]
