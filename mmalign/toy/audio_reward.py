"""toy_audio_gold: the exact evaluator of the toy audio world as a reward, and a beep-feature
embedding for the distribution rewards.

Score: `gold_score_audio(waveform, sample_rate, caption)` (audio_gold.py) reduced to `correct`
as 0/1 (mode "correct") or the fraction of the constraints satisfied (mode "fraction": count,
pitch, order, no_extra_beeps).

Embedding (`audio_embeds`, so that `fad` / `vendi` / `exemplar_clap` can use
`embedding: {name: toy_audio_gold}` in the toy world, where the tiny CLAP is untrained): the
clip's power spectrogram (periodic Hann window of 1024 samples, hop 160, at 16 kHz) summed in
four bands (within a semitone of 220, 440 and 880 Hz, and everything else), averaged over ten
100 ms windows, log1p(power / 1e-4), flattened to 40 numbers and L2-normalised. Clips at other
rates are resampled to 16 kHz first (torchaudio).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.registry import register_reward
from mmalign.rewards.common import check_batch, reward_info
from mmalign.types import Samples

from .audio_gold import gold_score_audio
from .audio_world import PITCH_NAMES, PITCHES, SAMPLE_RATE
from .reward import gold_to_score

N_FFT, HOP, SEGMENTS = 1024, 160, 10


@dataclass
class ToyAudioGoldConfig:
    mode: Literal["fraction", "correct"] = "fraction"


def beep_features(waves: Tensor) -> Tensor:
    """Mono waveforms [B, T] at 16 kHz -> normalised beep-band features [B, 4 * SEGMENTS]."""
    x = waves.to(torch.float64)
    window = torch.hann_window(N_FFT, periodic=True, dtype=x.dtype, device=x.device)
    power = torch.stft(x, N_FFT, HOP, window=window, center=True, return_complex=True).abs() ** 2  # B,F,frames
    freqs = torch.arange(N_FFT // 2 + 1, dtype=x.dtype, device=x.device) * SAMPLE_RATE / N_FFT
    semitone = 2 ** (1 / 12)
    masks = [(freqs >= PITCHES[p] / semitone) & (freqs <= PITCHES[p] * semitone) for p in PITCH_NAMES]
    masks.append(~torch.stack(masks).any(0))
    bands = torch.stack([(power * m[None, :, None]).sum(1) for m in masks], 1)  # B,4,frames
    pooled = F.adaptive_avg_pool1d(bands, SEGMENTS)  # B,4,SEGMENTS
    return F.normalize(torch.log1p(pooled / 1e-4).flatten(1), dim=-1)


class ToyAudioGold:
    modality = "audio"
    differentiable = False

    def __init__(self, cfg: ToyAudioGoldConfig, name: str = "toy_audio_gold"):
        self.cfg, self.name = cfg, name
        self.batch_size = 64

    def prepare(self, samples: Samples) -> Tensor:
        """Samples -> mono waveforms [B, T] at 16 kHz (float64, CPU)."""
        audio = samples.require("audio", f"reward {self.name!r}")
        if samples.sample_rate is None:
            raise ValueError(f"reward {self.name!r}: Samples.sample_rate is not set")
        wave = audio.detach().to("cpu", torch.float64)
        wave = wave.mean(1) if wave.ndim == 3 else wave
        if int(samples.sample_rate) != SAMPLE_RATE:
            import torchaudio

            wave = torchaudio.functional.resample(wave, int(samples.sample_rate), SAMPLE_RATE)
        return wave

    def audio_embeds(self, waves: Tensor) -> Tensor:
        return beep_features(waves)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        waves = self.prepare(samples)
        check_batch(self.name, len(waves), prompts)
        scores = [
            gold_to_score(gold_score_audio(w.numpy(), SAMPLE_RATE, p), self.cfg.mode) for w, p in zip(waves, prompts)
        ]
        return torch.tensor(scores, dtype=torch.float32, device=samples.audio.device)


@register_reward("toy_audio_gold", ToyAudioGoldConfig)
@reward_info("audio", False, "nothing (mmalign.toy.audio_gold exact evaluator; beep-band embedding)")
def build_toy_audio_gold(cfg: ToyAudioGoldConfig) -> ToyAudioGold:
    """Toy audio world gold score (fraction of beep constraints, or correct 0/1); beep-band embedding."""
    return ToyAudioGold(cfg)
