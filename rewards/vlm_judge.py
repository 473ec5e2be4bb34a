"""VLM judge: any transformers image-text-to-text chat model as a reward, from one forward pass.

Three ways to read a scalar from the next-token distribution after a templated question
(the prompt is filled into `*_template` with {prompt}; {n} is the number of ratings):

    yes_no  (VQAScore, Lin et al. 2024, "Evaluating Text-to-Visual Generation with
             Image-to-Text Generation"): question 'Does this figure show "{prompt}"? Please
             answer yes or no.'; score = P(Yes) / (P(Yes) + P(No))  (normalize_yes_no: true)
             or P(Yes) under the full softmax as VQAScore reports it (normalize_yes_no: false).
    likert  (MJ-Bench-style rating, Chen et al. 2024, "MJ-Bench: Is Your Multimodal Reward
             Model Really a Good Judge for Text-to-Image Generation?"): score = expected
             rating sum_k k p_k / sum_k p_k over the tokens "1".."N".
    pairwise: `prefer(samples_a, samples_b, prompts)` shows both images and returns
             P(a is better) from P1 = p("1") / (p("1") + p("2")) per pair, usable as a soft
             preference label; `swap_average: true` (default) averages both presentation
             orders, (P1(a, b) + 1 - P1(b, a)) / 2; `prefer_first` gives P1 for one order.

Loads with the Auto classes (AutoProcessor + AutoModelForImageTextToText) from a hub id or a
local directory; the processor's chat template renders the question. Every answer string
must be a single token after the generation prompt (checked at load, clear error if not).
Not differentiable: the processor's image path is PIL/numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from mmalign.registry import register_reward
from mmalign.types import Samples

from ._judge import ChatJudge, JudgeBase, JudgeScoring
from .common import check_batch, check_model_spec, images_to_uint8_pil, reward_info

VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'


@dataclass
class VLMJudgeConfig(JudgeScoring):
    model: str = "Qwen/Qwen2-VL-7B-Instruct"  # hub id or local directory
    processor: str | None = None  # default: model
    yes_no_template: str = VQASCORE_QUESTION
    likert_template: str = (
        'How well does this image match the prompt "{prompt}"? Rate it from 1 to {n}, '
        "where {n} is a perfect match. Answer with only the number."
    )
    pairwise_template: str = (
        'Which image better matches the prompt "{prompt}"? Answer 1 if the first image '
        "is better or 2 if the second image is better."
    )

    def validate(self) -> None:
        check_model_spec(self.model, "model")
        check_model_spec(self.processor, "processor")
        self.validate_scoring()


class VLMJudge(JudgeBase):
    modality = "image"
    n_labels = ("Image 1:", "Image 2:")

    def __init__(self, cfg: VLMJudgeConfig, name: str = "vlm_judge"):
        judge = ChatJudge(
            cfg.model,
            cfg.processor,
            cfg.device,
            cfg.dtype,
            ("AutoModelForImageTextToText", "AutoModelForMultimodalLM"),
            lambda: {"type": "image"},
        )
        super().__init__(cfg, judge, name)

    def media_list(self, samples: Samples) -> list:
        return images_to_uint8_pil(samples.require("image", f"reward {self.name!r}"))

    def media_kwargs(self, flat_media: list) -> dict:
        return {"images": flat_media}

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        media = self.media_list(samples)
        check_batch(self.name, len(media), prompts)
        return self.score_media(media, prompts).to(samples.images.device)

    def sample_device(self, samples: Samples):
        return samples.images.device


@register_reward("vlm_judge", VLMJudgeConfig)
@reward_info("image", False, "any transformers image-text-to-text chat model + processor (Auto classes)")
def build_vlm_judge(cfg: VLMJudgeConfig) -> VLMJudge:
    """VLM judge: yes/no P(Yes)/(P(Yes)+P(No)), Likert expected rating, or pairwise P(first)."""
    return VLMJudge(cfg)
