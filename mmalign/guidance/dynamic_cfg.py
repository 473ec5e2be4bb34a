"""Dynamic classifier-free guidance by online feedback.

Papalampidi et al., "Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (2025):
at each denoising step t, for every candidate scale s in S,

    ε_s = ε_u + s (ε_c − ε_u),     x̂_0(s) = x̂_0(x_t, ε_s)
    score(s) = Σ_k w_k(t) · norm_k( E_k(x̂_0(s), c) )

and the step is taken with s*_t = argmax_s score(s) (greedy search, per sample). One
conditional and one unconditional pass give every candidate; only the evaluators E_k
(rewards on the decoded x̂_0, or cheap latent-space scorers) run per candidate. norm_k
standardises evaluator k over the candidates of a sample ("zscore") so that the weights
w_k(t) mix evaluators on different scales; w_k may depend on the step (e.g. text alignment
early, quality late). A step where every weight is 0 is not evaluated and takes the first
candidate; ties also go to the first candidate, so list the default scale first.

The chosen scale of every step is returned per sample (`extras["cfg_schedule"]`, [B, T]).
With a single candidate s this is plain CFG at s, step for step (`generator.rollout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.types import Rollout

from .common import (
    as_evaluators,
    cfg_combine,
    check_guidable,
    combine_scores,
    default_seeds,
    make_rollout,
    progress_of,
    score_candidates,
    weight_at,
)


@torch.no_grad()
def dynamic_cfg_sample(
    generator: Any,
    prompts: Sequence[str],
    evaluators: Any,
    candidates: Sequence[float] = (5.0, 2.0, 3.5, 7.5),
    num_steps: int = 20,
    seeds: Sequence[int] | None = None,
    eta: float = 0.0,
    normalize: str = "zscore",
    eval_batch_size: int = 64,
    decode: bool = True,
    keep_scores: bool = False,
) -> Rollout:
    """Sample `prompts` choosing the CFG scale of each step and sample from `candidates`.

    evaluators: Evaluator(s), rewards or (reward, weight) pairs (mmalign.guidance.common).
    Returns a Rollout (no log-probs) whose extras hold "cfg_schedule" [B, T] (the chosen
    scale per step), "candidates", and with `keep_scores` the combined scores [B, T, K].
    """
    check_guidable(generator, "dynamic CFG")
    cands = [float(s) for s in candidates]
    if not cands:
        raise ValueError("dynamic CFG: give at least one candidate scale")
    evals = as_evaluators(evaluators)
    if len(cands) > 1 and not evals:
        raise ValueError("dynamic CFG: several candidate scales need at least one evaluator")
    prompts = list(prompts)
    seeds = default_seeds(prompts, seeds)
    B, K = len(prompts), len(cands)
    steps = generator.sampling_timesteps(num_steps)
    cond = generator.encode_prompt(prompts)
    uncond = generator.encode_prompt(prompts, negative=True) if any(s != 1.0 for s in cands) else None
    rep_prompts = [p for p in prompts for _ in range(K)]
    x = generator.initial_latents(seeds)
    traj = [x]
    choice_idx = torch.zeros(B, len(steps), dtype=torch.long)
    all_scores = torch.zeros(B, len(steps), K)
    for k, (t, t_prev) in enumerate(steps):
        u, c = generator.cfg_outputs(x, t, cond, uncond)
        preds = [cfg_combine(u, c, s) for s in cands]
        progress = progress_of(k, len(steps))
        if K > 1 and any(weight_at(e.weight, progress) != 0 for e in evals):
            stacked = torch.stack(preds, 1)  # B, K, ...
            x0 = generator.predicted_x0(stacked.flatten(0, 1), x.repeat_interleave(K, 0), t)
            raw = score_candidates(evals, x0, rep_prompts, generator.decode, eval_batch_size)
            scores = combine_scores(evals, raw, K, progress, normalize)  # B, K
            pick = scores.argmax(1).cpu()  # first maximum on ties
            all_scores[:, k] = scores.float().cpu()
            pred = stacked[torch.arange(B, device=stacked.device), pick.to(stacked.device)]
        else:
            pick = torch.zeros(B, dtype=torch.long)
            pred = preds[0]
        choice_idx[:, k] = pick
        noise = generator.step_noise(seeds, k) if eta > 0 else None
        x = generator.sampler_step(pred, x, t, t_prev, eta, noise)
        traj.append(x)
    schedule = torch.tensor(cands)[choice_idx]
    extras: dict[str, Any] = {"cfg_schedule": schedule, "candidates": cands, "seeds": torch.tensor(seeds)}
    if keep_scores:
        extras["scores"] = all_scores
    return make_rollout(generator, x, traj, steps, prompts, decode, **extras)
