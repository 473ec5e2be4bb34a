"""Generator adapter for AudioLDM (Liu et al., "AudioLDM: Text-to-Audio Generation with Latent
Diffusion Models", 2023) through diffusers' `AudioLDMPipeline`.

AudioLDM is a UNet latent diffusion model over log-mel spectrograms: the VAE maps a mel
spectrogram [B, 1, frames, mel_bins] to latents [B, C, frames / f, mel_bins / f], and the
HiFi-GAN vocoder (`SpeechT5HifiGan`) turns a decoded mel spectrogram into a waveform. The text
conditions the UNet through `class_labels` -- the L2-normalised CLAP text embedding, added to
the time embedding (`class_embed_type: simple_projection`); the UNet's "cross-attention"
blocks get no `encoder_hidden_states` and attend to themselves, exactly as the pipeline calls
them. AudioLDM 2 (GPT-2 + T5 + CLAP conditioning through a language-model bridge) is not
covered: AudioLDM's single embedding keeps conditioning, CFG and reference passes the same as
the SD adapter's, and it is what Tango 2's and the audio DPO recipes fine-tune in diffusers.

Everything about sampling and training is the SD adapter's (`pipelines/sd.py`, subclassed):
DDIM rollout with DDPO's per-step Gaussian log-probs, `step_log_prob`, `denoise_error` in the
model's parameterisation (epsilon, or v), `reference()`, LoRA through peft, the guidance hooks.
This module only changes the conditioning (`class_labels`), the latent shape (duration) and
decoding (VAE -> mel -> vocoder -> `Samples(audio=[B, 1, T], sample_rate=vocoder rate)`).

Duration: `audio_length_in_s` seconds give `frames = int(s / (prod(upsample_rates) /
sampling_rate))` mel frames, rounded up to a multiple of the VAE factor, and the waveform is
cut to `int(s * sampling_rate)` samples -- as the pipeline computes them. Default: the UNet's
`sample_size` x VAE factor frames (the pipeline's default, 5.12 s for the released models).

LoRA: `AudioLDMPipeline` has no `load_lora_weights`; `save_trained` writes the diffusers-format
file SD writes (`pytorch_lora_weights.safetensors`, keys `unet.*`), which the pipeline's UNet
reads with `pipe.unet.load_lora_adapter(dir, prefix="unet")`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.config import check_hub_model, num
from mmalign.pipelines.common import DTYPES, LoraSettings, TrainedModule
from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
from mmalign.registry import register_generator
from mmalign.types import Samples

# UNet attention projections (AudioLDM's "cross"-attention attends to itself) and the
# projection of the CLAP embedding into the time embedding are not adapted by default.
AUDIOLDM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class AudioLDMGeneratorConfig:
    pretrained: str  # hub id (e.g. cvssp/audioldm-s-full-v2) or local directory in diffusers layout
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(target_modules=list(AUDIOLDM_LORA_TARGETS)))
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights (VAE, CLAP, vocoder, LoRA base)
    audio_length_in_s: float | None = num(None, gt=0)  # seconds; default: the UNet's sample_size (5.12 s released)
    negative_prompt: str = ""

    def validate(self) -> None:
        SDGeneratorConfig.validate(self)  # the same hub-id / directory checks


class AudioLDMGenerator(LatentDiffusionGenerator):
    """AudioLDM through diffusers; the UNet is what trains (see the module docstring)."""

    modality = "audio"

    def __init__(self, cfg: AudioLDMGeneratorConfig, pipe: Any = None):
        from diffusers import AudioLDMPipeline, DDIMScheduler, DDPMScheduler

        from mmalign.paths import resolve

        self.cfg = cfg
        if pipe is None:
            cfg.pretrained = resolve(cfg.pretrained)
            p = Path(cfg.pretrained).expanduser()
            src = str(p) if p.is_dir() else cfg.pretrained
            pipe = AudioLDMPipeline.from_pretrained(
                src, revision=cfg.revision, variant=cfg.variant, dtype=DTYPES[cfg.dtype]
            )
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.is_xl = False
        self.unet = pipe.unet
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.vocoder = pipe.vocoder.requires_grad_(False).eval()
        pipe.text_encoder.requires_grad_(False).eval()
        sched_cfg = dict(pipe.scheduler.config)
        self.train_scheduler = DDPMScheduler.from_config(sched_cfg, clip_sample=False)
        self.scheduler = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
        self.prediction_type = self.train_scheduler.config.prediction_type
        self.num_train_timesteps = self.train_scheduler.config.num_train_timesteps
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        voc = self.vocoder.config
        self.sample_rate = int(voc.sampling_rate)
        hop_s = float(math.prod(voc.upsample_rates)) / voc.sampling_rate  # seconds per mel frame
        if voc.model_in_dim % self.vae_scale:
            raise ValueError(
                f"generator.pretrained: the vocoder's {voc.model_in_dim} mel bins are not a multiple of "
                f"the VAE factor {self.vae_scale}"
            )
        seconds = cfg.audio_length_in_s or self.unet.config.sample_size * self.vae_scale * hop_s
        frames = math.ceil(int(seconds / hop_s) / self.vae_scale) * self.vae_scale
        if seconds < self.vae_scale * hop_s:  # the pipeline's check_inputs
            raise ValueError(
                f"generator.audio_length_in_s: {seconds} s is shorter than one latent frame "
                f"({self.vae_scale * hop_s:g} s)"
            )
        self.audio_length_in_s, self.frames = seconds, frames
        self.num_audio_samples = int(seconds * self.sample_rate)
        self.resolution = None  # no image resolution: the length is `audio_length_in_s`
        self._trained = TrainedModule(self.unet, cfg.finetune, cfg.lora, DTYPES[cfg.dtype])
        self.lcm_scheduler = None

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Any]:
        """{"class_labels": [B, D]} -- the pipeline's normalised CLAP text embeddings (or those of
        the negative prompt, encoded exactly as the pipeline encodes its CFG branch)."""
        prompts = list(prompts)
        if negative:
            both = self.pipe._encode_prompt(prompts, self.device, 1, True, [self.cfg.negative_prompt] * len(prompts))
            return {"class_labels": both[: len(prompts)]}
        return {"class_labels": self.pipe._encode_prompt(prompts, self.device, 1, False)}

    @staticmethod
    def cat_cond(*conds: dict[str, Any]) -> dict[str, Any]:
        return {"class_labels": torch.cat([c["class_labels"] for c in conds])}

    def model_output(
        self, latents: Tensor, t: Tensor, cond: dict[str, Any], timestep_cond: Tensor | None = None
    ) -> Tensor:
        unet = self._trained.current()
        dtype = next(unet.parameters()).dtype if self._trained.use_ref else latents.dtype
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        labels = cond["class_labels"].to(dtype)
        return unet(latents.to(dtype), t, encoder_hidden_states=None, class_labels=labels).sample.float()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (
            self.unet.config.in_channels,
            self.frames // self.vae_scale,
            self.vocoder.config.model_in_dim // self.vae_scale,
        )

    # ------------------------------------------------------------------ VAE + vocoder
    def decode(self, latents: Tensor) -> Samples:
        """Latents -> mel spectrogram (VAE) -> waveform (vocoder), cut to the requested length
        as the pipeline cuts it; [B, 1, T] in [-1, 1] (clamped) at the vocoder's rate."""
        mel = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        wav = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype)).float()
        wav = wav[:, : self.num_audio_samples]
        return Samples(audio=wav.clamp(-1, 1).unsqueeze(1), sample_rate=self.sample_rate)

    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        raise ValueError(
            "generator 'audioldm' trains on its own sampled latents; re-encoding samples "
            "(rollout.reencode, data.reencode) is not supported for audio"
        )

    # ------------------------------------------------------------------ saving
    def load_trained(self, path: str | Path) -> None:
        """A LoRA (diffusers format) or full UNet written by `save_trained`."""
        path = Path(path)
        if self.cfg.finetune != "lora" and (path / "pytorch_lora_weights.safetensors").is_file():
            # inference on a trained LoRA (AudioLDMPipeline has no load_lora_weights)
            self.unet.load_lora_adapter(str(path), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
            return
        super().load_trained(path)

    def save_trained(self, out_dir: str | Path) -> Path:
        """A diffusers-format LoRA (`pytorch_lora_weights.safetensors`, keys `unet.*`), or the full UNet."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.finetune == "lora":
            from diffusers.loaders import StableDiffusionLoraLoaderMixin
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        else:
            self.unet.save_pretrained(out / "unet", safe_serialization=True)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"generator": "audioldm", "pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune})
        )
        return out


@register_generator("audioldm", AudioLDMGeneratorConfig)
def build_audioldm(cfg: AudioLDMGeneratorConfig) -> AudioLDMGenerator:
    """AudioLDM text-to-audio (UNet over mel latents, CLAP conditioning, HiFi-GAN vocoder) through diffusers."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return AudioLDMGenerator(cfg)
