"""Audio-LM judge: Qwen2-Audio (or any transformers audio-text chat model) as a reward.

The same scoring as the VLM judge (rewards/vlm_judge.py; shared code in rewards/_judge.py),
with audio in place of images (audio judges as in WavReward, Ji et al. 2025, "WavReward:
Spoken Dialogue Models With Generalist Reward Evaluators"; the yes/no probability follows
VQAScore, Lin et al. 2024):

    yes_no:  P(Yes) / (P(Yes) + P(No)) after 'Does this audio match "{prompt}"? ...'
    likert:  sum_k k p_k / sum_k p_k over the rating tokens "1".."N"
    prefer(samples_a, samples_b, prompts): P1 = P(first is better) = p("1") / (p("1") + p("2")),
             both orders averaged with swap_average (default), prefer_first: one order

Audio is mixed to mono and resampled (torchaudio) to the processor's feature-extractor rate
(16 kHz for Qwen2-Audio's Whisper features) and passed to the processor with the rendered
chat template; one forward pass (no generate). Loads Qwen2AudioForConditionalGeneration via
AutoModelForMultimodalLM from a hub id ("Qwen/Qwen2-Audio-7B-Instruct") or a directory.
Not differentiable (the Whisper feature extractor is numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.registry import register_reward
from mmalign.types import Samples

from ._judge import ChatJudge, JudgeBase, JudgeScoring
from .clap import audio_to_mono, resample
from .common import check_batch, check_model_spec, reward_info


@dataclass
class AudioJudgeConfig(JudgeScoring):
    model: str = "Qwen/Qwen2-Audio-7B-Instruct"
    processor: str | None = None
    yes_no_template: str = 'Does this audio match "{prompt}"? Please answer yes or no.'
    likert_template: str = (
        'How well does this audio match the description "{prompt}"? Rate it from 1 to {n}, '
        "where {n} is a perfect match. Answer with only the number."
    )
    pairwise_template: str = (
        'Which audio better matches the description "{prompt}"? Answer 1 if the first audio '
        "is better or 2 if the second audio is better."
    )

    def validate(self) -> None:
        check_model_spec(self.model, "model")
        check_model_spec(self.processor, "processor")
        self.validate_scoring()


class AudioJudge(JudgeBase):
    modality = "audio"
    n_labels = ()  # Qwen2-Audio's template already writes "Audio 1:", "Audio 2:"

    def __init__(self, cfg: AudioJudgeConfig, name: str = "audio_judge"):
        judge = ChatJudge(
            cfg.model,
            cfg.processor,
            cfg.device,
            cfg.dtype,
            ("AutoModelForMultimodalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"),
            lambda: {"type": "audio"},
        )
        super().__init__(cfg, judge, name)
        fe = getattr(judge.processor, "feature_extractor", None)
        if fe is None:
            raise ValueError(f"{cfg.processor or cfg.model}: the processor has no audio feature extractor")
        self.sampling_rate = int(fe.sampling_rate)

    def media_list(self, samples: Samples) -> list:
        audio = samples.require("audio", f"reward {self.name!r}")
        if samples.sample_rate is None:
            raise ValueError(f"reward {self.name!r}: Samples.sample_rate is not set")
        with torch.no_grad():
            wave = resample(
                audio_to_mono(audio.float(), f"reward {self.name!r}"), int(samples.sample_rate), self.sampling_rate
            )
        return [w.cpu().numpy() for w in wave]

    def media_kwargs(self, flat_media: list) -> dict:
        return {"audio": flat_media, "sampling_rate": self.sampling_rate}

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        media = self.media_list(samples)
        check_batch(self.name, len(media), prompts)
        return self.score_media(media, prompts).to(samples.audio.device)

    def sample_device(self, samples: Samples):
        return samples.audio.device


@register_reward("audio_judge", AudioJudgeConfig)
@reward_info("audio", False, "Qwen2-Audio (AutoModelForMultimodalLM) + processor with chat template")
def build_audio_judge(cfg: AudioJudgeConfig) -> AudioJudge:
    """Audio-LM judge (Qwen2-Audio): yes/no, Likert, or pairwise P(first) from next-token logits."""
    return AudioJudge(cfg)
