"""Rule rewards: JPEG (in)compressibility; audio loudness; video motion.

JPEG compressibility / incompressibility (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", DDPO): each image is quantised to uint8, saved as JPEG at quality
95, and its size in kB (bytes / 1000) is the score:

    jpeg_incompressibility(x) =  size_kB(JPEG_95(x))
    jpeg_compressibility(x)   = -size_kB(JPEG_95(x))

Both ignore the prompt and are not differentiable.

audio_loudness (a rule reward on waveforms, for tests and smoke runs of audio generators): the
RMS level of each clip in dBFS, 20 log10(sqrt(mean_{c,t} x^2) + 1e-8) over channels and
samples; differentiable, prompt unused.

video_motion (a rule reward on videos, for tests and smoke runs of video generators): the mean
absolute change between consecutive frames, mean_{f,c,h,w} |x_{f+1} - x_f| of each B,F,3,H,W
clip in [0, 1] (0 for a still video); `sign: -1` rewards stillness. Differentiable, prompt unused.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .common import check_batch, images_to_uint8_pil, reward_info


@dataclass
class JpegConfig:
    quality: int = num(95, ge=1, le=100)  # DDPO uses 95

    def validate(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError("quality: must be in 1..100")


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1 kB = 1000 bytes) of each B,3,H,W [0,1] image saved as JPEG."""
    sizes = []
    for im in images_to_uint8_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    modality = "image"
    differentiable = False

    def __init__(self, cfg: JpegConfig, sign: float, name: str):
        self.cfg, self.sign, self.name = cfg, sign, name

    def __call__(self, samples: Samples, prompts: Sequence[str] | None = None) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts, need_prompts=False)
        return (self.sign * jpeg_size_kb(images, self.cfg.quality)).to(images.device)


@register_reward("jpeg_compressibility", JpegConfig)
@reward_info("image", False, "nothing (PIL JPEG encoder)")
def build_jpeg_compressibility(cfg: JpegConfig) -> JpegReward:
    """DDPO JPEG compressibility: -(size in kB of the JPEG at quality 95); prompt unused."""
    return JpegReward(cfg, -1.0, "jpeg_compressibility")


@register_reward("jpeg_incompressibility", JpegConfig)
@reward_info("image", False, "nothing (PIL JPEG encoder)")
def build_jpeg_incompressibility(cfg: JpegConfig) -> JpegReward:
    """DDPO JPEG incompressibility: size in kB of the JPEG at quality 95; prompt unused."""
    return JpegReward(cfg, 1.0, "jpeg_incompressibility")


@dataclass
class AudioLoudnessConfig:
    pass


class AudioLoudness:
    name = "audio_loudness"
    modality = "audio"
    differentiable = True

    def __call__(self, samples: Samples, prompts: Sequence[str] | None = None) -> Tensor:
        audio = samples.require("audio", f"reward {self.name!r}")
        check_batch(self.name, len(audio), prompts, need_prompts=False)
        rms = audio.float().pow(2).flatten(1).mean(1).sqrt()
        return 20 * torch.log10(rms + 1e-8)


@register_reward("audio_loudness", AudioLoudnessConfig)
@reward_info("audio", True, "nothing")
def build_audio_loudness(cfg: AudioLoudnessConfig) -> AudioLoudness:
    """RMS level of each waveform in dBFS (a rule reward on audio samples); prompt unused."""
    return AudioLoudness()


@dataclass
class VideoMotionConfig:
    sign: float = num(1.0)  # +1 rewards motion, -1 stillness


class VideoMotion:
    name = "video_motion"
    modality = "video"
    differentiable = True

    def __init__(self, sign: float = 1.0):
        self.sign = sign

    def __call__(self, samples: Samples, prompts: Sequence[str] | None = None) -> Tensor:
        video = samples.require("video", f"reward {self.name!r}")
        check_batch(self.name, len(video), prompts, need_prompts=False)
        if video.ndim != 5 or video.shape[1] < 2:
            raise ValueError(f"reward {self.name!r}: videos must be B,F,3,H,W with F >= 2, got {tuple(video.shape)}")
        return self.sign * (video[:, 1:].float() - video[:, :-1].float()).abs().flatten(1).mean(1)


@register_reward("video_motion", VideoMotionConfig)
@reward_info("video", True, "nothing")
def build_video_motion(cfg: VideoMotionConfig) -> VideoMotion:
    """Mean absolute change between consecutive frames (a rule reward on videos); prompt unused."""
    return VideoMotion(cfg.sign)
