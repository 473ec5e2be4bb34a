"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann, LAION 2022;
used as the aesthetic reward in DDPO: Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning").

    e = E_img(x) / ||E_img(x)||_2        (CLIP ViT-L/14 image embedding, 768-d)
    score = MLP(e)                        (a linear regressor of the 1-10 SAC/LOGOS/AVA rating)

The MLP, as released (`sac+logos+ava1-l14-linearMSE.pth`, a plain state_dict), is
    layers.0 Linear(768, 1024) -> layers.1 Dropout(0.2) -> layers.2 Linear(1024, 128)
    -> layers.3 Dropout(0.2) -> layers.4 Linear(128, 64) -> layers.5 Dropout(0.1)
    -> layers.6 Linear(64, 16) -> layers.7 Linear(16, 1)
with no activations (the ReLUs are commented out in the original), so the keys are
layers.{0,2,4,6,7}.{weight,bias} and the head is affine in the normalised embedding.

Backbone: transformers CLIPModel ("openai/clip-vit-large-patch14" or a local directory),
as DDPO's scorer does; preprocessing is CLIPImageProcessor's pipeline in torch (see
rewards/clip_hf.py), so the reward is differentiable with respect to the pixels (used for
reward-gradient methods such as DRaFT / AlignProp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .clip_hf import HFClip
from .common import (
    check_batch,
    check_file_spec,
    check_model_spec,
    grad_mode,
    load_state_dict,
    load_strict,
    resolve_file,
    reward_info,
)


class AestheticMLP(nn.Module):
    """The released head's layer layout (keys layers.0/2/4/6/7)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


@dataclass
class AestheticConfig:
    head: str  # the MLP checkpoint (.pth / .safetensors), or hf-hub:ORG/REPO/FILE
    clip_model: str = "openai/clip-vit-large-patch14"  # hub id or local directory
    processor: str | None = None  # default: clip_model
    batch_size: int = num(32, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_file_spec(self.head, "head")
        check_model_spec(self.clip_model, "clip_model")
        check_model_spec(self.processor, "processor")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


class AestheticScore:
    modality = "image"

    def __init__(self, cfg: AestheticConfig, name: str = "aesthetic"):
        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        self.clip = HFClip(cfg.clip_model, cfg.processor, cfg.device, cfg.dtype, need_text=False)
        path = resolve_file(cfg.head, "head")
        sd = load_state_dict(path)
        if "layers.0.weight" not in sd:
            raise ValueError(f"{path}: not an aesthetic-predictor head (no layers.0.weight; keys {list(sd)[:5]})")
        dim = int(sd["layers.0.weight"].shape[1])
        proj = int(self.clip.model.config.projection_dim)
        if dim != proj:
            raise ValueError(f"{path}: head expects {dim}-d embeddings but {cfg.clip_model} gives {proj}-d")
        self.head = AestheticMLP(dim)
        load_strict(self.head, sd, path)
        self.head.eval().requires_grad_(False).to(self.clip.device, self.clip.compute_dtype)

    def embed_images(self, images: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> normalised CLIP image embeddings (used for frame consistency)."""
        return self.clip.image_features(images)

    def score_embeddings(self, normalised: Tensor) -> Tensor:
        return self.head(normalised.to(self.head.layers[0].weight.dtype)).squeeze(-1)

    def __call__(self, samples: Samples, prompts: Sequence[str] | None = None) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts, need_prompts=False)
        bs, out = self.cfg.batch_size, []
        with grad_mode(self.differentiable):
            for i in range(0, len(images), bs):
                out.append(self.score_embeddings(self.clip.image_features(images[i : i + bs], normalize=True)))
        return torch.cat(out)


@register_reward("aesthetic", AestheticConfig)
@reward_info("image", "config (default yes)", "transformers CLIP ViT-L/14 + LAION aesthetic MLP head checkpoint")
def build_aesthetic(cfg: AestheticConfig) -> AestheticScore:
    """LAION aesthetic predictor v2: MLP(normalised CLIP ViT-L/14 image embedding); prompt unused."""
    return AestheticScore(cfg)
