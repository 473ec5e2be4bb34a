"""The written interfaces: one typed protocol per role a component can play.

The trainer (`mmalign.trainer`) and the inference-time samplers (`mmalign.guidance`) dispatch
on these with `isinstance`, never by probing for attributes. A component plays a role by
having every member of its protocol (no base class to inherit); a component that cannot do
something simply does not have the hook, so it does not satisfy that protocol and the caller
refuses it with one line naming what is missing (`require`).

Roles:

    methods     Method (every method), OnlineMethod, SetupMethod, AfterStepMethod,
                StatefulMethod, OwnDataMethod, RewardOptionalMethod
    generators  Generator (every generator), DiffusionGenerator, GuidableGenerator, TokenGenerator
    rewards     Reward (per-sample; its `modality` says which Samples field it reads),
                PairwiseJudge, OrderedPairwiseJudge, DistributionReward, MovesToDevice

docs/interfaces.md lists the hooks, the shipped classes that implement each protocol, and the
trainer's call order. The data types they exchange (`Samples`, `Rollout`) are in `mmalign.types`.

Processes: under `accelerate launch` every process builds its own generator, reward and method
and the trainer calls every hook on every process (rank r sees its share of a round's prompts)
unless a docstring says otherwise. Tensors are on the generator's device unless stated.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mmalign.config import ConfigError
from mmalign.types import Modality, Rollout, Samples

if TYPE_CHECKING:
    from mmalign.methods.online import RolloutSettings


# =========================================================================== generators
@runtime_checkable
class Generator(Protocol):
    """What the trainer needs of any generator: the trained module, devices, the frozen
    reference and saving. Every registered generator satisfies it."""

    modality: Modality  # what `rollout(...).samples` holds
    cfg: Any  # the generator's config dataclass; `cfg.pretrained` (the base model) keys data caches

    @property
    def device(self) -> torch.device:
        """The device of the trained module."""
        ...

    def to(self, device: Any) -> Any:
        """Move every model (trained, frozen, reference) to `device`; returns self. Called once by the
        trainer after building the generator."""
        ...

    def trainable(self) -> nn.Module:
        """The module whose parameters with `requires_grad` the optimizer trains (LoRA adapters or the
        whole network). The trainer wraps it with `accelerate.prepare` and checkpoints those parameters."""
        ...

    def set_forward_module(self, module: nn.Module) -> None:
        """Route training forwards through `module`: the trainer's wrapped (DDP) `trainable()` while
        training, the unwrapped one while sampling a round or evaluating (no collective ops)."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the trained module (`train.gradient_checkpointing`)."""
        ...

    def reference(self) -> AbstractContextManager:
        """A context inside which every forward pass uses the frozen reference policy (LoRA disabled,
        or a frozen copy of the initial weights); a no-op with `finetune: none`."""
        ...

    def save_trained(self, out_dir: str | Path) -> Path:
        """Write what was trained in the generator's own loadable format (main process only, inside
        the EMA weights when EMA is on); returns `out_dir`."""
        ...

    def load_trained(self, path: str | Path) -> None:
        """Load weights written by `save_trained` (sampling and evaluating a trained run)."""
        ...


@runtime_checkable
class DiffusionGenerator(Generator, Protocol):
    """A latent diffusion or flow generator that the diffusion methods train: sampling with
    per-step log-probabilities, the denoising loss, the VAE and the text encoder.

    Latents are [B, C, h, w] float32 (`latent_shape` = (C, h, w)); timesteps `t` are in training
    units, integers (or floats for flow models) in [0, num_train_timesteps)."""

    resolution: int  # output pixels (square)
    num_train_timesteps: int
    prediction_type: str  # "epsilon" | "v_prediction" | "flow"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at `resolution`."""
        ...

    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Any]:
        """The text conditioning of `prompts` (a dict of batch-first tensors), or of the negative
        prompt repeated len(prompts) times when `negative`."""
        ...

    @staticmethod
    def cat_cond(*conds: dict[str, Any]) -> dict[str, Any]:
        """Concatenate conditionings along the batch (one model pass for several branches)."""
        ...

    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Images [B,3,H,W] in [0, 1] -> scaled latents [B, *latent_shape] (a VAE posterior draw per
        sample from `seeds`, or its mean, as the generator's `vae_latents` says)."""
        ...

    def decode(self, latents: Tensor) -> Samples:
        """Scaled latents [B, *latent_shape] -> Samples(images=[B,3,H,W] in [0, 1])."""
        ...

    def model_output(self, latents: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The network's raw output (in `prediction_type`'s parameterisation, float32) at noisy
        `latents` [B, ...] and timesteps `t` [B] under `cond`; differentiable through the trained
        module (or the reference inside `reference()`)."""
        ...

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
        """Sample `prompts` (no gradients): a `Rollout` with every latent x_T..x_0 [B, T+1, ...], the
        timesteps [T], per-step log-probabilities [B, T] float64 of the stochastic steps (None with
        `need_log_probs=False`) and decoded samples. Noise comes from `seeds` (one per sample), so a
        sample does not depend on its batch. Called by online methods' `collect` on every process."""
        ...

    def condition(self, rollout: Rollout) -> Rollout:
        """(Re)compute `rollout.extras["cond"/"uncond"]` from its prompts (after loading a buffer)."""
        ...

    def step_log_prob(
        self, rollout: Rollout, step: int, index: Tensor | slice = slice(None), return_mean: bool = False
    ) -> Any:
        """log p(latents[:, step+1] | latents[:, step], c) [B'] float64 under the current model (or the
        reference inside `reference()`), for the samples `index`; with `return_mean` also the step's
        Gaussian mean and std, as (logp, mean, std). Differentiable; policy-gradient methods call it
        in `loss`."""
        ...

    def denoise_error(
        self,
        x0: Tensor,
        cond: dict[str, Any],
        t: Tensor,
        noise: Tensor,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Per-sample mean squared error [B] of the denoiser on x0 [B, ...] noised with `noise` to
        timesteps `t` [B] (the CFG-guided prediction with `uncond` and a scale != 1). Differentiable;
        the Diffusion-DPO family and RAFT call it in `loss`."""
        ...

    def predict_x0(self, x0: Tensor, cond: dict[str, Any], t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_0, x_t): noise x0 to timesteps t and estimate it back from the model's output."""
        ...


@runtime_checkable
class GuidableGenerator(Protocol):
    """The sampling hooks the inference-time samplers of `mmalign.guidance` need. They walk exactly
    the steps `rollout` walks, so with the same settings a guided sampler with one candidate
    reproduces `rollout`. `t` below is the sampler's timestep (an int for DDIM, a float for flow)."""

    prediction_type: str  # "epsilon" | "v_prediction" | "flow": how cfg_outputs are parameterised

    def encode_prompt(self, prompts: Sequence[str], negative: bool = False) -> dict[str, Any]:
        """As `DiffusionGenerator.encode_prompt`."""
        ...

    def decode(self, latents: Tensor) -> Samples:
        """Latents [N, ...] -> Samples(images=[N,3,H,W] in [0, 1])."""
        ...

    def sampling_timesteps(self, num_steps: int) -> list[tuple[Any, Any]]:
        """[(t, t_prev), ...] of the sampler's steps, first (noisiest) to last."""
        ...

    def initial_latents(self, seeds: Sequence[int]) -> Tensor:
        """x_T [B, ...], drawn per sample from `seeds` as `rollout` draws it."""
        ...

    def step_noise(self, seeds: Sequence[int], step: int) -> Tensor:
        """The noise [B, ...] `rollout` adds at `step` when eta > 0."""
        ...

    def cfg_outputs(self, x: Tensor, t: Any, cond: dict, uncond: dict | None) -> tuple[Tensor | None, Tensor]:
        """(unconditional, conditional) model outputs from one batched pass; (None, c) without
        `uncond`. Any CFG scale s is then u + s (c - u) at no further model cost."""
        ...

    def predicted_x0(self, pred: Tensor, x: Tensor, t: Any) -> Tensor:
        """x̂_0 from a (guided) model output at x_t; differentiable (reward guidance backpropagates)."""
        ...

    def sampler_step(
        self, pred: Tensor, x: Tensor, t: Any, t_prev: Any, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """One sampler step from a (guided) output: x_{t_prev}; `noise` is needed when eta > 0."""
        ...

    def alpha_sigma(self, t: Any) -> tuple[float, float]:
        """(alpha, sigma) with x_t = alpha x_0 + sigma noise at `t`."""
        ...


@runtime_checkable
class TokenGenerator(Generator, Protocol):
    """An autoregressive vision-language model (`pipelines/vlm.py`): responses are token sequences,
    scored per token; it has no denoising steps."""

    def encoder(self) -> Any:
        """The prompt/response encoder (`mmalign.data.vlm.VLMEncoder`) for this model's processor."""
        ...

    @property
    def pad_id(self) -> int:
        """The token id that pads sequences."""
        ...

    def token_logps(self, seqs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(logps, loss_mask, changed), each [N, L-1]: log p of every next token of the encoded
        sequences (`mmalign.data.vlm.build_sequences`) under the current model (or the reference
        inside `reference()`); zero outside the response. Differentiable."""
        ...

    def generate_ids(
        self,
        prompts: Sequence,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[Tensor]:
        """One sampled response (token ids, cut after end-of-sequence) per encoded prompt."""
        ...

    def rollout(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        num_samples: int = 1,
        seeds: Sequence[int] | None = None,
        **sampling: Any,
    ) -> Rollout:
        """`num_samples` responses per (image(s), prompt): Samples(text=[B*K]) prompt-major."""
        ...


# =========================================================================== methods
@runtime_checkable
class Method(Protocol):
    """What every method is: a loss on a micro-batch, and the generator role that loss needs.

    Without any further role the method is *offline*: the trainer builds its data from `data:`
    (preference pairs: manifest, Pick-a-Pic or generated) and feeds it micro-batches."""

    # The generator protocol `loss` calls (DiffusionGenerator or TokenGenerator); the trainer
    # refuses a generator that does not satisfy it before anything runs.
    generator_role: type

    def loss(self, batch: dict, generator: Any) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss of one micro-batch (differentiable w.r.t. `generator.trainable()`) and
        float metrics to log. Called on every process, grad_accum times per optimizer step, inside
        `accelerator.autocast()`; `batch` is a collated micro-batch of `train.batch_size` items
        (offline) or `OnlineMethod.batch`'s dict (online). It must hold "prompts"."""
        ...


@runtime_checkable
class OnlineMethod(Method, Protocol):
    """A method that samples its own data: rounds of `collect` with the current policy, each
    followed by `rollout.steps_per_round` optimizer steps on micro-batches of that round."""

    rollout: RolloutSettings  # prompts_per_round, samples_per_prompt, steps_per_round, sampler settings

    def collect(self, generator: Any, reward: Any, prompts: Sequence[str], seeds: Sequence[int]) -> Any:
        """Sample and score one round on this process (no gradients): `prompts` are this rank's
        share of the round's prompts, `seeds` one per prompt. Returns the round's buffer (usually a
        `Rollout`, saved with checkpoints for exact resume). `reward` may be None
        (`RewardOptionalMethod`)."""
        ...

    def round_metrics(self, buffer: Any) -> dict[str, float]:
        """Float statistics of a round (e.g. reward_mean), averaged over processes and logged as
        rollout/<name>. Called once per round, right after `collect`."""
        ...

    def num_items(self, buffer: Any) -> int:
        """How many trainable items the buffer holds (samples, pairs ...). Zero stops training with
        an error (nothing to learn from the round)."""
        ...

    def batch(self, buffer: Any, idx: list[int], seeds: list[int]) -> dict:
        """The micro-batch of items `idx` (indices < num_items) with one seed per item for the
        loss's own randomness; what `loss` receives."""
        ...


@runtime_checkable
class SetupMethod(Protocol):
    """A method that prepares itself against the built generator and reward (checks them, builds
    models it owns, or replaces the trained module)."""

    def setup(self, generator: Any, reward: Any) -> None:
        """Called once in `Trainer.__init__`, after the generator is on its device and before the
        optimizer sees `generator.trainable()`; `reward` may be None."""
        ...


@runtime_checkable
class AfterStepMethod(Protocol):
    """A method that updates models of its own after every optimizer step (e.g. a target network)."""

    def after_step(self, generator: Any) -> dict[str, float]:
        """Called after each optimizer (and EMA) step on every process; returns metrics to log."""
        ...


@runtime_checkable
class StatefulMethod(Protocol):
    """A method with state besides the generator's trained weights (saved as method.pt)."""

    def state_dict(self) -> dict:
        """The state to checkpoint (CPU tensors and plain values); main process, every checkpoint."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s result on resume (every process; after `setup`)."""
        ...


@runtime_checkable
class OwnDataMethod(Protocol):
    """An offline method that reads its own data format instead of preference image pairs."""

    def build_dataset(
        self, data: Any, generator: Any, run_dir: Path, log: Callable[[str], None] = print, accelerator: Any = None
    ) -> Any:
        """The training dataset from the run's `data:` settings: a map-style dataset whose items
        `collate` (its own, if it has one) turns into `loss`'s batch. Called once, on every process."""
        ...


@runtime_checkable
class RewardOptionalMethod(Protocol):
    """A method that can run without a `reward:` in some configurations."""

    @property
    def needs_reward(self) -> bool:
        """Whether this configuration needs a reward (the trainer refuses a run without one if so)."""
        ...


# =========================================================================== rewards
@runtime_checkable
class Reward(Protocol):
    """A per-sample reward (higher is better).

    `modality` says which `Samples` field it reads: "image" -> images [B,3,H,W] in [0, 1];
    "video" -> video [B,F,3,H,W] in [0, 1]; "audio" -> audio [B,C,T] in [-1, 1] with sample_rate;
    "text" -> text (B strings). A reward given samples of another modality fails with one line
    (`Samples.require`)."""

    name: str
    modality: Modality
    differentiable: bool  # gradients flow from the scores to the samples (reward guidance, RG-LCD's expert path)

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        """Scores [B] float, one per sample, for its prompt, on the samples' device."""
        ...


@runtime_checkable
class PairwiseJudge(Protocol):
    """A judge that compares two samples of the same prompt (`preference: pairwise`, eval-judge)."""

    name: str
    modality: Modality

    def prefer(self, samples_a: Samples, samples_b: Samples, prompts: Sequence[str]) -> Tensor:
        """[B] P(samples_a[i] is better than samples_b[i] for prompts[i])."""
        ...


@runtime_checkable
class OrderedPairwiseJudge(PairwiseJudge, Protocol):
    """A pairwise judge that can be asked one presentation order at a time (to average both orders
    and measure position bias)."""

    def prefer_first(self, samples_a: Samples, samples_b: Samples, prompts: Sequence[str]) -> Tensor:
        """[B] P(first is better) with samples_a shown first; no order averaging."""
        ...


@runtime_checkable
class DistributionReward(Protocol):
    """A reward of a whole batch (FID-like: a distance between the batch's distribution and a
    reference one), not of single samples. Shipped: `fad` and `vendi` (rewards/fad.py,
    rewards/vendi.py; `mmalign score` scores a folder as one set with them)."""

    name: str
    modality: Modality
    higher_is_better: bool

    def score_batch(self, samples: Samples, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(score, contributions): the batch's scalar score (0-dim float tensor, higher is better
        when `higher_is_better`) and per-item contributions [B] that sum to it, so a method can
        credit single samples."""
        ...


@runtime_checkable
class MovesToDevice(Protocol):
    """A component with models to place (most rewards load theirs where their config says)."""

    def to(self, device: Any) -> Any:
        """Move the component's models to `device`; returns self."""
        ...


# =========================================================================== dispatch helpers
ROLE_NAMES: dict[type, str] = {
    Generator: "a generator",
    DiffusionGenerator: "a diffusion generator",
    GuidableGenerator: "a guidable generator",
    TokenGenerator: "a token (VLM) generator",
    Method: "a method",
    OnlineMethod: "an online method",
    Reward: "a per-sample reward",
    PairwiseJudge: "a pairwise judge",
    DistributionReward: "a distribution reward",
}


def role_name(role: type) -> str:
    """'a diffusion generator' for DiffusionGenerator (the class name otherwise)."""
    return ROLE_NAMES.get(role, role.__name__)


def missing_members(obj: Any, role: type) -> list[str]:
    """The members of protocol `role` that `obj` lacks (typing's own list of a protocol's members)."""
    return sorted(m for m in typing._get_protocol_attrs(role) if not hasattr(obj, m))  # type: ignore[attr-defined]


class RoleError(ConfigError, TypeError):
    """A component does not satisfy the protocol a caller needs (a one-line, user-facing error)."""


def require(obj: Any, role: type, who: str, what: str = "") -> None:
    """Raise RoleError with one line unless `obj` satisfies protocol `role`, e.g.
    "guidance needs a guidable generator; VLMGenerator is not one (it lacks alpha_sigma, ...)".
    `what` names the component (default: its class name)."""
    if isinstance(obj, role):
        return
    lacks = missing_members(obj, role)
    raise RoleError(
        f"{who} needs {role_name(role)}; {what or type(obj).__name__} is not one"
        + (f" (it lacks {', '.join(lacks)})" if lacks else "")
    )
