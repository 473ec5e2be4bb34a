"""Generator adapter for Wan 2.1 text-to-video (Wan team, "Wan: Open and Advanced Large-Scale
Video Generative Models", 2025) through diffusers' `WanPipeline`.

Wan is a rectified-flow transformer, so everything that defines the training objective and the
samplers is the flow adapter's (`pipelines/flow.py`, FlowMatchingGenerator, which this class
subclasses): x_sigma = (1 - sigma) x0 + sigma noise, velocity target v = noise - x0;
`denoise_error` is the per-sample mean over *all* latent dimensions (channels, latent frames,
height, width) of ||v - v_theta||^2 with the flow adapter's timestep density and loss
weightings; `rollout` is Flow-GRPO's SDE sampler (or DanceGRPO's, `sde_type: dance_grpo`) with
per-dimension-mean Gaussian log-probs; `step_log_prob`, `predict_x0`, the guidance hooks and
LoRA save/load are the flow adapter's. What differs for Wan is only:

- loading: `WanPipeline` (`WanTransformer3DModel`, `AutoencoderKLWan`, UMT5 text encoder).
  Wan 2.2's two-expert pipelines (`transformer_2` with a `boundary_ratio`) and the TI2V
  per-token timesteps (`expand_timesteps`) are refused at load with one line;
- latents are 5-D: (C, F_lat, h, w) per sample, F_lat = (num_frames - 1) // 4 + 1 and
  h, w = height / 8, width / 8 (the VAE's `scale_factor_temporal` / `scale_factor_spatial`);
  `num_frames` must be 4k + 1 (checked when the config loads);
- the VAE's latent normalisation: z_model = (z - latents_mean) / latents_std per channel
  (WanPipeline decodes with z = z_model * latents_std + latents_mean);
- `encode_prompt` is the pipeline's (UMT5 states, zero-padded to `max_sequence_length`);
- `model_output` calls the transformer with `timestep` (scheduler units) and
  `encoder_hidden_states`; the zero-padded text tokens run as one key with its logit raised by
  log(n) (RepeatedTokenWanAttnProcessor; the same velocities up to float rounding,
  `repeated_token_attention: false` runs all of them);
- the timestep grid is the pipeline's scheduler's (`set_timesteps(num_steps)`: its timesteps go
  to the model, its sigmas into the steps), as WanPipeline and flow_grpo's Wan script set it. With
  FlowMatchEulerDiscreteScheduler the ODE path (eta = 0) is WanPipeline.__call__; released Wan
  checkpoints ship UniPCMultistepScheduler (flow sigmas, `flow_shift`), whose grid is walked with
  the same single Euler / SDE steps, not UniPC's multistep update (as flow_grpo does; docs/parity.md).
  Training sigmas (`denoise_error`) take the scheduler's `shift` / `flow_shift`;
- `encode_images` takes videos (B, F, 3, H, W in [0, 1]) and `decode` returns
  `Samples(video=B, F, 3, H, W in [0, 1])`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import ConfigError, check_hub_model, num
from mmalign.pipelines.common import DTYPES, VAE_SALT, LoraSettings, TrainedModule
from mmalign.pipelines.flow import LOSS_WEIGHTINGS, SDE_TYPES, FlowMatchingGenerator, check_choice
from mmalign.registry import register_generator
from mmalign.types import Samples, per_sample_randn

# Self- (attn1) and cross-attention (attn2) projections of Wan's transformer blocks: what
# flow_grpo's train_wan2_1.py targets (its suffixes to_q/to_k/to_v/to_out.0 match these; its
# add_*_proj exist only in image-to-video blocks), with its rank 32 / alpha 64 gaussian-init
# LoRA as the default; add "ffn.net.0.proj", "ffn.net.2" for the feed-forward layers.
WAN_LORA_TARGETS = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]


def _wan_lora() -> LoraSettings:
    return LoraSettings(rank=32, alpha=64.0, target_modules=list(WAN_LORA_TARGETS))


@dataclass
class WanGeneratorConfig:
    pretrained: str  # hub id or local directory in WanPipeline layout (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: LoraSettings = field(default_factory=_wan_lora)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen transformer / text encoder weights
    num_frames: int = num(81, ge=1)  # 4k + 1 (the VAE compresses 4 frames into one latent frame after the first)
    resolution: int | None = num(None, ge=16)  # square videos; sets height and width
    height: int | None = num(None, ge=16)  # pixels; default WanPipeline's 480
    width: int | None = num(None, ge=16)  # pixels; default WanPipeline's 832
    fps: int = num(16, ge=1)  # frame rate of written sample videos (Wan 2.1 generates 16 fps)
    negative_prompt: str = ""
    # UMT5 tokens, zero-padded as WanPipeline pads them; None: the pipeline's default (512)
    max_sequence_length: int | None = num(None, ge=1)
    vae_latents: Literal["sample", "mean"] = "sample"  # latents of videos to train on (see encode_images)
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"  # training-time sigma density
    logit_mean: float = num(0.0)
    logit_std: float = num(1.0, gt=0)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap", "eps"] = "none"  # as the flow generator's
    sde_type: Literal["flow_grpo", "dance_grpo"] = "flow_grpo"  # as the flow generator's
    # run the zero-padded text tokens as one in the cross-attention (same outputs up to float rounding)
    repeated_token_attention: bool = True

    def validate(self) -> None:
        from mmalign.paths import resolve

        p = self.pretrained = resolve(self.pretrained)
        looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1
        if looks_local and not Path(p).expanduser().is_dir():
            raise ValueError(f"pretrained: directory {p} not found")
        if Path(p).is_dir() and not (Path(p) / "model_index.json").is_file():
            raise ValueError(f"pretrained: {p} has no model_index.json (not a diffusers pipeline directory)")
        check_num_frames(self.num_frames)
        if self.resolution is not None and (self.height is not None or self.width is not None):
            raise ValueError("resolution: give either resolution (square) or height/width, not both")
        self.validate_choices()

    def validate_choices(self) -> None:
        check_choice("sde_type", self.sde_type, SDE_TYPES)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)


class RepeatedTokenWanAttnProcessor:
    """diffusers' WanAttnProcessor for the cross-attention (attn2), where the last text token may
    stand for n identical ones.

    WanPipeline zero-pads the UMT5 states to `max_sequence_length` (512) tokens. Every per-token
    op before and inside the cross-attention (the text embedder's MLP, to_k / to_v, the RMS norm
    of the keys) maps the identical zero tokens to identical keys and values, so n of them in a
    softmax are one of them with its logit raised by log(n). The generator cuts the text states
    after the first position from which all are zero (`cut_zero_tokens`); text states of
    S < `total` positions then end in one token standing for total - S + 1, which gets the bias.
    n comes from the input's length alone, so a recomputation (gradient checkpointing) sees the
    same attention. Full-length text states take the stock path. The same velocities up to float
    rounding, at the cost of the real tokens plus one (as the flow adapter runs SD3's zero T5
    tokens).
    """

    def __init__(self, total: int):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.stock = WanAttnProcessor()
        self.total = total

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None and attn.add_k_proj is None:
            n = self.total - encoder_hidden_states.shape[1] + 1
            if n > 1:
                bias = torch.zeros(
                    encoder_hidden_states.shape[1], dtype=hidden_states.dtype, device=hidden_states.device
                )
                bias[-1] = math.log(n)
                attention_mask = bias.view(1, 1, 1, -1)
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def check_num_frames(n: int, temporal: int = 4, key: str = "num_frames") -> None:
    """ValueError unless n = temporal * k + 1 (Wan's causal VAE keeps the first frame and
    compresses each following `temporal` frames into one latent frame)."""
    if n < 1 or (n - 1) % temporal:
        lo = (n - 1) // temporal * temporal + 1
        raise ValueError(
            f"{key}: {n} is not {temporal}k+1 (Wan's VAE encodes the first frame and then groups of "
            f"{temporal}); use {max(lo, 1)} or {lo + temporal}"
        )


class WanGenerator(FlowMatchingGenerator):
    """Wan 2.1 text-to-video through diffusers; the transformer is what trains."""

    modality = "video"

    def __init__(self, cfg: WanGeneratorConfig, pipe: Any = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

        self.cfg = cfg
        cfg.validate_choices()
        check_num_frames(cfg.num_frames, key="generator.num_frames")
        if pipe is None:
            from diffusers import DiffusionPipeline

            from mmalign.paths import resolve

            cfg.pretrained = resolve(cfg.pretrained)
            local = Path(cfg.pretrained).expanduser()
            src = str(local) if local.is_dir() else cfg.pretrained
            index = DiffusionPipeline.load_config(src, revision=cfg.revision)
            cls = index.get("_class_name", "")
            if cls != "WanPipeline":
                raise ValueError(
                    f"generator.pretrained: {src} is a {cls}; the wan generator loads the WanPipeline "
                    "(text-to-video) layout"
                )
            check_wan_variant(index, src)
            # the VAE loads in float32 whatever `dtype` is (as Wan's own code runs it)
            dtypes = {"vae": torch.float32, "default": DTYPES[cfg.dtype]}
            kw: dict[str, Any] = dict(revision=cfg.revision, variant=cfg.variant, dtype=dtypes)
            if index.get("transformer_2", [None])[0] is None:
                kw["transformer_2"] = None
            pipe = WanPipeline.from_pretrained(src, **kw)
        else:
            check_wan_variant({**pipe.config, "transformer_2": [pipe.transformer_2]}, "pipe")
        self.pipe = pipe
        self.is_flux = False
        self.distilled_guidance = False
        self.zero_tokens = 0
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer: nn.Module = pipe.transformer
        # the VAE decodes in float32 (a pipeline passed in is cast); it is small next to the transformer
        self.vae = (
            (pipe.vae if pipe.vae.dtype == torch.float32 else pipe.vae.to(torch.float32)).requires_grad_(False).eval()
        )
        pipe.text_encoder.requires_grad_(False).eval()
        sc = pipe.scheduler.config
        # the sampling grid: the pipeline's own scheduler (a copy), as WanPipeline sets its timesteps
        self.sample_scheduler = type(pipe.scheduler).from_config(sc)
        if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sc)
        elif sc.get("use_flow_sigmas") or sc.get("prediction_type") == "flow_prediction":
            # UniPC / DPM-Solver with flow sigmas (the released checkpoints): the training-time sigmas
            # use the same shift (flow_shift)
            shift = sc.get("flow_shift", None) or sc.get("shift", 1.0)
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=sc.num_train_timesteps, shift=shift)
        else:
            raise ConfigError(
                f"generator.pretrained: the pipeline's scheduler {type(pipe.scheduler).__name__} is not a "
                "flow-matching one (FlowMatchEulerDiscreteScheduler, or UniPC / DPM-Solver with use_flow_sigmas)"
            )
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.vae_scale = pipe.vae_scale_factor_spatial
        self.vae_scale_temporal = pipe.vae_scale_factor_temporal
        check_num_frames(cfg.num_frames, self.vae_scale_temporal, "generator.num_frames")
        tcfg = self.transformer.config
        self.latent_channels = tcfg.in_channels
        side = cfg.resolution
        self.height = cfg.height or side or 480
        self.width = cfg.width or side or 832
        self.resolution = self.height if self.height == self.width else (self.height, self.width)
        ph, pw = tcfg.patch_size[1], tcfg.patch_size[2]
        for key, px, p in (("height", self.height, ph), ("width", self.width, pw)):
            if px % (self.vae_scale * p):
                raise ConfigError(
                    f"generator.{'resolution' if side else key}: {px} is not a multiple of {self.vae_scale * p} "
                    "(the VAE's downsampling x the transformer's patch size)"
                )
        self.num_frames = cfg.num_frames
        self.fps = cfg.fps
        self.compute_dtype = DTYPES[cfg.dtype]
        self.max_sequence_length = cfg.max_sequence_length
        if self.max_sequence_length is None:
            self.max_sequence_length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        # the zero-padded text tokens run as one (RepeatedTokenWanAttnProcessor) unless
        # cfg.repeated_token_attention is off; image-to-video blocks (add_k_proj) are not Wan 2.1 T2V
        self._trained = TrainedModule(self.transformer, cfg.finetune, cfg.lora, DTYPES[cfg.dtype])
        self.cross_attn = (
            RepeatedTokenWanAttnProcessor(self.max_sequence_length) if cfg.repeated_token_attention else None
        )
        if self.cross_attn is not None:  # one processor, shared by the policy and a frozen full copy
            for module in (self.transformer, self._trained.ref):
                for block in getattr(module, "blocks", []):
                    block.attn2.set_processor(self.cross_attn)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F_lat, h, w) of one video's latent."""
        f = (self.num_frames - 1) // self.vae_scale_temporal + 1
        return (self.latent_channels, f, self.height // self.vae_scale, self.width // self.vae_scale)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Tensor]:
        """UMT5 states of `prompts` (or of the negative prompt), zero-padded to max_sequence_length
        as WanPipeline.encode_prompt pads them."""
        texts = [self.cfg.negative_prompt] * len(prompts) if negative else list(prompts)
        emb, _ = self.pipe.encode_prompt(
            texts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"encoder_hidden_states": emb}

    # ------------------------------------------------------------------ model calls
    def model_output(
        self, latents: Tensor, t: Tensor, cond: dict[str, Tensor], guidance: float | None = None
    ) -> Tensor:
        """Velocity v_theta(x, t, c) in float32 for latents B,C,F,h,w; t in scheduler units."""
        model = self._trained.current()
        dtype = next(model.parameters()).dtype if self._trained.use_ref else self.compute_dtype
        B = latents.shape[0]
        t = t.to(latents.device, torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        emb = cond["encoder_hidden_states"]
        if self.cross_attn is not None and emb.shape[1] == self.max_sequence_length:
            emb = cut_zero_tokens(emb)  # the zero tail as one token (RepeatedTokenWanAttnProcessor)
        return model(
            hidden_states=latents.to(dtype), timestep=t, encoder_hidden_states=emb.to(dtype), return_dict=False
        )[0].float()

    def sampling_schedule(self, num_steps: int) -> tuple[Tensor, list[float]]:
        """(timesteps [T], sigmas [T+1] ending at 0) of the pipeline's scheduler, as WanPipeline sets
        them (`set_timesteps(num_steps)`); the model sees the timesteps, the steps use the sigmas."""
        self.sample_scheduler.set_timesteps(num_steps, device="cpu")
        timesteps = self.sample_scheduler.timesteps.clone()
        sigmas = [float(s) for s in self.sample_scheduler.sigmas]
        if sigmas and 1 - 1e-5 < sigmas[0] < 1:
            # UniPC's flow grid starts at float32(1 - 1/1000 shifted) = 0.999999: taken as the pure-noise
            # sigma 1, where the Flow-GRPO SDE uses the next grid value in sqrt(sigma / (1 - sigma))
            # instead of a noise level 1000x eta
            sigmas[0] = 1.0
        if len(sigmas) != num_steps + 1 or sigmas[-1] != 0.0 or len(timesteps) != num_steps:
            raise ValueError(
                f"wan: the scheduler {type(self.sample_scheduler).__name__} gives {len(timesteps)} timesteps and "
                f"sigmas ending at {sigmas[-1]} for {num_steps} steps; the samplers need one sigma per step and a "
                "final sigma 0 (final_sigmas_type: zero)"
            )
        return timesteps, sigmas

    def _mu(self) -> float:
        raise ValueError("wan: a scheduler with use_dynamic_shifting is not supported (Wan uses a fixed shift)")

    # ------------------------------------------------------------------ VAE
    def _to_model_latents(self, z: Tensor) -> Tensor:
        return (z.float() - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    @torch.no_grad()
    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Videos B,F,3,H,W in [0,1] -> normalised latents B,C,F_lat,h,w: a posterior draw
        (`vae_latents: sample`, each from its seed in `seeds`, as the flow adapter draws image
        latents) or the posterior mean."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"wan: videos to encode must be B,F,3,H,W in [0,1], got shape {tuple(images.shape)}")
        x = images.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1
        dist = self.vae.encode(x).latent_dist
        z = dist.mean
        if self.cfg.vae_latents == "sample":
            if seeds is None:
                eps = torch.randn_like(z)
            else:
                eps = per_sample_randn([int(s) * 1_000_003 + VAE_SALT for s in seeds], z.shape[1:], z.device, z.dtype)
            z = z + dist.std * eps
        return self._to_model_latents(z)

    encode_videos = encode_images

    def decode(self, latents: Tensor) -> Samples:
        """Normalised latents B,C,F_lat,h,w -> Samples(video=B,F,3,H,W in [0,1]) as WanPipeline decodes them."""
        dev = latents.device
        z = latents.float() * self.latents_std.to(dev) + self.latents_mean.to(dev)
        x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return Samples(video=((x + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous())


def cut_zero_tokens(emb: Tensor) -> Tensor:
    """emb[:, :L + 1]: the text states up to the first position L from which every sample's
    tokens are all zero, that position standing for the S - L zero tokens; `emb` itself when
    the zero tail is shorter than two tokens."""
    nonzero = emb.detach().abs().amax(dim=(0, 2)) > 0  # [S]: some sample has a non-zero state there
    idx = torch.nonzero(nonzero).flatten()
    L = int(idx[-1]) + 1 if len(idx) else 0
    return emb if emb.shape[1] - L <= 1 else emb[:, : L + 1]


def check_wan_variant(index: dict, src: str) -> None:
    """One line for the Wan pipelines this adapter does not run."""
    two = index.get("transformer_2", [None])
    if (two and two[0] is not None) or index.get("boundary_ratio") is not None:
        raise ConfigError(
            f"generator.pretrained: {src} is a Wan 2.2 two-expert pipeline (transformer_2 with boundary_ratio); "
            "the wan generator trains one transformer (Wan 2.1 T2V, or a Wan 2.2 single-transformer T2V)"
        )
    if index.get("expand_timesteps"):
        raise ConfigError(
            f"generator.pretrained: {src} uses per-token timesteps (Wan 2.2 TI2V, expand_timesteps); "
            "the wan generator does not support it"
        )


@register_generator("wan", WanGeneratorConfig)
def build_wan(cfg: WanGeneratorConfig) -> WanGenerator:
    """Wan 2.1 text-to-video (WanPipeline) with Flow-GRPO's or DanceGRPO's SDE and the flow-matching objectives."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return WanGenerator(cfg)
