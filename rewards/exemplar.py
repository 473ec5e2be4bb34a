"""Exemplar similarity reward: how close each sample is, in a (cross-modal) embedding space, to a
set of exemplars (DRAGON's exemplar-based rewards: Bai et al. 2025, "DRAGON: Distributional
Rewards Optimize Diffusion Generative Models"; with CLAP the exemplars may be texts for audio
samples, or audio clips).

With e_i the sample's normalised embedding (`embedding:`, default clap) and x_1..x_N the
normalised exemplar embeddings (audio from a folder or an expert source, and/or texts through
the encoder's text tower):

    reduce: centroid (default)   r_i = cos(e_i, mean_j x_j)
    reduce: mean                 r_i = (1/N) sum_j e_i . x_j
    reduce: max                  r_i = max_j e_i . x_j

times `scale` (1; set exp(logit_scale) by hand to match CLAP score's units). An ordinary
per-sample reward (higher is better); prompts are not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from ._distribution import DEFAULT_EMBEDDING, build_embedder, check_embedding_spec, check_exemplars, exemplar_embeddings
from .common import reward_info
from .fad import _device


@dataclass
class ExemplarConfig:
    embedding: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_EMBEDDING))  # reward whose encoder is used
    exemplars: str | None = None  # a folder of exemplar media, or an expert source (toy:render_audio)
    exemplar_texts: list[str] | None = None  # text exemplars (through the encoder's text tower)
    exemplar_prompts: list[str] | str | None = None  # expert source: prompts (or a prompt-set spec)
    exemplar_seeds: int = num(1, ge=1)  # expert source: seeds 0..n-1 per prompt
    reduce: Literal["centroid", "mean", "max"] = "centroid"
    scale: float = num(1.0, gt=0)

    def validate(self) -> None:
        check_embedding_spec(self.embedding)
        check_exemplars(self.exemplars, self.exemplar_prompts)
        if self.exemplars is None and not self.exemplar_texts:
            raise ValueError("exemplars: give exemplar media (a folder or an expert source) and/or exemplar_texts")


def exemplar_similarity(emb: Tensor, exemplars: Tensor, reduce: str = "centroid") -> Tensor:
    """[B] similarity of embeddings [B, D] to exemplar embeddings [N, D] (both normalised here)."""
    e = F.normalize(emb.to(torch.float64), dim=-1)
    x = F.normalize(exemplars.to(torch.float64), dim=-1)
    if reduce == "centroid":
        return e @ F.normalize(x.mean(0), dim=-1)
    sims = e @ x.T
    return sims.mean(1) if reduce == "mean" else sims.max(1).values


class ExemplarReward:
    """Per-sample similarity to an exemplar set (texts and/or media) in an embedding space."""

    differentiable = False
    uses_prompts = False

    def __init__(self, cfg: ExemplarConfig, name: str = "exemplar_clap"):
        self.cfg, self.name = cfg, name
        self.embedder = build_embedder(cfg.embedding, "reward.embedding")
        self.modality = self.embedder.modality
        self.exemplars = exemplar_embeddings(
            self.embedder, cfg.exemplars, cfg.exemplar_prompts, cfg.exemplar_seeds, cfg.exemplar_texts
        )

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        sim = exemplar_similarity(self.embedder.embed(samples), self.exemplars, self.cfg.reduce)
        return (self.cfg.scale * sim).float().to(_device(samples))


@register_reward("exemplar_clap", ExemplarConfig)
@reward_info("audio|image", "no", "the embedding reward's encoder (default clap) + exemplars")
def build_exemplar(cfg: ExemplarConfig) -> ExemplarReward:
    """Similarity to exemplars (texts or media, e.g. CLAP cross-modal): centroid / mean / max cosine."""
    return ExemplarReward(cfg)


# The modality is the embedding's, known once built: callers that check a registry entry's
# declared modality before building (mmalign sample --reward) skip the check, --list shows this.
build_exemplar.modality, build_exemplar.modality_label = None, "its embedding's"  # type: ignore[attr-defined]
