"""CLAP score: text-audio agreement (Wu et al. 2023, "Large-scale Contrastive Language-Audio
Pretraining with Feature Fusion and Keyword-to-Caption Augmentation", LAION-CLAP).

    score = exp(logit_scale_a) * cos(E_audio(a), E_text(c))

which is the diagonal of ClapModel's `logits_per_audio`. Loads transformers ClapModel and
its processor (ClapFeatureExtractor + tokenizer) from a hub id ("laion/clap-htsat-unfused",
"laion/larger_clap_music_and_speech", ...) or a local directory. Audio is mixed to mono and
resampled with torchaudio to the feature extractor's `sampling_rate` (48 kHz for LAION-CLAP).

Two feature paths (`features`):

- "processor": the original ClapFeatureExtractor (numpy; not differentiable). Inputs
  longer than `max_length_s` are cropped at a *random* offset there (as in training).
- "torch" (default): the same log-mel in torch, so the reward is differentiable with respect
  to the waveform: the padding rule (repeatpad / repeat / pad to max_length_s), a centered
  STFT (periodic Hann window of `fft_window_size`, hop `hop_length`, reflect padding), power
  2, the mel filter bank from torchaudio (`melscale_fbanks`: slaney scale + slaney norm for
  `rand_trunc`, htk scale without norm for `fusion`, as the extractor builds them), and
  10*log10(max(mel, 1e-10)). Differences to the numpy path: long inputs are cropped at a
  fixed offset (`long_audio_crop`, not random); the numpy STFT is stored in complex64 while
  ours stays in the input dtype; for fusion models, the three crops of long inputs are taken
  at fixed positions. For inputs up to max_length_s the two agree to ~1e-3 dB (tested).
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

from .common import as_features, check_batch, check_model_spec, grad_mode, module_device, reward_info, torch_dtype


def audio_to_mono(audio: Tensor, who: str) -> Tensor:
    """B,C,T (or B,T) -> B,T."""
    if audio.ndim == 2:
        return audio
    if audio.ndim != 3:
        raise ValueError(f"{who}: audio must be B,C,T in [-1,1], got shape {tuple(audio.shape)}")
    return audio.mean(1)


def resample(wave: Tensor, orig: int, new: int) -> Tensor:
    if orig == new:
        return wave
    import torchaudio

    return torchaudio.functional.resample(wave, orig, new)


class TorchClapFeatures:
    """ClapFeatureExtractor's log-mel features in torch (differentiable)."""

    def __init__(self, fe, long_audio_crop: str = "start"):
        import torchaudio

        self.fe = fe
        self.sr = int(fe.sampling_rate)
        self.n_fft = int(fe.fft_window_size)
        self.hop = int(fe.hop_length)
        self.max_len = int(fe.nb_max_samples)
        self.truncation = fe.truncation
        self.padding = fe.padding
        self.crop = long_audio_crop
        fusion = self.truncation == "fusion"
        self.fbank = torchaudio.functional.melscale_fbanks(
            n_freqs=self.n_fft // 2 + 1,
            f_min=float(fe.frequency_min),
            f_max=float(fe.frequency_max),
            n_mels=int(fe.feature_size),
            sample_rate=self.sr,
            norm=None if fusion else "slaney",
            mel_scale="htk" if fusion else "slaney",
        )  # [n_freqs, n_mels]

    def log_mel(self, wave: Tensor) -> Tensor:
        """[T] -> [frames, n_mels] in dB."""
        window = torch.hann_window(self.n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
        spec = (
            torch.stft(
                wave, self.n_fft, self.hop, window=window, center=True, pad_mode="reflect", return_complex=True
            ).abs()
            ** 2
        )  # [freq, frames]
        mel = self.fbank.to(wave).T @ spec
        return 10.0 * torch.log10(mel.clamp(min=1e-10)).T

    def _pad(self, wave: Tensor) -> Tensor:
        n = wave.shape[-1]
        if n >= self.max_len:
            return wave
        if self.padding == "repeat":
            wave = wave.repeat(self.max_len // n + 1)[: self.max_len]
        elif self.padding == "repeatpad":
            wave = wave.repeat(self.max_len // n)
        return F.pad(wave, (0, self.max_len - wave.shape[-1]))

    def _crop_at(self, n: int) -> int:
        over = n - self.max_len
        return {"start": 0, "center": over // 2, "end": over}[self.crop]

    def one(self, wave: Tensor) -> tuple[Tensor, bool]:
        n = wave.shape[-1]
        if n == 0:
            raise ValueError("CLAP: empty waveform")
        if self.truncation == "fusion":
            if n > self.max_len:
                mel = self.log_mel(wave)
                chunk = self.max_len // self.hop + 1
                total = mel.shape[0]
                if chunk == total:
                    return mel.unsqueeze(0).repeat(4, 1, 1), False
                starts = torch.arange(total - chunk + 1).tensor_split(3)
                idx = [int(s[len(s) // 2]) if len(s) else 0 for s in starts]
                shrink = F.interpolate(
                    mel[None, None], size=[chunk, mel.shape[1]], mode="bilinear", align_corners=False
                )[0, 0]
                crops = [mel[i : i + chunk] for i in idx]
                return torch.stack([shrink, *crops]), True
            mel = self.log_mel(self._pad(wave))
            return mel.unsqueeze(0).repeat(4, 1, 1), False
        if n > self.max_len:
            i = self._crop_at(n)
            return self.log_mel(wave[i : i + self.max_len]).unsqueeze(0), True
        return self.log_mel(self._pad(wave)).unsqueeze(0), False

    def __call__(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T] at self.sr -> input_features [B, 1|4, frames, n_mels], is_longer [B, 1]."""
        feats, longer = zip(*(self.one(w) for w in waves))
        is_longer = torch.tensor([[bool(x)] for x in longer], device=waves.device)
        if self.truncation == "fusion" and not is_longer.any():
            is_longer[0, 0] = True  # the extractor marks one random sample in this case; we take the first
        return torch.stack(feats), is_longer


@dataclass
class ClapConfig:
    model: str = "laion/clap-htsat-unfused"  # hub id or local directory
    processor: str | None = None  # default: model
    features: Literal["torch", "processor"] = "torch"
    long_audio_crop: Literal["start", "center", "end"] = "start"  # torch path, inputs > max_length_s
    batch_size: int = num(16, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_model_spec(self.model, "model")
        check_model_spec(self.processor, "processor")
        if self.differentiable and self.features != "torch":
            raise ValueError("differentiable: needs features: torch (the processor path is numpy)")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


class ClapScore:
    modality = "audio"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: ClapConfig, name: str = "clap"):
        from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel

        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        src = cfg.processor or cfg.model
        self.model = ClapModel.from_pretrained(cfg.model, dtype=torch_dtype(cfg.dtype)).eval().requires_grad_(False)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(src)
        self.tokenizer = AutoTokenizer.from_pretrained(src)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.torch_features = TorchClapFeatures(self.feature_extractor, cfg.long_audio_crop)
        if cfg.device:
            self.model.to(cfg.device)

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.model.dtype == torch.float64 else torch.float32

    def prepare(self, samples: Samples) -> Tensor:
        """Samples -> mono waveforms [B, T] at the model's sampling rate."""
        audio = samples.require("audio", f"reward {self.name!r}")
        if samples.sample_rate is None:
            raise ValueError(f"reward {self.name!r}: Samples.sample_rate is not set")
        wave = audio_to_mono(audio.to(self.device, self.compute_dtype), f"reward {self.name!r}")
        return resample(wave, int(samples.sample_rate), self.sampling_rate)

    def features(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.features == "torch":
            return self.torch_features(waves)
        fe = self.feature_extractor(
            [w.detach().cpu().double().numpy() for w in waves], sampling_rate=self.sampling_rate, return_tensors="pt"
        )
        return fe["input_features"].to(self.device), fe["is_longer"].to(self.device)

    def audio_embeds(self, waves: Tensor) -> Tensor:
        feats, is_longer = self.features(waves)
        out = self.model.get_audio_features(input_features=feats.to(self.model.dtype), is_longer=is_longer)
        return F.normalize(as_features(out).to(self.compute_dtype), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(as_features(self.model.get_text_features(**tok)).to(self.compute_dtype), dim=-1)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        with grad_mode(self.differentiable):
            waves = self.prepare(samples)
            check_batch(self.name, len(waves), prompts)
            bs, out = self.cfg.batch_size, []
            scale = self.model.logit_scale_a.exp().to(self.compute_dtype)
            for i in range(0, len(waves), bs):
                a = self.audio_embeds(waves[i : i + bs])
                t = self.text_embeds(prompts[i : i + bs])
                out.append(scale * (a * t).sum(-1))
        return torch.cat(out)


@register_reward("clap", ClapConfig)
@reward_info(
    "audio", "config (default yes, torch mel path)", "transformers ClapModel + ClapFeatureExtractor + tokenizer"
)
def build_clap(cfg: ClapConfig) -> ClapScore:
    """CLAP score: exp(logit_scale_a) * cos(audio, text); torch log-mel keeps it differentiable."""
    return ClapScore(cfg)
