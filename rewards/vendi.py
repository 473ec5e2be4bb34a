"""Vendi score reward: the diversity of a batch (Friedman & Dieng 2023, "The Vendi Score: A
Diversity Evaluation Metric for Machine Learning"; a DRAGON reward: Bai et al. 2025).

With the batch's normalised embeddings x_1..x_n (`embedding:`, any encoder: CLAP audio, CLIP
image), the cosine-similarity kernel K_ij = x_i . x_j (K_ii = 1) and the eigenvalues lambda_k
of K / n (they sum to 1),

    VS = exp(H),   H = -sum_k lambda_k log lambda_k        (0 log 0 = 0)

which is the reference implementation's order-1 score: 1 when all items are identical, n when
they are mutually orthogonal. Higher is better.

Per-item contributions (they sum to VS): item i's share of the entropy is the i-th diagonal
entry of the matrix entropy -(K/n) log(K/n),

    h_i = -sum_k U_ik^2 lambda_k log lambda_k      (K/n = U diag(lambda) U'; sum_i h_i = H, h_i >= 0)

and c_i = VS * h_i / H (c_i = VS / n when H = 0: all identical). An item that repeats others
gets a small share. With `per_prompt`, the score is computed within each prompt's group and
the batch value is the mean over the groups (each group's contributions divided by the
number of groups).

Calling the reward gives per-sample scores: the contributions scaled by the number of items
(they average to VS); prompts only matter with `per_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.registry import register_reward
from mmalign.types import Samples

from ._distribution import DEFAULT_EMBEDDING, build_embedder, check_embedding_spec
from .common import reward_info
from .fad import _device


@dataclass
class VendiConfig:
    embedding: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_EMBEDDING))  # reward whose encoder is used
    per_prompt: bool = False  # Vendi within each prompt's samples, averaged over prompts

    def validate(self) -> None:
        check_embedding_spec(self.embedding)


def vendi_from_embeddings(emb: Tensor) -> tuple[Tensor, Tensor]:
    """(VS [], contributions [n] summing to VS) of embeddings [n, D] (normalised here); float64."""
    x = F.normalize(emb.to(torch.float64), dim=-1)
    n = len(x)
    if n == 0:
        raise ValueError("Vendi score of an empty batch")
    k = x @ x.T / n
    lam, u = torch.linalg.eigh(0.5 * (k + k.T))
    lam = lam.clamp(min=0)
    plogp = torch.where(lam > 0, lam * torch.log(torch.where(lam > 0, lam, 1.0)), 0.0)
    h_items = -(u * u) @ plogp  # diag of -(K/n) log(K/n)
    h = h_items.sum()
    vs = torch.exp(h)
    if h <= 1e-12:
        return vs, torch.full((n,), float(vs) / n, dtype=torch.float64, device=x.device)
    return vs, vs * h_items / h


class VendiReward:
    """Vendi diversity of a batch; a DistributionReward (and a per-sample Reward)."""

    higher_is_better = True
    differentiable = False
    uses_prompts = False

    def __init__(self, cfg: VendiConfig, name: str = "vendi"):
        self.cfg, self.name = cfg, name
        self.embedder = build_embedder(cfg.embedding, "reward.embedding")
        self.modality = self.embedder.modality

    def embed(self, samples: Samples) -> Tensor:
        return self.embedder.embed(samples)

    def score_embeddings(self, emb: Tensor, prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        if not self.cfg.per_prompt:
            return vendi_from_embeddings(emb)
        if prompts is None or len(prompts) != len(emb):
            raise ValueError(f"reward {self.name!r} (per_prompt): needs one prompt per sample")
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        contrib = torch.zeros(len(emb), dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        for idx in groups.values():
            vs, c = vendi_from_embeddings(emb[idx])
            total = total + vs / len(groups)
            contrib[idx] = c / len(groups)
        return total, contrib

    def score_batch(self, samples: Samples, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        device = _device(samples)
        score, contrib = self.score_embeddings(self.embed(samples), prompts)
        return score.to(device), contrib.to(device)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        _, contrib = self.score_batch(samples, prompts)
        return (contrib * len(contrib)).float()


@register_reward("vendi", VendiConfig)
@reward_info("audio|image", "no", "the embedding reward's encoder (default clap)")
def build_vendi(cfg: VendiConfig) -> VendiReward:
    """Vendi score (exp entropy of the cosine kernel's eigenvalues): batch diversity, per-item shares."""
    return VendiReward(cfg)


build_vendi.batch_level = True  # type: ignore[attr-defined]


# The modality is the embedding's, known once built: callers that check a registry entry's
# declared modality before building (mmalign sample --reward) skip the check, --list shows this.
build_vendi.modality, build_vendi.modality_label = None, "its embedding's"  # type: ignore[attr-defined]
