"""D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model", 2024): DPO on the denoising MDP's steps.

Two trajectories of one prompt start from the same initial noise x_T; a preference says
which final image is better (here: from a reward model or a judge). Every stochastic step
of the preferred trajectory is treated as a preferred action, and the per-step DPO loss is

    L_k = -log sigmoid( beta * [ clip(log rho_w,k) - clip(log rho_l,k) ] ),
    log rho_k = log p_theta(x_{k+1} | x_k, c) - log p_ref(x_{k+1} | x_k, c)

averaged over a random subset of steps (`timestep_fraction`). As in the paper's code the
reference is the policy that sampled the round (`reference: sampler`, no extra forward) and
log rho is clipped to [log(1-eps), log(1+eps)], a PPO-like trust region; `reference: base`
uses the frozen base model (LoRA disabled) instead, the textbook DPO reference.

Log-probs are summed over latent dimensions (preference.py), so log rho is not the tiny
per-dimension mean that leaves the original loss at log 2 ("loss stays 0.693"); beta is
set for sums. Pairs whose rewards differ by <= tie_threshold are ties: they contribute
nothing and are counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.methods.online import RolloutSettings, collect, train_steps
from mmalign.registry import register_method


def d3po_step_loss(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float,
                   eps: float | None) -> Tensor:
    """Per-pair loss at one step; eps=None disables the log-ratio clipping."""
    lw, ll = logp_w - ref_w, logp_l - ref_l
    if eps is not None:
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        lw, ll = lw.clamp(lo, hi), ll.clamp(lo, hi)
    return -F.logsigmoid(beta * (lw - ll))


@dataclass
class D3POConfig:
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(samples_per_prompt=2,
                                                                             same_initial_noise=True))
    beta: float = 1.0
    clip_eps: float | None = 0.5  # |log rho| <= log(1 + eps); None: no clipping
    reference: Literal["sampler", "base"] = "sampler"
    timestep_fraction: float = 0.5
    tie_threshold: float = 0.0

    def validate(self) -> None:
        if self.rollout.samples_per_prompt != 2:
            raise ValueError("rollout.samples_per_prompt: D3PO compares exactly 2 trajectories per prompt")
        if not self.rollout.same_initial_noise:
            raise ValueError("rollout.same_initial_noise: D3PO pairs start from the same noise (set true)")
        if self.rollout.eta <= 0:
            raise ValueError("rollout.eta: D3PO needs stochastic steps (eta > 0)")


class D3PO:
    online = True

    def __init__(self, cfg: D3POConfig):
        self.cfg, self.rollout = cfg, cfg.rollout

    def collect(self, generator, reward, prompts, seeds):
        ro = collect(generator, reward, prompts, seeds, self.rollout)
        r = ro.extras["rewards"].view(-1, 2)
        base = torch.arange(len(r), device=r.device) * 2
        first_wins = r[:, 0] >= r[:, 1]
        w = torch.where(first_wins, base, base + 1)
        l = torch.where(first_wins, base + 1, base)
        ok = (r[:, 0] - r[:, 1]).abs() > self.cfg.tie_threshold
        ro.extras["pairs"] = torch.stack([w[ok], l[ok]], 1)
        ro.extras["ties"] = float((~ok).sum())
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        r, p = ro.extras["rewards"], ro.extras["pairs"]
        return {"reward_mean": float(r.mean()), "pairs": float(len(p)), "ties": ro.extras["ties"]}

    def num_items(self, ro) -> int:
        return len(ro.extras["pairs"])

    def batch(self, ro, idx, seeds) -> dict:
        p = ro.extras["pairs"][torch.as_tensor(idx, device=ro.extras["pairs"].device)]
        return {"w": ro.select(p[:, 0]), "l": ro.select(p[:, 1]), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator) -> tuple[Tensor, dict[str, float]]:
        w, l = batch["w"], batch["l"]
        both = type(w).cat([w, l])
        if "cond" not in both.extras or both.extras.get("cond") is None:
            generator.condition(both)
        B = len(w)
        steps = train_steps(both.log_probs.shape[1], self.cfg.timestep_fraction, int(batch["seeds"][0]))
        total, acc, lr_abs = 0.0, 0.0, 0.0
        for k in steps:
            logp = generator.step_log_prob(both, k)  # winners and losers in one batched forward
            if self.cfg.reference == "base":
                with torch.no_grad(), generator.reference():
                    ref = generator.step_log_prob(both, k)
            else:
                ref = both.log_probs[:, k].to(logp.device)
            per = d3po_step_loss(logp[:B], logp[B:], ref[:B], ref[B:], self.cfg.beta, self.cfg.clip_eps)
            total = total + per.mean() / len(steps)
            d = ((logp[:B] - ref[:B]) - (logp[B:] - ref[B:])).detach()
            acc += float((d > 0).float().mean()) / len(steps)
            lr_abs += float((logp - ref).detach().abs().mean()) / len(steps)
        return total, {"implicit_acc": acc, "abs_log_ratio": lr_abs}


@register_method("d3po", D3POConfig)
def build_d3po(cfg: D3POConfig) -> D3PO:
    """D3PO: per-step DPO on trajectory pairs from the same initial noise."""
    return D3PO(cfg)
