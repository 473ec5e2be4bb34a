"""HPSv2 / HPSv2.1: Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A
Solid Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis").

HPSv2 is OpenCLIP ViT-H-14 fine-tuned on HPD v2. The original scorer computes

    logits_per_image = image_features @ text_features.T     (both L2-normalised)
    hps_score = diag(logits_per_image)

i.e. score = cos(E_img(x), E_txt(c)), with no logit scale (typical values 0.2 - 0.35).

Loading: the released checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`,
`{"state_dict": ...}`) have exactly the keys of stock open_clip ViT-H-14, so we build
`open_clip.create_model(architecture, pretrained=None)` (no base-weight download) and load
the checkpoint's state_dict strictly. The architecture is configurable (`architecture` names
an open_clip config, or `model_config` gives one inline) so tests run a tiny model.

Preprocessing follows the reference scorer (tgxs002/HPSv2, hpsv2/img_score.py builds its
transform with `light_augmentation=True`, so hpsv2/src/open_clip/factory.py passes
`resize_longest_max=True` to transform.py's `image_transform`): ToTensor, then `ResizeMaxSize`
on the float tensor (longest side to the model size, new side = Python round(side * size /
longest), torchvision bicubic; zero padding to a square, pad // 2 before and the rest after on
each axis, fill 0 in [0, 1] pixel space, i.e. before normalisation), then Normalize with the
OpenAI CLIP mean/std. Square images are only resized; a 512x768 image is letterboxed, not
cropped. `LetterboxTransform` does the same in torch on float tensors: on an 8-bit image it is
the reference computation itself (not an approximation of a uint8 path), and it is
differentiable in the pixels. Two notes: the reference's tensor resize antialiases only with
torchvision >= 0.17 (its default changed then; we antialias, as a current install does), and
for a non-square image whose longest side already equals the model size the reference skips
the padding and the ViT then fails on the non-square input; we pad it.
tests/fixtures/hps_reference.safetensors (scripts/make_hps_reference.py) holds the reference
transform's outputs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_batch,
    check_file_spec,
    grad_mode,
    load_state_dict,
    load_strict,
    module_device,
    resolve_file,
    reward_info,
    torch_dtype,
)

HPS_CHECKPOINTS = {
    "v2": "hf-hub:xswu/HPSv2/HPS_v2_compressed.pt",
    "v2.1": "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt",
}


@dataclass(frozen=True)
class LetterboxTransform:
    """HPSv2's eval transform (hpsv2/src/open_clip/transform.py ResizeMaxSize + Normalize) in torch.

    B,3,H,W float in [0,1] -> B,3,size,size: bicubic (antialiased) resize of the longest side to
    `size` with sides round(side * size / longest) (Python round, as the reference), zero padding
    left/top = pad // 2, right/bottom = pad - pad // 2, then (x - mean) / std. No clamping: the
    reference resizes float tensors, so bicubic overshoot is kept.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fill: float = 0.0

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.size / float(max(h, w))
        if scale == 1.0:
            return h, w
        return round(h * scale), round(w * scale)

    def __call__(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        nh, nw = self.resized_size(h, w)
        if (nh, nw) != (h, w):
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        ph, pw = self.size - nh, self.size - nw
        if ph or pw:
            images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=self.fill)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


@dataclass
class HPSConfig:
    version: Literal["v2", "v2.1"] = "v2.1"  # picks the default checkpoint
    checkpoint: str | None = None  # local .pt/.safetensors, or hf-hub:ORG/REPO/FILE
    architecture: str = "ViT-H-14"  # an open_clip model name
    model_config: dict[str, Any] | None = None  # or an inline open_clip config (embed_dim, vision_cfg, text_cfg)
    batch_size: int = num(32, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_file_spec(self.checkpoint, "checkpoint")
        if self.model_config is not None:
            for key in ("embed_dim", "vision_cfg", "text_cfg"):
                if key not in self.model_config:
                    raise ValueError(f"model_config.{key}: missing (an open_clip model config)")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


def build_open_clip(architecture: str, model_config: dict | None):
    """An open_clip model without weights, plus its tokenizer and an identifier."""
    import logging

    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: we load the checkpoint next
    try:
        return _build_open_clip(open_clip, architecture, model_config)
    finally:
        root.setLevel(level)


def _build_open_clip(open_clip, architecture: str, model_config: dict | None):
    tmp = None
    if model_config is not None:
        tmp = tempfile.TemporaryDirectory()
        (Path(tmp.name) / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config}))
        ident = "local-dir:" + tmp.name
        model = open_clip.create_model(ident, load_weights=False)
    else:
        if architecture not in open_clip.list_models():
            raise ValueError(f"architecture: {architecture!r} is not an open_clip model name")
        ident = architecture
        model = open_clip.create_model(architecture, pretrained=None)
    tokenizer = open_clip.get_tokenizer(ident)
    if tmp is not None:
        tmp.cleanup()
    return model, tokenizer


class HPSv2:
    """HPSv2(.1) score: cos(image, prompt) under the HPS-fine-tuned OpenCLIP."""

    modality = "image"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: HPSConfig, name: str = "hps"):
        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        model, self.tokenizer = build_open_clip(cfg.architecture, cfg.model_config)
        path = resolve_file(cfg.checkpoint or HPS_CHECKPOINTS[cfg.version], "checkpoint")
        load_strict(model, load_state_dict(path), path)
        self.model = model.eval().requires_grad_(False).to(torch_dtype(cfg.dtype))
        self.compute_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        if cfg.device:
            self.model.to(cfg.device)
        size = self.model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise ValueError(f"architecture: HPS letterboxes to a square; image_size {size} is not square")
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = tuple(pp.get("mean", OPENAI_CLIP_MEAN))
        std = tuple(pp.get("std", OPENAI_CLIP_STD))
        self.transform = LetterboxTransform(size=int(size[0]), mean=mean, std=std)  # type: ignore[arg-type]
        self.image_size = size

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def preprocess(self, images: Tensor) -> Tensor:
        return self.transform(images)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.device, next(self.model.parameters()).dtype)
        return F.normalize(self.model.encode_image(x).to(self.compute_dtype), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        f = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return F.normalize(f.to(self.compute_dtype), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> normalised image embeddings (used for frame consistency)."""
        return self.image_features(self.preprocess(images.to(self.device, self.compute_dtype)))

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts)
        bs, out = self.cfg.batch_size, []
        with grad_mode(self.differentiable):
            for i in range(0, len(images), bs):
                x = self.preprocess(images[i : i + bs].to(self.device, self.compute_dtype))
                out.append((self.image_features(x) * self.text_features(prompts[i : i + bs])).sum(-1))
        return torch.cat(out)


@register_reward("hps", HPSConfig)
@reward_info("image", "config (default yes)", "open_clip ViT-H-14 (no weights) + HPS_v2(.1) checkpoint state_dict")
def build_hps(cfg: HPSConfig) -> HPSv2:
    """HPSv2 / HPSv2.1 human preference score: cos(image, prompt), no logit scale."""
    return HPSv2(cfg)
