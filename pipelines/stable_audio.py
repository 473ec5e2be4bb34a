"""Generator adapter for Stable Audio Open (Evans et al., "Stable Audio Open", 2024) through
diffusers' `StableAudioPipeline`.

The model: `StableAudioDiTModel` denoises Oobleck VAE latents [B, C, L] (`AutoencoderOobleck`,
one latent frame per `hop_length` waveform samples), conditioned by cross-attention on the
projected T5 text states followed by the `seconds_start` / `seconds_total` embeddings
(`StableAudioProjectionModel`), and globally on the two seconds embeddings. Without a
negative prompt, classifier-free guidance's unconditional branch is all-zero cross-attention
states (the seconds stay in the global states), exactly as the pipeline builds it.

Parameterisation. The pipeline's `CosineDPMSolverMultistepScheduler` is EDM-style: x = x0 +
sigma n with preconditioning c_in = 1 / sqrt(sigma^2 + 1), network time u = atan(sigma) 2 / pi
and x0_hat = c_skip x + c_out F with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 +
1) (sigma_data = 1, v-prediction). With sigma = tan(u pi / 2) that is the cosine VP process
stable-audio-tools trains: the network sees x_u = cos(u pi/2) x0 + sin(u pi/2) n at time u and
predicts v = cos(u pi/2) n - sin(u pi/2) x0. `denoise_error(x0, cond, t, noise)` is that
training loss, per sample, averaged over latent dimensions, at u = (t + 1) / num_train_timesteps
for the integer t the methods draw uniformly (stable-audio-tools draws u ~ U(0, 1)).

Sampling (`rollout`):

- `eta = 0` without log-probs: the pipeline's own sampler, the same scheduler class (SDE-DPM-Solver++
  (2M) whose noise comes from a Brownian tree), seeded per sample (`torch.Generator().
  manual_seed(seed)`), so it reproduces `StableAudioPipeline(..., latents=x_T, generator=[...])`.
- otherwise (every online method's rollout): a first-order stochastic step on the scheduler's
  sigma grid, the DDIM/DDPM step of the VE process (DDPO's step, Song et al. eq. 12, for x =
  x0 + sigma n): from sigma_s to sigma_t, with x0_hat from the guided output and
  eps_hat = (x - x0_hat) / sigma_s,

      std = eta sigma_t sqrt(1 - sigma_t^2 / sigma_s^2),
      mean = x0_hat + sqrt(sigma_t^2 - std^2) eps_hat,

  a Gaussian with the per-dimension-averaged log-density of `step_gaussian_log_prob`. At eta = 1
  it is exactly the scheduler's first-order update (`dpm_solver_first_order_update`, SDE-DPM-
  Solver++(1)) with fresh Gaussian noise; eta = 0 is the deterministic DPM-Solver++(1) (DDIM).
  The grid's final sigma 0 is replaced by `sde_final_sigma` (default 0.01) so that the last
  step is a Gaussian too (DDPO's last DDIM step likewise ends at alpha_bar_0 < 1); the sample
  decoded is that nearly clean x. The second-order multistep update is not used there: its
  mean depends on the previous step's output, so a step's log-probability would need two
  network passes.

LoRA: `StableAudioDiTModel` has no diffusers adapter mixin and `StableAudioPipeline` no
`load_lora_weights`, so the adapters are peft's (`inject_adapter_in_model`) and `save_trained`
writes the peft format (`adapter_config.json` + `adapter_model.safetensors`), which loads onto a
pipeline's transformer with `peft.inject_adapter_in_model(LoraConfig.from_pretrained(dir),
pipe.transformer)` and `peft.set_peft_model_state_dict`.

Duration: `audio_end_in_s` (seconds_total; default the model's maximum, sample_size x
hop_length / sampling_rate: 47.55 s for Stable Audio Open) and `audio_start_in_s` condition the
model and crop the decoded waveform as the pipeline does; the latent length is always the
transformer's `sample_size`. Reward guidance (GuidableGenerator) is not offered: the guided
samplers score images; best-of-N sampling needs only `rollout` and `decode`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.config import check_hub_model, num
from mmalign.pipelines.common import DTYPES, LoraSettings, TrainedAdapterMixin, TrainedModule
from mmalign.pipelines.sd import SDGeneratorConfig
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
class StableAudioGeneratorConfig:
    pretrained: str  # hub id (stabilityai/stable-audio-open-1.0) or a local directory in diffusers layout
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights (VAE, T5, LoRA base)
    audio_start_in_s: float = num(0.0, ge=0)  # seconds_start
    audio_end_in_s: float | None = num(None, gt=0)  # seconds_total; default: the model's maximum length
    negative_prompt: str = ""  # "" -> the pipeline's all-zero unconditional branch
    sde_final_sigma: float = num(0.01, gt=0)  # where the stochastic (log-prob) sampler stops instead of 0
    # latents of clips to train on (re-encoded samples): an Oobleck posterior draw, or its mean
    vae_latents: Literal["sample", "mean"] = "sample"

    def validate(self) -> None:
        SDGeneratorConfig.validate(self)
        if self.audio_end_in_s is not None and self.audio_end_in_s <= self.audio_start_in_s:
            raise ValueError(
                f"audio_end_in_s: {self.audio_end_in_s} must be greater than audio_start_in_s {self.audio_start_in_s}"
            )


class StableAudioGenerator(TrainedAdapterMixin):
    """Stable Audio Open through diffusers; the DiT is what trains (see the module docstring)."""

    modality = "audio"

    def __init__(self, cfg: StableAudioGeneratorConfig, pipe: Any = None):
        from diffusers import StableAudioPipeline

        from mmalign.paths import resolve

        self.cfg = cfg
        if pipe is None:
            cfg.pretrained = resolve(cfg.pretrained)
            p = Path(cfg.pretrained).expanduser()
            src = str(p) if p.is_dir() else cfg.pretrained
            pipe = StableAudioPipeline.from_pretrained(
                src, revision=cfg.revision, variant=cfg.variant, dtype=DTYPES[cfg.dtype]
            )
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.transformer = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False).eval()
        pipe.text_encoder.requires_grad_(False).eval()
        pipe.projection_model.requires_grad_(False).eval()
        sc = pipe.scheduler.config
        if sc.prediction_type != "v_prediction" or sc.sigma_data != 1.0:
            raise ValueError(
                f"generator.pretrained: the scheduler has prediction_type {sc.prediction_type!r} and sigma_data "
                f"{sc.sigma_data}; this adapter implements Stable Audio's v-prediction with sigma_data 1"
            )
        self.prediction_type = "v_prediction"
        self.num_train_timesteps = int(sc.num_train_timesteps)
        self.sample_rate = int(self.vae.config.sampling_rate)
        self.max_seconds = self.transformer.config.sample_size * self.vae.hop_length / self.sample_rate
        end = cfg.audio_end_in_s if cfg.audio_end_in_s is not None else self.max_seconds
        if end - cfg.audio_start_in_s > self.max_seconds + 1e-9:
            raise ValueError(
                f"generator.audio_end_in_s: {end - cfg.audio_start_in_s:g} s of audio is longer than the "
                f"model's maximum {self.max_seconds:g} s"
            )
        self.audio_start_in_s, self.audio_end_in_s = float(cfg.audio_start_in_s), float(end)
        self.resolution = None  # no image resolution: the length is audio_end_in_s
        self._trained = TrainedModule(self.transformer, cfg.finetune, cfg.lora, DTYPES[cfg.dtype])

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Any]:
        """{"encoder_hidden_states": [B, tokens + 2, D] (projected T5 states, seconds_start,
        seconds_total), "global_hidden_states": [B, 1, 2 D]}, as the pipeline builds them; the
        negative branch is all-zero cross-attention states without a negative prompt."""
        prompts = list(prompts)
        B, dev = len(prompts), self.device
        proj = self.pipe.projection_model(
            start_seconds=torch.full((B,), self.audio_start_in_s, device=dev),
            end_seconds=torch.full((B,), self.audio_end_in_s, device=dev),
        )
        start, end = proj.seconds_start_hidden_states, proj.seconds_end_hidden_states
        glob = torch.cat([start, end], dim=2)
        if negative and not self.cfg.negative_prompt:
            text = self.pipe.encode_prompt(prompts, dev, False)
            return {
                "encoder_hidden_states": torch.zeros_like(torch.cat([text, start, end], 1)),
                "global_hidden_states": glob,
            }
        texts = [self.cfg.negative_prompt] * B if negative else prompts
        text = self.pipe.encode_prompt(texts, dev, False)
        return {"encoder_hidden_states": torch.cat([text, start, end], dim=1), "global_hidden_states": glob}

    @staticmethod
    def cat_cond(*conds: dict[str, Any]) -> dict[str, Any]:
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    def condition(self, rollout: Rollout) -> Rollout:
        rollout.extras["cond"] = self.encode_prompt(rollout.prompts)
        g = rollout.extras.get("guidance_scale", 1.0)
        rollout.extras["uncond"] = self.encode_prompt(rollout.prompts, negative=True) if g > 1.0 else None
        return rollout

    # ------------------------------------------------------------------ the network
    def model_output(self, latents: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The DiT's raw output (v) for network inputs `latents` (already scaled by c_in: the VP
        x_u) at network times `t` = u in [0, 1] (scalar or [B])."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        net = self._trained.current()
        dtype = next(net.parameters()).dtype if self._trained.use_ref else latents.dtype
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        glob = cond["global_hidden_states"]
        rotary = get_1d_rotary_pos_embed(
            self.pipe.rotary_embed_dim, latents.shape[2] + glob.shape[1], use_real=True, repeat_interleave_real=False
        )
        return net(
            latents.to(dtype),
            t.to(latents.device, dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            global_hidden_states=glob.to(dtype),
            rotary_embedding=rotary,
            return_dict=False,
        )[0].float()

    def guided_x0(self, x: Tensor, sigma: float, cond: dict, uncond: dict | None, scale: float) -> Tensor:
        """x0_hat of the EDM-form sample x at noise level sigma from the CFG-combined output
        (the pipeline combines raw outputs; the preconditioning is linear, so the same)."""
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        u = torch.tensor(math.atan(sigma) * 2 / math.pi, device=x.device)
        if uncond is None or scale <= 1.0:
            out = self.model_output(x * c_in, u, cond)
        else:
            un, co = self.model_output(torch.cat([x, x]) * c_in, u, self.cat_cond(uncond, cond)).chunk(2)
            out = un + scale * (co - un)
        return x / (sigma**2 + 1.0) - sigma / math.sqrt(sigma**2 + 1.0) * out

    # ------------------------------------------------------------------ training losses
    def _vp(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor, Tensor]:
        u = (t.double() + 1) / self.num_train_timesteps
        shape = (-1,) + (1,) * (ndim - 1)
        alpha, sigma = torch.cos(u * math.pi / 2).view(shape), torch.sin(u * math.pi / 2).view(shape)
        return u.float(), alpha.float(), sigma.float()

    def denoise_error(
        self,
        x0: Tensor,
        cond: dict[str, Any],
        t: Tensor,
        noise: Tensor,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Per-sample mean over latent dimensions of (v - F(x_u, u, c))^2 (the module docstring's
        cosine VP objective at u = (t + 1) / num_train_timesteps); with `uncond` and a scale != 1,
        of the CFG-combined output."""
        u, alpha, sigma = self._vp(t, x0.ndim)
        x_t = alpha * x0.float() + sigma * noise.float()
        if uncond is not None and guidance_scale != 1.0:
            un, co = self.model_output(torch.cat([x_t, x_t]), torch.cat([u, u]), self.cat_cond(uncond, cond)).chunk(2)
            pred = un + guidance_scale * (co - un)
        else:
            pred = self.model_output(x_t, u, cond)
        target = alpha * noise.float() - sigma * x0.float()
        return (pred - target).pow(2).flatten(1).mean(1)

    def predict_x0(self, x0: Tensor, cond: dict[str, Any], t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, x_u): x0 noised to time u and estimated back, x0_hat = alpha x_u - sigma v."""
        u, alpha, sigma = self._vp(t, x0.ndim)
        x_t = alpha * x0.float() + sigma * noise.float()
        return alpha * x_t - sigma * self.model_output(x_t, u, cond), x_t

    # ------------------------------------------------------------------ sampling
    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.transformer.config.in_channels, self.transformer.config.sample_size)

    def _scheduler(self, num_steps: int):
        from diffusers import CosineDPMSolverMultistepScheduler

        sched = CosineDPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(num_steps)
        return sched

    def sde_sigmas(self, num_steps: int) -> list[float]:
        """The stochastic sampler's grid: the scheduler's sigmas with the final 0 replaced by `sde_final_sigma`."""
        sig = self._scheduler(num_steps).sigmas.double().tolist()
        sig[-1] = min(self.cfg.sde_final_sigma, sig[-2])
        return sig

    @staticmethod
    def sde_step(x0_hat: Tensor, x: Tensor, sigma_s: float, sigma_t: float, eta: float) -> tuple[Tensor, float]:
        """Mean and std of the first-order stochastic step from sigma_s to sigma_t (module docstring)."""
        std = eta * sigma_t * math.sqrt(max(1.0 - (sigma_t / sigma_s) ** 2, 0.0))
        mean = x0_hat + math.sqrt(max(sigma_t**2 - std**2, 0.0)) / sigma_s * (x - x0_hat)
        return mean, std

    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        num_steps: int = 20,
        guidance_scale: float = 7.0,
        eta: float = 1.0,
        seeds: Sequence[int] | None = None,
        latents: Tensor | None = None,
        need_log_probs: bool = True,
        decode: bool = True,
        sde_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample (see the module docstring: the pipeline's sampler at eta 0 without log-probs,
        else the first-order stochastic step with per-step log-probs). x_T = unit noise from each
        seed times the scheduler's init_noise_sigma, as the pipeline scales it."""
        sde_steps = None if sde_steps is None else tuple(sde_steps)
        if need_log_probs and (eta <= 0 or sde_steps == ()):
            raise ValueError(
                "rollout: eta=0 is the pipeline's sampler and has no step log-probabilities (nor "
                "sde_steps=[]); use eta>0 or need_log_probs=False"
            )
        prompts = list(prompts)
        B = len(prompts)
        seeds = list(seeds) if seeds is not None else list(range(B))
        dev, shape = self.device, self.latent_shape
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt(prompts, negative=True) if guidance_scale > 1.0 else None
        sched = self._scheduler(num_steps)
        x = per_sample_randn(seeds, shape, dev) if latents is None else latents.to(dev).float()
        x = x * sched.init_noise_sigma
        traj, logps = [x], []
        if eta <= 0 and not need_log_probs:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([x, x]) if uncond is not None else x, t)
                out = self.model_output(inp, t, self.cat_cond(uncond, cond) if uncond is not None else cond)
                if uncond is not None:
                    un, co = out.chunk(2)
                    out = un + guidance_scale * (co - un)
                x = sched.step(out, t, x, generator=gens).prev_sample.float()
                traj.append(x)
        else:
            sig = self.sde_sigmas(num_steps)
            for k in range(num_steps):
                x0_hat = self.guided_x0(x, sig[k], cond, uncond, guidance_scale)
                eta_k = step_noise_level(eta, sde_steps, k)
                mean, std = self.sde_step(x0_hat, x, sig[k], sig[k + 1], eta_k)
                if std > 0:
                    x = mean + std * self.step_noise(seeds, k)
                    if need_log_probs:
                        logps.append(step_gaussian_log_prob(x, mean, std))
                else:
                    x = mean
                    if need_log_probs:
                        logps.append(torch.full((B,), math.nan, device=dev, dtype=torch.float64))
                traj.append(x)
        return Rollout(
            samples=self.decode(x) if decode else Samples(),
            latents=torch.stack(traj, 1),
            timesteps=sched.timesteps.clone().cpu(),
            log_probs=torch.stack(logps, 1) if logps else None,
            prompts=prompts,
            extras={
                "cond": cond,
                "uncond": uncond,
                "guidance_scale": guidance_scale,
                "eta": eta,
                "sde_steps": sde_steps,
            },
        )

    def step_noise(self, seeds: Sequence[int], step: int) -> Tensor:
        """The unit Gaussian noise the stochastic rollout adds at step `step`."""
        return per_sample_randn([int(s) * 7919 + step + 1 for s in seeds], self.latent_shape, self.device)

    def step_log_prob(
        self, rollout: Rollout, step: int, index: Tensor | slice = slice(None), return_mean: bool = False
    ):
        """log p(latents[:, step+1] | latents[:, step], c) of the stochastic step under the current
        (or reference) model; with `return_mean` also the step's mean and std."""
        ex = rollout.extras
        x = rollout.latents[index, step].to(self.device)
        x_next = rollout.latents[index, step + 1].to(self.device)
        sig = self.sde_sigmas(len(rollout.timesteps))
        sub = lambda d: None if d is None else {k: v[index] for k, v in d.items()}
        x0_hat = self.guided_x0(x, sig[step], sub(ex["cond"]), sub(ex["uncond"]), ex["guidance_scale"])
        mean, std = self.sde_step(x0_hat, x, sig[step], sig[step + 1], trained_step_noise_level(ex, step))
        logp = step_gaussian_log_prob(x_next, mean, std)
        return (logp, mean, std) if return_mean else logp

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: Tensor) -> Samples:
        """Latents -> waveform (Oobleck VAE), cut to [audio_start_in_s, audio_end_in_s) as the
        pipeline cuts it; [B, channels, T] in [-1, 1] (clamped) at the VAE's sampling rate."""
        wav = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        a, b = int(self.audio_start_in_s * self.sample_rate), int(self.audio_end_in_s * self.sample_rate)
        return Samples(audio=wav[:, :, a:b].clamp(-1, 1), sample_rate=self.sample_rate)

    @torch.no_grad()
    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Clips [B, C, T] in [-1, 1] (this generator's samples: `audio_start_in_s` .. `audio_end_in_s`)
        -> latents [B, C_lat, sample_size]: each clip is placed at its start offset in a zero
        waveform of the model's full length (cut beyond it), as the pipeline prepares
        `initial_audio_waveforms` (mono repeated to stereo, stereo averaged to mono), and encoded by
        the Oobleck VAE as a posterior draw (`vae_latents: sample`, seeded per sample like the
        image adapters' draws) or its mean."""
        from mmalign.pipelines.common import VAE_SALT

        a = images.to(self.device, torch.float32)
        if a.ndim != 3:
            raise ValueError(f"generator 'stable_audio': audio to encode must be B,C,T, got shape {tuple(a.shape)}")
        ch = self.vae.config.audio_channels
        if a.shape[1] == 1 and ch > 1:
            a = a.repeat(1, ch, 1)
        elif a.shape[1] > 1 and ch == 1:
            a = a.mean(1, keepdim=True)
        elif a.shape[1] != ch:
            raise ValueError(f"generator 'stable_audio': {a.shape[1]}-channel audio for a {ch}-channel VAE")
        full = self.transformer.config.sample_size * self.vae.hop_length
        start = int(self.audio_start_in_s * self.sample_rate)
        wav = a.new_zeros(a.shape[0], ch, full)
        n = max(0, min(a.shape[-1], full - start))
        wav[:, :, start : start + n] = a[:, :, :n]
        dist = self.vae.encode(wav.to(self.vae.dtype)).latent_dist
        z = dist.mean
        if self.cfg.vae_latents == "sample":
            if seeds is None:
                eps = torch.randn_like(z)
            else:
                eps = per_sample_randn([int(s) * 1_000_003 + VAE_SALT for s in seeds], z.shape[1:], z.device, z.dtype)
            z = z + dist.std * eps
        return z.float()

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> Path:
        """peft-format LoRA (adapter_config.json + adapter_model.safetensors), or the full transformer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.finetune == "lora":
            from peft import LoraConfig
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            lc = self.cfg.lora
            LoraConfig(
                r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
            ).save_pretrained(out)
            sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
            save_file(sd, str(out / "adapter_model.safetensors"))
        else:
            self.transformer.save_pretrained(out / "transformer", safe_serialization=True)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"generator": "stable_audio", "pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune})
        )
        return out

    def load_trained(self, path: str | Path) -> None:
        """Weights written by `save_trained` (a peft LoRA, or a full transformer)."""
        path = Path(path)
        if (path / "adapter_model.safetensors").is_file():
            from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
            from safetensors.torch import load_file

            if self.cfg.finetune != "lora":  # inference on a trained LoRA
                inject_adapter_in_model(LoraConfig.from_pretrained(str(path)), self.transformer)
            res = set_peft_model_state_dict(self.transformer, load_file(str(path / "adapter_model.safetensors")))
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"{path}: LoRA keys do not match this transformer: {res.unexpected_keys[:5]}")
        elif (path / "transformer" / "config.json").is_file():
            from diffusers import StableAudioDiTModel

            loaded = StableAudioDiTModel.from_pretrained(path / "transformer")
            res = self.transformer.load_state_dict(loaded.state_dict(), strict=False)
            if res.unexpected_keys:
                raise ValueError(f"{path}: transformer weights do not match: {res.unexpected_keys[:5]}")
        else:
            raise FileNotFoundError(f"{path}: neither adapter_model.safetensors nor transformer/ found")


@register_generator("stable_audio", StableAudioGeneratorConfig)
def build_stable_audio(cfg: StableAudioGeneratorConfig) -> StableAudioGenerator:
    """Stable Audio Open (DiT over Oobleck latents, T5 + seconds conditioning) through diffusers."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return StableAudioGenerator(cfg)
