"""Generator adapter for AnimateDiff text-to-video: an SD 1.x UNet with motion modules.

AnimateDiff (Guo et al., "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models
without Specific Tuning", ICLR 2024) inserts temporal-attention *motion modules* into a frozen
Stable Diffusion 1.x UNet; diffusers holds them in a `MotionAdapter` and the combined network
in a `UNetMotionModel`, which denoises 5-D latents B,C,F,h,w (F frames, each an SD latent).

Everything diffusion-specific is the SD adapter's (`pipelines/sd.py`,
`LatentDiffusionGenerator`), on 5-D latents: DDIM rollout with per-step Gaussian log-probs
(DDPO's convention, averaged over every latent dimension of the video), `step_log_prob`,
`denoise_error` (epsilon or v targets), `predict_x0`, `reference()` and the guidance hooks.
What differs here:

- loading: a saved `AnimateDiffPipeline` folder, or an SD 1.x base plus `motion_adapter`
  (a hub id or local `MotionAdapter` folder), as `AnimateDiffPipeline.from_pretrained(base,
  motion_adapter=...)` loads them;
- the text conditioning is repeated per frame (the UNetMotionModel runs its spatial layers on
  B*F frames, as `AnimateDiffPipeline.__call__` repeats the prompt embeddings);
- DDIM uses AnimateDiff's linear beta schedule by default (`beta_schedule`);
- what trains: LoRA on the motion modules' attention projections by default
  (`lora.target_modules` takes module-name globs), or (`finetune: full`) the motion modules
  themselves, the spatial UNet frozen;
- decoding is frame by frame to `Samples(video=B,F,3,H,W)`; `encode_images` takes videos.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import check_hub_model, num
from mmalign.pipelines.common import DTYPES, LoraSettings
from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig, _is_local
from mmalign.registry import register_generator
from mmalign.types import Samples

# The attention projections (temporal self-attention, attn1 and attn2) of every motion module:
# `down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q` etc.
MOTION_LORA_TARGETS = [
    "motion_modules.*.to_q",
    "motion_modules.*.to_k",
    "motion_modules.*.to_v",
    "motion_modules.*.to_out.0",
]
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class MotionLoraSettings(LoraSettings):
    """LoRA settings whose `target_modules` default to the motion modules' attention projections.

    An entry with a glob character (`*`, `?`, `[`) matches module names (the whole name or a
    dotted suffix of it) and is expanded to the matching Linear/Conv/Embedding layers; a plain
    entry keeps peft's meaning (a name or a dotted name suffix: `to_q` is every to_q, spatial too).
    """

    target_modules: list[str] = field(default_factory=lambda: list(MOTION_LORA_TARGETS))


@dataclass
class AnimateDiffGeneratorConfig(SDGeneratorConfig):
    """`generator: animatediff`. The `sd` keys apply too; `pretrained` is a saved AnimateDiffPipeline
    (hub id or folder), or an SD 1.x base given with `motion_adapter`."""

    motion_adapter: str | None = None  # MotionAdapter hub id or folder (e.g. guoyww/animatediff-motion-adapter-v1-5-2)
    num_frames: int = num(16, ge=1)  # frames per video (<= the adapter's motion_max_seq_length)
    fps: int = num(8, ge=1)  # frame rate of written videos (AnimateDiff's examples: 8)
    # lora: adapters on `lora.target_modules` (default: the motion modules' attention projections);
    # full: the motion modules' own weights (the spatial SD UNet frozen); none: inference only
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: MotionLoraSettings = field(default_factory=MotionLoraSettings)  # rank, alpha, ...; target_modules take globs
    # DDIM's beta schedule: AnimateDiff's inference and training configs use "linear"
    # (beta 0.00085 -> 0.012); "pipeline" keeps the loaded pipeline scheduler's.
    beta_schedule: Literal["linear", "scaled_linear", "pipeline"] = "linear"
    vae_batch_size: int = num(16, ge=1)  # frames per VAE encode / decode call

    def validate(self) -> None:
        super().validate()
        if self.motion_adapter:
            from mmalign.paths import resolve

            p = self.motion_adapter = resolve(self.motion_adapter)
            looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1
            if looks_local and not Path(p).expanduser().is_dir():
                raise ValueError(f"motion_adapter: directory {p} not found")
            if Path(p).is_dir() and not (Path(p) / "config.json").is_file():
                raise ValueError(f"motion_adapter: {p} has no config.json (not a diffusers MotionAdapter directory)")


def resolve_lora_targets(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """`patterns` with every glob expanded to the names of the LoRA-able layers it matches (see
    `MotionLoraSettings`); a glob that matches none is a ValueError naming it."""
    names = [n for n, m in module.named_modules() if isinstance(m, _LORA_LAYER_TYPES)]
    out: list[str] = []
    for pat in patterns:
        if not any(c in pat for c in "*?["):
            out.append(pat)
            continue
        hits = [n for n in names if fnmatchcase(n, pat) or fnmatchcase(n, "*." + pat)]
        if not hits:
            raise ValueError(f"lora.target_modules: {pat!r} matches no Linear/Conv layer of the UNetMotionModel")
        out.extend(h for h in hits if h not in out)
    return out


def load_animatediff_pipeline(cfg: AnimateDiffGeneratorConfig) -> Any:
    """`AnimateDiffPipeline` from a saved AnimateDiff folder, or from an SD 1.x base + motion adapter."""
    from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter

    from mmalign.paths import resolve

    cfg.pretrained = resolve(cfg.pretrained)
    src = str(Path(cfg.pretrained).expanduser()) if _is_local(cfg.pretrained) else cfg.pretrained
    index = DiffusionPipeline.load_config(src, revision=cfg.revision)
    dtype = DTYPES[cfg.dtype]
    kw: dict[str, Any] = dict(revision=cfg.revision, variant=cfg.variant, dtype=dtype)
    if cfg.motion_adapter:
        ma = resolve(cfg.motion_adapter)
        ma = str(Path(ma).expanduser()) if _is_local(ma) else ma
        kw["motion_adapter"] = MotionAdapter.from_pretrained(ma, dtype=dtype)
    elif "motion_adapter" not in index:
        raise ValueError(
            f"generator.pretrained: {cfg.pretrained} is not an AnimateDiffPipeline (no motion_adapter in its "
            "model_index.json); give the motion modules with generator.motion_adapter"
        )
    return AnimateDiffPipeline.from_pretrained(src, feature_extractor=None, image_encoder=None, **kw)


class AnimateDiffGenerator(LatentDiffusionGenerator):
    """AnimateDiff through diffusers: the UNetMotionModel denoises B,C,F,h,w latents; the motion
    modules (LoRA on them by default) are what trains."""

    modality = "video"

    def __init__(self, cfg: AnimateDiffGeneratorConfig, pipe: Any = None):
        """Load `cfg.pretrained` (+ `cfg.motion_adapter`), or wrap an already built AnimateDiffPipeline."""
        from diffusers import DDIMScheduler, DDPMScheduler

        pipe = pipe if pipe is not None else load_animatediff_pipeline(cfg)
        if type(pipe.unet).__name__ != "UNetMotionModel":
            raise ValueError(f"animatediff: the pipeline's unet is a {type(pipe.unet).__name__}, not a UNetMotionModel")
        max_len = pipe.unet.config.get("motion_max_seq_length") or 32
        if cfg.num_frames > max_len:
            raise ValueError(
                f"generator.num_frames: {cfg.num_frames} frames exceed the motion modules' positional "
                f"table (motion_max_seq_length {max_len})"
            )
        lora = cfg.lora
        if cfg.finetune == "lora":
            lora = dataclasses.replace(
                cfg.lora, target_modules=resolve_lora_targets(pipe.unet, cfg.lora.target_modules)
            )
        super().__init__(dataclasses.replace(cfg, lora=lora), pipe=pipe)
        self.cfg = cfg
        if cfg.finetune == "full":  # the motion modules only; the spatial SD UNet stays frozen
            self.unet.freeze_unet2d_params()
        if cfg.beta_schedule != "pipeline":
            sched_cfg = dict(self.pipe.scheduler.config, beta_schedule=cfg.beta_schedule, clip_sample=False)
            self.train_scheduler = DDPMScheduler.from_config(sched_cfg)
            self.scheduler = DDIMScheduler.from_config(sched_cfg)
        # `pipe(...)` samples with the DDIM scheduler the adapter uses (AnimateDiff's own sampler)
        self.pipe.scheduler = DDIMScheduler.from_config(self.scheduler.config)
        self.num_frames = cfg.num_frames
        self.fps = cfg.fps

    # ------------------------------------------------------------------ model calls
    def model_output(
        self, latents: Tensor, t: Tensor, cond: dict[str, Any], timestep_cond: Tensor | None = None
    ) -> Tensor:
        """The UNetMotionModel's output on B,C,F,h,w latents; the text embeddings are repeated per
        frame (F consecutive rows per sample), as AnimateDiffPipeline.__call__ does."""
        frames = latents.shape[2]
        per_frame = dict(cond, encoder_hidden_states=cond["encoder_hidden_states"].repeat_interleave(frames, 0))
        return super().model_output(latents, t, per_frame, timestep_cond)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        h = self.resolution // self.vae_scale
        return (self.unet.config.in_channels, self.num_frames, h, h)

    # ------------------------------------------------------------------ VAE, frame by frame
    @torch.no_grad()
    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Videos B,F,3,H,W in [0,1] -> latents B,C,F,h,w, each frame encoded by the SD VAE as the
        image adapter encodes images (posterior draw or mean, `vae_latents`). Frame f of the sample
        with seed s draws from seed s*F + f, so a preference pair given one seed shares its draws.
        A B,3,H,W batch is taken as single-frame videos."""
        video = images if images.ndim == 5 else images[:, None]
        b, f = video.shape[:2]
        frames = video.flatten(0, 1)
        frame_seeds = None if seeds is None else [int(s) * f + k for s in seeds for k in range(f)]
        step = self.cfg.vae_batch_size
        parts = [
            super(AnimateDiffGenerator, self).encode_images(
                frames[i : i + step], None if frame_seeds is None else frame_seeds[i : i + step]
            )
            for i in range(0, len(frames), step)
        ]
        z = torch.cat(parts)
        return z.view(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def decode(self, latents: Tensor) -> Samples:
        """Latents B,C,F,h,w -> Samples(video=B,F,3,H,W in [0,1]), decoded frame by frame."""
        b, _, f = latents.shape[:3]
        frames = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
        step = self.cfg.vae_batch_size
        parts = [
            super(AnimateDiffGenerator, self).decode(frames[i : i + step]).images for i in range(0, len(frames), step)
        ]
        x = torch.cat(parts)
        return Samples(video=x.view(b, f, *x.shape[1:]))

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> Path:
        """LoRA: `pytorch_lora_weights.safetensors` in the format `AnimateDiffPipeline.load_lora_weights`
        reads (keys `unet.<module>.lora_A/B.weight`). Full: the motion modules as a MotionAdapter
        folder `motion_adapter/` (usable as `generator.motion_adapter` or `AnimateDiffPipeline(motion_adapter=...)`)."""
        if self.cfg.finetune != "full":
            out = super().save_trained(out_dir)
        else:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.unet.save_motion_modules(str(out / "motion_adapter"), safe_serialization=True)
        meta = {
            "pretrained": self.cfg.pretrained,
            "motion_adapter": self.cfg.motion_adapter,
            "finetune": self.cfg.finetune,
        }
        (out / "mmalign_generator.json").write_text(json.dumps(meta))
        return out

    def load_trained(self, path: str | Path) -> None:
        """Load weights written by `save_trained` (a LoRA file or a `motion_adapter/` folder)."""
        path = Path(path)
        if (path / "motion_adapter" / "config.json").is_file():
            from diffusers import MotionAdapter

            self.unet.load_motion_modules(MotionAdapter.from_pretrained(path / "motion_adapter"))
            return
        super().load_trained(path)


@register_generator("animatediff", AnimateDiffGeneratorConfig)
def build_animatediff(cfg: AnimateDiffGeneratorConfig) -> AnimateDiffGenerator:
    """AnimateDiff text-to-video (SD 1.x UNet + motion modules) through diffusers."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    if cfg.motion_adapter:
        check_hub_model("generator.motion_adapter", cfg.motion_adapter)
    return AnimateDiffGenerator(cfg)
