"""FAD reward: the Fréchet distance between the embeddings of generated samples and an exemplar
set (Kilgour et al. 2019, "Fréchet Audio Distance"; as a reward for DRAGON: Bai et al. 2025,
"DRAGON: Distributional Rewards Optimize Diffusion Generative Models").

Both sets are fitted with Gaussians (mean, covariance as np.cov: divided by N - 1) and

    FD = ||mu_b - mu_r||^2 + tr(S_b) + tr(S_r) - 2 tr((S_b S_r)^(1/2))

in float64 (the reference implementations take scipy.linalg.sqrtm(S_b S_r); we take the same
trace as the eigenvalues of R S_b R with R = S_r^(1/2), which is symmetric PSD: equal for PSD
covariances, with no complex round-off). Lower FD is better, so **the reward is -FD**
(`higher_is_better` is True).

`variant`:

- "set" (distribution-to-distribution, DRAGON's full-dataset FAD): the batch's value is -FD of
  the batch against the exemplars (at least 2 samples). Per-item contributions c_i sum exactly
  to it: with v_i = e_i - mu_b, d = mu_b - mu_r, B items, M = R S_b R and M^+ its
  pseudo-inverse, item i is credited with (the negative of)

      d . (e_i - mu_r) / B                         its share of the mean term (exact: sums to ||d||^2)
    + ||v_i||^2 / (B - 1)                          its share of tr(S_b) (exact)
    + tr(S_r) / B                                  an equal share of the constant
    - 2 v_i' R (M^+)^(1/2) R v_i / (B - 1)         its Euler share of tr((S_b S_r)^(1/2)), which is
                                                   homogeneous of degree 1/2 in S_b (sums to it;
                                                   the round-off of M's null space is shared equally)

  so an item far from the exemplar mean, or one that widens the batch beyond the exemplars'
  spread, is credited less.
- "per_clip" (instance-to-distribution, DRAGON's per-song FAD): each sample's FD to the
  exemplar Gaussian as a point mass (one embedding per clip, covariance zero):
  FD_i = ||e_i - mu_r||^2 + tr(S_r); the reward of sample i is -FD_i. It is also an ordinary
  per-sample reward; as a distribution reward its batch value is the mean of -FD_i and the
  contributions are -FD_i / B.

Calling the reward (`reward(samples, prompts)`) gives per-sample scores: -FD_i (per_clip) or
the contributions scaled by B (set: they average to the batch's -FD), so per-sample methods
can use either variant. Prompts are not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from ._distribution import (
    DEFAULT_EMBEDDING,
    build_embedder,
    check_embedding_spec,
    check_exemplars,
    exemplar_embeddings,
    frechet_distance,
    gaussian,
    psd_sqrt,
)
from .common import reward_info


@dataclass
class FadConfig:
    exemplars: str  # a folder of exemplar media, or an expert source (toy:render_audio)
    embedding: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_EMBEDDING))  # reward whose encoder is used
    variant: Literal["set", "per_clip"] = "set"
    exemplar_prompts: list[str] | str | None = None  # expert source: prompts (or a prompt-set spec)
    exemplar_seeds: int = num(1, ge=1)  # expert source: seeds 0..n-1 per prompt
    eps: float = num(0.0, ge=0)  # added to both covariances' diagonals (0: none, as the reference)

    def validate(self) -> None:
        check_embedding_spec(self.embedding)
        check_exemplars(self.exemplars, self.exemplar_prompts)


def set_contributions(emb: Tensor, mu_r: Tensor, s_r: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """(FD [], per-item shares [B] summing to FD) of embeddings [B, D] against (mu_r, s_r); float64."""
    e = emb.to(torch.float64)
    b, dim = e.shape
    if b < 2:
        raise ValueError(f"FAD (variant set) needs at least 2 samples to fit a covariance, got {b}")
    eye = torch.eye(dim, dtype=torch.float64, device=e.device)
    mu_b, s_b = gaussian(e)
    s_b, s_r = s_b + eps * eye, s_r + eps * eye
    fd = frechet_distance(mu_b, s_b, mu_r, s_r)
    v = e - mu_b
    mean_share = (e - mu_r) @ (mu_b - mu_r) / b
    trace_share = (v * v).sum(1) / (b - 1) + (eps * dim + torch.trace(s_r)) / b  # tr(S_b + eps I) + tr(S_r)
    r = psd_sqrt(s_r)
    m = r @ s_b @ r
    w, u = torch.linalg.eigh(0.5 * (m + m.T))
    w = w.clamp(min=0)
    keep = w > w.max().clamp(min=1e-300) * dim * torch.finfo(torch.float64).eps
    inv_sqrt = (u[:, keep] / w[keep].sqrt()) @ u[:, keep].T  # (M^+)^(1/2)
    rv = v @ r
    cross = ((rv @ inv_sqrt) * rv).sum(1) / (b - 1)  # sums to tr(M^(1/2)) on M's range
    cross = cross + (w.sqrt().sum() - cross.sum()) / b  # the null space's round-off, shared equally
    shares = mean_share + trace_share - 2.0 * cross
    return fd, shares + (fd - shares.sum()) / b  # exact to the last bit


def per_clip_distance(emb: Tensor, mu_r: Tensor, s_r: Tensor) -> Tensor:
    """FD of each embedding as a point mass to N(mu_r, s_r): ||e_i - mu_r||^2 + tr(s_r) [B]."""
    d = emb.to(torch.float64) - mu_r
    return (d * d).sum(1) + torch.trace(s_r)


class FadReward:
    """-FAD against an exemplar set; a DistributionReward (and a per-sample Reward)."""

    higher_is_better = True  # the reward is -FD
    differentiable = False
    uses_prompts = False

    def __init__(self, cfg: FadConfig, name: str = "fad"):
        self.cfg, self.name = cfg, name
        self.embedder = build_embedder(cfg.embedding, "reward.embedding")
        self.modality = self.embedder.modality
        ref = exemplar_embeddings(self.embedder, cfg.exemplars, cfg.exemplar_prompts, cfg.exemplar_seeds)
        self.num_exemplars = len(ref)
        self.mu_r, self.s_r = gaussian(ref)
        if cfg.variant == "set" and self.num_exemplars < 2:
            raise ValueError(f"reward {name!r}: the exemplar set needs at least 2 items, got {self.num_exemplars}")

    def embed(self, samples: Samples) -> Tensor:
        return self.embedder.embed(samples)

    def score_embeddings(self, emb: Tensor, prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """(batch reward, per-item contributions [B] summing to it) from embeddings [B, D]."""
        if self.cfg.variant == "per_clip":
            r = -per_clip_distance(emb, self.mu_r, self.s_r)
            return r.mean(), r / len(r)
        fd, shares = set_contributions(emb, self.mu_r, self.s_r, self.cfg.eps)
        return -fd, -shares

    def score_batch(self, samples: Samples, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        device = _device(samples)
        score, contrib = self.score_embeddings(self.embed(samples), prompts)
        return score.to(device), contrib.to(device)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        _, contrib = self.score_batch(samples, prompts)
        return (contrib * len(contrib)).float()


def _device(samples: Samples) -> torch.device:
    for x in (samples.audio, samples.images, samples.video):
        if x is not None:
            return x.device
    return torch.device("cpu")


@register_reward("fad", FadConfig)
@reward_info("audio|image", "no", "the embedding reward's encoder (default clap) + exemplar media")
def build_fad(cfg: FadConfig) -> FadReward:
    """-FAD (Fréchet distance of embeddings) to an exemplar set; batch-level, per-item contributions."""
    return FadReward(cfg)


build_fad.batch_level = True  # type: ignore[attr-defined]


# The modality is the embedding's, known once built: callers that check a registry entry's
# declared modality before building (mmalign sample --reward) skip the check, --list shows this.
build_fad.modality, build_fad.modality_label = None, "its embedding's"  # type: ignore[attr-defined]
