"""The data every reward, generator and method exchanges: a media batch (`Samples`), what a
rollout returns (`Rollout`), and the per-step Gaussian log-probability and per-sample noise
helpers the samplers and methods share. The roles themselves (typed protocols for methods,
generators and rewards) are in `mmalign.protocols` (see docs/interfaces.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Modality = Literal["image", "video", "audio", "text"]


@dataclass
class Samples:
    """One media batch. Exactly the fields of the batch's modality are set.

    images: B,3,H,W float in [0, 1]; video: B,F,3,H,W float in [0, 1];
    audio: B,C,T float in [-1, 1] with `sample_rate`; text: list of B strings.
    """

    images: Tensor | None = None
    video: Tensor | None = None
    audio: Tensor | None = None
    sample_rate: int | None = None
    text: list[str] | None = None

    def __len__(self) -> int:
        for x in (self.images, self.video, self.audio, self.text):
            if x is not None:
                return len(x)
        return 0

    @property
    def modality(self) -> Modality:
        for name, x in (("image", self.images), ("video", self.video), ("audio", self.audio), ("text", self.text)):
            if x is not None:
                return name  # type: ignore[return-value]
        raise ValueError("Samples holds no media")

    def require(self, modality: Modality, who: str) -> Tensor | list[str]:
        """Return this batch's tensor for `modality`, or fail naming `who` wanted what."""
        x = {"image": self.images, "video": self.video, "audio": self.audio, "text": self.text}[modality]
        if x is None:
            have = self.modality if len(self) else "nothing"
            raise TypeError(f"{who} scores {modality} samples, but got {have} samples")
        if modality == "image":
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{who}: images must be B,3,H,W in [0,1], got shape {tuple(x.shape)}")
        return x


@dataclass
class Rollout:
    """What `Generator.rollout` returns.

    latents: B, T+1, C, h, w -- x_T ... x_0 of the sampler (index k is the input of step k)
    timesteps: T -- the scheduler timestep used at step k
    log_probs: B, T -- log p(latents[:, k+1] | latents[:, k], c) of the stochastic step
                 (`step_gaussian_log_prob`: the Gaussian log-density per latent dimension, i.e. its
                 mean over dimensions, float64); None when eta=0,
                 NaN at the deterministic steps of a rollout with `sde_steps`
    extras["sde_steps"]: the stochastic steps (a tuple) when only some are; None when all are
    """

    samples: Samples
    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor | None
    prompts: list[str]
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int] | Tensor) -> Rollout:
        """The sub-rollout of samples `index` (tensors with a batch dimension are indexed)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Rollout(
            samples=_index_samples(self.samples, idx),
            latents=self.latents[idx.to(self.latents.device)],
            timesteps=self.timesteps,
            log_probs=None if self.log_probs is None else self.log_probs[idx.to(self.log_probs.device)],
            prompts=[self.prompts[i] for i in idx.tolist()],
            extras=_index_tree(self.extras, idx, len(self)),
        )

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts made with the same sampler settings."""
        first = parts[0]
        return Rollout(
            samples=_cat_samples([p.samples for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            timesteps=first.timesteps,
            log_probs=None if first.log_probs is None else torch.cat([p.log_probs for p in parts]),
            prompts=[x for p in parts for x in p.prompts],
            extras=_cat_tree([p.extras for p in parts], [len(p) for p in parts]),
        )


def step_noise_level(eta: float, sde_steps: Sequence[int] | None, step: int) -> float:
    """The noise level of a rollout's step: eta on its stochastic steps (all, without sde_steps), else 0."""
    return eta if sde_steps is None or step in sde_steps else 0.0


def step_gaussian_log_prob(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """Per-sample log N(x; mean, std^2 I) *averaged* over all non-batch dimensions (float64):

        mean_d [ -(x_d - mean_d)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    the per-dimension mean of ddpo-pytorch's `ddim_step_with_logprob`, flow_grpo's
    `sde_step_with_logprob` and DanceGRPO's `flux_step`, so clip ranges and KL / DPO weights
    carry over from their configs. The squares and their mean are taken in float64 (from the
    float32 inputs): a log-ratio of two such values, exp(logp_new - logp_old), then has no
    float32 rounding of a D-term sum in it (at D = 262,144 that error would be ~1e-2 on a sum,
    ~1e-7 on a float32 mean, against clip ranges of 1e-4).
    """
    sq = (x.double() - mean.double()).pow(2).flatten(1).mean(1)
    return -sq / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


def trained_step_noise_level(extras: dict[str, Any], step: int) -> float:
    """`step_noise_level` for a step whose log-probability is asked for: an error at a deterministic one."""
    eta = step_noise_level(extras["eta"], extras.get("sde_steps"), step)
    if eta <= 0:
        raise ValueError(
            f"step {step} of this rollout is deterministic (its SDE steps: {extras.get('sde_steps')}; "
            f"eta {extras['eta']}): it has no log-probability"
        )
    return eta


def _index_samples(s: Samples, idx: Tensor) -> Samples:
    pick = lambda x: None if x is None else x[idx.to(x.device)]
    return Samples(
        images=pick(s.images),
        video=pick(s.video),
        audio=pick(s.audio),
        sample_rate=s.sample_rate,
        text=None if s.text is None else [s.text[i] for i in idx.tolist()],
    )


def _cat_samples(parts: Sequence[Samples]) -> Samples:
    """Concatenate media batches of one modality (empty when the first holds none)."""
    first = parts[0]
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])
    return Samples(
        images=cat("images"),
        video=cat("video"),
        audio=cat("audio"),
        sample_rate=first.sample_rate,
        text=None if first.text is None else [t for p in parts for t in p.text],
    )


def _index_tree(x: Any, idx: Tensor, n: int) -> Any:
    if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n:
        return x[idx.to(x.device)]
    if isinstance(x, dict):
        return {k: _index_tree(v, idx, n) for k, v in x.items()}
    if isinstance(x, list) and len(x) == n:
        return [x[i] for i in idx.tolist()]
    return x


def _cat_tree(xs: list[Any], sizes: list[int]) -> Any:
    x0 = xs[0]
    if isinstance(x0, Tensor) and x0.ndim > 0 and x0.shape[0] == sizes[0]:
        return torch.cat(xs)
    if isinstance(x0, dict):
        return {k: _cat_tree([x[k] for x in xs], sizes) for k in x0}
    if isinstance(x0, list) and len(x0) == sizes[0]:
        return [v for x in xs for v in x]
    return x0


def per_sample_randn(seeds: Tensor | Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """Gaussian noise of `shape` per sample, each drawn from its own seed.

    Methods draw their noise and timesteps this way so that a sample's randomness does not
    depend on how the global batch is split over processes or accumulation steps (a
    2-process run equals a 1-process run) and a resumed run replays the same draws.
    """
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(out).to(device=device, dtype=dtype)


def per_sample_randint(seeds: Tensor | Sequence[int], low: int, high: int, device=None, salt: int = 1) -> Tensor:
    """One integer in [low, high) per sample from its seed (salted so it differs from the noise)."""
    vals = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 1_000_003 + salt)
        vals.append(int(torch.randint(low, high, (1,), generator=g)))
    return torch.tensor(vals, device=device, dtype=torch.long)
