"""The shared preference-loss layer: pure functions on per-sample scores.

Every pairwise objective here takes per-sample scores of the preferred (w) and
dispreferred (l) sample under the policy and the reference and returns per-sample losses.
With the implicit reward margin

    Delta = (policy_w - ref_w) - (policy_l - ref_l)

- `dpo`        -log sigmoid(beta Delta)                       (Rafailov et al. 2023)
- `cdpo`       -(1-eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
               (conservative DPO: labels flipped with probability eps)
- `robust_dpo` [-(1-eps) log sigmoid(beta Delta) + eps log sigmoid(-beta Delta)] / (1 - 2 eps)
               (Chowdhury et al. 2024: unbiased under label-flip rate eps)
- `ipo`        (Delta - 1/(2 beta))^2                         (Azar et al. 2023)
- `hinge`      max(0, 1 - beta Delta)                         (SLiC-style)
- `rank`       Plackett-Luce over K >= 2 ordered candidates  (as RankDPO / LiPO use it)

Likelihood semantics (one convention for every modality):
- VLMs / LMs: score = summed token log-probability of the response (or its length
  average, where a method says so, e.g. SimPO).
- Diffusion / flow models: score = -(denoising error), the error being the *mean* over
  latent dimensions of ||target - prediction||^2 at a shared (t, noise). The ELBO
  difference is -T omega(lambda) D/2 times the summed error; beta absorbs T omega(lambda)
  and the dimension count D. Diffusion-DPO's "-beta/2 (...)" is `dpo` with beta/2 on these
  scores, so its beta = 5000 (SD1.5/SDXL) is the paper's number.
- Trajectory methods (D3PO, DDPO/GRPO) use per-step Gaussian log-densities *summed* over
  latent dimensions (what `Generator.rollout` stores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def margin(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> Tensor:
    return (policy_w - ref_w) - (policy_l - ref_l)


def dpo(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    return -F.logsigmoid(beta * margin(policy_w, policy_l, ref_w, ref_l))


def cdpo(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, eps: float) -> Tensor:
    z = beta * margin(policy_w, policy_l, ref_w, ref_l)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_dpo(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, eps: float) -> Tensor:
    if not 0 <= eps < 0.5:
        raise ValueError("robust_dpo: eps must be in [0, 0.5)")
    z = beta * margin(policy_w, policy_l, ref_w, ref_l)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    return (margin(policy_w, policy_l, ref_w, ref_l) - 1 / (2 * beta)) ** 2


def hinge(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    return torch.relu(1 - beta * margin(policy_w, policy_l, ref_w, ref_l))


def rank(scores_policy: Tensor, scores_ref: Tensor, beta: float) -> Tensor:
    """Plackett-Luce negative log-likelihood of the given order (best first), per sample.

    scores_*: [B, K], column 0 the best. With r_k = beta (policy_k - ref_k):
    L = -sum_{k<K} [ r_k - logsumexp(r_k, ..., r_K) ]. For K = 2 this is `dpo`.
    """
    r = beta * (scores_policy - scores_ref)
    # logsumexp over the suffix r_k..r_K for every k: a reversed cumulative logsumexp
    suffix = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    return -(r - suffix)[..., :-1].sum(-1)


LOSSES = {"dpo": dpo, "cdpo": cdpo, "robust_dpo": robust_dpo, "ipo": ipo, "hinge": hinge}


def pairwise(loss_type: str, policy_w, policy_l, ref_w, ref_l, beta: float, eps: float = 0.0) -> Tensor:
    """Dispatch by name (configs choose `loss_type`)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    fn = LOSSES[loss_type]
    if loss_type in ("cdpo", "robust_dpo"):
        return fn(policy_w, policy_l, ref_w, ref_l, beta, eps)
    return fn(policy_w, policy_l, ref_w, ref_l, beta)
