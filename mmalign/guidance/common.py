"""What the inference-time samplers share: the generator hooks they need, evaluators with
timestep-dependent weights, and scoring of candidates.

A generator is guidable when it satisfies `mmalign.protocols.GuidableGenerator`: besides
`encode_prompt(prompts, negative=False)` and `decode(latents) -> Samples` it has

    sampling_timesteps(num_steps) -> [(t, t_prev), ...]   the sampler's steps, first to last
    initial_latents(seeds) -> x_T                          per-sample noise
    step_noise(seeds, step) -> noise                       for stochastic steps (eta > 0)
    cfg_outputs(x, t, cond, uncond) -> (u, c)              model outputs, one batched pass
    predicted_x0(pred, x, t) -> x̂_0                        from a (guided) output; differentiable
    sampler_step(pred, x, t, t_prev, eta, noise) -> x_prev
    alpha_sigma(t) -> (alpha, sigma)                       x_t = alpha x_0 + sigma noise
    prediction_type: "epsilon" | "v_prediction" | "flow"

`pipelines/sd.py` implements them for UNet latent diffusion (DDIM), `pipelines/flow.py` for
rectified-flow transformers (velocity outputs, x̂_0 = x_t - sigma v, alpha = 1 - sigma, the
Euler step or Flow-GRPO's SDE step at eta > 0). Every guided output is linear in (u, c): u + s (c - u) for any
parameterisation, so candidates of CFG scale cost no extra model pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmalign.protocols import GuidableGenerator, Reward, require
from mmalign.types import Rollout, Samples

# A weight: a constant, (start, end) linear in sampling progress, or a function of progress.
# Progress runs from 0 at the first (noisiest) step to 1 at the last.
Weight = float | tuple[float, float] | Callable[[float], float]


def check_guidable(generator: Any, who: str) -> None:
    """One line (a RoleError, a TypeError) unless `generator` is a GuidableGenerator."""
    require(generator, GuidableGenerator, who, f"generator {type(generator).__name__}")


def weight_at(w: Weight, progress: float) -> float:
    """The value of a weight schedule at `progress` in [0, 1]."""
    if callable(w):
        return float(w(progress))
    if isinstance(w, (tuple, list)):
        if len(w) != 2:
            raise ValueError(f"weight schedule {w!r}: expected (start, end)")
        return float(w[0]) + (float(w[1]) - float(w[0])) * progress
    return float(w)


def parse_weight(text: str, where: str = "weight") -> Weight:
    """'2' -> 2.0; '0..1' -> (0.0, 1.0), linear from the first step to the last."""
    try:
        if ".." in text:
            a, b = text.split("..", 1)
            return (float(a), float(b))
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number or START..END") from None


@dataclass
class Evaluator:
    """A scorer of candidates with a (timestep-dependent) weight.

    `fn` is a Reward (scored on the candidates' x̂_0 decoded to the generator's media: images,
    videos or audio, `space="image"`), or a callable (x̂_0 latents [N,...], prompts) -> [N] scored in latent space
    (`space="latent"`, the paper's cheap latent evaluators). Higher is better.
    """

    fn: Any
    weight: Weight = 1.0
    name: str = ""
    space: str = ""  # "image" | "latent"; default: "image" for rewards, "latent" for plain callables

    def __post_init__(self) -> None:
        if not self.space:
            self.space = "image" if isinstance(self.fn, Reward) else "latent"
        if self.space not in ("image", "latent"):
            raise ValueError(f"evaluator {self.name!r}: space must be 'image' or 'latent', got {self.space!r}")
        if (
            self.space == "image"
            and isinstance(self.fn, Reward)
            and self.fn.modality not in ("image", "video", "audio")
        ):
            raise TypeError(
                f"evaluator {self.label}: reward scores {self.fn.modality} samples, but these samplers make "
                "images, videos or audio"
            )
        if not self.name:
            self.name = getattr(self.fn, "name", None) or getattr(self.fn, "__name__", "evaluator")

    @property
    def label(self) -> str:
        return repr(self.name or getattr(self.fn, "name", "evaluator"))


def as_evaluators(items: Any) -> list[Evaluator]:
    """Evaluator | Reward | (reward, weight) | a list of those -> [Evaluator].

    A tuple of two is always one (fn, weight) pair; give several evaluators as a list."""
    if items is None:
        return []
    if not isinstance(items, list):
        items = [items]
    out = []
    for it in items:
        if isinstance(it, Evaluator):
            out.append(it)
        elif isinstance(it, tuple) and len(it) == 2:
            out.append(Evaluator(it[0], it[1]))
        else:
            out.append(Evaluator(it))
    seen: dict[str, int] = {}
    for e in out:  # scores are keyed by name: make names unique
        seen[e.name] = seen.get(e.name, 0) + 1
        if seen[e.name] > 1:
            e.name = f"{e.name}#{seen[e.name]}"
    return out


def decode_all(decode: Callable, x: Tensor, batch_size: int = 64) -> Samples:
    """`decode` over latents [N, ...] in chunks of `batch_size`, concatenated into one `Samples`
    (images, or videos for a video generator)."""
    parts = [decode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    field = {"image": "images", "video": "video"}.get(parts[0].modality)
    if field is None:
        raise TypeError(f"guided sampling decodes images or videos, got {parts[0].modality} samples")
    return Samples(**{field: torch.cat([getattr(p, field) for p in parts])})


def score_candidates(
    evaluators: Sequence[Evaluator],
    x0: Tensor,
    prompts: Sequence[str],
    decode: Callable,
    batch_size: int = 64,
    samples: Samples | None = None,
) -> dict[str, Tensor]:
    """Raw score of each evaluator on each latent x̂_0 [N,...] (prompts: N strings) -> {name: [N]}.

    Media-space evaluators (`space="image"`: rewards) see `decode(x0)` (decoded once, in chunks
    of `batch_size`, and shared: images, or videos for a video generator), or `samples` when the
    caller already has them; a reward of another modality fails in one line (`Samples.require`)."""
    out: dict[str, Tensor] = {}
    need_media = any(e.space == "image" for e in evaluators)
    if need_media and samples is None:
        samples = decode_all(decode, x0, batch_size)
    for e in evaluators:
        if e.space == "image":
            if isinstance(e.fn, Reward) and len(samples) and e.fn.modality != samples.modality:
                raise TypeError(
                    f"evaluator {e.label}: reward scores {e.fn.modality} samples, but the generator makes "
                    f"{samples.modality} samples"
                )
            s = e.fn(samples, list(prompts))
        else:
            s = e.fn(x0, list(prompts))
        s = torch.as_tensor(s).reshape(-1).float().to(x0.device)
        if len(s) != len(x0):
            raise ValueError(f"evaluator {e.label} returned {len(s)} scores for {len(x0)} candidates")
        if not torch.isfinite(s).all():
            raise ValueError(f"evaluator {e.label} returned non-finite scores")
        out[e.name] = s
    return out


def combine_scores(
    evaluators: Sequence[Evaluator],
    raw: dict[str, Tensor],
    num_candidates: int,
    progress: float,
    normalize: str = "zscore",
) -> Tensor:
    """Σ_k w_k(progress) · norm(score_k), candidates grouped per sample: raw [B*K] -> [B, K].

    normalize: "zscore" standardises each evaluator over the K candidates of a sample (so
    weights compare evaluators on different scales); "none" uses raw scores."""
    if normalize not in ("zscore", "none"):
        raise ValueError(f"normalize: expected 'zscore' or 'none', got {normalize!r}")
    total = None
    for e in evaluators:
        w = weight_at(e.weight, progress)
        s = raw[e.name].view(-1, num_candidates)
        if normalize == "zscore" and num_candidates > 1:
            s = (s - s.mean(1, keepdim=True)) / (s.std(1, unbiased=False, keepdim=True) + 1e-6)
        total = w * s if total is None else total + w * s
    return total


def cfg_combine(u: Tensor | None, c: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in the model's parameterisation: u + s (c - u) (c when s == 1)."""
    if u is None or scale == 1.0:
        return c
    return u + scale * (c - u)


def progress_of(step: int, num_steps: int) -> float:
    return step / (num_steps - 1) if num_steps > 1 else 1.0


def default_seeds(prompts: Sequence[str], seeds: Sequence[int] | None) -> list[int]:
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    return seeds


def make_rollout(
    generator: Any,
    x: Tensor,
    traj: list[Tensor],
    steps: list[tuple[int, int]],
    prompts: list[str],
    decode: bool,
    **extras: Any,
) -> Rollout:
    samples = generator.decode(x) if decode else Samples()
    return Rollout(
        samples=samples,
        latents=torch.stack(traj, 1),
        timesteps=torch.tensor([t for t, _ in steps]),
        log_probs=None,
        prompts=prompts,
        extras=extras,
    )
