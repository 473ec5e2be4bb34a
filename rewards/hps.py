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

Preprocessing: the original uses open_clip's PIL transform (Resize(224, bicubic) on the
shorter side, CenterCrop(224), ToTensor, Normalize(OpenAI mean/std)). We do the same in
torch on float tensors (bicubic with antialias, long side truncated, crop offset rounded
like torchvision's CenterCrop), which keeps the reward differentiable. The difference to
the PIL path is PIL's 8-bit rounding after resizing (and PIL's own bicubic kernel support
when downscaling); `preprocess_pil` runs the original path and the tests bound the gap.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.registry import register_reward
from mmalign.types import Samples

from ._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipTransform,
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


@dataclass
class HPSConfig:
    version: Literal["v2", "v2.1"] = "v2.1"  # picks the default checkpoint
    checkpoint: str | None = None  # local .pt/.safetensors, or hf-hub:ORG/REPO/FILE
    architecture: str = "ViT-H-14"  # an open_clip model name
    model_config: dict[str, Any] | None = None  # or an inline open_clip config (embed_dim, vision_cfg, text_cfg)
    batch_size: int = 32
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
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = tuple(pp.get("mean", OPENAI_CLIP_MEAN))
        std = tuple(pp.get("std", OPENAI_CLIP_STD))
        # open_clip: Resize(size[0]) on the shorter side (int size) then CenterCrop(size)
        self.transform = ClipTransform(resize=size[0] if size[0] == size[1] else size, crop=size,  # type: ignore[arg-type]
                                       mean=mean, std=std, crop_offset="round")
        self.image_size = size

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def preprocess(self, images: Tensor) -> Tensor:
        return self.transform(images)

    def preprocess_pil(self, pil_images: list) -> Tensor:
        """The original (non-differentiable) PIL path: open_clip.image_transform(is_train=False)."""
        import open_clip

        tf = open_clip.image_transform(self.image_size, is_train=False, mean=self.transform.mean, std=self.transform.std)
        return torch.stack([tf(im) for im in pil_images])

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
