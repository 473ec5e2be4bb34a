"""Generator adapter for rectified-flow transformers: Stable Diffusion 3 / 3.5 and FLUX.

Loads a diffusers pipeline (StableDiffusion3Pipeline or FluxPipeline) from a hub id or a
local directory, fine-tunes the transformer with LoRA (peft) or fully, and plays the
DiffusionGenerator and GuidableGenerator roles (`mmalign.protocols`) with the flow-matching
conventions (sigma in [0, 1], sigma = 1 noise):

    x_sigma = (1 - sigma) x0 + sigma * noise,     velocity target v = noise - x0.

- `denoise_error(x0, cond, t, noise)`: per-sample *mean* over latent dimensions of
  ||v - v_theta(x_sigma, sigma, c)||^2 -- the same convention as the UNet adapter, so the
  preference layer's beta means the same thing (Flow-DPO is Diffusion-DPO on these errors).
  `t` is an integer in [0, num_train_timesteps) like the UNet's; it is mapped to sigma by
  the quantile function of the model's training-time density (logit-normal by default, as
  SD3 trains; `timestep_sampling: uniform` for plain U(0, 1)) followed by the scheduler's
  shift, so methods that draw t uniformly sample sigma the way the model was trained.
  `loss_weighting` (default none) multiplies each sample's error by w(sigma) from diffusers'
  `compute_loss_weighting_for_sd3` (Esser et al., "Scaling Rectified Flow Transformers for
  High-Resolution Image Synthesis", 2024): sigma_sqrt w = sigma^-2, cosmap
  w = 2 / (pi (1 - 2 sigma + 2 sigma^2)), on the shifted sigma; mmalign's `eps` w = (1 - sigma)^2
  makes it the error of the implied noise prediction eps_hat = x_sigma + (1 - sigma) v_theta,
  what the UNet adapter's error measures (a UNet's Diffusion-DPO beta then means the same here).
  diffusers' SD3 scripts apply it to uniformly drawn t (`timestep_sampling: uniform` reproduces
  them; with logit_normal the density and the weight multiply) and to the velocity error (their
  `precondition_outputs=0`; the x0 target is sigma^2 times it). SD3's `mode` density is not offered: diffusers'
  `compute_density_for_timestep_sampling` draws its own u, while t here maps to sigma through a
  quantile function. Every caller gets the weight, policy and reference passes alike: RAFT /
  RWR and DPO's sft term become SD3's weighted objective; Diffusion-/Flow-DPO (pair and
  reference share t) becomes DPO with beta w(sigma_t), the paper's T omega(lambda_t) that is
  otherwise a constant (retune beta). `predict_x0` is never weighted (DiffusionNFT weights its
  own terms).
- `rollout(prompts, eta=a)`: Flow-GRPO's SDE sampler (Liu et al., "Flow-GRPO: Training Flow
  Matching Models via Online RL", 2025, eq. 9-10). With sigma_t = a sqrt(sigma / (1 - sigma))
  (sigma = 1 replaced by the next grid value in the denominator, as the paper's code does)
  and dt = sigma_next - sigma < 0,

      mean = x + dt [v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)],   std = sigma_t sqrt(-dt)

  and x_next ~ N(mean, std^2 I). Log-probs are Gaussian log-densities *averaged* over latent
  dimensions, as the paper's `sde_step_with_logprob` returns them (computed in float64, as in
  sd.py: `mmalign.types.step_gaussian_log_prob`). a = 0 is exactly diffusers'
  FlowMatchEulerDiscreteScheduler Euler step x + dt v. `eta` is the name the online methods
  already use for the sampler's noise level, so a GRPO config runs unchanged here.
- `sde_type: dance_grpo` (config) swaps in DanceGRPO's SDE step (Xue et al., "DanceGRPO:
  Unleashing GRPO on Visual Generation", 2025) with eta as its eta: the Euler mean plus the
  score correction -1/2 eta^2 s dt, s = -(x - (1 - sigma) x0_hat) / sigma^2 and
  x0_hat = x - sigma v, and std eta sqrt(-dt). Since s = -(x + (1 - sigma) v) / sigma, that is
  the mean above with sigma_t = eta (constant) in place of a sqrt(sigma / (1 - sigma)). Its
  log-probs are per-dimension means as in its code (`flux_step`). Rollout, `step_log_prob`
  (hence KL on the step means) and the
  guided samplers' `sampler_step` all take the same step.
- `reference()`: LoRA adapters disabled (or a frozen copy with full fine-tuning).
- `predict_x0(...)`: the model's clean-sample estimate x0_hat = x_sigma - sigma v_theta
  (what DiffusionNFT's losses are written in).

Classifier-free guidance is the pipelines' (uncond, cond batch; applied when scale > 1).
FLUX.1-dev style models with a guidance embedding get the scale through the embedding and
no CFG batch. Latents are kept unpacked (B, C, h, w) for both families; FLUX packing into
2x2 patches happens inside `model_output`.

SD3 without T5 (`drop_t5`, or a folder saved without it, like the toy model): the pipeline
conditions on `max_sequence_length` (default 256) zero "T5 tokens" after the CLIP tokens.
`model_output` runs them as one token whose attention logit is raised by log(n)
(RepeatedTokenJointAttnProcessor): the same velocities up to float rounding, at the cost of one token.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.config import ConfigError, check_hub_model, num
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

# Attention projections of the MMDiT blocks (image and text streams); FLUX's single blocks
# share the to_q/to_k/to_v names. peft matches by suffix, so absent names are simply skipped.
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _flow_lora() -> LoraSettings:
    return LoraSettings(target_modules=list(FLOW_LORA_TARGETS))


SDE_TYPES = {"flow_grpo": "Flow-GRPO's SDE step", "dance_grpo": "DanceGRPO's"}
# diffusers' compute_loss_weighting_for_sd3 silently gives weight 1 to any unknown name: check first
LOSS_WEIGHTINGS = {
    "none": "w = 1",
    "sigma_sqrt": "w = sigma^-2",
    "cosmap": "w = 2 / (pi (1 - 2 sigma + 2 sigma^2))",
    "eps": "w = (1 - sigma)^2",
}


def check_choice(field: str, value: str, choices: dict[str, str]) -> str:
    """`value` if it is one of `choices` (name -> meaning), else a ValueError naming generator.`field`."""
    if value not in choices:
        meanings = ", ".join(f"{k}: {v}" for k, v in choices.items())
        raise ValueError(f"generator.{field}: {value!r} is not one of {list(choices)} ({meanings})")
    return value


@dataclass
class FlowGeneratorConfig:
    pretrained: str  # hub id or local directory in diffusers layout (SD3 / SD3.5 / FLUX)
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: LoraSettings = field(default_factory=_flow_lora)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights
    resolution: int | None = num(None, ge=8)  # pixels; default: the transformer's sample_size x VAE factor
    negative_prompt: str = ""
    # Latents of images to train on (pairs, re-encoded samples, expert data): a posterior draw,
    # as the denoiser was trained, or the posterior mean (see `encode_images`).
    vae_latents: Literal["sample", "mean"] = "sample"
    drop_t5: bool = False  # SD3: load without text_encoder_3 (T5); its tokens become zeros
    # T5 tokens (zeros when there is no T5). None: the pipeline's own default (SD3 256, FLUX 512),
    # so samples match the stock pipeline called with default arguments.
    max_sequence_length: int | None = num(None, ge=1)
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"  # training-time sigma density
    logit_mean: float = num(0.0)
    logit_std: float = num(1.0, gt=0)
    # per-sample weight w(sigma) of denoise_error (diffusers' compute_loss_weighting_for_sd3);
    # none keeps the plain flow-matching error
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap", "eps"] = "none"
    # the SDE of `rollout` / `step_log_prob` at eta > 0 (eta = 0 is the Euler ODE for both):
    # Flow-GRPO's sigma_t = eta sqrt(sigma / (1 - sigma)) or DanceGRPO's sigma_t = eta
    sde_type: Literal["flow_grpo", "dance_grpo"] = "flow_grpo"

    def validate(self) -> None:
        from mmalign.paths import resolve

        p = self.pretrained = resolve(self.pretrained)
        looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1
        if looks_local and not Path(p).expanduser().is_dir():
            raise ValueError(f"pretrained: directory {p} not found")
        if Path(p).is_dir() and not (Path(p) / "model_index.json").is_file():
            raise ValueError(f"pretrained: {p} has no model_index.json (not a diffusers pipeline directory)")
        if self.max_sequence_length is not None and self.max_sequence_length < 0:
            raise ValueError("max_sequence_length: must be >= 0")
        if self.logit_std <= 0:
            raise ValueError("logit_std: must be positive")
        self.validate_choices()

    def validate_choices(self) -> None:
        """The string options (also checked by the generator itself, before anything loads)."""
        check_choice("sde_type", self.sde_type, SDE_TYPES)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)


class RepeatedTokenJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0, where the last text token may stand for n identical ones.

    Without T5, StableDiffusion3Pipeline appends `max_sequence_length` zero "T5 tokens" to the
    CLIP tokens. Every per-token op of SD3's joint blocks keeps identical tokens identical, so
    in each joint attention they are n equal keys with equal values: one of them with its logit
    raised by log(n) gives the same softmax. Called with `last_token_repeats=n` (through the
    transformer's `joint_attention_kwargs`) it computes that; without it, it is the stock
    processor. The flow generator runs the toy model's 256 zero tokens as one this way.
    """

    def __init__(self):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.stock = JointAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_token_repeats: int | None = None,
        **kwargs,
    ) -> Any:
        if encoder_hidden_states is None or not last_token_repeats or last_token_repeats == 1:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        B, n_image = hidden_states.shape[:2]

        def heads(x: Tensor, norm: nn.Module | None) -> Tensor:
            x = x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = torch.cat(
            [
                heads(attn.to_q(hidden_states), attn.norm_q),
                heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
            ],
            2,
        )
        k = torch.cat(
            [
                heads(attn.to_k(hidden_states), attn.norm_k),
                heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
            ],
            2,
        )
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(last_token_repeats)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(B, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, text = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def sde_step(
    v: Tensor,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    sigma_max: float,
    noise_level: float,
    sde_type: str = "flow_grpo",
) -> tuple[Tensor, float]:
    """Mean and std of the SDE step from sigma to sigma_next (float32 in, float32 out).

    flow_grpo: Flow-GRPO's, sigma_t = noise_level sqrt(sigma / (1 - sigma)); `sigma_max`
    replaces sigma in the 1 - sigma denominator at sigma = 1 (the first step), where the
    square root is infinite. dance_grpo: DanceGRPO's, sigma_t = noise_level; its mean
    x + dt v - 1/2 eta^2 score dt with score = -(x - (1 - sigma) x0_hat) / sigma^2,
    x0_hat = x - sigma v, equals x + dt [v + eta^2 / (2 sigma) (x + (1 - sigma) v)], the same
    drift as Flow-GRPO's (the reference code adds log_term * dsigma with
    log_term = -1/2 eta^2 score and dsigma = dt < 0). Both: std = sigma_t sqrt(-dt).
    noise_level = 0 is the Euler ODE step for both.
    """
    dt = sigma_next - sigma
    if noise_level == 0:
        check_choice("sde_type", sde_type, SDE_TYPES)
        return x + dt * v, 0.0
    std_t = sde_noise_level(sigma, sigma_max, noise_level, sde_type)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


def sde_noise_level(sigma: float, sigma_max: float, noise_level: float, sde_type: str = "flow_grpo") -> float:
    """sigma_t of the SDE step at sigma (its std is sigma_t sqrt(-dt)): flow_grpo's `std_dev_t`,
    noise_level sqrt(sigma / (1 - sigma)) with sigma_max (the grid's second value, flow_grpo's
    `sigmas[1]`) in the denominator at sigma = 1; DanceGRPO's noise_level. It is what
    flow_grpo's KL divides by (`step_log_prob(..., return_mean=True)`'s third value)."""
    check_choice("sde_type", sde_type, SDE_TYPES)
    if sde_type == "dance_grpo":
        return noise_level
    denom = 1 - (sigma_max if sigma >= 1 else sigma)
    if denom <= 0:
        raise ValueError(
            f"flow_grpo SDE: sigma_max={sigma_max} at sigma={sigma} makes sqrt(sigma / (1 - sigma)) "
            "infinite; the grid's second sigma must be < 1"
        )
    return noise_level * math.sqrt(sigma / denom)


class FlowMatchingGenerator(TrainedAdapterMixin):
    """SD3 / SD3.5 / FLUX through diffusers; the transformer is what trains."""

    modality = "image"

    def __init__(self, cfg: FlowGeneratorConfig, pipe: Any = None):
        from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

        self.cfg = cfg
        cfg.validate_choices()
        if pipe is None:
            from mmalign.paths import resolve

            cfg.pretrained = resolve(cfg.pretrained)
            local = Path(cfg.pretrained).expanduser()
            src = str(local) if local.is_dir() else cfg.pretrained
            index = DiffusionPipeline.load_config(src, revision=cfg.revision)
            kw: dict[str, Any] = dict(revision=cfg.revision, variant=cfg.variant, dtype=DTYPES[cfg.dtype])
            if "Flux" in index.get("_class_name", ""):
                from diffusers import FluxPipeline

                pipe = FluxPipeline.from_pretrained(src, **kw)
            elif "StableDiffusion3" in index.get("_class_name", ""):
                from diffusers import StableDiffusion3Pipeline

                if cfg.drop_t5:
                    kw.update(text_encoder_3=None, tokenizer_3=None)
                # folders saved without T5 (or IP-adapter parts) list them as [null, null] or not at all
                kw.update(
                    {
                        c: None
                        for c in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
                        if index.get(c, [None])[0] is None
                    }
                )
                pipe = StableDiffusion3Pipeline.from_pretrained(src, **kw)
            else:
                raise ValueError(
                    f"pretrained: {src} is a {index.get('_class_name')}; the flow generator loads "
                    "StableDiffusion3Pipeline or FluxPipeline layouts (use generator `sd` for UNets)"
                )
        self.pipe = pipe
        self.is_flux = type(pipe).__name__.startswith("Flux")
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer: nn.Module = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False).eval()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.requires_grad_(False).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        tcfg = self.transformer.config
        self.latent_channels = tcfg.in_channels // 4 if self.is_flux else tcfg.in_channels
        sample = getattr(pipe, "default_sample_size", None) or tcfg.sample_size
        self.resolution = cfg.resolution or sample * self.vae_scale
        multiple = self.vae_scale * (2 if self.is_flux else tcfg.patch_size)  # latents are cut into 2x2 patches
        if self.resolution % multiple:
            raise ConfigError(
                f"generator.resolution: {self.resolution} is not a multiple of {multiple} (the VAE's "
                f"downsampling x the transformer's patch size)"
            )
        self.distilled_guidance = bool(getattr(tcfg, "guidance_embeds", False))
        self.compute_dtype = DTYPES[cfg.dtype]
        self.max_sequence_length = cfg.max_sequence_length
        if self.max_sequence_length is None:
            self.max_sequence_length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        # SD3 without T5: its max_sequence_length zero tokens run as one (RepeatedTokenJointAttnProcessor)
        self.zero_tokens = 0
        if not self.is_flux and getattr(pipe, "text_encoder_3", None) is None and self.max_sequence_length > 1:
            self.zero_tokens = self.max_sequence_length
            self.transformer.set_attn_processor(RepeatedTokenJointAttnProcessor())
        self._trained = TrainedModule(self.transformer, cfg.finetune, cfg.lora, DTYPES[cfg.dtype])

    # ------------------------------------------------------------------ plumbing
    # device, to, trainable, set_forward_module, enable_gradient_checkpointing,
    # trainable_state_dict, reference: TrainedAdapterMixin (pipelines/common.py)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.resolution // self.vae_scale
        return (self.latent_channels, h, h)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Tensor]:
        """Text conditioning of `prompts` (or of the negative prompt repeated, when `negative`)."""
        texts = [self.cfg.negative_prompt] * len(prompts) if negative else list(prompts)
        dev, m = self.device, self.max_sequence_length
        if self.is_flux:
            emb, pooled, _ = self.pipe.encode_prompt(texts, None, device=dev, max_sequence_length=m)
        else:
            emb, _, pooled, _ = self.pipe.encode_prompt(
                texts, None, None, device=dev, do_classifier_free_guidance=False, max_sequence_length=m
            )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    @staticmethod
    def cat_cond(*conds: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    # encode_images, decode: TrainedAdapterMixin (pipelines/common.py)

    # ------------------------------------------------------------------ model calls
    def model_output(
        self, latents: Tensor, t: Tensor, cond: dict[str, Tensor], guidance: float | None = None
    ) -> Tensor:
        """Velocity v_theta(x, t, c) in float32; t in scheduler units (sigma * num_train_timesteps)."""
        model = self._trained.current()
        dtype = next(model.parameters()).dtype if self._trained.use_ref else self.compute_dtype
        B = latents.shape[0]
        t = t.to(latents.device, torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        emb = cond["encoder_hidden_states"].to(dtype)
        pooled = cond["pooled_projections"].to(dtype)
        if not self.is_flux:
            kw = None
            if self.zero_tokens and emb.shape[1] == self.pipe.tokenizer_max_length + self.zero_tokens:
                emb = emb[:, : emb.shape[1] - self.zero_tokens + 1]  # the zero tokens as one
                kw = {"last_token_repeats": self.zero_tokens}
            return model(
                hidden_states=latents.to(dtype),
                timestep=t,
                encoder_hidden_states=emb,
                pooled_projections=pooled,
                joint_attention_kwargs=kw,
                return_dict=False,
            )[0].float()
        from diffusers import FluxPipeline

        C, h, w = latents.shape[1:]
        packed = FluxPipeline._pack_latents(latents.to(dtype), B, C, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, latents.device, dtype)
        txt_ids = torch.zeros(emb.shape[1], 3, device=latents.device, dtype=dtype)
        g = None
        if self.distilled_guidance:
            g = torch.full((B,), 1.0 if guidance is None else guidance, device=latents.device, dtype=torch.float32)
        out = model(
            hidden_states=packed,
            timestep=t / self.num_train_timesteps,
            guidance=g,
            pooled_projections=pooled,
            encoder_hidden_states=emb,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale).float()

    def guided_velocity(self, x: Tensor, t: Tensor, cond: dict, uncond: dict | None, scale: float) -> Tensor:
        """Classifier-free guided velocity at one (scalar) timestep, as the diffusers pipelines combine it."""
        if self.distilled_guidance:
            return self.model_output(x, t, cond, guidance=scale)
        if uncond is None or scale <= 1.0:
            return self.model_output(x, t, cond)
        both = self.model_output(torch.cat([x, x]), t, self.cat_cond(uncond, cond))
        u, c = both.chunk(2)
        return u + scale * (c - u)

    # ------------------------------------------------------------------ training objective
    def _mu(self) -> float:
        """FLUX-style resolution-dependent shift (scheduler use_dynamic_shifting)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h = self.resolution // self.vae_scale
        seq = (h // 2) ** 2 if self.is_flux else (h // self.transformer.config.patch_size) ** 2
        c = self.scheduler.config
        return calculate_shift(
            seq,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    def train_sigmas(self, t: Tensor) -> Tensor:
        """Integer training timesteps t in [0, N) -> sigma in (0, 1), increasing in t.

        u = (t + 1/2) / N is pushed through the quantile function of the training density
        (logit-normal: sigmoid(m + s * Phi^-1(u))) and then the scheduler's shift, so t drawn
        uniformly gives sigma distributed as the model was trained.
        """
        u = (t.double() + 0.5) / self.num_train_timesteps
        if self.cfg.timestep_sampling == "logit_normal":
            z = math.sqrt(2) * torch.erfinv(2 * u - 1)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        c = self.scheduler.config
        if c.get("use_dynamic_shifting", False):
            mu = self._mu()
            u = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        elif c.get("shift", 1.0) != 1.0:
            s = c.shift
            u = s * u / (1 + (s - 1) * u)
        return u.float()

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x_sigma, sigma[B,1,1,1]) for integer training timesteps t."""
        sigma = self.train_sigmas(t).to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0.float() + sigma * noise.float(), sigma

    def denoise_error(
        self, x0: Tensor, cond: dict, t: Tensor, noise: Tensor, uncond: dict | None = None, guidance_scale: float = 1.0
    ) -> Tensor:
        """Per-sample mean over latent dimensions of ||(noise - x0) - v_theta(x_sigma)||^2,
        times w(sigma) of the config's `loss_weighting` (none: w = 1, the plain error).

        With `uncond` and `guidance_scale` != 1, the error of the guided velocity u + s (c - u)
        (gradients through both branches), as the UNet adapter offers it.
        """
        x_t, sigma = self.noisy(x0, t, noise)
        ts = sigma.flatten() * self.num_train_timesteps
        if uncond is not None and guidance_scale != 1.0:
            u, c = self.model_output(torch.cat([x_t, x_t]), torch.cat([ts, ts]), self.cat_cond(uncond, cond)).chunk(2)
            v = u + guidance_scale * (c - u)
        else:
            v = self.model_output(x_t, ts, cond)
        err = (v - (noise.float() - x0.float())).pow(2).flatten(1).mean(1)
        if self.cfg.loss_weighting == "none":
            return err
        if self.cfg.loss_weighting == "eps":
            return err * (1 - sigma.flatten()) ** 2
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return err * compute_loss_weighting_for_sd3(self.cfg.loss_weighting, sigmas=sigma.flatten())

    def predict_x0(self, x0: Tensor, cond: dict, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, x_t): noise x0 to training timestep t and estimate it back, x0_hat = x_t - sigma v."""
        x_t, sigma = self.noisy(x0, t, noise)
        v = self.model_output(x_t, sigma.flatten() * self.num_train_timesteps, cond)
        return x_t - sigma * v, x_t

    # ------------------------------------------------------------------ SDE sampling with log-probs
    def sampling_schedule(self, num_steps: int) -> tuple[Tensor, list[float]]:
        """(timesteps [T] in scheduler units, sigmas [T+1] ending at 0) exactly as the pipeline sets them."""
        kw: dict[str, Any] = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            kw["mu"] = self._mu()
        if self.is_flux:  # FluxPipeline's default grid
            kw["sigmas"] = list(torch.linspace(1.0, 1 / num_steps, num_steps).double().numpy())
        self.scheduler.set_timesteps(num_steps, device="cpu", **kw)
        return self.scheduler.timesteps.clone(), self.scheduler.sigmas.tolist()

    def rollout(
        self,
        prompts: Sequence[str],
        num_steps: int = 20,
        guidance_scale: float = 4.5,
        eta: float = 0.7,
        seeds: Sequence[int] | None = None,
        latents: Tensor | None = None,
        need_log_probs: bool = True,
        decode: bool = True,
        sde_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample with the config's SDE (`sde_type`, Flow-GRPO's by default; noise level `eta`);
        keep x_1..x_0 and each step's log-prob.

        eta = 0 is the deterministic Euler sampler of diffusers' pipelines. Noise is drawn per
        sample from `seeds` (default 0..B-1), so a sample does not depend on its batch. The SDE
        type is stored in `extras`, so `step_log_prob` scores the step that was taken. With
        `sde_steps`, only those steps are stochastic and the others Euler steps (MixGRPO /
        Flow-GRPO-Fast); their log-probs are NaN.
        """
        sde_steps = None if sde_steps is None else tuple(sde_steps)
        if need_log_probs and (eta <= 0 or sde_steps == ()):
            raise ValueError(
                "rollout: eta=0 is the deterministic ODE sampler and has no step log-probabilities "
                "(nor sde_steps=[]); use eta>0 or need_log_probs=False"
            )
        prompts = list(prompts)
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        dev, shape = self.device, self.latent_shape
        cond = self.encode_prompt(prompts)
        cfg_on = guidance_scale > 1.0 and not self.distilled_guidance
        uncond = self.encode_prompt(prompts, negative=True) if cfg_on else None
        timesteps, sigmas = self.sampling_schedule(num_steps)
        x = per_sample_randn(seeds, shape, dev) if latents is None else latents.to(dev).float()
        traj, logps = [x], []
        with torch.no_grad():
            for k, t in enumerate(timesteps):
                v = self.guided_velocity(x, t, cond, uncond, guidance_scale)
                eta_k = step_noise_level(eta, sde_steps, k)
                mean, std = sde_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], eta_k, self.cfg.sde_type)
                if std > 0:
                    x = mean + std * per_sample_randn([s * 7919 + k + 1 for s in seeds], shape, dev)
                    if need_log_probs:
                        logps.append(step_gaussian_log_prob(x, mean, std))
                else:
                    x = mean
                    if need_log_probs and eta_k == 0:  # outside sde_steps
                        logps.append(torch.full((len(x),), math.nan, device=dev, dtype=torch.float64))
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
                "num_steps": num_steps,
                "sde_type": self.cfg.sde_type,
                "sde_steps": sde_steps,
            },
        )

    # ------------------------------------------------------------------ hooks of the guided samplers
    # (mmalign/guidance/common.py). A step is named by its timestep t = sigma * N in scheduler
    # units; the sigmas themselves come from the schedule `sampling_timesteps` set, so the
    # guided samplers walk exactly `rollout`'s grid.
    prediction_type = "flow"

    def sampling_timesteps(self, num_steps: int) -> list[tuple[float, float]]:
        """(t, t_next) of each step of `rollout(num_steps=...)`; t_next = 0 at the last."""
        if self.distilled_guidance:
            raise ValueError(
                "guided sampling combines u + s (c - u) per step; a guidance-distilled FLUX model takes "
                "its scale through an embedding and has no unconditional branch"
            )
        timesteps, sigmas = self.sampling_schedule(num_steps)
        ts = [float(t) for t in timesteps] + [0.0]
        self._guided_sigmas = {ts[k]: (sigmas[k], sigmas[k + 1]) for k in range(num_steps)}
        self._guided_sigma_max = sigmas[1]  # as `rollout` (flow_grpo's sigmas[1]; 0 with one step)
        return [(ts[k], ts[k + 1]) for k in range(num_steps)]

    def _step_sigmas(self, t: float) -> tuple[float, float]:
        try:
            return self._guided_sigmas[float(t)]
        except (AttributeError, KeyError):
            raise ValueError(f"timestep {t}: not on the grid of the last sampling_timesteps() call") from None

    def _sigma(self, t: float) -> float:
        return self._step_sigmas(t)[0]

    def initial_latents(self, seeds: Sequence[int]) -> Tensor:
        """x_1 of each sample, drawn from its seed as `rollout` draws it."""
        return per_sample_randn(seeds, self.latent_shape, self.device)

    def step_noise(self, seeds: Sequence[int], step: int) -> Tensor:
        """The noise `rollout` adds at step `step` (eta > 0)."""
        return per_sample_randn([s * 7919 + step + 1 for s in seeds], self.latent_shape, self.device)

    def cfg_outputs(self, x: Tensor, t: float, cond: dict, uncond: dict | None) -> tuple[Tensor | None, Tensor]:
        """(unconditional, conditional) velocities from one batched pass; (None, cond) without `uncond`."""
        tt = torch.tensor(float(t), device=self.device)
        if uncond is None:
            return None, self.model_output(x, tt, cond)
        u, c = self.model_output(torch.cat([x, x]), tt, self.cat_cond(uncond, cond)).chunk(2)
        return u, c

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """x_t = (1 - sigma) x_0 + sigma noise."""
        s = self._sigma(t)
        return 1.0 - s, s

    def predicted_x0(self, pred: Tensor, x: Tensor, t: float) -> Tensor:
        """x̂_0 = x_t - sigma v (differentiable)."""
        return x - self._sigma(t) * pred

    def sampler_step(
        self, pred: Tensor, x: Tensor, t: float, t_next: float, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """One step of `rollout`'s sampler from a (guided) velocity: Euler at eta = 0, else the config's SDE."""
        sigma, sigma_next = self._step_sigmas(t)
        mean, std = sde_step(pred, x, sigma, sigma_next, self._guided_sigma_max, eta, self.cfg.sde_type)
        if std > 0:
            if noise is None:
                raise ValueError("sampler_step: eta > 0 needs `noise`")
            return mean + std * noise
        return mean

    def condition(self, rollout: Rollout) -> Rollout:
        """(Re)compute a rollout's text conditioning from its prompts (e.g. after loading it)."""
        rollout.extras["cond"] = self.encode_prompt(rollout.prompts)
        g = rollout.extras.get("guidance_scale", 1.0)
        cfg_on = g > 1.0 and not self.distilled_guidance
        rollout.extras["uncond"] = self.encode_prompt(rollout.prompts, negative=True) if cfg_on else None
        return rollout

    def step_log_prob(
        self, rollout: Rollout, step: int, index: Tensor | slice = slice(None), return_mean: bool = False
    ):
        """log p(latents[:, step+1] | latents[:, step], c) under the current (or reference) model.

        With `return_mean`, also the step's Gaussian mean and sigma_t (`sde_noise_level`; the
        step's std is sigma_t sqrt(-dt)): flow_grpo's KL is mean_d (mu - mu_ref)^2 / (2 sigma_t^2)
        (train_sd3.py). The SDE is the one the rollout was sampled with (its extras' sde_type;
        the config's when absent).
        """
        ex = rollout.extras
        x = rollout.latents[index, step].to(self.device).float()
        x_next = rollout.latents[index, step + 1].to(self.device).float()
        _, sigmas = self.sampling_schedule(int(ex["num_steps"]))
        sub = lambda d: None if d is None else {k: v[index] for k, v in d.items()}
        v = self.guided_velocity(x, rollout.timesteps[step], sub(ex["cond"]), sub(ex["uncond"]), ex["guidance_scale"])
        eta, sde_type = trained_step_noise_level(ex, step), ex.get("sde_type", self.cfg.sde_type)
        mean, std = sde_step(v, x, sigmas[step], sigmas[step + 1], sigmas[1], eta, sde_type)
        logp = step_gaussian_log_prob(x_next, mean, std)
        return (logp, mean, sde_noise_level(sigmas[step], sigmas[1], eta, sde_type)) if return_mean else logp

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> Path:
        """Save what was trained: a diffusers-format transformer LoRA (pipe.load_lora_weights reads it),
        or the full transformer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.transformer)
            type(self.pipe).save_lora_weights(out, transformer_lora_layers=layers, safe_serialization=True)
        else:
            self.transformer.save_pretrained(out / "transformer", safe_serialization=True)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune})
        )
        return out

    def load_trained(self, path: str | Path) -> None:
        """Load weights written by `save_trained` (a LoRA directory or a full transformer)."""
        path = Path(path)
        if (path / "pytorch_lora_weights.safetensors").is_file():
            if self.cfg.finetune != "lora":
                self.pipe.load_lora_weights(path)
                return
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            sd = load_file(path / "pytorch_lora_weights.safetensors")
            sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
            res = set_peft_model_state_dict(self.transformer, sd)
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"{path}: LoRA keys do not match this transformer: {res.unexpected_keys[:5]}")
        elif (path / "transformer" / "config.json").is_file():
            loaded = type(self.transformer).from_pretrained(path / "transformer")
            res = self.transformer.load_state_dict(loaded.state_dict(), strict=False)
            if res.unexpected_keys:
                raise ValueError(f"{path}: transformer weights do not match: {res.unexpected_keys[:5]}")
        else:
            raise FileNotFoundError(f"{path}: neither pytorch_lora_weights.safetensors nor transformer/ found")


@register_generator("flow", FlowGeneratorConfig)
def build_flow(cfg: FlowGeneratorConfig) -> FlowMatchingGenerator:
    """Rectified-flow transformers (SD3 / SD3.5, FLUX) through diffusers, with Flow-GRPO's or DanceGRPO's SDE."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return FlowMatchingGenerator(cfg)
