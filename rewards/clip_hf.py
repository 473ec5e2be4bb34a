"""CLIP score on transformers' CLIPModel (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"; CLIPScore: Hessel et al. 2021, "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning").

    score = w * cos(E_img(x), E_txt(c))                      (clip_at_zero: false)
    CLIPScore(c, x) = w * max(cos(E_img(x), E_txt(c)), 0)    (clip_at_zero: true, w = 2.5)

E_img / E_txt are CLIPModel.get_image_features / get_text_features (projected, then
L2-normalised here). Loads from a hub id ("openai/clip-vit-large-patch14") or a local
directory holding the model, its tokenizer and its CLIPImageProcessor config.

Preprocessing reproduces CLIPImageProcessor in torch: resize the shorter side to
`size.shortest_edge` (bicubic, antialiased; long side int(s * long / short)), center crop
`crop_size` (offset floored), rescale to [0,1] (our input already is), normalise with the
processor's image_mean / image_std. The processor resizes the uint8 image and rounds back
to uint8; we resize floats, so the two differ by at most a rounding step (~1/255 before
normalisation; tested) and ours carries gradients.

`HFClip` (loading + features) is shared with PickScore and the LAION aesthetic predictor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .common import (
    as_features,
    check_batch,
    check_model_spec,
    grad_mode,
    module_device,
    reward_info,
    torch_dtype,
    transform_from_hf_processor,
)


class HFClip:
    """A transformers CLIPModel with its tokenizer and torch image transform."""

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        need_text: bool = True,
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model, dtype=torch_dtype(dtype)).eval().requires_grad_(False)
        src = processor or model
        self.image_processor = AutoImageProcessor.from_pretrained(src)
        self.transform = transform_from_hf_processor(self.image_processor)
        self.tokenizer = AutoTokenizer.from_pretrained(src) if need_text else None
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        if device:
            self.model.to(device)

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for a float64 model (gradient checks), else float32 for pixels and scores."""
        return torch.float64 if self.model.dtype == torch.float64 else torch.float32

    def preprocess(self, images: Tensor) -> Tensor:
        return self.transform(images)

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """B,3,H,W in [0,1] -> [B, D] image embeddings (L2-normalised unless told not to)."""
        x = self.preprocess(images.to(self.device, self.compute_dtype)).to(self.model.dtype)
        f = as_features(self.model.get_image_features(pixel_values=x)).to(self.compute_dtype)
        return F.normalize(f, dim=-1) if normalize else f

    def text_features(self, prompts: Sequence[str], normalize: bool = True) -> Tensor:
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tok = {k: v.to(self.device) for k, v in tok.items()}
        f = as_features(self.model.get_text_features(**tok)).to(self.compute_dtype)
        return F.normalize(f, dim=-1) if normalize else f

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().to(self.compute_dtype)


@dataclass
class ClipHFConfig:
    model: str = "openai/clip-vit-large-patch14"  # hub id or local directory
    processor: str | None = None  # where the tokenizer / image processor live (default: model)
    weight: float = num(1.0)  # w (CLIPScore uses 2.5)
    clip_at_zero: bool = False  # CLIPScore convention: w * max(cos, 0)
    batch_size: int = num(64, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_model_spec(self.model, "model")
        check_model_spec(self.processor, "processor")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


def cosine_scores(img: Tensor, txt: Tensor) -> Tensor:
    """Row-wise cosine of already-normalised features: [B]."""
    return (img * txt).sum(-1)


def clip_score_formula(cos: Tensor, weight: float, clip_at_zero: bool) -> Tensor:
    return weight * (cos.clamp(min=0) if clip_at_zero else cos)


class ClipHFScore:
    """w * cos(image, text) with transformers CLIP; batched; differentiable in the pixels."""

    modality = "image"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: ClipHFConfig, name: str = "clip_hf"):
        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        self.clip = HFClip(cfg.model, cfg.processor, cfg.device, cfg.dtype)

    def embed_images(self, images: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> normalised CLIP image embeddings (used for frame consistency)."""
        return self.clip.image_features(images)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts)
        bs, out = self.cfg.batch_size, []
        with grad_mode(self.differentiable):
            for i in range(0, len(images), bs):
                cos = cosine_scores(
                    self.clip.image_features(images[i : i + bs]), self.clip.text_features(prompts[i : i + bs])
                )
                out.append(cos)
        return clip_score_formula(torch.cat(out), self.cfg.weight, self.cfg.clip_at_zero)


@register_reward("clip_hf", ClipHFConfig)
@reward_info("image", "config (default yes)", "transformers CLIPModel + tokenizer + CLIPImageProcessor (hub id or dir)")
def build_clip_hf(cfg: ClipHFConfig) -> ClipHFScore:
    """CLIP score (transformers CLIPModel): w * cos(image, text), optional CLIPScore max(.,0)."""
    return ClipHFScore(cfg)
