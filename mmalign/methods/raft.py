"""Reward-ranked and reward-weighted fine-tuning: RAFT / best-of-N and reward-weighted
regression (RWR) for diffusion models.

- RAFT (Dong et al., "RAFT: Reward rAnked FineTuning for Generative Foundation Model
  Alignment", 2023): sample N per prompt with the current policy, keep the top `top_k` by
  reward, and fine-tune on them with the ordinary denoising loss.
- RWR (Peters & Schaal 2007; for text-to-image: Lee et al., "Aligning Text-to-Image Models
  using Human Feedback", 2023): the denoising loss on every sample, weighted by
  w_i = softmax_group(r_i / temperature) * G (so that uniform rewards give weight 1).

    L = sum_i w_i * ||eps - eps_theta(x_t^(i), t, c_i)||^2 / sum_i 1

Both need no log-probs (any sampler; eta may be 0). Nothing keeps the policy near the
reference but the step count and learning rate (no KL term). The plain loss is positive-only:
it also teaches whatever all of the policy's own samples share (sampler and VAE artifacts). On
the toy world that outweighs the selection, even with the exact gold reward
(docs/results/toy-world-log.md); group-centred methods (GRPO, online DPO) cancel it, and so does the baseline below,
with which RAFT raises the toy's held-out gold more than any other method (configs/toy/raft.yaml).

`baseline: true` subtracts each group's mean weight (1) from the weights, so that a group's
weights sum to zero (RAFT top-1 of 4: +3/4 for the best, -1/4 for each other; RWR:
softmax * G - 1), and trains on whole groups whose samples share one noise draw and one
timestep. What every sample of a group shares then cancels in the gradient, and what is left
pushes the denoiser towards the group's better samples and away from its worse ones. This is
a baseline-subtracted RWR: the negative weights make the loss unbounded below, so it relies on
a short run at a low learning rate, like the policy-gradient methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.methods.online import RolloutSettings, collect
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method
from mmalign.types import per_sample_randint, per_sample_randn


@dataclass
class RAFTConfig:
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(eta=0.0))
    mode: Literal["raft", "rwr"] = "raft"
    top_k: int = num(1, ge=1)  # raft: samples kept per prompt
    temperature: float = num(0.1, gt=0)  # rwr: softmax temperature on rewards within a group
    min_reward: float | None = num(None)  # raft: also require reward >= this
    # Scale s of the guided prediction u + s (c - u) the loss is taken on. 1 trains the
    # conditional model alone; samples drawn at CFG s > 1 are then learned by the conditional
    # branch and CFG is applied on top again at sampling time (effectively s^2): set it to the
    # rollout's guidance_scale to train the policy that actually sampled.
    train_guidance_scale: float = num(1.0, ge=0)
    min_timestep: int = num(0, ge=0)  # train on t in [min_timestep, T): composition is set at high noise
    baseline: bool = False  # subtract the group mean weight; train on whole groups (module docstring)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k: must be >= 1")
        if not 0 <= self.min_timestep < 1000:
            raise ValueError("min_timestep: must be in [0, 1000)")
        if self.mode not in ("raft", "rwr"):
            raise ValueError(f"mode: {self.mode!r} is not 'raft' or 'rwr'")
        if self.top_k >= self.rollout.samples_per_prompt and self.mode == "raft":
            raise ValueError("top_k: must be smaller than rollout.samples_per_prompt (else nothing is filtered)")


class RAFT:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: RAFTConfig):
        self.cfg, self.rollout = cfg, cfg.rollout

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        ro = collect(generator, reward, prompts, seeds, self.rollout, need_log_probs=False)
        r = ro.extras["rewards"]
        G = self.rollout.samples_per_prompt
        rg = r.view(-1, G)
        if self.cfg.mode == "raft":
            top = rg.topk(self.cfg.top_k, dim=1).indices + torch.arange(len(rg), device=r.device)[:, None] * G
            keep = top.flatten()
            if self.cfg.min_reward is not None:
                keep = keep[r[keep] >= self.cfg.min_reward]
            weights = torch.ones(len(r), device=r.device)
        else:
            weights = (torch.softmax(rg / self.cfg.temperature, dim=1) * G).flatten()
            keep = torch.arange(len(r), device=r.device)
        ro.extras["selected"] = keep.sort().values
        if self.cfg.baseline:
            chosen = torch.zeros(len(r), device=r.device)
            chosen[keep] = 1.0
            weights = (weights * chosen).view(-1, G)
            weights = (weights - weights.mean(1, keepdim=True)).flatten()
            keep = torch.arange(len(r), device=r.device)
        ro.extras["weights"] = weights
        ro.extras["keep"] = keep.sort().values
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        """reward_kept: mean reward of the selected samples (raft: the top_k; rwr: all)."""
        r, sel = ro.extras["rewards"], ro.extras["selected"]
        return {
            "reward_mean": float(r.mean()),
            "reward_kept": float(r[sel].mean()) if len(sel) else float("nan"),
            "kept": float(len(sel)),
        }

    def num_items(self, ro) -> int:
        """Kept samples; with a baseline, whole groups."""
        if self.cfg.baseline:
            return len(ro.extras["keep"]) // self.rollout.samples_per_prompt
        return len(ro.extras["keep"])

    def batch(self, ro, idx, seeds) -> dict:
        idx = torch.as_tensor(idx, device=ro.extras["keep"].device)
        if self.cfg.baseline:  # item i is group i: its G samples, one seed for all of them
            G = self.rollout.samples_per_prompt
            idx = (idx[:, None] * G + torch.arange(G, device=idx.device)).flatten()
            seeds = [s for s in seeds for _ in range(G)]
        sel = ro.extras["keep"][idx]
        x0 = ro.extras["x0"] if "x0" in ro.extras else ro.latents[:, -1]
        return {
            "prompts": [ro.prompts[i] for i in sel.tolist()],
            "latents": x0[sel],
            "weights": ro.extras["weights"][sel],
            "seeds": torch.as_tensor(seeds),
        }

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["latents"].to(generator.device).float()
        seeds = batch["seeds"]
        noise = per_sample_randn(seeds, x0.shape[1:], x0.device)
        t = per_sample_randint(seeds, self.cfg.min_timestep, generator.num_train_timesteps, x0.device)
        s = self.cfg.train_guidance_scale
        uncond = generator.encode_prompt(batch["prompts"], negative=True) if s != 1.0 else None
        err = generator.denoise_error(
            x0, generator.encode_prompt(batch["prompts"]), t, noise, uncond=uncond, guidance_scale=s
        )
        w = batch["weights"].to(err.device)
        return (w * err).mean(), {"mse": float(err.detach().mean()), "weight_max": float(w.max())}


@register_method("raft", RAFTConfig)
def build_raft(cfg: RAFTConfig) -> RAFT:
    """RAFT / best-of-N fine-tuning, or reward-weighted regression (mode: rwr)."""
    return RAFT(cfg)
