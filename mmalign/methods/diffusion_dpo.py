"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", 2023).

With the same noise eps and timestep t for the preferred image x_w and the dispreferred
x_l, and per-sample mean squared denoising errors e = ||eps - eps_theta(x_t, t, c)||^2,

    L = -log sigmoid( -beta/2 * [ (e_w^theta - e_l^theta) - (e_w^ref - e_l^ref) ] )

(the paper's eq. 14 with T*omega(lambda) folded into beta; beta = 5000 for SD1.5 and
SDXL as in the paper's code, the 1/2 being part of the formula). In the shared
preference-layer terms this is DPO on the per-sample score -e with beta/2.

The policy's winner and loser go through one batched forward; the reference pass runs
without autograd, with LoRA adapters disabled (no second UNet) unless fine-tuning fully.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.methods.preference import LOSSES, pairwise
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method
from mmalign.types import per_sample_randint, per_sample_randn


def diffusion_dpo_loss(
    policy_err_w: Tensor,
    policy_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    loss_type: str = "dpo",
    eps: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample Diffusion-DPO losses and metrics from per-sample denoising errors.

    `loss_type` swaps the sigmoid for another objective of the preference layer (cdpo,
    robust_dpo, ipo, hinge) on the same scores (-error) and the same beta/2.
    """
    inside = -0.5 * beta * ((policy_err_w - policy_err_l) - (ref_err_w - ref_err_l))
    losses = pairwise(loss_type, -policy_err_w, -policy_err_l, -ref_err_w, -ref_err_l, beta / 2, eps)
    # implicit reward of each image relative to the reference: r = -beta/2 * (e_theta - e_ref)
    reward_w = -0.5 * beta * (policy_err_w - ref_err_w)
    reward_l = -0.5 * beta * (policy_err_l - ref_err_l)
    metrics = {
        "implicit_acc": (inside > 0).float() + 0.5 * (inside == 0).float(),
        "margin": reward_w - reward_l,
        "reward_w": reward_w,
        "reward_l": reward_l,
    }
    return losses, metrics


@dataclass
class DiffusionDPOConfig:
    beta: float = num(5000.0, gt=0)
    loss_type: str = "dpo"  # dpo | cdpo | robust_dpo | ipo | hinge (mmalign/methods/preference.py)
    label_smoothing: float = num(0.0, ge=0, lt=1)  # eps of cdpo / robust_dpo
    sft_weight: float = num(0.0, ge=0)  # optional extra loss on the winner's denoising error
    max_timestep: int | None = num(None, ge=1)  # sample t in [min_timestep, max_timestep); default all training steps
    min_timestep: int = num(0, ge=0)
    # Scale s of the guided prediction u + s (c - u) whose errors are compared (policy and
    # reference alike). 1 is the paper (conditional model only); the pairs' sampling CFG
    # scale makes the loss score the policy that produced them (see RAFTConfig).
    train_guidance_scale: float = num(1.0, ge=0)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta: must be positive")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.min_timestep >= self.max_timestep):
            raise ValueError("min_timestep: must be >= 0 and below max_timestep")
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type: unknown {self.loss_type!r}; choose from {sorted(LOSSES)}")


class DiffusionDPO:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: DiffusionDPOConfig, reference: Callable | None = None):
        """`reference(generator)`: a context in which the generator is the reference policy
        (default: `generator.reference()`, the frozen base; online_dpo can pass another)."""
        self.cfg = cfg
        self.reference = reference or (lambda generator: generator.reference())

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        prompts = batch["prompts"]
        seeds = batch["seeds"]  # the pair shares its VAE posterior draw, noise and timestep
        x_w = batch["latents_w"] if "latents_w" in batch else generator.encode_images(batch["chosen"], seeds)
        x_l = batch["latents_l"] if "latents_l" in batch else generator.encode_images(batch["rejected"], seeds)
        x_w, x_l = x_w.to(generator.device).float(), x_l.to(generator.device).float()
        noise = per_sample_randn(seeds, x_w.shape[1:], x_w.device)
        t = per_sample_randint(
            seeds, self.cfg.min_timestep, self.cfg.max_timestep or generator.num_train_timesteps, x_w.device
        )
        cond = generator.encode_prompt(prompts)
        cond2 = generator.cat_cond(cond, cond)
        s = self.cfg.train_guidance_scale
        guided = {}
        if s != 1.0:
            uncond = generator.encode_prompt(prompts, negative=True)
            guided = {"uncond": generator.cat_cond(uncond, uncond), "guidance_scale": s}
        x, noise2, t2 = torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t])

        with torch.no_grad(), self.reference(generator):  # first: a reference may swap weights in
            ref_w, ref_l = generator.denoise_error(x, cond2, t2, noise2, **guided).chunk(2)
        err_w, err_l = generator.denoise_error(x, cond2, t2, noise2, **guided).chunk(2)

        losses, m = diffusion_dpo_loss(
            err_w, err_l, ref_w, ref_l, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing
        )
        loss = losses.mean()
        if self.cfg.sft_weight:
            loss = loss + self.cfg.sft_weight * err_w.mean()
        metrics = {k: float(v.detach().mean()) for k, v in m.items()}
        metrics.update(
            mse_w=float(err_w.detach().mean()), mse_l=float(err_l.detach().mean()), ref_mse_w=float(ref_w.mean())
        )
        return loss, metrics


@register_method("diffusion_dpo", DiffusionDPOConfig)
def build_diffusion_dpo(cfg: DiffusionDPOConfig) -> DiffusionDPO:
    """Diffusion-DPO: DPO on per-sample denoising errors of preference pairs."""
    return DiffusionDPO(cfg)
