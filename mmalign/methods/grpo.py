"""DDPO / GRPO-style policy gradient for diffusion models.

DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", 2023) treats
denoising as an MDP whose actions are the stochastic DDIM steps, and maximises the reward
of the final sample with PPO's clipped surrogate; GRPO-style training (Flow-GRPO, Liu et al.
2025; DanceGRPO, Xue et al. 2025) samples a group of G images per prompt and centres each
reward on its prompt's mean. As flow_grpo's train_sd3.py with its configs' stat tracker
(`PerPromptStatTracker(global_std=True)`):

    A_i = (r_i - mean_group(r)) / (std_round(r) + 1e-4),  clipped to [-adv_clip, adv_clip]
    L   = E_{i,k} max( -A_i rho_ik, -A_i clip(rho_ik, 1 - c, 1 + c) ) + kl_coef * KL_ik
    rho_ik = exp( log p_theta(x_{k+1} | x_k, c) - log p_old(x_{k+1} | x_k, c) )
    KL_ik  = mean_d (mu_theta - mu_ref)_d^2 / (2 s_k^2)

std_round is the population std of all of the round's rewards (over every process);
`advantage_std: group` divides by each group's own std instead (DanceGRPO, and GRPO as
usually written), `none` only centres. Log-probs are per-dimension means of the step's
Gaussian log-density (ddpo-pytorch, flow_grpo and DanceGRPO code), so the defaults are
theirs: clip_range 1e-4, adv_clip 5, all steps trained (timestep_fraction 1), no KL. s_k is
what the reference's step function returns as std_dev_t: on the flow SDE sigma_t, the step
std without its sqrt(-dt) (flow_grpo's KL, so kl_coef 0.04 is its `beta` 0.04); on DDIM the
step std (DDPO has no KL term; this makes it the exact KL per dimension). The loss is the
mean over the trained steps of each step's batch mean, as flow_grpo's per-step backward with
gradient accumulation over the steps. Groups whose rewards are all equal carry no signal and
are dropped (counted). Only a fraction of the denoising steps is trained per sample
(timestep subsampling, a random subset per batch), optionally drawn from a window of the
trajectory (`timestep_window`, as MixGRPO / TempFlow-GRPO restrict training to the early
steps). The score of a step scales with |d mean / d eps| / sigma, which is not flat along a
trajectory: with 10 DDIM steps at eta 1 the step from t=101 to t=1 has sigma 0.04 and 6-9x
the weight of any other, so when drawn it dominates the update; [0, 0.8] leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.methods.online import RolloutSettings, check_window, collect, group_advantages, train_steps, window_steps
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method


def ppo_clip_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """Per-element PPO clipped surrogate (to minimise) and whether the clip was active."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@dataclass
class GRPOConfig:
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    clip_range: float = num(1e-4, gt=0)  # on the ratio of per-dimension mean log-probs (ddpo / flow_grpo)
    adv_clip: float = num(5.0, gt=0)
    kl_coef: float = num(0.0, ge=0)  # flow_grpo's train.beta (0.04 in its GRPO configs)
    timestep_fraction: float = num(1.0, gt=0, le=1)  # train on this fraction of the denoising steps per sample
    # the part of the trajectory those steps are drawn from, as fractions (0 = the first, noisiest step)
    timestep_window: list[float] = num(default_factory=lambda: [0.0, 1.0], ge=0, le=1)
    # the std advantages are divided by: the whole round's (flow_grpo's global_std), each group's, or none
    advantage_std: Literal["global", "group", "none"] = "global"
    filter_zero_std: bool = True

    def validate(self) -> None:
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range: must be in (0, 1), got {self.clip_range}")
        if not self.adv_clip > 0:
            raise ValueError(f"adv_clip: must be > 0, got {self.adv_clip}")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError("timestep_fraction: must be in (0, 1]")
        check_window("timestep_window", self.timestep_window)
        if self.rollout.eta <= 0:
            raise ValueError("rollout.eta: policy gradient needs stochastic steps (eta > 0)")
        T = self.rollout.num_steps
        trained, sde = window_steps(T, self.timestep_window), window_steps(T, self.rollout.sde_window)
        if not set(trained) <= set(sde):
            raise ValueError(
                f"timestep_window {list(self.timestep_window)} (steps {list(trained)} of {T}) must lie "
                f"inside rollout.sde_window {list(self.rollout.sde_window)} (steps {list(sde)}): "
                "the steps outside it are deterministic and have no log-probabilities"
            )


class GRPO:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: GRPOConfig):
        self.cfg, self.rollout = cfg, cfg.rollout

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        # log-probs only: the re-encoded latents other online methods train on would go unused
        ro = collect(generator, reward, prompts, seeds, replace(self.rollout, reencode=False))
        r, grp = ro.extras["rewards"], ro.extras["group"]
        a_std = self.cfg.advantage_std
        adv = group_advantages(r, grp, std=a_std != "none", global_std=a_std == "global")
        adv = adv.clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        keep = torch.ones_like(r, dtype=torch.bool)
        if self.cfg.filter_zero_std:
            for g in grp.unique():
                m = grp == g
                if r[m].std(unbiased=False) < 1e-6:
                    keep &= ~m
        ro.extras["advantages"] = adv
        ro.extras["keep"] = torch.nonzero(keep).flatten()
        ro.extras["dropped_groups"] = float((~keep).sum()) / self.rollout.samples_per_prompt
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        r = ro.extras["rewards"]
        return {
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False)),
            "dropped_groups": float(ro.extras["dropped_groups"]),
        }

    def num_items(self, ro) -> int:
        return len(ro.extras["keep"])

    def batch(self, ro, idx, seeds) -> dict:
        return {"rollout": ro.select(ro.extras["keep"][torch.as_tensor(idx)]), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        ro = batch["rollout"]
        if "cond" not in ro.extras:
            generator.condition(ro)
        steps = train_steps(
            ro.log_probs.shape[1], self.cfg.timestep_fraction, int(batch["seeds"][0]), self.cfg.timestep_window
        )
        adv = ro.extras["advantages"].to(generator.device)
        total, clipfrac, kl_sum, log_ratio = 0.0, 0.0, 0.0, 0.0
        for k in steps:
            logp, mean, std = generator.step_log_prob(ro, k, return_mean=True)
            old = ro.log_probs[:, k].to(logp.device)
            per, clipped = ppo_clip_loss(logp, old, adv, self.cfg.clip_range)
            loss_k = per.mean()
            if self.cfg.kl_coef:
                with torch.no_grad(), generator.reference():
                    _, ref_mean, _ = generator.step_log_prob(ro, k, return_mean=True)
                kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)  # flow_grpo's train_sd3.py
                loss_k = loss_k + self.cfg.kl_coef * kl.mean()
                kl_sum += float(kl.detach().mean())
            total = total + loss_k / len(steps)
            clipfrac += float(clipped.mean()) / len(steps)
            log_ratio += float((logp.detach() - old).abs().mean()) / len(steps)
        metrics = {"clipfrac": clipfrac, "abs_log_ratio": log_ratio, "advantage_abs": float(adv.abs().mean())}
        if self.cfg.kl_coef:
            metrics["kl"] = kl_sum / len(steps)
        return total, metrics


@register_method("grpo", GRPOConfig)
def build_grpo(cfg: GRPOConfig) -> GRPO:
    """DDPO/GRPO: PPO-clip on per-step log-prob ratios with group-centred advantages."""
    return GRPO(cfg)
