"""The training loop of one request's adapter, top to bottom.

A PEFT LoRA adapter is put on the target layers of the live model. Its A matrices
are kept in the null space of the retained inputs: projected at initialisation,
on every gradient, and again after every optimiser step (AdamW rescales each
coordinate, which would otherwise leave the null space).
"""

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from registry import Adapter, pause_point
from seqforget.data import Rows
from seqforget.errors import SeqforgetError
from seqforget.projection import NullSpace
from seqforget.stopping import Stop, Stopping

_PREFIX = "base_model.model."


@dataclass
class Trained:
    adapter: Adapter  # what the model gains: the method's sign is already in its weights
    trajectory: list[dict]  # one record per optimiser step
    stop: Stop  # how training ended
    seconds: float


def _lora_layers(peft_model, targets: list[str]) -> dict[str, torch.nn.Module]:
    layers = {}
    for name, module in peft_model.named_modules():
        short = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if short in targets and hasattr(module, "lora_A"):
            layers[short] = module
    return layers


def train_adapter(model, method, forget: Rows, retain: Rows, guard: Rows | None, reference: Rows | None,
                  targets: list[str], nullspaces: dict[str, NullSpace], settings, progress=None) -> Trained:
    """Train a LoRA adapter on `model` (left unchanged on return) and give it back.

    forget, retain: the request's encoded rows, as the scope means them; guard: retain rows
    kept out of training that the retain guard watches (None: it watches `retain`); reference: rows
    the model never saw, which set the level to stop at (seqforget.stopping), or None.
    nullspaces: {module: NullSpace} for the projected layers, or {} for none.
    settings: seqforget.requests.Training. progress: a seqforget.progress.Progress, or None.
    """
    if method.adapter_kind != "lora":
        raise SeqforgetError(f"method {method.name} stores a {method.adapter_kind!r} adapter, which training cannot build yet")
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
    b_weights = [layer.lora_B["default"].weight for layer in layers.values()]  # (d_out, r)

    def project_all():
        with torch.no_grad():
            for name, a in a_weights.items():
                if name in nullspaces:
                    a.copy_(nullspaces[name].project(a))

    project_all()
    hooks = [a.register_hook(nullspaces[name].project) for name, a in a_weights.items() if name in nullspaces]

    original = peft_model.disable_adapter  # `with original():` runs the model as it was before this request
    peft_model.eval()
    method.prepare(peft_model, forget, retain, reference, original)
    forget_batches = forget.endless(settings.batch_size, settings.seed)
    retain_batches = retain.endless(settings.batch_size, settings.seed + 1)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    with torch.no_grad(), original():
        stopping = Stopping(peft_model, forget, guard if guard is not None else retain, reference, settings)
    stopping.start(params)
    trajectory = []
    peft_model.train()
    try:
        for step in range(1, settings.steps + 1):
            loss, logs = method.loss(peft_model, next(forget_batches), next(retain_batches), original)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            project_all()
            trajectory.append({"step": step, "loss": loss.item(), **logs})
            if progress is not None:
                progress.update(loss=loss.item())
            pause_point("training")
            if step % settings.check_every == 0 or step == settings.steps:
                peft_model.eval()
                with signed(b_weights, method.sign):  # probe the update the registry will store
                    done = stopping.check(peft_model, step, params)
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * stopping.lr_scale
                if stopping.rolled_back:
                    optimizer.state.clear()  # AdamW's moments would push straight back where the guard undid
                peft_model.train()
                if done:
                    break
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
    stop = stopping.result()
    del trajectory[stop.step:]  # steps after the kept check were undone by the retain guard (checks say which before it)
    return Trained(Adapter("lora", weights, _peft_config(config)), trajectory, stop, time.perf_counter() - start)


@contextmanager
def signed(b_weights: list[torch.Tensor], sign: int):
    """The LoRA's B factors multiplied by `sign` inside the block: what a subtracting method stores."""
    if sign > 0:
        yield
        return
    with torch.no_grad():
        for b in b_weights:
            b.mul_(-1)
    try:
        yield
    finally:
        with torch.no_grad():
            for b in b_weights:
                b.mul_(-1)


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
