"""Reward-guided latent consistency distillation (RG-LCD): Li et al., "Reward Guided Latent
Consistency Distillation" (2024), on latent consistency distillation (LCD) from Luo et al.,
"Latent Consistency Models" (2023).

A student consistency model f_theta(z, w, c, t) = c_skip(t) z + c_out(t) x0_theta(z, w, c, t)
(x0_theta from the UNet's output as the parameterisation says; w enters the UNet as a
guidance-scale embedding, `time_cond_proj_dim`) is distilled from a frozen teacher latent
diffusion model. For a data latent z_0, a solver index n with t_{n+k} = (n+1) k - 1 on the
skipping-step grid (k = `skip`, e.g. 20 of 1000), a CFG scale s ~ U[s_min, s_max] and noise:

    z_{n+k}  = alpha(t_{n+k}) z_0 + sigma(t_{n+k}) eps
    zhat_n   = DDIM(z_{n+k}, t_{n+k} -> t_n) with the teacher's CFG estimates
               x0_s = x0_u + s (x0_c - x0_u),  eps_s = eps_u + s (eps_c - eps_u),
               zhat_n = sqrt(abar(t_n)) x0_s + sqrt(1 - abar(t_n)) eps_s,   t_n = max(t_{n+k} - k, 0)
    L_CD     = d( f_theta(z_{n+k}, s, c, t_{n+k}),  f_theta^-(zhat_n, s, c, t_n) )
    d(x, y)  = mean( sqrt((x - y)^2 + c^2) - c )          (pseudo-Huber, c = `huber_c`)
    c_skip(t) = sigma_d^2 / ((t tau)^2 + sigma_d^2),  c_out(t) = t tau / sqrt((t tau)^2 + sigma_d^2)

with sigma_d = 0.5, tau = `timestep_scaling` (10, as diffusers' LCMScheduler), theta^- an EMA of
theta (`target_decay`), and the CFG scale in the Imagen / diffusers convention (s = 1 + LCM's w;
the student embeds s - 1, as LatentConsistencyModelPipeline does at inference). RG-LCD adds

    L = L_CD - beta * R( f_theta(z_{n+k}, s, c, t_{n+k}), c )        (beta = `reward_weight`)

on the student's one-step generation, with R either (a) `reward_path: expert` -- the
differentiable expert reward of the VAE-decoded latent -- or (b) `reward_path: lrm` -- a latent
proxy reward model (LRM) on latents, trained online after every optimizer step to match the
expert's preferences among each prompt's candidates {student one-step output, target output,
data latent}: for every candidate pair (i, j)

    L_LRM = mean_pairs KL( softmax([r_i, r_j] / T) || softmax([g_i, g_j]) )
            (`lrm.loss: distillation`; `cross_entropy`: CE on the expert's argmax)

with r the expert reward, g the LRM's score and T = `lrm.temperature`. The LRM thus learns
r / T up to a per-prompt constant, so the reward term uses R = T g: `reward_weight` then means
the same for both paths. The paper shows (b) avoids the high-frequency artefacts that
optimising (a) through the decoder produces.

Data: this is an online method that needs prompts only. Each round the frozen teacher samples
the round's prompts (DDIM, `rollout.num_steps`, `rollout.guidance_scale`) and those latents are
the z_0 that get noised (the paper uses an image-text dataset's latents instead).
The student starts as the teacher plus a zero-initialised guidance embedding (so it equals the
teacher at step 0); it trains in full (`generator.finetune: full`); the teacher is the
generator's frozen reference copy. The result is saved as a whole diffusers pipeline with an
LCMScheduler (`original_inference_steps` = 1000 / k), which StableDiffusionPipeline,
LatentConsistencyModelPipeline and the `sd` generator (1-, 2-, 4-step sampling) load.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.config import num
from mmalign.methods.online import RolloutSettings
from mmalign.pipelines.sd import LatentDiffusionGenerator, guidance_scale_embedding
from mmalign.protocols import DiffusionGenerator, Reward
from mmalign.registry import register_method
from mmalign.types import Rollout, Samples, per_sample_randint, per_sample_randn

SIGMA_DATA = 0.5


# --------------------------------------------------------------------------- pure functions
def boundary_scalings(
    t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA
) -> tuple[Tensor, Tensor]:
    """LCM's c_skip(t), c_out(t): c_skip(0) = 1, c_out(0) = 0 (the boundary condition f(z, 0) = z)."""
    st = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(pred: Tensor, x: Tensor, abar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a model output at per-sample alpha-bar `abar` [B] (x = sqrt(abar) x0 + sqrt(1-abar) eps)."""
    a, s = _bcast(abar.sqrt(), x), _bcast((1 - abar).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - s * pred) / a, pred
    if prediction_type == "v_prediction":
        return a * x - s * pred, a * pred + s * x
    if prediction_type == "sample":
        return pred, (x - a * pred) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def consistency_output(
    pred: Tensor, x: Tensor, t: Tensor, abar: Tensor, prediction_type: str, timestep_scaling: float = 10.0
) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(pred)."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    x0, _ = x0_and_eps(pred, x, abar, prediction_type)
    return _bcast(c_skip, x) * x + _bcast(c_out, x) * x0


def teacher_ddim_step(
    pred_uncond: Tensor,
    pred_cond: Tensor,
    x: Tensor,
    scale: Tensor,
    abar: Tensor,
    abar_prev: Tensor,
    prediction_type: str,
) -> Tensor:
    """One skipping-step DDIM (eta=0) step of the teacher with CFG scale `scale` [B] per sample."""
    x0_u, eps_u = x0_and_eps(pred_uncond, x, abar, prediction_type)
    x0_c, eps_c = x0_and_eps(pred_cond, x, abar, prediction_type)
    s = _bcast(scale, x)
    x0 = x0_u + s * (x0_c - x0_u)
    eps = eps_u + s * (eps_c - eps_u)
    return _bcast(abar_prev.sqrt(), x) * x0 + _bcast((1 - abar_prev).sqrt(), x) * eps


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Per-sample mean over elements of sqrt((x - y)^2 + c^2) - c (as LCM's distillation uses it)."""
    return (((x - y) ** 2 + c * c).sqrt() - c).flatten(1).mean(1)


def lrm_loss(scores: Tensor, expert: Tensor, temperature: float, kind: str = "distillation") -> tuple[Tensor, Tensor]:
    """Pairwise preference loss of latent-reward scores [B, K] against expert rewards [B, K].

    For each pair i < j: distillation = KL(softmax([r_i, r_j]/T) || softmax([g_i, g_j])) averaged
    over the batch; cross_entropy = CE([g_i, g_j], argmax(r_i, r_j)). Returns (mean over pairs,
    pairwise accuracy of the scores' ordering against the expert's; ties count one half).
    """
    if scores.shape != expert.shape or scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"lrm_loss: scores {tuple(scores.shape)} and expert {tuple(expert.shape)} must be B,K (K>=2)")
    losses, accs = [], []
    K = scores.shape[1]
    for i in range(K):
        for j in range(i + 1, K):
            logits = torch.stack([scores[:, i], scores[:, j]], 1)
            r = torch.stack([expert[:, i], expert[:, j]], 1).to(logits.dtype)
            logq = F.log_softmax(logits, 1)
            if kind == "distillation":
                p = F.softmax(r / temperature, 1)
                losses.append((torch.xlogy(p, p) - p * logq).sum(1).mean())
            elif kind == "cross_entropy":
                losses.append(F.nll_loss(logq, r.argmax(1)))
            else:
                raise ValueError(f"lrm_loss: unknown kind {kind!r} (distillation, cross_entropy)")
            with torch.no_grad():
                d_s, d_r = torch.sign(scores[:, i] - scores[:, j]), torch.sign(expert[:, i] - expert[:, j])
                accs.append(torch.where(d_r == 0, 0.5, (d_s == d_r).float()).mean())
    return torch.stack(losses).mean(), torch.stack(accs).mean()


def _per_sample_uniform(seeds: Sequence[int], salt: int) -> Tensor:
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 1_000_003 + salt)
        out.append(float(torch.rand(1, generator=g)))
    return torch.tensor(out)


# --------------------------------------------------------------------------- latent reward model
class LatentRewardModel(nn.Module):
    """A small prompt-conditional reward model on (scaled) latents: a conv tower pooled to a
    4x4 grid (keeps where things are), the prompt's mean text-encoder state, and an MLP on
    [image, text, image * text] features -> one score per sample."""

    def __init__(self, latent_channels: int, text_dim: int, width: int = 64):
        super().__init__()
        self.tower = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 2 * width),
        )
        self.text = nn.Linear(text_dim, 2 * width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(6 * width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, latents: Tensor, text_features: Tensor) -> Tensor:
        h = self.tower(latents.float())
        u = self.text(text_features.float())
        return self.head(torch.cat([h, u, h * u], 1)).squeeze(1)


def text_features(cond: dict) -> Tensor:
    """The prompt summary the LRM reads: the mean over tokens of the text encoder's states."""
    return cond["encoder_hidden_states"].float().mean(1)


# --------------------------------------------------------------------------- the student in the generator
def install_student(generator: LatentDiffusionGenerator, student: nn.Module, scheduler: Any) -> None:
    """Train `student` in place of the generator's UNet (`generator.finetune: full`); `reference()`
    stays the loaded UNet, the teacher. With the LCMScheduler set, the generator's `rollout` samples
    the student with LCM multistep sampling and `save_trained` writes a whole pipeline."""
    generator.unet = generator.pipe.unet = student
    trained = generator._trained  # the generator's TrainedModule: what trains and what forwards
    trained.module = trained.forward_module = student
    generator.lcm_scheduler = scheduler


# --------------------------------------------------------------------------- config + method
@dataclass
class LRMSettings:
    width: int = num(64, ge=1)
    lr: float = num(1e-3, gt=0)
    temperature: float = num(0.01, gt=0)  # T: the expert's pairwise preference is softmax(r / T)
    loss: Literal["distillation", "cross_entropy"] = "distillation"
    warmup_steps: int = num(0, ge=0)  # optimizer steps during which the LRM trains but the reward term is off

    def validate(self) -> None:
        if self.temperature <= 0 or self.lr <= 0 or self.width < 1:
            raise ValueError("lrm: temperature, lr and width must be positive")


@dataclass
class RGLCDConfig:
    # teacher samples per round (the data latents z_0); eta 0 = deterministic DDIM
    rollout: RolloutSettings = field(
        default_factory=lambda: RolloutSettings(
            prompts_per_round=32, samples_per_prompt=1, num_steps=20, guidance_scale=4.0, eta=0.0, steps_per_round=4
        )
    )
    skip: int = num(20, ge=1)  # k: the teacher's skipping-step DDIM solver jumps k training timesteps
    guidance_range: list[float] = num(default_factory=lambda: [2.0, 8.0], ge=0)  # CFG scale s ~ U[min, max]
    time_cond_proj_dim: int = num(256, ge=1)  # the student's guidance-embedding width
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = num(0.001, gt=0)
    timestep_scaling: float = num(10.0, gt=0)
    target_decay: float = num(0.95, ge=0, lt=1)  # EMA decay of the target network theta^-
    reward_weight: float = num(1.0, ge=0)  # beta; 0 = plain latent consistency distillation (no reward needed)
    reward_path: Literal["lrm", "expert"] = "lrm"
    lrm: LRMSettings = field(default_factory=LRMSettings)

    def validate(self) -> None:
        if self.skip < 1:
            raise ValueError("skip: must be >= 1")
        if len(self.guidance_range) != 2 or not 1.0 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise ValueError(f"guidance_range: expected [min, max] with 1 <= min <= max, got {self.guidance_range}")
        if self.time_cond_proj_dim < 2:
            raise ValueError("time_cond_proj_dim: must be >= 2")
        if self.huber_c <= 0:
            raise ValueError("huber_c: must be positive")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError("target_decay: must be in [0, 1)")
        if self.reward_weight < 0:
            raise ValueError("reward_weight: must be >= 0 (0 disables the reward term)")
        if self.rollout.samples_per_prompt < 1:
            raise ValueError("rollout.samples_per_prompt: must be >= 1")


class RGLCD:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: RGLCDConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.target: nn.Module | None = None
        self.lrm: LatentRewardModel | None = None
        self.lrm_opt: torch.optim.Optimizer | None = None
        self.reward = None
        self.num_updates = 0
        self._candidates: list[dict] = []

    @property
    def needs_reward(self) -> bool:
        return self.cfg.reward_weight > 0

    @property
    def uses_lrm(self) -> bool:
        return self.cfg.reward_weight > 0 and self.cfg.reward_path == "lrm"

    # ------------------------------------------------------------------ set-up (trainer hook)
    def setup(self, generator: DiffusionGenerator, reward) -> None:
        """Install the student (teacher + zero-initialised guidance embedding) and build the
        target network and, for `reward_path: lrm`, the latent reward model."""
        from diffusers import LCMScheduler, UNet2DConditionModel

        if not isinstance(generator, LatentDiffusionGenerator):
            raise ValueError(
                f"method rg_lcd: generator {type(generator).__name__} is not a UNet latent diffusion "
                "model (use generator.name=sd)"
            )
        if generator.cfg.finetune != "full":
            raise ValueError(
                "method rg_lcd: distils a whole student UNet; set generator.finetune=full "
                f"(got {generator.cfg.finetune!r})"
            )
        teacher = generator.unet
        if teacher.config.get("time_cond_proj_dim") is not None:
            raise ValueError(
                "method rg_lcd: the generator's UNet already has a guidance embedding "
                "(time_cond_proj_dim); distil from an ordinary diffusion model"
            )
        T = generator.num_train_timesteps
        if T % self.cfg.skip:
            raise ValueError(f"method rg_lcd: skip={self.cfg.skip} must divide num_train_timesteps={T}")
        if self.needs_reward:
            if reward is None:
                raise ValueError("method rg_lcd: reward_weight > 0 needs a `reward:` (the expert reward)")
            if self.cfg.reward_path == "expert" and not (isinstance(reward, Reward) and reward.differentiable):
                raise ValueError(
                    f"method rg_lcd: reward_path=expert backpropagates through the reward, but reward "
                    f"{getattr(reward, 'name', reward)!r} is not differentiable (use reward_path=lrm)"
                )
        self.reward = reward
        student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=self.cfg.time_cond_proj_dim)
        res = student.load_state_dict(teacher.state_dict(), strict=False)
        if res.unexpected_keys or set(res.missing_keys) != {"time_embedding.cond_proj.weight"}:
            raise ValueError(
                f"method rg_lcd: could not initialise the student from the teacher "
                f"(missing {res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]})"
            )
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()  # the student starts as the teacher
        student.to(generator.device).requires_grad_(True).train()  # built in float32
        scheduler = LCMScheduler.from_config(
            generator.pipe.scheduler.config,
            original_inference_steps=T // self.cfg.skip,
            timestep_scaling=self.cfg.timestep_scaling,
            clip_sample=False,
            thresholding=False,
        )
        install_student(generator, student, scheduler)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.alphas_cumprod = generator.train_scheduler.alphas_cumprod.detach().cpu().float()
        if self.uses_lrm:
            dim = text_features(generator.encode_prompt([""])).shape[-1]
            self.lrm = LatentRewardModel(student.config.in_channels, dim, self.cfg.lrm.width).to(generator.device)
            self.lrm.requires_grad_(False)
            self.lrm_opt = torch.optim.AdamW(self.lrm.parameters(), lr=self.cfg.lrm.lr)

    # ------------------------------------------------------------------ rounds (teacher data)
    @torch.no_grad()
    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds, batch_size: int = 64) -> Rollout:
        """The round's data latents: teacher DDIM samples of every prompt (and, for the LRM,
        their expert rewards)."""
        rs, G = self.rollout, self.rollout.samples_per_prompt
        rep = [p for p in prompts for _ in range(G)]
        sample_seeds = [s * 1009 + j for s in seeds for j in range(G)]
        x0, rewards = [], []
        with generator.reference():  # the frozen teacher, sampling with DDIM
            for i in range(0, len(rep), batch_size):
                sl = slice(i, i + batch_size)
                ro = generator.rollout(
                    rep[sl],
                    num_steps=rs.num_steps,
                    guidance_scale=rs.guidance_scale,
                    eta=rs.eta,
                    seeds=sample_seeds[sl],
                    need_log_probs=False,
                    decode=False,
                )
                x0.append(ro.latents[:, -1])
                if self.uses_lrm:
                    rewards.append(reward(generator.decode(ro.latents[:, -1]), rep[sl]).float())
        extras = {"guidance_scale": rs.guidance_scale}
        if rewards:
            extras["rewards"] = torch.cat(rewards)
        return Rollout(
            samples=Samples(),
            latents=torch.cat(x0)[:, None],
            timesteps=ro.timesteps,
            log_probs=None,
            prompts=rep,
            extras=extras,
        )

    def round_metrics(self, ro: Rollout) -> dict[str, float]:
        out = {"teacher_samples": float(len(ro))}
        if "rewards" in ro.extras:
            out["reward_mean"] = float(ro.extras["rewards"].mean())
        return out

    def num_items(self, ro: Rollout) -> int:
        return len(ro)

    def batch(self, ro: Rollout, idx, seeds) -> dict:
        sel = torch.as_tensor(idx, device=ro.latents.device)
        out = {"prompts": [ro.prompts[i] for i in idx], "latents": ro.latents[sel, -1], "seeds": torch.as_tensor(seeds)}
        if "rewards" in ro.extras:
            out["rewards"] = ro.extras["rewards"][sel.to(ro.extras["rewards"].device)]
        return out

    # ------------------------------------------------------------------ the objective
    def draws(self, seeds: Sequence[int], shape, device) -> dict[str, Tensor]:
        """Per-sample randomness of one micro-batch: solver index, timesteps, CFG scale, noise."""
        k, T = self.cfg.skip, len(self.alphas_cumprod)
        n = per_sample_randint(seeds, 0, T // k, salt=11)
        t_start = (n + 1) * k - 1
        lo, hi = self.cfg.guidance_range
        return {
            "t_start": t_start,
            "t_end": (t_start - k).clamp(min=0),
            "scale": lo + (hi - lo) * _per_sample_uniform(seeds, salt=13),
            "noise": per_sample_randn(seeds, shape, device),
        }

    def distillation_terms(self, batch: dict, generator) -> dict[str, Tensor]:
        """Student output f_theta(z_{n+k}), its target f_theta^-(zhat_n) and the pieces between."""
        x0 = batch["latents"].to(generator.device).float()
        prompts, dev, ptype = batch["prompts"], x0.device, generator.prediction_type
        d = self.draws(batch["seeds"].tolist(), x0.shape[1:], dev)
        ac = self.alphas_cumprod
        abar, abar_prev = ac[d["t_start"]], ac[d["t_end"]]
        t_start, t_end = d["t_start"].to(dev), d["t_end"].to(dev)
        x_t = _bcast(abar.sqrt(), x0) * x0 + _bcast((1 - abar).sqrt(), x0) * d["noise"]
        cond = generator.encode_prompt(prompts)
        w_emb = guidance_scale_embedding(d["scale"] - 1.0, self.cfg.time_cond_proj_dim).to(dev)
        pred = generator.model_output(x_t, t_start, cond, timestep_cond=w_emb)
        student = consistency_output(pred, x_t, d["t_start"], abar, ptype, self.cfg.timestep_scaling)
        with torch.no_grad():
            uncond = generator.encode_prompt(prompts, negative=True)
            with generator.reference():
                u, c = generator.model_output(
                    torch.cat([x_t, x_t]), torch.cat([t_start, t_start]), generator.cat_cond(uncond, cond)
                ).chunk(2)
            x_prev = teacher_ddim_step(u, c, x_t, d["scale"], abar, abar_prev, ptype)
            kw = {"added_cond_kwargs": cond["added_cond_kwargs"]} if "added_cond_kwargs" in cond else {}
            tpred = self.target(
                x_prev, t_end, encoder_hidden_states=cond["encoder_hidden_states"], timestep_cond=w_emb, **kw
            ).sample.float()
            target = consistency_output(tpred, x_prev, d["t_end"], abar_prev, ptype, self.cfg.timestep_scaling)
        return {"student": student, "target": target, "x_prev": x_prev, "x_t": x_t, "x0": x0, "cond": cond, **d}

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        terms = self.distillation_terms(batch, generator)
        student, target = terms["student"], terms["target"]
        if self.cfg.loss == "huber":
            per = pseudo_huber(student, target, self.cfg.huber_c)
        else:
            per = (student - target).pow(2).flatten(1).mean(1)
        loss = per.mean()
        metrics = {"distill": float(loss.detach())}
        if self.needs_reward:
            r = self.reward_of(student, batch["prompts"], terms["cond"], generator)
            metrics["reward"] = float(r.detach().mean())
            if self.num_updates >= self.cfg.lrm.warmup_steps or not self.uses_lrm:
                loss = loss - self.cfg.reward_weight * r.mean()
        if self.uses_lrm:
            self._candidates.append(
                {
                    "student": student.detach(),
                    "target": target,
                    "x0": terms["x0"],
                    "prompts": list(batch["prompts"]),
                    "text": text_features(terms["cond"]),
                    "x0_reward": batch["rewards"].to(student.device),
                }
            )
        return loss, metrics

    def reward_of(self, latents: Tensor, prompts: list[str], cond: dict, generator) -> Tensor:
        """R of one-step generations: the LRM on latents, or the expert on decoded images."""
        if self.cfg.reward_path == "lrm":  # T g estimates the expert's r (the LRM learns r / T)
            return self.cfg.lrm.temperature * self.lrm(latents, text_features(cond))
        return self.reward(generator.decode(latents), prompts).float()

    # ------------------------------------------------------------------ after each optimizer step (trainer hook)
    def after_step(self, generator: DiffusionGenerator) -> dict[str, float]:
        """EMA update of the target network; one latent-reward-model step on this step's candidates."""
        d = self.cfg.target_decay
        with torch.no_grad():
            for pt, ps in zip(self.target.parameters(), generator.trainable().parameters()):
                pt.mul_(d).add_(ps.detach().to(pt.dtype), alpha=1 - d)
        self.num_updates += 1
        if not self.uses_lrm or not self._candidates:
            return {}
        c = {
            k: torch.cat([x[k] for x in self._candidates])
            if k != "prompts"
            else [p for x in self._candidates for p in x[k]]
            for k in self._candidates[0]
        }
        self._candidates = []
        with torch.no_grad():  # the expert's view of the two generated candidates
            r = [self.reward(generator.decode(c[k]), c["prompts"]).float() for k in ("student", "target")]
        expert = torch.stack([r[0], r[1], c["x0_reward"].float()], 1)
        lat = torch.stack([c["student"], c["target"], c["x0"]], 1)
        B, K = lat.shape[:2]
        self.lrm.requires_grad_(True)
        scores = self.lrm(lat.flatten(0, 1), c["text"].repeat_interleave(K, 0)).view(B, K)
        loss, acc = lrm_loss(scores, expert, self.cfg.lrm.temperature, self.cfg.lrm.loss)
        self.lrm_opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.lrm.parameters():  # keep the replicas identical
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        self.lrm_opt.step()
        self.lrm.requires_grad_(False)
        return {"lrm_loss": float(loss.detach()), "lrm_acc": float(acc), "expert_reward_student": float(r[0].mean())}

    # ------------------------------------------------------------------ checkpoint state (trainer hook)
    def state_dict(self) -> dict:
        out = {
            "target": {k: v.detach().cpu() for k, v in self.target.state_dict().items()},
            "num_updates": self.num_updates,
        }
        if self.lrm is not None:
            out["lrm"] = {k: v.detach().cpu() for k, v in self.lrm.state_dict().items()}
            out["lrm_opt"] = self.lrm_opt.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        self.num_updates = int(state["num_updates"])
        if self.lrm is not None:
            if "lrm" not in state:
                raise ValueError("rg_lcd checkpoint has no latent reward model (was it trained with reward_path=lrm?)")
            self.lrm.load_state_dict(state["lrm"])
            self.lrm_opt.load_state_dict(state["lrm_opt"])


@register_method("rg_lcd", RGLCDConfig)
def build_rg_lcd(cfg: RGLCDConfig) -> RGLCD:
    """Reward-guided latent consistency distillation (LCD + expert or latent-proxy reward)."""
    return RGLCD(cfg)
