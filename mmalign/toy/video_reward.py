"""toy_video_proxy: the toy video world's learned proxy reward (video_proxy.py) as a reward.

Scores `Samples.video` (B,F,3,H,W in [0,1]) against the prompts with the tiny video-text model
trained contrastively on rendered clips with hard negatives (exp(logit_scale) * cosine). It is
differentiable (reward backpropagation can use it) and never saw the gold evaluator. Registered
on importing this module (the toy plug-in does), weights at `toy:video_proxy`
(rebuild: python -m mmalign.toy.video_train proxy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from mmalign.registry import register_reward
from mmalign.rewards.common import check_batch, reward_info
from mmalign.sources import resolve_asset
from mmalign.types import Samples


@dataclass
class ToyVideoProxyConfig:
    path: str = "toy:video_proxy"


class ToyVideoProxy:
    modality = "video"
    differentiable = True

    def __init__(self, cfg: ToyVideoProxyConfig, name: str = "toy_video_proxy"):
        from .video_proxy import load_video_proxy

        self.cfg, self.name = cfg, name
        self.model = load_video_proxy(resolve_asset(cfg.path))
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        video = samples.require("video", f"reward {self.name!r}")
        check_batch(self.name, len(video), prompts)
        model = self.model.to(video.device)
        return model(video.float().clamp(0, 1), list(prompts)).float()


@register_reward("toy_video_proxy", ToyVideoProxyConfig)
@reward_info("video", True, "toy:video_proxy (tiny video-text model, mmalign/toy/video_proxy.py)")
def build_toy_video_proxy(cfg: ToyVideoProxyConfig) -> ToyVideoProxy:
    """Toy video world proxy: a tiny video-text model's scaled cosine similarity (differentiable)."""
    return ToyVideoProxy(cfg)
