"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation").

A CLIP-H model (transformers CLIPModel) fine-tuned on Pick-a-Pic. The original scorer:

    image_embs = normalize(model.get_image_features(processor(images)))
    text_embs  = normalize(model.get_text_features(processor(text, padding, truncation, max_length=77)))
    scores = model.logit_scale.exp() * text_embs @ image_embs.T
    probs  = softmax(scores, dim=-1)          # preference over candidate images for one prompt

So score = exp(logit_scale) * cos(text, image) (about 20-23 for real images), and
`preference_probs` gives the softmax over the candidates of one prompt.

Loads `model` ("yuvalkirstain/PickScore_v1" or a local directory) and the processor (tokenizer
and image processor) from `processor`, by default "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" as
the reference does (yuvalkirstain/PickScore README, "Inference with PickScore": the processor
from the LAION CLIP-H repo, the model from PickScore_v1); offline, pass a local copy of it.
Preprocessing is the CLIPImageProcessor pipeline in torch (see rewards/clip_hf.py for the exact
steps and the difference to the uint8 path), so the score is differentiable in the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .clip_hf import HFClip
from .common import check_batch, check_model_spec, grad_mode, reward_info

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the reference's processor_name_or_path


@dataclass
class PickScoreConfig:
    model: str = "yuvalkirstain/PickScore_v1"
    processor: str | None = PICKSCORE_PROCESSOR  # tokenizer + image processor (hub id or dir); null: the model's
    batch_size: int = num(32, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_model_spec(self.model, "model")
        check_model_spec(self.processor, "processor")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


def pickscore_formula(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """exp(logit_scale) * cos(text, image), row-wise, for normalised features."""
    return logit_scale * (txt * img).sum(-1)


def preference_probs(scores: Tensor, group_size: int | None = None) -> Tensor:
    """Softmax over candidates: scores [P, K] (or flat [P*K] with group_size=K) -> probs [P, K]."""
    if scores.ndim == 1:
        if group_size is None:
            return torch.softmax(scores, dim=-1)
        if scores.numel() % group_size:
            raise ValueError(f"preference_probs: {scores.numel()} scores do not split into groups of {group_size}")
        scores = scores.view(-1, group_size)
    return torch.softmax(scores, dim=-1)


class PickScore:
    modality = "image"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: PickScoreConfig, name: str = "pickscore"):
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
            scale = self.clip.logit_scale()
            for i in range(0, len(images), bs):
                img = self.clip.image_features(images[i : i + bs])
                txt = self.clip.text_features(prompts[i : i + bs])
                out.append(pickscore_formula(img, txt, scale))
        return torch.cat(out)

    def probs(self, images: Tensor, prompt: str) -> Tensor:
        """P(image k is preferred) among the candidate `images` [K,3,H,W] for one prompt."""
        return preference_probs(self(Samples(images=images), [prompt] * len(images)))


@register_reward("pickscore", PickScoreConfig)
@reward_info("image", "config (default yes)", "transformers CLIPModel (PickScore_v1) + CLIP-H processor")
def build_pickscore(cfg: PickScoreConfig) -> PickScore:
    """PickScore: exp(logit_scale) * cos(text, image); softmax over candidates = preference."""
    return PickScore(cfg)
