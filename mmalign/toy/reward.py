"""toy_gold: the exact evaluator of the shapes world as a reward.

`gold_score(image, caption)` (gold.py) returns per-constraint booleans and `correct`. The
score is either `correct` as 0/1 (mode "correct") or the fraction of the caption's
constraints satisfied (mode "fraction"; the booleans other than `correct`). Registered by
the toy plug-in (plugin.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmalign.registry import register_reward
from mmalign.rewards.common import check_batch, reward_info
from mmalign.types import Samples

from . import gold


@dataclass
class ToyGoldConfig:
    mode: Literal["fraction", "correct"] = "fraction"


def gold_to_score(result: dict, mode: str) -> float:
    """Reduce one gold_score() dict: `correct` as 0/1, or the fraction of constraints satisfied."""
    if mode == "correct":
        return float(bool(result["correct"]))
    flags = [bool(v) for k, v in result.items() if k != "correct" and isinstance(v, bool)]
    if not flags:
        raise ValueError(f"gold_score returned no per-constraint booleans: {sorted(result)}")
    return sum(flags) / len(flags)


class ToyGold:
    modality = "image"
    differentiable = False

    def __init__(self, cfg: ToyGoldConfig, name: str = "toy_gold"):
        self.cfg, self.name = cfg, name

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts)
        x = images.detach().float().clamp(0, 1).cpu()
        scores = [gold_to_score(gold.gold_score(x[i], prompts[i]), self.cfg.mode) for i in range(len(x))]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register_reward("toy_gold", ToyGoldConfig)
@reward_info("image", False, "nothing (mmalign.toy.gold exact evaluator)")
def build_toy_gold(cfg: ToyGoldConfig) -> ToyGold:
    """Toy-world gold score: fraction of caption constraints satisfied, or `correct` (0/1)."""
    return ToyGold(cfg)
