"""Search by a reward at sampling time: best-of-N and per-step beam search.

Best-of-N (rejection sampling on whole samples; e.g. Coste et al., "Reward Model Ensembles
Help Mitigate Overoptimization", use it as the inference-time baseline): draw N samples per
prompt and keep  argmax_j  Σ_k w_k R_k(x^j, c).

Per-step beam search: keep W particles per prompt; at each stochastic step (eta > 0) every
particle proposes K children x_{t-1} ~ p(x_{t-1} | x_t, c); each child is scored on its own
x̂_0 (the denoiser's prediction at the next timestep, or the sample itself after the last
step) and the best W of the W·K children of a prompt survive. W = 1 is per-step rejection
sampling (the best of K proposals at every step). The children's model outputs are reused
for their next step, so a step costs W·K model passes and W·K evaluator calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.protocols import DiffusionGenerator, require
from mmalign.types import Rollout, _index_samples, per_sample_randn

from .common import (
    as_evaluators,
    cfg_combine,
    check_guidable,
    combine_scores,
    decode_all,
    default_seeds,
    score_candidates,
)


@torch.no_grad()
def best_of_n_sample(
    generator: Any,
    prompts: Sequence[str],
    evaluators: Any,
    n: int = 4,
    guidance_scale: float = 5.0,
    num_steps: int = 20,
    seeds: Sequence[int] | None = None,
    eta: float = 0.0,
    batch_size: int = 64,
    normalize: str = "none",
) -> Rollout:
    """Draw `n` samples per prompt (candidate j of seed s has seed s·n + j) and keep the best.

    Returns the chosen samples' Rollout; extras hold "seeds" (chosen), "chosen" [B] (index j),
    "candidate_scores" [B, n] (combined) and "candidate_rewards" {name: [B, n]}.
    """
    require(generator, DiffusionGenerator, "best-of-N", f"generator {type(generator).__name__}")
    if n < 1:
        raise ValueError(f"best-of-N: n must be >= 1, got {n}")
    evals = as_evaluators(evaluators)
    if not evals:
        raise ValueError("best-of-N: give at least one reward")
    prompts = list(prompts)
    seeds = default_seeds(prompts, seeds)
    rep = [p for p in prompts for _ in range(n)]
    cand_seeds = [s * n + j for s in seeds for j in range(n)]
    parts = [
        generator.rollout(
            rep[i : i + batch_size],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            seeds=cand_seeds[i : i + batch_size],
            need_log_probs=False,
        )
        for i in range(0, len(rep), batch_size)
    ]
    ro = Rollout.cat(parts)
    raw = score_candidates(evals, ro.latents[:, -1], rep, generator.decode, batch_size, samples=ro.samples)
    scores = combine_scores(evals, raw, n, 1.0, normalize)  # B, n
    chosen = scores.argmax(1).cpu()
    flat = torch.arange(len(prompts)) * n + chosen
    out = ro.select(flat)
    out.extras.update(
        {
            "seeds": torch.tensor([cand_seeds[i] for i in flat.tolist()]),
            "chosen": chosen,
            "candidate_scores": scores.cpu(),
            "candidate_rewards": {k: v.view(-1, n).cpu() for k, v in raw.items()},
        }
    )
    return out


def _take(x: Any, idx: Tensor) -> Any:
    """Index every batch tensor of a conditioning dict."""
    if isinstance(x, Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, dict):
        return {k: _take(v, idx) for k, v in x.items()}
    return x


def _guided_pred(
    generator: Any, x: Tensor, t: int, cond: dict, uncond: dict | None, scale: float, batch_size: int
) -> Tensor:
    outs = []
    for i in range(0, len(x), batch_size):
        sl = torch.arange(i, min(i + batch_size, len(x)))
        outs.append(
            cfg_combine(
                *generator.cfg_outputs(
                    x[i : i + batch_size], t, _take(cond, sl), None if uncond is None else _take(uncond, sl)
                ),
                scale,
            )
        )
    return torch.cat(outs)


@torch.no_grad()
def beam_search_sample(
    generator: Any,
    prompts: Sequence[str],
    evaluators: Any,
    beam_width: int = 1,
    num_candidates: int = 4,
    guidance_scale: float = 5.0,
    num_steps: int = 20,
    seeds: Sequence[int] | None = None,
    eta: float = 1.0,
    normalize: str = "none",
    batch_size: int = 64,
) -> Rollout:
    """Per-step beam search (beam_width W, num_candidates K children per particle) by a reward.

    Returns the best final particle per prompt; extras hold "scores" [B] (combined score of
    the chosen sample) and "seeds".
    """
    check_guidable(generator, "beam search")
    if eta <= 0:
        raise ValueError("beam search: eta must be > 0 (deterministic steps give identical children)")
    W, K = int(beam_width), int(num_candidates)
    if W < 1 or K < 1:
        raise ValueError(f"beam search: beam_width and num_candidates must be >= 1, got {W}, {K}")
    evals = as_evaluators(evaluators)
    if not evals:
        raise ValueError("beam search: give at least one reward")
    prompts = list(prompts)
    seeds = default_seeds(prompts, seeds)
    B = len(prompts)
    steps = generator.sampling_timesteps(num_steps)
    cond_b = generator.encode_prompt(prompts)
    uncond_b = generator.encode_prompt(prompts, negative=True) if guidance_scale != 1.0 else None
    # particles are ordered by prompt: particle p belongs to prompt p // W
    pseeds = [s * W + j for s in seeds for j in range(W)]
    owner = torch.arange(B).repeat_interleave(W)
    x = generator.initial_latents(pseeds)
    traj = x.unsqueeze(1)
    pred = None
    last_images = None
    for k, (t, t_prev) in enumerate(steps):
        cond, uncond = _take(cond_b, owner), None if uncond_b is None else _take(uncond_b, owner)
        if pred is None:
            pred = _guided_pred(generator, x, t, cond, uncond, guidance_scale, batch_size)
        child_seeds = [(s * 1_000_003 + j + 1) % 2**31 for s in pseeds for j in range(K)]
        noise = per_sample_randn([s * 7919 + k + 1 for s in child_seeds], x.shape[1:], x.device)
        xc = generator.sampler_step(pred.repeat_interleave(K, 0), x.repeat_interleave(K, 0), t, t_prev, eta, noise)
        child_owner = owner.repeat_interleave(K)
        child_prompts = [prompts[i] for i in child_owner.tolist()]
        if k + 1 < len(steps):
            t_next = steps[k + 1][0]
            cc, cu = _take(cond_b, child_owner), None if uncond_b is None else _take(uncond_b, child_owner)
            child_pred = _guided_pred(generator, xc, t_next, cc, cu, guidance_scale, batch_size)
            x0 = generator.predicted_x0(child_pred, xc, t_next)
            images = None
        else:
            child_pred, x0 = None, xc
            images = decode_all(generator.decode, xc, batch_size)  # images, or videos
        raw = score_candidates(evals, x0, child_prompts, generator.decode, batch_size, samples=images)
        scores = combine_scores(evals, raw, W * K, k / max(len(steps) - 1, 1), normalize)  # B, W*K
        keep = scores.topk(W, dim=1).indices.cpu()  # sorted: best first
        sel = (torch.arange(B).unsqueeze(1) * (W * K) + keep).flatten()
        x = xc[sel.to(xc.device)]
        pred = None if child_pred is None else child_pred[sel.to(child_pred.device)]
        parent = sel // K
        traj = torch.cat([traj[parent.to(traj.device)], x.unsqueeze(1)], 1)
        pseeds = [child_seeds[i] for i in sel.tolist()]
        final_scores = scores.gather(1, keep.to(scores.device))[:, 0]
        if images is not None:
            last_images = _index_samples(images, sel)
    best = torch.arange(B) * W  # the first kept particle of each prompt is its best
    return Rollout(
        samples=_index_samples(last_images, best),
        latents=traj[best.to(traj.device)],
        timesteps=torch.tensor([t for t, _ in steps]),
        log_probs=None,
        prompts=prompts,
        extras={"scores": final_scores.cpu(), "seeds": torch.tensor(seeds), "beam_width": W, "num_candidates": K},
    )
