"""Generator adapter for UNet latent diffusion: Stable Diffusion 1.x / 2.x and SDXL.

Loads a diffusers pipeline from a hub id or a local directory, fine-tunes the UNet with
LoRA (peft) or fully, and plays the DiffusionGenerator and GuidableGenerator roles
(`mmalign.protocols`):

- `denoise_error(x0, cond, t, noise)`: per-sample mean over latent dimensions of
  ||target - model(x_t, t, c)||^2 (target = eps, or v for v-prediction models).
- `rollout(prompts, ...)`: DDIM sampling with eta and classifier-free guidance, returning
  every latent x_T..x_0, the timesteps, and per-step log p(x_{t-1} | x_t, c) of the
  stochastic DDIM step (Song et al., "Denoising Diffusion Implicit Models", eq. 12, as
  DDPO (Black et al.) uses it). Log-probs are Gaussian log-densities *averaged* over latent
  dimensions, as ddpo-pytorch's `ddim_step_with_logprob` returns them (computed in float64,
  `mmalign.types.step_gaussian_log_prob`).
- `reference()`: the frozen reference policy. With LoRA the adapters are disabled (no
  second model); with full fine-tuning a frozen copy is made once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import check_hub_model, num
from mmalign.pipelines.common import DTYPES, LoraSettings, TrainedAdapterMixin, TrainedModule
from mmalign.registry import register_generator
from mmalign.types import (
    Rollout,
    Samples,
    per_sample_randn,
    step_gaussian_log_prob,
    step_noise_level,
    trained_step_noise_level,
)


@dataclass
class SDGeneratorConfig:
    pretrained: str  # hub id or local directory in diffusers layout
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16"
    finetune: Literal["lora", "full", "none"] = "lora"  # none: inference only (sample / eval)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights (VAE, text encoders, LoRA base)
    resolution: int | None = num(None, ge=8)  # pixels; default: the UNet's sample_size x VAE factor
    negative_prompt: str = ""
    # Latents of images to train on (pairs, re-encoded samples, expert data): a posterior draw,
    # as the denoiser was trained, or the posterior mean (see `encode_images`).
    vae_latents: Literal["sample", "mean"] = "sample"

    def validate(self) -> None:
        from mmalign.paths import resolve

        p = self.pretrained = resolve(self.pretrained)
        looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1
        if looks_local and not Path(p).expanduser().is_dir():
            raise ValueError(f"pretrained: directory {p} not found")
        if Path(p).is_dir() and not (Path(p) / "model_index.json").is_file():
            raise ValueError(f"pretrained: {p} has no model_index.json (not a diffusers pipeline directory)")


def _is_local(p: str) -> bool:
    return Path(p).expanduser().is_dir()


class LatentDiffusionGenerator(TrainedAdapterMixin):
    """SD 1.x/2.x and SDXL through diffusers; the UNet is what trains."""

    modality = "image"

    def __init__(self, cfg: SDGeneratorConfig, pipe: Any = None):
        """Load `cfg.pretrained`, or wrap an already built pipeline (`pipe`, e.g. in benchmarks)."""
        from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline

        self.cfg = cfg
        if pipe is not None:
            self.pipe = pipe
        else:
            from mmalign.paths import resolve

            cfg.pretrained = resolve(cfg.pretrained)
            src = str(Path(cfg.pretrained).expanduser()) if _is_local(cfg.pretrained) else cfg.pretrained
            index = DiffusionPipeline.load_config(src, revision=cfg.revision)
            kw: dict[str, Any] = dict(revision=cfg.revision, variant=cfg.variant, dtype=DTYPES[cfg.dtype])
            if "text_encoder_2" in index or "XL" in index.get("_class_name", ""):
                from diffusers import StableDiffusionXLPipeline

                self.pipe = StableDiffusionXLPipeline.from_pretrained(src, **kw)
            else:
                self.pipe = StableDiffusionPipeline.from_pretrained(
                    src, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw
                )
        self.is_xl = getattr(self.pipe, "text_encoder_2", None) is not None
        self.pipe.set_progress_bar_config(disable=True)
        self.unet: nn.Module = self.pipe.unet
        self.vae = self.pipe.vae.requires_grad_(False).eval()
        for enc in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)):
            if enc is not None:
                enc.requires_grad_(False).eval()
        # Latent diffusion must never clip x0 to [-1, 1] (PNDM configs lack the key and
        # DDIM's default would turn it on).
        sched_cfg = dict(self.pipe.scheduler.config)
        self.train_scheduler = DDPMScheduler.from_config(sched_cfg, clip_sample=False)
        self.scheduler = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
        self.prediction_type = self.train_scheduler.config.prediction_type
        self.num_train_timesteps = self.train_scheduler.config.num_train_timesteps
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = cfg.resolution or self.unet.config.sample_size * self.vae_scale
        # LoRA / full / none and the frozen reference (shared with the flow adapter)
        self._trained = TrainedModule(self.unet, cfg.finetune, cfg.lora, DTYPES[cfg.dtype])
        # A latent consistency model (a pipeline saved with its LCMScheduler, e.g. a distilled
        # student) samples with LCM multistep sampling in `rollout` (see `lcm_rollout`); a method
        # that distils one sets it (mmalign.methods.rg_lcd.install_student).
        self.lcm_scheduler = self.pipe.scheduler if type(self.pipe.scheduler).__name__ == "LCMScheduler" else None

    # ------------------------------------------------------------------ plumbing
    # device, to, trainable, set_forward_module, enable_gradient_checkpointing,
    # trainable_state_dict, reference: TrainedAdapterMixin (pipelines/common.py)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Any]:
        """Text conditioning for `prompts` (or the negative prompt repeated when `negative`)."""
        prompts = list(prompts)
        dev = self.device
        if self.is_xl:
            pe, ne, pooled, npooled = self.pipe.encode_prompt(
                prompts,
                device=dev,
                num_images_per_prompt=1,
                do_classifier_free_guidance=negative,
                negative_prompt=[self.cfg.negative_prompt] * len(prompts) if negative else None,
            )
            emb, pool = (ne, npooled) if negative else (pe, pooled)
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=dev, dtype=emb.dtype).repeat(len(prompts), 1)
            return {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pool, "time_ids": time_ids}}
        texts = [self.cfg.negative_prompt] * len(prompts) if negative else prompts
        emb, _ = self.pipe.encode_prompt(texts, dev, 1, False)
        return {"encoder_hidden_states": emb}

    @staticmethod
    def cat_cond(*conds: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds])}
        if "added_cond_kwargs" in conds[0]:
            out["added_cond_kwargs"] = {
                k: torch.cat([c["added_cond_kwargs"][k] for c in conds]) for k in conds[0]["added_cond_kwargs"]
            }
        return out

    # encode_images, decode: TrainedAdapterMixin (pipelines/common.py)

    # ------------------------------------------------------------------ model calls
    def model_output(
        self, latents: Tensor, t: Tensor, cond: dict[str, Any], timestep_cond: Tensor | None = None
    ) -> Tensor:
        unet = self._trained.current()
        dtype = next(unet.parameters()).dtype if self._trained.use_ref else latents.dtype
        enc = cond["encoder_hidden_states"].to(dtype)
        kw = {}
        if "added_cond_kwargs" in cond:
            kw["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cond["added_cond_kwargs"].items()}
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        if timestep_cond is not None:  # an LCM UNet's guidance-scale embedding (time_cond_proj_dim)
            kw["timestep_cond"] = timestep_cond.to(dtype)
        return unet(latents.to(dtype), t, encoder_hidden_states=enc, **kw).sample.float()

    def denoise_error(
        self,
        x0: Tensor,
        cond: dict[str, Any],
        t: Tensor,
        noise: Tensor,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Per-sample mean squared error of the denoiser at timesteps t (shape [B]).

        With `uncond` and `guidance_scale` != 1 the error is that of the classifier-free
        guided prediction u + s (c - u) -- the model that actually samples at scale s -- with
        gradients through both branches (see `train_guidance_scale` of RAFT / Diffusion-DPO).
        """
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        if uncond is not None and guidance_scale != 1.0:
            u, c = self.model_output(torch.cat([x_t, x_t]), torch.cat([t, t]), self.cat_cond(uncond, cond)).chunk(2)
            pred = u + guidance_scale * (c - u)
        else:
            pred = self.model_output(x_t, t, cond)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return (pred - target.float()).pow(2).flatten(1).mean(1)

    def predict_x0(self, x0: Tensor, cond: dict[str, Any], t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, x_t): noise x0 to timesteps t and estimate it back from the model's prediction."""
        x_t = self.train_scheduler.add_noise(x0.float(), noise.float(), t)
        out = self.model_output(x_t, t, cond)
        a = self.train_scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.ndim - 1)))
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt(), x_t
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * out, x_t
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def guided_eps(self, x: Tensor, t: Tensor, cond: dict, uncond: dict | None, scale: float) -> Tensor:
        """Classifier-free guided epsilon at one (scalar) timestep; v-prediction converted to epsilon."""
        if uncond is None or scale == 1.0:
            out = self.model_output(x, t, cond)
        else:
            both = self.model_output(torch.cat([x, x]), t, self.cat_cond(uncond, cond))
            u, c = both.chunk(2)
            out = u + scale * (c - u)
        if self.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t
            a = float(self.scheduler.alphas_cumprod[int(t)])
            out = math.sqrt(a) * out + math.sqrt(1 - a) * x
        return out

    # ------------------------------------------------------------------ DDIM with log-probs
    def _alphas(self, t: int, prev_t: int) -> tuple[float, float]:
        ac = self.scheduler.alphas_cumprod
        a_t = float(ac[t])
        a_prev = float(ac[prev_t]) if prev_t >= 0 else float(self.scheduler.final_alpha_cumprod)
        return a_t, a_prev

    def ddim_step(self, eps: Tensor, x: Tensor, t: int, prev_t: int, eta: float) -> tuple[Tensor, float]:
        """Mean and standard deviation of p(x_prev | x_t) for DDIM with eta (Song et al. eq. 12)."""
        a_t, a_prev = self._alphas(t, prev_t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * math.sqrt(max(var, 0.0))
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        return mean, std

    def rollout(
        self,
        prompts: Sequence[str],
        num_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        seeds: Sequence[int] | None = None,
        latents: Tensor | None = None,
        need_log_probs: bool = True,
        decode: bool = True,
        sde_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample with DDIM; keep x_T..x_0 and log-probs of each stochastic step.

        Noise is drawn per sample from `seeds` (default 0..B-1), so a sample does not depend
        on the batch it is in. A latent consistency model samples with `lcm_rollout` instead
        (eta is then unused; LCM steps have no log-probabilities). With `sde_steps`, only those
        steps are stochastic and the others DDIM steps at eta 0; their log-probs are NaN.
        """
        if self.lcm_scheduler is not None and not self._trained.use_ref:
            if need_log_probs:
                raise ValueError("rollout: LCM sampling has no step log-probabilities; use need_log_probs=False")
            return self.lcm_rollout(prompts, num_steps, guidance_scale, seeds, latents, decode)
        sde_steps = None if sde_steps is None else tuple(sde_steps)
        if need_log_probs and (eta <= 0 or sde_steps == ()):
            raise ValueError(
                "rollout: eta=0 is deterministic DDIM and has no step log-probabilities (nor "
                "sde_steps=[]); use eta>0 or need_log_probs=False"
            )
        prompts = list(prompts)
        B = len(prompts)
        seeds = list(seeds) if seeds is not None else list(range(B))
        dev = self.device
        shape = self.latent_shape
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt(prompts, negative=True) if guidance_scale != 1.0 else None
        self.scheduler.set_timesteps(num_steps, device="cpu")
        timesteps = self.scheduler.timesteps.clone()
        stride = self.num_train_timesteps // num_steps
        x = per_sample_randn(seeds, shape, dev) if latents is None else latents.to(dev).float()
        x = x * self.scheduler.init_noise_sigma
        traj, logps = [x], []
        with torch.no_grad():
            for k, t in enumerate(timesteps.tolist()):
                eps = self.guided_eps(x, torch.tensor(t, device=dev), cond, uncond, guidance_scale)
                eta_k = step_noise_level(eta, sde_steps, k)
                mean, std = self.ddim_step(eps, x, t, t - stride, eta_k)
                if std > 0:
                    noise = per_sample_randn([s * 7919 + k + 1 for s in seeds], shape, dev)
                    x = mean + std * noise
                    if need_log_probs:
                        logps.append(step_gaussian_log_prob(x, mean, std))
                else:
                    x = mean
                    if need_log_probs and eta_k == 0:  # outside sde_steps
                        logps.append(torch.full((B,), math.nan, device=dev, dtype=torch.float64))
                traj.append(x)
            samples = self.decode(x) if decode else Samples()
        return Rollout(
            samples=samples,
            latents=torch.stack(traj, 1),
            timesteps=timesteps,
            log_probs=torch.stack(logps, 1) if logps else None,
            prompts=prompts,
            extras={
                "cond": cond,
                "uncond": uncond,
                "guidance_scale": guidance_scale,
                "eta": eta,
                "stride": stride,
                "sde_steps": sde_steps,
            },
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.resolution // self.vae_scale
        return (self.unet.config.in_channels, h, h)

    # ------------------------------------------------------------------ guidance hooks (mmalign.guidance)
    # The inference-time samplers (dynamic CFG, reward guidance, beam search) need only these
    # and encode_prompt / decode; they walk exactly the steps `rollout` walks, so with the
    # same settings they reproduce it bit for bit.
    def sampling_timesteps(self, num_steps: int) -> list[tuple[int, int]]:
        """(t, t_prev) of each DDIM step of `rollout(num_steps=...)`; t_prev < 0 at the last."""
        if self.lcm_scheduler is not None:
            raise ValueError(
                "guided sampling walks DDIM steps with CFG; a latent consistency model (LCMScheduler) "
                "samples with `lcm_rollout` instead"
            )
        self.scheduler.set_timesteps(num_steps, device="cpu")
        stride = self.num_train_timesteps // num_steps
        return [(t, t - stride) for t in self.scheduler.timesteps.tolist()]

    def initial_latents(self, seeds: Sequence[int]) -> Tensor:
        """x_T of each sample, drawn from its seed as `rollout` draws it."""
        return per_sample_randn(seeds, self.latent_shape, self.device) * self.scheduler.init_noise_sigma

    def step_noise(self, seeds: Sequence[int], step: int) -> Tensor:
        """The noise `rollout` adds at step `step` (eta > 0)."""
        return per_sample_randn([s * 7919 + step + 1 for s in seeds], self.latent_shape, self.device)

    def cfg_outputs(self, x: Tensor, t: int, cond: dict, uncond: dict | None) -> tuple[Tensor | None, Tensor]:
        """(unconditional, conditional) model outputs in the model's own parameterisation
        (`prediction_type`) from one batched pass; (None, cond) when `uncond` is None.
        Any CFG scale s is then u + s (c - u), at no further model cost."""
        tt = torch.tensor(t, device=self.device)
        if uncond is None:
            return None, self.model_output(x, tt, cond)
        u, c = self.model_output(torch.cat([x, x]), tt, self.cat_cond(uncond, cond)).chunk(2)
        return u, c

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        """x_t = alpha x_0 + sigma eps at timestep t: (sqrt(abar_t), sqrt(1 - abar_t))."""
        a = float(self.scheduler.alphas_cumprod[int(t)])
        return math.sqrt(a), math.sqrt(1 - a)

    def to_eps(self, pred: Tensor, x: Tensor, t: int) -> Tensor:
        """A model output (epsilon or v) as epsilon, exactly as `guided_eps` converts it."""
        if self.prediction_type == "v_prediction":
            a = float(self.scheduler.alphas_cumprod[int(t)])
            return math.sqrt(a) * pred + math.sqrt(1 - a) * x
        return pred

    def predicted_x0(self, pred: Tensor, x: Tensor, t: int) -> Tensor:
        """x̂_0 = (x_t - sigma eps) / alpha from a model output (differentiable)."""
        alpha, sigma = self.alpha_sigma(t)
        return (x - sigma * self.to_eps(pred, x, t)) / alpha

    def sampler_step(
        self, pred: Tensor, x: Tensor, t: int, prev_t: int, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """One DDIM step from a (guided) model output: x_{t_prev}; `noise` is needed when eta > 0."""
        mean, std = self.ddim_step(self.to_eps(pred, x, t), x, t, prev_t, eta)
        if std > 0:
            if noise is None:
                raise ValueError("sampler_step: eta > 0 needs `noise`")
            return mean + std * noise
        return mean

    def condition(self, rollout: Rollout) -> Rollout:
        """(Re)compute a rollout's text conditioning from its prompts (e.g. after loading it)."""
        rollout.extras["cond"] = self.encode_prompt(rollout.prompts)
        g = rollout.extras.get("guidance_scale", 1.0)
        rollout.extras["uncond"] = self.encode_prompt(rollout.prompts, negative=True) if g != 1.0 else None
        return rollout

    def step_log_prob(
        self, rollout: Rollout, step: int, index: Tensor | slice = slice(None), return_mean: bool = False
    ):
        """log p(latents[:, step+1] | latents[:, step], c) under the current (or reference) model.

        With `return_mean`, also the step's Gaussian mean and the std a KL penalty divides by:
        here the DDIM step's std itself (ddpo-pytorch's `std_dev_t`; ddpo has no KL term, and
        GRPO's mean_d (mu - mu_ref)^2 / (2 std^2) is then the exact KL per dimension).
        """
        ex = rollout.extras
        x = rollout.latents[index, step].to(self.device)
        x_next = rollout.latents[index, step + 1].to(self.device)
        t = int(rollout.timesteps[step])
        sub = lambda d: None if d is None else _index_cond(d, index)
        eps = self.guided_eps(
            x, torch.tensor(t, device=self.device), sub(ex["cond"]), sub(ex["uncond"]), ex["guidance_scale"]
        )
        mean, std = self.ddim_step(eps, x, t, t - ex["stride"], trained_step_noise_level(ex, step))
        logp = step_gaussian_log_prob(x_next, mean, std)
        return (logp, mean, std) if return_mean else logp

    # ------------------------------------------------------------------ latent consistency models
    @torch.no_grad()
    def lcm_rollout(
        self,
        prompts: Sequence[str],
        num_steps: int = 4,
        guidance_scale: float = 8.0,
        seeds: Sequence[int] | None = None,
        latents: Tensor | None = None,
        decode: bool = True,
    ) -> Rollout:
        """LCM multistep sampling (Luo et al., "Latent Consistency Models", Alg. 3) with the
        LCMScheduler: each step maps x_t to the consistency function's x0 estimate and
        re-noises it to the next timestep. One conditional pass per step; the CFG scale enters
        as the guidance embedding of (guidance_scale - 1) when the UNet has `time_cond_proj_dim`,
        as in diffusers' LatentConsistencyModelPipeline, which this reproduces given the same
        x_T and per-sample generators `torch.Generator().manual_seed(seed * 7919 + 1)`."""
        prompts = list(prompts)
        B = len(prompts)
        seeds = list(seeds) if seeds is not None else list(range(B))
        dev, sched = self.device, self.lcm_scheduler
        sched.set_timesteps(num_steps, device="cpu")
        timesteps = sched.timesteps.clone()
        cond = self.encode_prompt(prompts)
        x = per_sample_randn(seeds, self.latent_shape, dev) if latents is None else latents.to(dev).float()
        x = x * sched.init_noise_sigma
        dim = self.unet.config.time_cond_proj_dim
        w_emb = guidance_scale_embedding(torch.full((B,), guidance_scale - 1.0), dim).to(dev) if dim else None
        gens = [torch.Generator().manual_seed(int(s) * 7919 + 1) for s in seeds]
        traj = [x]
        for t in timesteps.tolist():
            out = self.model_output(x, torch.tensor(t, device=dev), cond, timestep_cond=w_emb)
            x, denoised = sched.step(out, t, x, generator=gens, return_dict=False)
            traj.append(x)
        traj[-1] = denoised  # (equal to the last step's output: no noise is added at the end)
        return Rollout(
            samples=self.decode(denoised) if decode else Samples(),
            latents=torch.stack(traj, 1),
            timesteps=timesteps,
            log_probs=None,
            prompts=prompts,
            extras={"cond": cond, "uncond": None, "guidance_scale": guidance_scale, "sampler": "lcm"},
        )

    def _save_lcm_pipeline(self, out: Path) -> Path:
        """The whole pipeline with the trained UNet and the LCMScheduler (loadable by
        StableDiffusionPipeline / LatentConsistencyModelPipeline.from_pretrained and by `sd`)."""
        comps = {**self.pipe.components, "unet": self.unet, "scheduler": self.lcm_scheduler}
        kw = {"requires_safety_checker": False} if "requires_safety_checker" in self.pipe.config else {}
        type(self.pipe)(**comps, **kw).save_pretrained(out, safe_serialization=True)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune, "lcm": True})
        )
        return out

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> Path:
        """Save what was trained: a diffusers-format LoRA, or the full UNet (a latent
        consistency model: the whole pipeline with its LCMScheduler)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.lcm_scheduler is not None and self.cfg.finetune == "full":
            return self._save_lcm_pipeline(out)
        if self.cfg.finetune == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            type(self.pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        else:
            self.unet.save_pretrained(out / "unet", safe_serialization=True)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune})
        )
        return out

    def load_trained(self, path: str | Path) -> None:
        """Load weights written by `save_trained` (a LoRA directory or a full UNet)."""
        path = Path(path)
        if (path / "pytorch_lora_weights.safetensors").is_file():
            if self.cfg.finetune == "lora":
                from diffusers.utils import convert_unet_state_dict_to_peft
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                sd = load_file(path / "pytorch_lora_weights.safetensors")
                sd = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
                res = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(sd))
                if getattr(res, "unexpected_keys", None):
                    raise ValueError(f"{path}: LoRA keys do not match this UNet: {res.unexpected_keys[:5]}")
            else:
                self.pipe.load_lora_weights(path)
        elif (path / "unet" / "config.json").is_file():
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(path / "unet")
            missing = self.unet.load_state_dict(loaded.state_dict(), strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"{path}: UNet weights do not match: {missing.unexpected_keys[:5]}")
        else:
            raise FileNotFoundError(f"{path}: neither pytorch_lora_weights.safetensors nor unet/ found")


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance scales w [B] -> [B, dim] (VDM's, as LCM and diffusers'
    pipelines compute it: frequencies 10000^(-i/(dim/2-1)) of 1000 w; sin then cos)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32 throughout, bit-identical to diffusers
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    ang = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def _index_cond(cond: dict[str, Any], index: Tensor | slice) -> dict[str, Any]:
    """The conditioning of samples `index` (every tensor of the dict, nested dicts included)."""
    return {k: _index_cond(v, index) if isinstance(v, dict) else v[index] for k, v in cond.items()}


@register_generator("sd", SDGeneratorConfig)
def build_sd(cfg: SDGeneratorConfig) -> LatentDiffusionGenerator:
    """UNet latent diffusion (Stable Diffusion 1.x/2.x, SDXL) through diffusers."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return LatentDiffusionGenerator(cfg)
