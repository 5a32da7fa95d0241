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

from seqforget.losses import answer_logprob


@dataclass
class TrainedAdapter:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (A (r, d_in), B (d_out, r))}
    lora_config: dict  # PEFT adapter_config.json contents
    scale: float  # lora_alpha / r
    trajectory: list[dict]  # one record per step
    seconds: float


def _lora_layers(peft_model, targets: list[str]) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    layers = {}
    for name, module in peft_model.named_modules():
        short = name[len(prefix) :] if name.startswith(prefix) else name
        if short in targets and hasattr(module, "lora_A"):
            layers[short] = module
    return layers


def train_adapter(model, method, forget_batches, retain_batches, targets, nullspaces, settings, progress=None) -> TrainedAdapter:
    """Train a LoRA adapter on `model` (left unchanged on return) and give back its factors.

    forget_batches, retain_batches: endless iterators of batches.
    nullspaces: {module: NullSpace} for the projected layers, or {} for none.
    settings: seqforget.requests.Training.
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
                progress(step, loss.item())
    finally:
        for h in hooks:
            h.remove()
        peft_model.eval()
    pairs = {
        name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
        for name, layer in layers.items()
    }
    lora_config = config.to_dict()
    lora_config["target_modules"] = sorted(lora_config["target_modules"])
    lora_config["base_model_name_or_path"] = None
    lora_config["inference_mode"] = True
    peft_model.unload()  # removes the LoRA layers, restoring the model's own modules
    return TrainedAdapter(pairs, _jsonable(lora_config), settings.alpha / settings.rank, trajectory, time.perf_counter() - start)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums
        return obj.value
    return obj
