"""Reward combinators: weighted mixes, per-prompt normalisation, conservative ensembles.

mix:       R(x, c) = sum_k w_k R_k(x, c)     (named rewards, each built from the registry)
           optionally followed by per-prompt normalisation (DDPO's per-prompt stat tracking,
           Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"):
           A(x, c) = (R(x, c) - mean_c) / (std_c + 1e-6), where mean_c / std_c are over the
           last `buffer_size` rewards seen for prompt c, or over the current batch while
           fewer than `min_count` have been seen (std is the population std).

ensemble:  members R_1..R_k scored on the same samples, aggregated as in Coste et al. 2024,
           "Reward Model Ensembles Help Mitigate Overoptimization":
             mean: (1/k) sum_i R_i
             wco:  min_i R_i                                   (worst-case optimisation)
             uwo:  (1/k) sum_i R_i - lambda * (1/k) sum_i (R_i - mean)^2
                                                               (uncertainty-weighted optimisation)
           The members should be on a common scale (e.g. one reward model trained with
           several seeds), as in the paper; `scales` / `offsets` put them on one if not.

Members are given as `{name: REGISTERED_NAME, **its config}`; each is validated by its own
config dataclass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .common import build_reward, reward_info


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


class PerPromptStatTracker:
    """Running per-prompt reward statistics -> advantages within a prompt (DDPO)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if min_count > buffer_size:
            raise ValueError(f"min_count ({min_count}) cannot exceed buffer_size ({buffer_size})")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Add this batch to the buffers and return (r - mean) / (std + eps) per sample."""
        if len(prompts) != len(rewards):
            raise ValueError(f"stat tracker: {len(rewards)} rewards but {len(prompts)} prompts")
        r = rewards.detach().double().cpu()
        adv = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx] = (r[idx] - mean) / (std + self.eps)
        return adv.to(rewards.device, rewards.dtype if rewards.is_floating_point() else torch.float32)

    def get_stats(self) -> dict[str, dict[str, float]]:
        return {
            p: {
                "mean": float(torch.tensor(list(b)).mean()),
                "std": float(torch.tensor(list(b)).std(unbiased=False)),
                "count": len(b),
            }
            for p, b in self.stats.items()
        }

    def clear(self) -> None:
        self.stats = {}


def _members(specs: list[Any], where: str) -> list[Any]:
    if not specs:
        raise ValueError(f"{where}: give at least one reward")
    rewards = [build_reward(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    modalities = {r.modality for r in rewards}
    if len(modalities) > 1:
        raise ValueError(f"{where}: rewards score different modalities {sorted(modalities)}")
    return rewards


def _check_specs(specs: list[dict], field: str) -> None:
    if not specs:
        raise ValueError(f"{field}: give at least one reward")
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or "name" not in s:
            raise ValueError(f"{field}[{i}]: expected a mapping with a 'name' key (a registered reward)")


@dataclass
class MixConfig:
    rewards: list[dict[str, Any]]  # [{name: clip, model: ...}, {name: aesthetic, head: ...}]
    weights: list[float] | None = num(None)  # default: 1 for each
    normalize: Literal["none", "per_prompt"] = "none"
    buffer_size: int = num(16, ge=1)  # per_prompt: rewards kept per prompt
    min_count: int = num(16, ge=1)  # per_prompt: below this many, normalise with the batch's statistics

    def validate(self) -> None:
        _check_specs(self.rewards, "rewards")
        if self.weights is not None and len(self.weights) != len(self.rewards):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.rewards)} rewards")
        if self.normalize == "per_prompt" and self.min_count > self.buffer_size:
            raise ValueError("min_count: cannot exceed buffer_size")


class RewardMix:
    """sum_k w_k R_k, then optionally per-prompt advantages."""

    def __init__(
        self,
        rewards: list[Any],
        weights: Sequence[float] | None = None,
        normalize: str = "none",
        buffer_size: int = 16,
        min_count: int = 16,
        name: str = "mix",
    ):
        self.rewards, self.name = rewards, name
        self.weights = list(weights) if weights is not None else [1.0] * len(rewards)
        self.modality = rewards[0].modality
        self.differentiable = all(r.differentiable for r in rewards) and normalize == "none"
        self.tracker = PerPromptStatTracker(buffer_size, min_count) if normalize == "per_prompt" else None
        self.last_components: dict[str, Tensor] = {}

    def components(self, samples: Samples, prompts: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for i, r in enumerate(self.rewards):
            key = getattr(r, "name", f"r{i}")
            out[key if key not in out else f"{key}_{i}"] = r(samples, prompts)
        return out

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        comps = self.components(samples, prompts)
        self.last_components = {k: v.detach() for k, v in comps.items()}
        total = sum(w * _float(v) for w, v in zip(self.weights, comps.values()))
        if self.tracker is not None:
            total = self.tracker.update(list(prompts), total)
        return total  # type: ignore[return-value]


@register_reward("mix", MixConfig)
@reward_info("any (its members')", "if all members are", "its member rewards")
def build_mix(cfg: MixConfig) -> RewardMix:
    """Weighted sum of named rewards, optionally normalised per prompt (DDPO stat tracking)."""
    return RewardMix(_members(cfg.rewards, "rewards"), cfg.weights, cfg.normalize, cfg.buffer_size, cfg.min_count)


# --------------------------------------------------------------------------- ensembles


def aggregate(scores: Tensor, how: str, uwo_lambda: float = 0.5) -> Tensor:
    """scores [K members, B] -> [B] by mean, worst case (min) or mean - lambda * variance."""
    if scores.ndim != 2:
        raise ValueError(f"aggregate: expected [members, batch] scores, got shape {tuple(scores.shape)}")
    mean = scores.mean(0)
    if how == "mean":
        return mean
    if how == "wco":
        return scores.min(0).values
    if how == "uwo":
        var = ((scores - mean) ** 2).mean(0)  # intra-ensemble (population) variance
        return mean - uwo_lambda * var
    raise ValueError(f"aggregate: unknown aggregation {how!r} (mean, wco, uwo)")


@dataclass
class EnsembleConfig:
    members: list[dict[str, Any]]
    aggregate: Literal["mean", "wco", "uwo"] = "mean"
    uwo_lambda: float = num(0.5, ge=0)  # lambda of UWO
    scales: list[float] | None = num(None)  # per-member affine normalisation: (R_i - offset_i) * scale_i
    offsets: list[float] | None = num(None)

    def validate(self) -> None:
        _check_specs(self.members, "members")
        for field in ("scales", "offsets"):
            v = getattr(self, field)
            if v is not None and len(v) != len(self.members):
                raise ValueError(f"{field}: {len(v)} values for {len(self.members)} members")
        if self.uwo_lambda < 0:
            raise ValueError("uwo_lambda: must be >= 0")


class RewardEnsemble:
    def __init__(
        self,
        members: list[Any],
        how: str = "mean",
        uwo_lambda: float = 0.5,
        scales: Sequence[float] | None = None,
        offsets: Sequence[float] | None = None,
        name: str = "ensemble",
    ):
        self.members, self.how, self.uwo_lambda, self.name = members, how, uwo_lambda, name
        self.scales = list(scales) if scales is not None else [1.0] * len(members)
        self.offsets = list(offsets) if offsets is not None else [0.0] * len(members)
        self.modality = members[0].modality
        self.differentiable = all(m.differentiable for m in members)

    def member_scores(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        """[K, B] scores of every member (after the per-member affine normalisation)."""
        rows = [(_float(m(samples, prompts)) - o) * s for m, s, o in zip(self.members, self.scales, self.offsets)]
        return torch.stack(rows)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        return aggregate(self.member_scores(samples, prompts), self.how, self.uwo_lambda)


@register_reward("ensemble", EnsembleConfig)
@reward_info("any (its members')", "if all members are", "its member rewards")
def build_ensemble(cfg: EnsembleConfig) -> RewardEnsemble:
    """Reward-model ensemble: mean, worst-case (WCO) or mean - lambda*variance (UWO)."""
    return RewardEnsemble(_members(cfg.members, "members"), cfg.aggregate, cfg.uwo_lambda, cfg.scales, cfg.offsets)
