"""The training loop of one request's adapter, top to bottom.

A PEFT LoRA adapter is put on the target layers of the live model. Its A matrices
are kept in the null space of the retained inputs: projected at initialisation,
on every gradient, and again after every optimiser step (AdamW rescales each
coordinate, which would otherwise leave the null space).
"""

import time
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from registry import Adapter, pause_point
from seqforget.losses import answer_logprob
from seqforget.projection import NullSpace

_PREFIX = "base_model.model."


@dataclass
class Trained:
    adapter: Adapter  # what the model gains: the method's sign is already in its weights
    trajectory: list[dict]  # one record per optimiser step
    seconds: float


def _lora_layers(peft_model, targets: list[str]) -> dict[str, torch.nn.Module]:
    layers = {}
    for name, module in peft_model.named_modules():
        short = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if short in targets and hasattr(module, "lora_A"):
            layers[short] = module
    return layers


def train_adapter(model, method, forget_batches, retain_batches, targets: list[str],
                  nullspaces: dict[str, NullSpace], settings, progress=None) -> Trained:
    """Train a LoRA adapter on `model` (left unchanged on return) and give it back.

    forget_batches, retain_batches: endless iterators of batches.
    nullspaces: {module: NullSpace} for the projected layers, or {} for none.
    settings: seqforget.requests.Training. progress: a seqforget.progress.Progress, or None.
    """
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(targets), lora_dropout=0.0)
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    layers = _lora_layers(peft_model, targets)
    a_weights = {name: layer.lora_A["default"].weight for name, layer in layers.items()}  # (r, d_in)

    def project_all():
        with torch.no_grad():
            for name, a in a_weights.items():
                if name in nullspaces:
                    a.copy_(nullspaces[name].project(a))

    project_all()
    hooks = [a.register_hook(nullspaces[name].project) for name, a in a_weights.items() if name in nullspaces]

    def reference(batch):
        with torch.no_grad(), peft_model.disable_adapter():
            return answer_logprob(peft_model, batch)[0]

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    trajectory = []
    peft_model.train()
    try:
        for step in range(1, settings.steps + 1):
            loss, logs = method.loss(peft_model, next(forget_batches), next(retain_batches), reference)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            project_all()
            trajectory.append({"step": step, "loss": loss.item(), **logs})
            if progress is not None:
                progress.update(loss=loss.item())
            pause_point("training")
    finally:
        for h in hooks:
            h.remove()
        peft_model.eval()
    weights = {
        name: {"A": layer.lora_A["default"].weight.detach().numpy().copy(),
               "B": method.sign * layer.lora_B["default"].weight.detach().numpy().copy()}
        for name, layer in layers.items()
    }
    peft_model.unload()  # removes the LoRA layers, restoring the model's own modules
    return Trained(Adapter("lora", weights, _peft_config(config)), trajectory, time.perf_counter() - start)


def _peft_config(config: LoraConfig) -> dict:
    """The adapter_config.json PEFT writes for `config`, with no base model path."""
    out = _jsonable(config.to_dict())
    out["target_modules"] = sorted(out["target_modules"])
    out["base_model_name_or_path"] = None
    out["inference_mode"] = True
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums
        return obj.value
    return obj
