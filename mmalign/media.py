"""Reading media files into the tensors `Samples` holds, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


class MediaError(ValueError):
    """A media file is missing, unreadable or corrupt."""


def open_image(source, name: str | None = None) -> Image.Image:
    """Open and fully decode an image (path, bytes or file object) as RGB PIL."""
    import io

    name = name or str(source)
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise MediaError(f"{name}: image file not found")
        fp = source
    elif isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    else:
        fp = source
    try:
        with Image.open(fp) as im:
            im.load()  # decode now: a truncated file fails here, not mid-training
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: not a readable image ({e})") from None


def pil_to_tensor(im: Image.Image) -> Tensor:
    """PIL RGB -> 3,H,W float32 in [0,1]."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(x: Tensor) -> Image.Image:
    """3,H,W float in [0,1] -> PIL RGB."""
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def load_image(source, name: str | None = None) -> Tensor:
    return pil_to_tensor(open_image(source, name))


def image_grid(images: Tensor, nrow: int) -> Image.Image:
    """B,3,H,W in [0,1] -> one PIL grid image."""
    import torchvision

    return tensor_to_pil(torchvision.utils.make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0))
