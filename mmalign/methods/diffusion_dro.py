"""Diffusion-DRO (Wu et al., "Ranking-based Preference Optimization for Diffusion Models
from Implicit User Feedback", NeurIPS 2025): max-margin inverse RL as a denoising ranking.

Offline expert images x0^E (human-preferred / demonstrations) are ranked above online
samples of the policy at the same timestep t, measured by the improvement of the denoising
error over the reference:

    d = [e_theta(x^E_t) - e_ref(x^E_t)] - [e_theta(x^P_t) - e_ref(x^P_t)]
    L = max(0, d + margin)

where e(x, target) = mean over latent dimensions of ||eps_model(x_t, t, c) - target||^2,
x^E_t = sqrt(a_t) x0^E + sqrt(1 - a_t) eps (fresh eps, target eps), and x^P_t is the policy's
own latent at a random step k (timestep t = t_k) of a sampled trajectory. The policy term's
target (`policy_target`):
- `sampler_prediction` (default; the paper's code, basiclab/DiffusionDRO train.py with
  misc/buffer.py): the sampler's own noise prediction at that step, eps^P = the (guided)
  eps_sampler(x^P_t, t, c) the sampler stepped with. The code's replay buffer stores it from
  the pipeline's step callback (`noise_pred`) next to x^P_t and t.
- `final_sample`: eps^P = (x^P_t - sqrt(a_t) x0^P) / sqrt(1 - a_t), rebuilt from the
  trajectory's final sample x0^P (the noise that would put x0^P at x^P_t); not the paper's.
The policy samples live in a buffer refreshed every round (`rollout.steps_per_round`
optimizer steps) by the current policy; the round's sampler walks the generator's own
steps (DDIM with eta, CFG at `rollout.guidance_scale`) and keeps each step's prediction.
The paper's code differs there: its buffer sampler is DPM-Solver++ at guidance 1.0 on
timesteps shifted by a random offset per trajectory, and its buffer is a FIFO of the last
`buffer_size` trajectories, refreshed at every forward/backward pass by a copy of the policy
synced every 16 passes (one optimizer step at its default gradient accumulation of 16).

Experts (required): a registered expert source `prefix:name` (mmalign.sources; the toy world's
`toy:render` draws the correct scene for each caption), or a JSONL manifest of {prompt,
image} (paths relative to the manifest), read once and VAE-encoded when first needed.
No reward model is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from mmalign import sources
from mmalign.config import num
from mmalign.guidance.common import cfg_combine, make_rollout
from mmalign.methods.online import RolloutSettings
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method
from mmalign.types import Rollout, per_sample_randint, per_sample_randn


def dro_loss(
    err_expert: Tensor, ref_expert: Tensor, err_policy: Tensor, ref_policy: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """Per-sample hinge loss and the ranking difference d (negative = expert ranked above)."""
    d = (err_expert - ref_expert) - (err_policy - ref_policy)
    return torch.relu(d + margin), d


@torch.no_grad()
def sample_with_predictions(generator, prompts: list[str], seeds: list[int], rs: RolloutSettings) -> Rollout:
    """A trajectory per prompt, walking the steps `generator.rollout` walks (same x_T, noise and
    CFG), that also keeps the sampler's guided noise prediction at every step:
    extras["eps"][:, k] = u + s (c - u) at (latents[:, k], timesteps[k]) (epsilon models)."""
    steps = generator.sampling_timesteps(rs.num_steps)
    cond = generator.encode_prompt(prompts)
    uncond = generator.encode_prompt(prompts, negative=True) if rs.guidance_scale != 1.0 else None
    x = generator.initial_latents(seeds)
    traj, eps = [x], []
    for k, (t, t_prev) in enumerate(steps):
        pred = cfg_combine(*generator.cfg_outputs(x, t, cond, uncond), rs.guidance_scale)
        eps.append(pred)
        noise = generator.step_noise(seeds, k) if rs.eta > 0 else None
        x = generator.sampler_step(pred, x, t, t_prev, rs.eta, noise)
        traj.append(x)
    return make_rollout(generator, x, traj, steps, list(prompts), False, eps=torch.stack(eps, 1))


def policy_target(ro: Rollout, k: Tensor, alphas_cumprod: Tensor, mode: str) -> Tensor:
    """The noise target of the policy sample at step k[i] of trajectory i (see the module docstring):
    the sampler's prediction (`sampler_prediction`) or (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t) with x_0
    the trajectory's final latent (`final_sample`); a_t = alphas_cumprod[timesteps[k]]."""
    rows = torch.arange(len(ro), device=ro.latents.device)
    k = k.to(ro.latents.device)
    if mode == "sampler_prediction":
        if "eps" not in ro.extras:
            raise ValueError(
                "diffusion_dro: policy_target sampler_prediction needs the sampler's predictions "
                "(extras['eps']); this buffer was collected without them"
            )
        return ro.extras["eps"][rows, k].float()
    a = alphas_cumprod.to(ro.latents.device)[ro.timesteps.to(k.device)[k]].float().view(-1, 1, 1, 1)
    x_t, x0 = ro.latents[rows, k].float(), ro.latents[:, -1].float()
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


@dataclass
class DiffusionDROConfig:
    experts: str  # a registered expert source "prefix:name" (e.g. toy:render) or a JSONL manifest of {prompt, image}
    rollout: RolloutSettings = field(
        default_factory=lambda: RolloutSettings(samples_per_prompt=1, eta=0.0, guidance_scale=1.0)
    )
    margin: float = num(0.001, ge=0)
    expert_seed: int = num(0, ge=0)
    # sampler_prediction: the sampler's own noise prediction at the step (the paper's code);
    # final_sample: the noise rebuilt from the trajectory's final latent
    policy_target: Literal["sampler_prediction", "final_sample"] = "sampler_prediction"

    def validate(self) -> None:
        if sources.is_spec(self.experts) and not Path(self.experts).is_file():
            try:
                sources.lookup("expert_source", self.experts)
            except sources.SourceError as e:
                raise ValueError(f"experts: {e}") from None
        elif not Path(self.experts).is_file():
            raise ValueError(f"experts: {self.experts} not found")
        if self.margin < 0:
            raise ValueError(f"margin: must be >= 0, got {self.margin}")


class DiffusionDRO:
    generator_role = DiffusionGenerator
    needs_reward = False

    def __init__(self, cfg: DiffusionDROConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self._manifest: dict[str, list[Path]] | None = None

    def _expert_images(self, prompts: list[str], seeds: list[int]) -> Tensor:
        from mmalign.media import load_image, pil_to_tensor

        if sources.is_spec(self.cfg.experts) and not Path(self.cfg.experts).is_file():
            render = sources.lookup("expert_source", self.cfg.experts)  # fn(prompt, seed) -> PIL image
            return torch.stack(
                [pil_to_tensor(render(p, self.cfg.expert_seed * 100_003 + s)) for p, s in zip(prompts, seeds)]
            )
        if self._manifest is None:
            path = Path(self.cfg.experts)
            self._manifest = {}
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._manifest.setdefault(row["prompt"], []).append(path.parent / row["image"])
        out = []
        for p, s in zip(prompts, seeds):
            if p not in self._manifest:
                raise ValueError(f"{self.cfg.experts}: no expert image for prompt {p!r}")
            choices = self._manifest[p]
            out.append(load_image(choices[s % len(choices)]))
        return torch.stack(out)

    @torch.no_grad()
    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds) -> Rollout:
        rs = self.rollout
        check_epsilon(generator)
        rep = [p for p in prompts for _ in range(rs.samples_per_prompt)]
        sample_seeds = [s * 1009 + j for s in seeds for j in range(rs.samples_per_prompt)]
        if self.cfg.policy_target == "sampler_prediction":
            ro = sample_with_predictions(generator, rep, sample_seeds, rs)
        else:
            ro = generator.rollout(
                rep,
                num_steps=rs.num_steps,
                guidance_scale=rs.guidance_scale,
                eta=rs.eta,
                seeds=sample_seeds,
                need_log_probs=False,
                decode=False,
            )
        images = self._expert_images(rep, sample_seeds)
        ro.extras["expert_x0"] = generator.encode_images(images, sample_seeds)
        ro.extras["rewards"] = torch.zeros(len(rep))  # no reward model: for the round metrics only
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        return {"policy_samples": float(len(ro))}

    def num_items(self, ro) -> int:
        return len(ro)

    def batch(self, ro, idx, seeds) -> dict:
        return {"rollout": ro.select(idx), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        check_epsilon(generator)
        ro, seeds = batch["rollout"], batch["seeds"]
        dev = generator.device
        T = len(ro.timesteps)
        k = per_sample_randint(seeds, 0, T, salt=3)
        t = ro.timesteps[k].to(dev)
        a = generator.train_scheduler.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
        rows = torch.arange(len(ro))
        x_p = ro.latents[rows, k].to(dev).float()
        eps_p = policy_target(ro, k, generator.train_scheduler.alphas_cumprod, self.cfg.policy_target).to(dev)
        x0_e = ro.extras["expert_x0"].to(dev).float()
        eps_e = per_sample_randn(seeds, x0_e.shape[1:], dev)
        x_e = a.sqrt() * x0_e + (1 - a).sqrt() * eps_e
        cond = generator.encode_prompt(ro.prompts)
        cond2 = generator.cat_cond(cond, cond)
        x, eps, tt = torch.cat([x_e, x_p]), torch.cat([eps_e, eps_p]), torch.cat([t, t])

        def errors():
            pred = generator.model_output(x, tt, cond2)
            return (pred - eps).pow(2).flatten(1).mean(1)

        e_e, e_p = errors().chunk(2)
        with torch.no_grad(), generator.reference():
            r_e, r_p = errors().chunk(2)
        losses, d = dro_loss(e_e, r_e, e_p, r_p, self.cfg.margin)
        return losses.mean(), {
            "rank_acc": float((d.detach() < 0).float().mean()),
            "d": float(d.detach().mean()),
            "mse_expert": float(e_e.detach().mean()),
            "mse_policy": float(e_p.detach().mean()),
        }


def check_epsilon(generator) -> None:
    if generator.prediction_type != "epsilon":
        raise ValueError(
            "diffusion_dro: implemented for epsilon-prediction models (the paper's code trains "
            f"SD 1.5 / SDXL), got prediction_type {generator.prediction_type!r}"
        )


@register_method("diffusion_dro", DiffusionDROConfig)
def build_diffusion_dro(cfg: DiffusionDROConfig) -> DiffusionDRO:
    """Diffusion-DRO: hinge ranking of offline experts above online policy samples."""
    return DiffusionDRO(cfg)
