"""A request's weight update: one type from training to disk, and the file format of each kind.

    kind "lora"   weights[module] = {"A": (r, d_in), "B": (d_out, r)}; config is PEFT's
                  adapter_config (r, lora_alpha, target_modules, ...); the update of the
                  module's weight is (lora_alpha / r) * B @ A. Stored in PEFT's layout:
                  adapter_config.json + adapter_model.safetensors, which
                  `peft.PeftModel.from_pretrained(base_model, folder)` loads.
    kind "sine"   weights[module] = {"dW": (d_out, d_in)}; the update of the module's weight
                  is sin(dW), elementwise (SineProject: bounded in [-1, 1] per weight).
                  Stored as sine_config.json + sine_model.safetensors ("<module>.dW").
    kind "masked" weights[module] = {"indices": (n,) int64, "values": (n,)}; the update is
                  zero but at the flat (row-major) positions `indices` of the weight, where it
                  adds `values` (a repeated index adds twice; a saliency-masked dense update,
                  stored sparse); config["shapes"]
                  gives each module's (d_out, d_in). Stored as masked_config.json +
                  masked_model.safetensors ("<module>.indices", "<module>.values").

An adapter means what it stores: a method that subtracts what it learned (distil-then-
delete) stores a negated factor, so plain PEFT and seqforget apply the same update.
A new kind is one entry in KINDS: how its files are written and read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where arrays are read, not to open a registry
    import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class Adapter:
    kind: str
    weights: dict[str, dict[str, np.ndarray]]  # {module: {part: numpy array}}
    config: dict

    @property
    def modules(self) -> list[str]:
        return sorted(self.weights)

    @property
    def scale(self) -> float:
        """lora_alpha / r, as PEFT merges a plain LoRA."""
        return self.config["lora_alpha"] / self.config["r"]


def lora_key(module: str, part: str) -> str:
    return f"{_PREFIX}{module}.lora_{part}.weight"


# numpy and safetensors are imported where used, so that `seqforget status` starts at once


def _write_lora(folder: Path, adapter: Adapter) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for module, parts in adapter.weights.items():
        tensors[lora_key(module, "A")] = np.ascontiguousarray(parts["A"], dtype=np.float32)
        tensors[lora_key(module, "B")] = np.ascontiguousarray(parts["B"], dtype=np.float32)
    (folder / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _read_lora(folder: Path) -> Adapter:
    from safetensors.numpy import load_file

    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA (no rslora, no per-module ranks) is supported")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    weights = {}
    for key in tensors:
        if key.startswith(_PREFIX) and key.endswith(".lora_A.weight"):
            module = key[len(_PREFIX) : -len(".lora_A.weight")]
            weights[module] = {"A": tensors[key], "B": tensors[lora_key(module, "B")]}
    return Adapter("lora", weights, config)


def _writer(kind: str, parts: dict[str, str]):
    """Writer of a kind stored as <kind>_config.json + <kind>_model.safetensors ("<module>.<part>")."""

    def write(folder: Path, adapter: Adapter) -> None:
        import numpy as np
        from safetensors.numpy import save_file

        tensors = {f"{module}.{part}": np.ascontiguousarray(values[part], dtype=dtype)
                   for module, values in adapter.weights.items() for part, dtype in parts.items()}
        (folder / f"{kind}_config.json").write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(folder / f"{kind}_model.safetensors"))

    return write


def _reader(kind: str, parts: dict[str, str]):
    def read(folder: Path) -> Adapter:
        from safetensors.numpy import load_file

        config = json.loads((folder / f"{kind}_config.json").read_text())
        tensors = load_file(str(folder / f"{kind}_model.safetensors"))
        modules = {key.rsplit(".", 1)[0] for key in tensors}
        return Adapter(kind, {m: {part: tensors[f"{m}.{part}"] for part in parts} for m in modules}, config)

    return read


_SINE = {"dW": "float32"}
_MASKED = {"indices": "int64", "values": "float32"}

# kind -> (write into a folder, read from a folder)
KINDS = {"lora": (_write_lora, _read_lora),
         "sine": (_writer("sine", _SINE), _reader("sine", _SINE)),
         "masked": (_writer("masked", _MASKED), _reader("masked", _MASKED))}


def write_adapter(folder: Path, adapter: Adapter) -> None:
    if adapter.kind not in KINDS:
        raise ValueError(f"unknown adapter kind {adapter.kind!r} (known: {', '.join(KINDS)})")
    KINDS[adapter.kind][0](Path(folder), adapter)


def read_adapter(folder: Path, kind: str) -> Adapter:
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind][1](Path(folder))
