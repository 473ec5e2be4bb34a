"""Reward-gradient guidance at sampling time (no training).

Universal guidance, "forward" form (Bansal et al., "Universal Guidance for Diffusion
Models", 2023): with a differentiable reward R on the predicted clean sample,

    g_t = ∇_{x_t} Σ_k w_k(t) R_k( decode( x̂_0(x_t) ), c )
    ε̂'  = ε̂ − σ_t g_t                    (x_t = α_t x_0 + σ_t ε)

i.e. the score ∇ log p(x_t | c) gains + Σ_k w_k ∇ R_k: sampling from p(x | c) · exp(Σ w_k R_k)
to first order. The per-reward weights w_k (constants or schedules over the steps) let users
mix objectives, as VideoAlign's Flow-NRG does (Liu et al., "Improving Video Generation with
Human Feedback", 2025). `guide_prediction` applies the same score shift to any
parameterisation:

    epsilon:            ε' = ε − σ g
    v_prediction:       v' = v − (σ/α) g          (v = α ε − σ x_0)
    flow (rectified):   v' = v − (σ/α) g, α = 1 − σ  (x_t = (1−σ) x_0 + σ ε, v = ε − x_0)
    sample (x_0-pred):  x̂_0' = x̂_0 + (σ²/α) g

For flow generators (`prediction_type == "flow"`, pipelines/flow.py) the same sampler applies
the flow form; the first step (sigma = 1, alpha = 0) is unguided. (Flow-NRG proper
scores the noisy latent x_t with a reward model trained on noisy latents; here the reward
always sees x̂_0(x_t), as universal guidance does.)

With `through_model` (default) the gradient goes through the denoiser (∂x̂_0/∂x_t includes
∂ε̂/∂x_t); without it ε̂ is held fixed (∂x̂_0/∂x_t = 1/α), which is cheaper. With every weight 0 at a step, the
step is plain CFG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.protocols import Reward
from mmalign.types import Rollout

from .common import (
    as_evaluators,
    cfg_combine,
    check_guidable,
    default_seeds,
    make_rollout,
    progress_of,
    score_candidates,
    weight_at,
)


def guide_prediction(pred: Tensor, grad: Tensor, prediction_type: str, alpha: float, sigma: float) -> Tensor:
    """Shift a model output so that the implied score gains `grad` (= ∇_{x_t} of the weighted reward)."""
    if prediction_type == "epsilon":
        return pred - sigma * grad
    if prediction_type in ("v_prediction", "flow"):
        return pred - (sigma / alpha) * grad
    if prediction_type == "sample":
        return pred + (sigma**2 / alpha) * grad
    raise ValueError(f"reward guidance: unsupported prediction_type {prediction_type!r}")


def reward_guided_sample(
    generator: Any,
    prompts: Sequence[str],
    rewards: Any,
    guidance_scale: float = 5.0,
    num_steps: int = 20,
    seeds: Sequence[int] | None = None,
    eta: float = 0.0,
    through_model: bool = True,
    max_grad_norm: float | None = None,
    decode: bool = True,
) -> Rollout:
    """CFG sampling with universal-guidance reward gradients.

    rewards: differentiable rewards with weights: Evaluator(s) or (reward, weight) pairs;
    image-space rewards see decode(x̂_0), latent-space callables see x̂_0.
    max_grad_norm clips each sample's g_t (L2 over the latent) when set.
    Returns a Rollout whose extras hold "guidance_norm" [B, T] (‖σ g_t‖ per step).
    """
    check_guidable(generator, "reward guidance")
    evals = as_evaluators(rewards)
    if not evals:
        raise ValueError("reward guidance: give at least one reward")
    for e in evals:
        if e.space == "image" and not (isinstance(e.fn, Reward) and e.fn.differentiable):
            raise ValueError(
                f"reward guidance: reward {e.label} is not differentiable; gradient guidance needs a "
                "differentiable reward (e.g. clip)"
            )
    prompts = list(prompts)
    seeds = default_seeds(prompts, seeds)
    steps = generator.sampling_timesteps(num_steps)
    with torch.no_grad():
        cond = generator.encode_prompt(prompts)
        uncond = generator.encode_prompt(prompts, negative=True) if guidance_scale != 1.0 else None
        x = generator.initial_latents(seeds)
    traj = [x]
    norms = torch.zeros(len(prompts), len(steps))
    ptype = generator.prediction_type
    for k, (t, t_prev) in enumerate(steps):
        progress = progress_of(k, len(steps))
        alpha, sigma = generator.alpha_sigma(t)
        # alpha = 0 (a flow sampler's first step, sigma = 1): the shift sigma/alpha g is infinite
        # and x̂_0 says nothing yet, so that step is left unguided.
        weighted = [e for e in evals if weight_at(e.weight, progress) != 0] if alpha > 0 else []
        if not weighted:
            with torch.no_grad():
                pred = cfg_combine(*generator.cfg_outputs(x, t, cond, uncond), guidance_scale)
        else:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                if through_model:
                    pred = cfg_combine(*generator.cfg_outputs(xg, t, cond, uncond), guidance_scale)
                else:
                    with torch.no_grad():
                        pred = cfg_combine(*generator.cfg_outputs(x, t, cond, uncond), guidance_scale)
                x0 = generator.predicted_x0(pred, xg, t)
                raw = score_candidates(weighted, x0, prompts, generator.decode, batch_size=len(prompts))
                objective = sum(weight_at(e.weight, progress) * raw[e.name].sum() for e in weighted)
                (grad,) = torch.autograd.grad(objective, xg)
            pred = pred.detach()
            grad = grad.detach()
            if max_grad_norm is not None:
                n = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                grad = grad * (max_grad_norm / n).clamp(max=1.0).view(-1, *[1] * (grad.ndim - 1))
            norms[:, k] = (sigma * grad).flatten(1).norm(dim=1).cpu()
            pred = guide_prediction(pred, grad, ptype, alpha, sigma)
        with torch.no_grad():
            noise = generator.step_noise(seeds, k) if eta > 0 else None
            x = generator.sampler_step(pred, x, t, t_prev, eta, noise)
        traj.append(x)
    with torch.no_grad():
        return make_rollout(
            generator,
            x,
            traj,
            steps,
            prompts,
            decode,
            guidance_norm=norms,
            seeds=torch.tensor(seeds),
            guidance_scale=guidance_scale,
        )
