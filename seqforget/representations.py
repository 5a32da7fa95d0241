"""What the language model reads of an image, and augmented views of images.

image_features: the projector's output for each image, (n_images, T, H): the image
tokens the language model sees. Training the vision side so that these move (or stay)
is training what the language model can know from a picture.

augment: random views of a batch of processed images (B, 3, S, S) or crops, in the processor's
normalised space: a random crop resized back, a horizontal flip, per-channel gain and
offset, pixel noise. Forgetting trained on augmented views reaches views never trained on.
"""

import torch
import torch.nn.functional as F

from seqforget.errors import SeqforgetError
from seqforget.models import device_of


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n_images, T, H) projector outputs for pixel_values (n_images, 3, S, S), in float32 whatever the
    model's dtype; for crops (n_images, n, 3, S, S), each image's crops' tokens one after another."""
    out = model.get_image_features(pixel_values=pixel_values.to(device_of(model)))
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = (torch.stack(list(features)) if isinstance(features, (list, tuple)) else features).float()
    if pixel_values.dim() == 5:
        images, crops = pixel_values.shape[:2]
        if len(features) != images * crops:  # the model dropped padding crops: tokens no longer line up per image
            raise SeqforgetError("these images have different numbers of crops, so their features cannot be compared "
                                 "token by token; turn the image processor's splitting off (do_image_splitting)")
        features = features.reshape(images, -1, features.shape[-1])
    return features


def augment(pixels: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random view of each image in pixels (B, 3, S, S), or of each crop in (B, n, 3, S, S);
    strength 0 returns the images. All-zero images (a batch's padding) stay zero."""
    if strength <= 0:
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:])  # (B', 3, S, S)
    b, _, s, _ = flat.shape
    out = []
    for i in range(b):
        scale = 1.0 - strength * 0.25 * torch.rand(1, generator=generator).item()  # keep 75-100% of the side
        side = max(2, round(s * scale))
        y, x = (torch.randint(0, s - side + 1, (2,), generator=generator)).tolist()
        view = flat[i : i + 1, :, y : y + side, x : x + side]
        view = F.interpolate(view, size=(s, s), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=generator).item() < 0.5:
            view = view.flip(-1)
        out.append(view)
    views = torch.cat(out)  # (B', 3, S, S)
    gain = 1.0 + strength * 0.15 * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    offset = strength * 0.1 * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    noise = strength * 0.05 * torch.randn(views.shape, generator=generator)
    real = flat.flatten(1).any(1)[:, None, None, None]  # (B', 1, 1, 1)
    return torch.where(real, views * gain + offset + noise, flat).reshape(pixels.shape)
