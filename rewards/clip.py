"""CLIP score on open_clip (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision"; CLIPScore: Hessel et al., "CLIPScore: A Reference-free
Evaluation Metric for Image Captioning").

score = w * cos(E_img(x), E_txt(c)), or with `clip_at_zero` the CLIPScore convention
w * max(cos, 0) (CLIPScore uses w = 2.5). Preprocessing runs in torch (resize with
antialias -> center crop -> normalise with the model's mean/std), so the reward is
differentiable with respect to the pixels. This differs from open_clip's PIL transform
only by the resampling kernel's rounding (bicubic on uint8 PIL vs bicubic on floats).

Load from any of:
  model: "ViT-B-32", pretrained: "openai"             (a tag: downloads on a real run)
  model: "ViT-B-32", pretrained: "/path/ckpt.safetensors"  (a checkpoint file)
  model: "local-dir:/path" or "hf-hub:org/repo"        (open_clip_config.json + weights)
  model: "toy:proxy_clip"                              (the toy world's proxy reward)
  model_config: {embed_dim: ..., vision_cfg: ..., text_cfg: ...}, pretrained: file
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import ConfigError, check_hub_model, num
from mmalign.paths import resolve
from mmalign.registry import register_reward
from mmalign.rewards.common import reward_info
from mmalign.types import Samples

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipRewardConfig:
    model: str | None = None  # built-in name, "local-dir:PATH" or "hf-hub:ID"
    pretrained: str | None = None  # tag or checkpoint file (only without a schema)
    model_config: dict | None = None  # an open_clip model config (embed_dim, vision_cfg, text_cfg)
    weight: float = num(1.0)  # w
    clip_at_zero: bool = False  # CLIPScore: w * max(cos, 0)
    batch_size: int = num(64, ge=1)
    differentiable: bool = True
    device: str | None = None  # default: the trainer's device

    def validate(self) -> None:
        if self.model is not None and resolve(self.model) != self.model:  # a shipped asset, e.g. toy:proxy_clip
            self.model = "local-dir:" + resolve(self.model)
        if (self.model is None) == (self.model_config is None):
            raise ValueError("model: give exactly one of `model` or `model_config`")
        if self.model is not None and self.model.startswith("local-dir:"):
            d = Path(self.model[len("local-dir:") :])
            if not (d / "open_clip_config.json").is_file():
                raise ValueError(f"model: {d / 'open_clip_config.json'} not found")
        if self.pretrained and Path(self.pretrained).suffix in {".safetensors", ".pt", ".pth", ".bin"}:
            if not Path(self.pretrained).is_file():
                raise ValueError(f"pretrained: checkpoint file {self.pretrained} not found")


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


class ClipScore:
    """Batched, optionally differentiable CLIP score between images and prompts."""

    modality = "image"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: ClipRewardConfig, name: str = "clip"):
        import open_clip

        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        if cfg.model_config is not None:
            self._tmp = tempfile.TemporaryDirectory()
            (Path(self._tmp.name) / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg.model_config}))
            ident = "local-dir:" + self._tmp.name
            model = open_clip.create_model(ident, load_weights=False)
        else:
            ident = cfg.model
            is_file = cfg.pretrained is not None and Path(cfg.pretrained).is_file()
            model = open_clip.create_model(ident, pretrained=None if is_file else cfg.pretrained)
        if cfg.pretrained is not None and Path(cfg.pretrained).is_file():
            missing, unexpected = model.load_state_dict(_load_state_dict(cfg.pretrained), strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{cfg.pretrained}: checkpoint does not match the model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(ident)
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", model.visual.image_size)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(pp.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", OPENAI_STD)).view(1, 3, 1, 1)
        if cfg.device:
            self.to(cfg.device)

    def to(self, device: Any) -> ClipScore:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> normalised model input: resize shorter side, center crop."""
        h, w = images.shape[-2:]
        th, tw = self.size
        scale = max(th / h, tw / w)
        if (h, w) != (th, tw):
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - th) // 2, (nw - tw) // 2
            images = images[..., top : top + th, left : left + tw]
        return (images - self.mean.to(images)) / self.std.to(images)

    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        if len(prompts) != len(images):
            raise ValueError(f"reward {self.name!r}: {len(images)} images but {len(prompts)} prompts")
        out = []
        grad = torch.is_grad_enabled() and self.differentiable
        with torch.set_grad_enabled(grad):
            for i in range(0, len(images), self.cfg.batch_size):
                x = images[i : i + self.cfg.batch_size].to(self.device, torch.float32)
                cos = (self.image_features(x) * self.text_features(prompts[i : i + self.cfg.batch_size])).sum(-1)
                out.append(cos)
        cos = torch.cat(out)
        if self.cfg.clip_at_zero:
            cos = cos.clamp(min=0)
        return self.cfg.weight * cos


@register_reward("clip", ClipRewardConfig)
@reward_info("image", True, "open_clip model: built-in name + tag/checkpoint, local-dir:, hf-hub:, or toy:")
def build_clip(cfg: ClipRewardConfig) -> ClipScore:
    """CLIP score (open_clip): w * cos(image, text)."""
    check_model_name(cfg.model)
    return ClipScore(cfg)


def check_model_name(model: str | None) -> None:
    """ConfigError naming `reward.model` when it is neither a built-in open_clip name nor a usable
    local-dir: / hf-hub: source (an hf-hub id must be downloaded while HF_HUB_OFFLINE=1)."""
    if model is None or model.startswith("local-dir:"):
        return
    if model.startswith("hf-hub:"):
        check_hub_model("reward.model", model[len("hf-hub:") :])
        return
    import open_clip

    if model not in open_clip.list_models():
        raise ConfigError(
            f"reward.model: {model!r} is not a built-in open_clip model; give a built-in name "
            "(open_clip.list_models()), local-dir:PATH or hf-hub:ID"
        )
