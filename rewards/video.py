"""Video reward from an image reward: score sampled frames, aggregate, add frame consistency.

InstructVideo (Yuan et al. 2024, "InstructVideo: Instructing Video Diffusion Models with
Human Feedback") repurposes an image reward (HPSv2) for video:

- Segmental video reward (segmental sparse sampling): split the F frames into S segments of
  span F // S and score one frame per segment, the first of each segment (`pick: first`) or
  a random one (`pick: random`, TSN-style); `frames: uniform` takes S evenly spaced frames,
  `frames: all` every frame.
- Temporally attenuated reward: frame g (index f_g) is weighted w_g = exp(-lambda |f_g - F//2|)
  (`tar_lambda`; 0 switches it off), and the video score is mean_g(w_g r_g), as the original
  averages the weighted scores; `tar_normalize: true` gives sum_g w_g r_g / sum_g w_g instead.

Frame consistency (`consistency_weight` > 0) adds c * mean_t cos(e_t, e_{t+1}) over all
consecutive frames, with e_t the normalised CLIP image embedding of frame t from the inner
reward's image encoder (any CLIP-family reward here: clip, clip_hf, pickscore, hps,
aesthetic), or from `consistency_reward` if given.

The inner reward is named by registry name + args (`image_reward: {name: hps, ...}`).
Differentiable iff the inner reward is (frame selection is indexing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .common import build_reward, check_batch, grad_mode, reward_info


def segment_indices(
    num_frames: int, segments: int, pick: str = "first", generator: torch.Generator | None = None, batch: int = 1
) -> Tensor:
    """[batch, segments] frame indices, one per segment of span num_frames // segments."""
    if segments > num_frames:
        raise ValueError(f"segments ({segments}) > frames ({num_frames})")
    span = num_frames // segments
    base = torch.arange(segments) * span
    if pick == "first":
        local = torch.zeros(batch, segments, dtype=torch.long)
    elif pick == "middle":
        local = torch.full((batch, segments), span // 2, dtype=torch.long)
    elif pick == "random":
        local = torch.randint(span, (batch, segments), generator=generator)
    else:
        raise ValueError(f"unknown pick {pick!r}")
    return base[None] + local


def uniform_indices(num_frames: int, n: int, batch: int = 1) -> Tensor:
    idx = torch.linspace(0, num_frames - 1, n).round().long()
    return idx[None].expand(batch, -1).clone()


def tar_weights(indices: Tensor, num_frames: int, lam: float) -> Tensor:
    """InstructVideo's temporally attenuated coefficients exp(-lambda |f - F//2|)."""
    return torch.exp(-(indices - num_frames // 2).abs().float() * lam)


def consecutive_cosine(embeds: Tensor) -> Tensor:
    """[B, F, D] normalised embeddings -> [B] mean cos(e_t, e_{t+1})."""
    if embeds.shape[1] < 2:
        return torch.ones(embeds.shape[0], device=embeds.device)
    return (embeds[:, 1:] * embeds[:, :-1]).sum(-1).mean(1)


def image_embedder(reward: Any):
    """A function images [N,3,H,W] in [0,1] -> normalised CLIP embeddings, from a CLIP-family reward."""
    fn = getattr(reward, "embed_images", None)
    if fn is not None:
        return fn
    fn = getattr(reward, "image_features", None)  # rewards/clip.py (open_clip): raw images in
    if fn is not None:
        return lambda x: F.normalize(fn(x), dim=-1)
    raise ValueError(
        f"reward {getattr(reward, 'name', reward)!r} has no image encoder for frame consistency; "
        "set consistency_reward to a CLIP-family reward (clip, clip_hf, pickscore, hps, aesthetic)"
    )


@dataclass
class VideoFromImageConfig:
    image_reward: dict[str, Any]  # {name: REGISTERED_IMAGE_REWARD, **its args}
    frames: Literal["segments", "uniform", "all"] = "segments"
    segments: int = num(8, ge=1)  # S: frames scored per video (segments / uniform)
    pick: Literal["first", "middle", "random"] = "first"  # which frame of each segment
    seed: int = num(0, ge=0)  # for pick: random
    tar_lambda: float = num(0.0, ge=0)  # temporally attenuated reward; 0 = plain mean
    tar_normalize: bool = False
    consistency_weight: float = num(0.0, ge=0)
    consistency_reward: dict[str, Any] | None = None  # default: the image reward's own encoder
    frame_batch_size: int = num(64, ge=1)  # frames per call of the image reward

    def validate(self) -> None:
        if not isinstance(self.image_reward, dict) or "name" not in self.image_reward:
            raise ValueError("image_reward: expected a mapping with a 'name' key (a registered image reward)")
        if self.segments < 1:
            raise ValueError("segments: must be >= 1")
        if self.tar_lambda < 0:
            raise ValueError("tar_lambda: must be >= 0")
        if self.frame_batch_size < 1:
            raise ValueError("frame_batch_size: must be >= 1")


class VideoFromImage:
    modality = "video"

    def __init__(self, cfg: VideoFromImageConfig, name: str = "video_from_image"):
        self.cfg, self.name = cfg, name
        self.image_reward = build_reward(cfg.image_reward, "image_reward")
        if self.image_reward.modality != "image":
            raise ValueError(
                f"image_reward: {cfg.image_reward['name']!r} scores {self.image_reward.modality}, not images"
            )
        self.differentiable = bool(self.image_reward.differentiable)
        self._embed = None
        if cfg.consistency_weight:
            src = (
                build_reward(cfg.consistency_reward, "consistency_reward")
                if cfg.consistency_reward
                else self.image_reward
            )
            self._embed = image_embedder(src)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def frame_indices(self, batch: int, num_frames: int) -> Tensor:
        c = self.cfg
        if c.frames == "all":
            return torch.arange(num_frames)[None].expand(batch, -1).clone()
        if c.frames == "uniform":
            return uniform_indices(num_frames, min(c.segments, num_frames), batch)
        return segment_indices(num_frames, min(c.segments, num_frames), c.pick, self.generator, batch)

    def frame_scores(self, video: Tensor, idx: Tensor, prompts: Sequence[str]) -> Tensor:
        b, s = idx.shape
        frames = video[torch.arange(b)[:, None], idx.to(video.device)].flatten(0, 1)  # [B*S, 3, H, W]
        frame_prompts = [p for p in prompts for _ in range(s)]
        bs, out = self.cfg.frame_batch_size, []
        for i in range(0, len(frames), bs):
            out.append(self.image_reward(Samples(images=frames[i : i + bs]), frame_prompts[i : i + bs]))
        return torch.cat(out).view(b, s)

    def consistency(self, video: Tensor) -> Tensor:
        b, f = video.shape[:2]
        emb = torch.cat(
            [
                self._embed(video.flatten(0, 1)[i : i + self.cfg.frame_batch_size])
                for i in range(0, b * f, self.cfg.frame_batch_size)
            ]
        )
        return consecutive_cosine(emb.view(b, f, -1))

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        video = samples.require("video", f"reward {self.name!r}")
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"reward {self.name!r}: video must be B,F,3,H,W in [0,1], got shape {tuple(video.shape)}")
        check_batch(self.name, len(video), prompts)
        b, f = video.shape[:2]
        with grad_mode(self.differentiable):
            idx = self.frame_indices(b, f)
            r = self.frame_scores(video, idx, prompts)
            r = r if r.is_floating_point() else r.float()
            if self.cfg.tar_lambda > 0:
                w = tar_weights(idx, f, self.cfg.tar_lambda).to(r)
                score = (w * r).sum(1) / w.sum(1) if self.cfg.tar_normalize else (w * r).mean(1)
            else:
                score = r.mean(1)
            if self.cfg.consistency_weight:
                score = score + self.cfg.consistency_weight * self.consistency(video).to(score)
        return score


@register_reward("video_from_image", VideoFromImageConfig)
@reward_info("video", "if the image reward is", "its image reward (+ a CLIP encoder for frame consistency)")
def build_video_from_image(cfg: VideoFromImageConfig) -> VideoFromImage:
    """Video reward from an image reward: segmental frame sampling, TAR weights, frame consistency."""
    return VideoFromImage(cfg)
