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
- Trajectory methods (D3PO, DDPO/GRPO) use per-step Gaussian log-densities *averaged* over
  latent dimensions (what `Generator.rollout` stores; the reference codes' convention).
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


# --------------------------------------------------------------------------- VLM / LM family
# (appended for the VLM DPO family; the functions above are unchanged)
#
# Scores below are response log-probabilities: `logp_*` summed over response tokens,
# `avg_*` their length averages. Every function returns per-sample losses.


def simpo(avg_w: Tensor, avg_l: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free:  -log sigmoid(beta/|y_w| log pi(y_w|x)
    - beta/|y_l| log pi(y_l|x) - gamma), on length-averaged log-probs `avg_*`."""
    return -F.logsigmoid(beta * (avg_w - avg_l) - gamma)


def log_odds(avg: Tensor) -> Tensor:
    """log( P / (1 - P) ) with P = exp(avg), the length-normalised likelihood (ORPO eq. 4)."""
    return avg - torch.log1p(-torch.exp(avg).clamp(max=1 - 1e-7))


def orpo(avg_w: Tensor, avg_l: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """ORPO (Hong et al. 2024): L = L_SFT + lam * L_OR with L_SFT = -avg_w (mean token NLL of
    the chosen response) and L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)).
    Returns (per-sample loss, per-sample L_OR)."""
    l_or = -F.logsigmoid(log_odds(avg_w) - log_odds(avg_l))
    return -avg_w + lam * l_or, l_or


def kto_kl_baseline(kl_policy: Tensor, kl_ref: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over mismatched
    (x, y') pairs of the batch, detached (Ethayarajh et al. 2024, as the paper's code does)."""
    return (kl_policy - kl_ref).mean().clamp(min=0).detach()


def kto(
    logp: Tensor,
    ref_logp: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024), unpaired. r = log pi(y|x) - log pi_ref(y|x);
    desirable: lambda_D (1 - sigmoid(beta (r - z0))); undesirable: lambda_U (1 - sigmoid(beta (z0 - r)))."""
    r = logp - ref_logp
    d = desirable.to(torch.bool)
    return torch.where(
        d, lambda_d * (1 - torch.sigmoid(beta * (r - z0))), lambda_u * (1 - torch.sigmoid(beta * (z0 - r)))
    )


def mdpo(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    policy_w_corrupt: Tensor,
    ref_w_corrupt: Tensor,
    beta: float,
    anchor: float = 0.0,
) -> dict[str, Tensor]:
    """mDPO (Wang et al. 2024, "mDPO: Conditional Preference Optimization for Multimodal LLMs").

    With r(y|m) = beta (log pi(y|m,x) - log pi_ref(y|m,x)), m the image and m' a corrupted one:
      dpo    = -log sigmoid(r(y_w|m) - r(y_l|m))           (standard DPO)
      copo   = -log sigmoid(r(y_w|m) - r(y_w|m'))          (conditional: prefer the true image)
      anchor = -log sigmoid(r(y_w|m) - delta)              (anchored preference, delta = 0)
    L = dpo + copo + anchor. Returns the three per-sample terms and their sum ("loss")."""
    rw = beta * (policy_w - ref_w)
    rl = beta * (policy_l - ref_l)
    rc = beta * (policy_w_corrupt - ref_w_corrupt)
    out = {"dpo": -F.logsigmoid(rw - rl), "copo": -F.logsigmoid(rw - rc), "anchor": -F.logsigmoid(rw - anchor)}
    out["loss"] = out["dpo"] + out["copo"] + out["anchor"]
    return out


def mmdpo_beta(beta: float, delta: Tensor, w: float, k: float) -> Tensor:
    """MM-DPO's dynamic reward scaling (MM-RLHF, Zhang et al. 2025):
    beta(delta) = beta (1 + w (1 - exp(-k delta))), delta a reward-model margin r(y_w) - r(y_l)."""
    return beta * (1 + w * (1 - torch.exp(-k * delta)))


def dense_token_weights(mask: Tensor, changed: Tensor, gamma: float) -> Tensor:
    """RLHF-V's dense DPO weights (Yu et al. 2024, eq. 3): per response token 1 if unchanged
    between chosen and rejected, gamma if changed; 0 outside the response."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    return m * torch.where(changed.to(torch.bool), torch.as_tensor(gamma, dtype=m.dtype), torch.ones_like(m))


def dense_logp(token_logps: Tensor, mask: Tensor, changed: Tensor, gamma: float) -> Tensor:
    """RLHF-V's response score: log pi(y|x) = (1/N) [sum_{unchanged} log p + gamma sum_{changed} log p],
    N = |y_u| + gamma |y_c|. token_logps, mask, changed: [B, T]."""
    wts = dense_token_weights(mask, changed, gamma).to(token_logps.dtype)
    return (token_logps * wts).sum(-1) / wts.sum(-1).clamp(min=1e-8)


def povid(
    policy_w: Tensor,
    policy_lt: Tensor,
    policy_ln: Tensor,
    ref_w: Tensor,
    ref_lt: Tensor,
    ref_ln: Tensor,
    alpha: float,
    beta1: float,
    beta2: float,
) -> Tensor:
    """POVID (Zhou et al. 2024, "Aligning Modalities in Vision Large Language Models via
    Preference Fine-tuning", eq. 3):
      L = -log sigmoid( alpha log[pi(y_w|x)/pi_ref(y_w|x)]
                        - ( beta1 log[pi(y_l^t|x)/pi_ref(y_l^t|x)] + beta2 log[pi(y_l^n|x~)/pi_ref(y_l^n|x~)] ) )
    y_l^t: the hallucinated (AI-written) rejection; y_l^n: the policy's response to the noisy image x~,
    scored given x~."""
    z = alpha * (policy_w - ref_w) - (beta1 * (policy_lt - ref_lt) + beta2 * (policy_ln - ref_ln))
    return -F.logsigmoid(z)
