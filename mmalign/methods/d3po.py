"""D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model", 2024): DPO on the denoising MDP's steps.

Two trajectories of one prompt start from the same initial noise x_T; a preference says
which final image is better: from a reward model or a judge's score (`reward:`, `preference:
reward`), from a pairwise judge shown both images (`preference: pairwise`), or from human
labels (`method.buffer` + `method.labels`); the last two are described below. Every
stochastic step of the preferred trajectory is treated as a preferred action, and the
per-step DPO loss is

    L_k = -log sigmoid( beta * [ clip(log rho_w,k) - clip(log rho_l,k) ] ),
    log rho_k = log p_theta(x_{k+1} | x_k, c) - log p_ref(x_{k+1} | x_k, c)

averaged over a random subset of steps (`timestep_fraction`), with log rho clipped to
[log(1-eps), log(1+eps)] (the code clamps the ratio rho to [1-eps, 1+eps] before its log).

The reference p_ref (`reference:`):
- `base` (default; the paper's code, yk7333/d3po scripts/rm/train_d3po.py): the frozen
  *initial* model for the whole run. The code deep-copies the UNet before adding the LoRA
  layers, freezes the copy and never updates it; here `generator.reference()` is that model
  (LoRA adapters disabled, or with full fine-tuning the frozen copy the generator makes when
  it loads). One extra no-grad forward per trained step.
- `sampler`: the policy that sampled the round (its stored log-probs, no extra forward).
  log rho then measures only the change since the round's sampling, so the clip acts as a
  PPO-like trust region around the sampler rather than a bound on the distance to the
  initial model: a trust-region variant, not the paper's objective.

Log-probs are per-dimension means of the step Gaussian (as in the paper's code, which is
built on ddpo-pytorch), so log rho is small and the defaults beta = 0.1, eps = 0.1 are the
code's (config/base.py). Pairs whose rewards differ by <= tie_threshold are ties: they contribute
nothing and are counted.

Pairwise judge (`preference: pairwise`): the reward must have `prefer(samples_a, samples_b,
prompts) -> [B] P(a is better)` (vlm_judge, audio_judge; any other reward is refused at setup,
naming it). Write P1(x, y) for the judge's P(first image is better) when shown x, then y. Each
pair (a, b) = samples (2j, 2j+1) is shown as (a, b) and, with `swap_average: true` (the
default), also as (b, a): p = (P1(a, b) + 1 - P1(b, a)) / 2; without it p = P1(a, b). A chat
judge tends to prefer the image it sees first; the two samples of a pair are exchangeable, so
that bias is label noise rather than a systematic shift, and averaging the orders removes it at
twice the judge's cost. Each order is asked on its own (the judge's `prefer_first` where it has
one, so the judge's own `swap_average` is not applied on top; else its `prefer`). The
round metric `position_bias` = mean(P1(a, b) + P1(b, a) - 1) (0: none; > 0: the judge favours
the first image), `judge_margin` = mean |p - 0.5|. Sample a wins when p >= 0.5; pairs with
|p - 0.5| <= tie_threshold are ties (counted, skipped), so tie_threshold is in [0, 0.5) here.
The judge's `mode` is what it reports as a score: evaluation's reward column calls the judge on
single images, so keep `mode: yes_no` or `likert` on the reward (or set `eval.enabled: false`
with `mode: pairwise`).

Human labels (the paper's setting): `write_for_labelling` (CLI: `mmalign sample --label-pairs`)
samples the pairs and writes the buffer (trajectories and log-probs), each sample's image as
images/<sample id>.png and a pairs.jsonl template; a labeller fills in `choice` / `tie`
(`read_labels` documents the format). With `method.buffer` and `method.labels` set, D3PO
samples nothing and uses no reward: every round trains on the stored trajectories with the
labelled pairs. With `reference: base` the reference log-probs are recomputed with the frozen
initial model; with `sampler` they are the stored log-probs, i.e. the policy that sampled the
buffer (so sample with the model you train). Labelled ties contribute nothing and are counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.config import ConfigError, num
from mmalign.data.preference import DataError, jsonl_rows
from mmalign.methods.online import RolloutSettings, collect, dump_rollout, load_buffer, train_steps
from mmalign.protocols import DiffusionGenerator, OrderedPairwiseJudge, PairwiseJudge
from mmalign.registry import register_method
from mmalign.types import Rollout, Samples


def d3po_step_loss(
    logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, eps: float | None
) -> Tensor:
    """Per-pair loss at one step, -log sigmoid(beta [clip(log rho_w) - clip(log rho_l)]) with
    log rho = logp - ref clipped to [log(1-eps), log(1+eps)]; eps=None disables the clipping."""
    lw, ll = logp_w - ref_w, logp_l - ref_l
    if eps is not None:
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        lw, ll = lw.clamp(lo, hi), ll.clamp(lo, hi)
    return -F.logsigmoid(beta * (lw - ll))


@dataclass
class D3POConfig:
    rollout: RolloutSettings = field(
        default_factory=lambda: RolloutSettings(samples_per_prompt=2, same_initial_noise=True)
    )
    beta: float = num(0.1, gt=0)  # the reference code's config/base.py
    clip_eps: float | None = num(0.1, gt=0)  # rho clamped to [1 - eps, 1 + eps]; None: no clipping
    # base: the frozen initial model (the paper's code); sampler: the round's sampler (a trust-region variant)
    reference: Literal["base", "sampler"] = "base"
    timestep_fraction: float = num(1.0, gt=0, le=1)  # the reference code trains on every step
    # Where a round's preferences come from: `reward` ranks the pair by the reward's scores;
    # `pairwise` asks the reward's prefer(a, b, prompts) (a pairwise judge: vlm_judge, audio_judge).
    preference: Literal["reward", "pairwise"] = "reward"
    swap_average: bool = True  # pairwise: ask both presentation orders and average (position bias)
    # a tie: |reward gap| <= this (reward), |P(first better) - 0.5| <= this (pairwise)
    tie_threshold: float = num(0.0, ge=0)
    # Human labels instead of a reward: `buffer` is a directory written for labelling (`mmalign
    # sample --label-pairs`), `labels` its filled-in JSONL. Set both, and no `reward:`; the
    # sampling settings then come from the buffer (`rollout` only sets steps_per_round) and the
    # trainer's data.prompts are read but unused.
    buffer: str | None = None
    labels: str | None = None

    def validate(self) -> None:
        if (self.buffer is None) != (self.labels is None):
            raise ValueError("buffer, labels: give both (a rollout written for labelling and its labels) or neither")
        if self.labels is not None:
            if self.tie_threshold:
                raise ValueError("tie_threshold: compares reward gaps; with labels the ties are the file's `tie: true`")
            if not (Path(self.buffer) / "buffer.safetensors").is_file():
                raise ValueError(
                    f"buffer: {self.buffer} has no buffer.safetensors (write one with `mmalign sample --label-pairs`)"
                )
            if not Path(self.labels).is_file():
                raise ValueError(f"labels: {self.labels} not found")
            if self.preference != "reward":
                raise ValueError(
                    f"preference: {self.preference!r} asks the reward; with labels the preferences "
                    "are the file's (remove `preference` or method.buffer and method.labels)"
                )
            read_labels(self.labels, buffer_prompts(self.buffer))  # every line, before any model loads
        if self.tie_threshold < 0:
            raise ValueError(f"tie_threshold: must be >= 0, got {self.tie_threshold}")
        if self.preference == "pairwise" and self.tie_threshold >= 0.5:
            raise ValueError(
                f"tie_threshold: with preference: pairwise it bounds |P(first better) - 0.5|, so it "
                f"must be < 0.5 (got {self.tie_threshold}; 0.5 makes every pair a tie)"
            )
        if self.rollout.samples_per_prompt != 2:
            raise ValueError("rollout.samples_per_prompt: D3PO compares exactly 2 trajectories per prompt")
        if not self.rollout.same_initial_noise:
            raise ValueError("rollout.same_initial_noise: D3PO pairs start from the same noise (set true)")
        if self.rollout.eta <= 0:
            raise ValueError("rollout.eta: D3PO needs stochastic steps (eta > 0)")
        if self.rollout.sde_steps() is not None:
            raise ValueError(
                f"rollout.sde_window: D3PO trains on steps drawn from the whole trajectory, so every "
                f"step must be stochastic (got {list(self.rollout.sde_window)}; use [0.0, 1.0])"
            )


class D3PO:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: D3POConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.labelled: Rollout | None = None  # labels mode: the stored buffer with its labelled pairs

    @property
    def needs_reward(self) -> bool:
        return self.cfg.labels is None

    def setup(self, generator: DiffusionGenerator, reward) -> None:
        """Fail fast: pairwise mode checks the reward can compare pairs; labels mode refuses a reward
        (it would be ignored) and reads buffer and labels now."""
        if self.cfg.preference == "pairwise":
            check_pairwise(reward)
        if self.cfg.labels is None:
            return
        if reward is not None:
            raise ConfigError(
                f"method.labels: D3PO takes its preferences from {self.cfg.labels}, not from a "
                "reward; remove `reward:` (evaluation then reports gold accuracy only) or remove "
                "method.buffer and method.labels to rank by the reward"
            )
        self.labelled = load_labelled(self.cfg.buffer, self.cfg.labels, generator)

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        if self.cfg.labels is not None:  # every round: the same labelled trajectories (prompts unused)
            if self.labelled is None:
                self.setup(generator, reward)
            return self.labelled
        if self.cfg.preference == "pairwise":
            check_pairwise(reward)
            ro = collect(generator, None, prompts, seeds, self.rollout)  # the judge scores pairs, not samples
            p, bias = judge_pairs(reward, ro.samples, ro.prompts, self.cfg.swap_average)
            margin = p - 0.5
            ro.extras["judge_margin"] = float(margin.abs().mean())
            if bias is not None:
                ro.extras["position_bias"] = bias
        else:
            ro = collect(generator, reward, prompts, seeds, self.rollout)
            r = ro.extras["rewards"].view(-1, 2)
            margin = r[:, 0] - r[:, 1]
        ro.extras["pairs"], ties = pairs_from_margin(margin, self.cfg.tie_threshold)
        ro.extras["ties"] = float(ties)
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        out = {"pairs": float(len(ro.extras["pairs"])), "ties": ro.extras["ties"]}
        if "rewards" in ro.extras:  # not in labels or pairwise mode
            out = {"reward_mean": float(ro.extras["rewards"].mean()), **out}
        for k in ("judge_margin", "position_bias"):  # pairwise mode
            if k in ro.extras:
                out[k] = ro.extras[k]
        return out

    def num_items(self, ro) -> int:
        return len(ro.extras["pairs"])

    def batch(self, ro, idx, seeds) -> dict:
        p = ro.extras["pairs"][torch.as_tensor(idx, device=ro.extras["pairs"].device)]
        return {"w": ro.select(p[:, 0]), "l": ro.select(p[:, 1]), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        w, l = batch["w"], batch["l"]
        both = type(w).cat([w, l])
        if "cond" not in both.extras or both.extras.get("cond") is None:
            generator.condition(both)
        B = len(w)
        steps = train_steps(both.log_probs.shape[1], self.cfg.timestep_fraction, int(batch["seeds"][0]))
        total, acc, lr_abs = 0.0, 0.0, 0.0
        for k in steps:
            logp = generator.step_log_prob(both, k)  # winners and losers in one batched forward
            ref = self.reference_log_prob(both, k, generator).to(logp.device)
            per = d3po_step_loss(logp[:B], logp[B:], ref[:B], ref[B:], self.cfg.beta, self.cfg.clip_eps)
            total = total + per.mean() / len(steps)
            d = ((logp[:B] - ref[:B]) - (logp[B:] - ref[B:])).detach()
            acc += float((d > 0).float().mean()) / len(steps)
            lr_abs += float((logp - ref).detach().abs().mean()) / len(steps)
        return total, {"implicit_acc": acc, "abs_log_ratio": lr_abs}

    @torch.no_grad()
    def reference_log_prob(self, ro: Rollout, k: int, generator) -> Tensor:
        """log p_ref(x_{k+1} | x_k, c) of every sample of `ro` at step k: the frozen initial model
        (`base`) or the stored log-probs of the round's sampler (`sampler`)."""
        if self.cfg.reference == "base":
            with generator.reference():
                return generator.step_log_prob(ro, k)
        return ro.log_probs[:, k]


def pairs_from_margin(margin: Tensor, tie_threshold: float) -> tuple[Tensor, int]:
    """(winner, loser) sample ids of the pairs (2j, 2j+1) from margin[j] = how much sample 2j is
    preferred (a reward gap, or P(first better) - 0.5); the first wins at margin >= 0, and
    |margin| <= tie_threshold is a tie (dropped, counted). Returns (pairs [P, 2], ties)."""
    base = torch.arange(len(margin), device=margin.device) * 2
    first_wins = margin >= 0
    w = torch.where(first_wins, base, base + 1)
    l = torch.where(first_wins, base + 1, base)
    ok = margin.abs() > tie_threshold
    return torch.stack([w[ok], l[ok]], 1), int((~ok).sum())


# --------------------------------------------------------------------------- pairwise judge
def check_pairwise(reward) -> None:
    """Refuse `preference: pairwise` with a reward that cannot compare two samples."""
    if reward is None:
        raise ConfigError(
            "method.preference: pairwise asks the reward which sample of a pair is better: set "
            "`reward:` to a pairwise judge (vlm_judge, audio_judge)"
        )
    if not isinstance(reward, PairwiseJudge):
        name = getattr(reward, "name", type(reward).__name__)
        raise ConfigError(
            f"method.preference: pairwise needs a reward with prefer(samples_a, samples_b, prompts), "
            f"but reward {name!r} only scores single samples; use a pairwise judge (vlm_judge, "
            "audio_judge) or `preference: reward`"
        )


def _every_other(s: Samples, start: int) -> Samples:
    pick = lambda x: None if x is None else x[start::2]
    return Samples(
        images=pick(s.images), video=pick(s.video), audio=pick(s.audio), sample_rate=s.sample_rate, text=pick(s.text)
    )


@torch.no_grad()
def judge_pairs(
    judge, samples: Samples, prompts: Sequence[str], swap_average: bool = True
) -> tuple[Tensor, float | None]:
    """p[j] = P(sample 2j beats sample 2j+1) from the judge, and its position bias
    mean(P1(a, b) + P1(b, a) - 1) (None without swap_average; P1(x, y) = prefer_first(x, y), or
    prefer(x, y) for a judge without prefer_first).

    With swap_average the judge sees both orders: p = (P1(a, b) + 1 - P1(b, a)) / 2.
    """
    a, b, pr = _every_other(samples, 0), _every_other(samples, 1), list(prompts[0::2])
    ask = judge.prefer_first if isinstance(judge, OrderedPairwiseJudge) else judge.prefer  # one order per call
    p_ab = ask(a, b, pr).float()
    if not swap_average:
        return p_ab, None
    p_ba = ask(b, a, pr).float().to(p_ab.device)
    return 0.5 * (p_ab + 1.0 - p_ba), float((p_ab + p_ba - 1.0).mean())


# --------------------------------------------------------------------------- human labels
LABEL_KEYS = ("prompt", "sample_ids", "choice", "tie")


@torch.no_grad()
def write_for_labelling(
    generator,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    eta: float = 1.0,
    batch_size: int = 64,
) -> Rollout:
    """Sample D3PO pairs (2 trajectories per prompt from one initial noise) and write them for labelling:

        OUT/buffer.safetensors, buffer.json  the trajectories and log-probs (`method.buffer: OUT`)
        OUT/images/<sample id>.png           each sample's decoded image; sample id = index in the buffer
        OUT/pairs.jsonl                      a template, one line per pair: prompt, sample_ids [2j, 2j+1],
                                             choice null, tie false (and the two image paths)

    A labeller sets `choice` (0 or 1) or `tie: true` on every line (`read_labels`).
    """
    rs = RolloutSettings(
        prompts_per_round=len(prompts),
        samples_per_prompt=2,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        same_initial_noise=True,
        reencode=False,
    )
    ro = collect(generator, None, prompts, seeds, rs, batch_size=batch_size)
    if ro.samples.images is None:
        raise ValueError(
            f"write_for_labelling: the generator returned {ro.samples.modality} samples; "
            "only images are written for labelling"
        )
    out = Path(out_dir)
    names = dump_rollout(ro, out)
    with open(out / "pairs.jsonl", "w") as f:
        for j, prompt in enumerate(prompts):  # collect() keeps the 2 samples of prompt j at 2j, 2j+1
            ids = [2 * j, 2 * j + 1]
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "sample_ids": ids,
                        "choice": None,
                        "tie": False,
                        "images": [names[i] for i in ids],
                    }
                )
                + "\n"
            )
    return ro


def buffer_prompts(buffer: str | Path) -> list[str]:
    """The prompts of a rollout written for labelling (its buffer.json), one per sample."""
    path = Path(buffer) / "buffer.json"
    try:
        prompts = json.loads(path.read_text())["prompts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: not a labelling buffer's metadata ({type(e).__name__}: {e}); rewrite the "
            "round with `mmalign sample --label-pairs`"
        ) from None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise DataError(f"{path}: `prompts` must be a list of strings")
    return prompts


def read_labels(path: str | Path, prompts: Sequence[str]) -> tuple[Tensor, int]:
    """Pairwise labels of a buffer's samples, from JSONL (the format `mmalign label` writes).

    One object per line: {"prompt": str, "sample_ids": [a, b], "choice": 0 | 1 | null, "tie": bool}.
    `sample_ids` index the buffer's samples (whose prompts are `prompts`); `choice` is the index in
    sample_ids of the preferred sample, null when `tie` is true. Other keys (the template's
    `images`) are ignored, blank lines skipped. Returns (pairs [P, 2] of (preferred, other) sample
    ids, number of ties); a bad line raises DataError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    pairs, ties = [], 0
    for at, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object with keys {', '.join(LABEL_KEYS)}")
        missing = [k for k in LABEL_KEYS if k not in row]
        if missing:
            raise DataError(f"{at}: missing key {missing[0]!r} (every line needs {', '.join(LABEL_KEYS)})")
        prompt, ids, choice, tie = (row[k] for k in LABEL_KEYS)
        if not (isinstance(ids, list) and len(ids) == 2 and all(type(i) is int for i in ids) and ids[0] != ids[1]):
            raise DataError(f"{at}: sample_ids must be a list of 2 different sample ids (integers), got {ids!r}")
        for i in ids:
            if not 0 <= i < len(prompts):
                raise DataError(
                    f"{at}: sample id {i} out of range (the buffer has {len(prompts)} samples, "
                    f"ids 0..{len(prompts) - 1})"
                )
            if prompt != prompts[i]:
                raise DataError(
                    f"{at}: prompt {prompt!r} does not match the buffer's prompt of sample {i}, "
                    f"{prompts[i]!r} (labels of another buffer?)"
                )
        if type(tie) is not bool:
            raise DataError(f"{at}: tie must be true or false, got {tie!r}")
        if tie:
            if choice is not None:
                raise DataError(f"{at}: tie is true but choice is {choice!r}; a tie has choice null")
            ties += 1
            continue
        if type(choice) is not int or choice not in (0, 1):
            hint = " (is this line still unlabelled?)" if choice is None else ""
            raise DataError(
                f"{at}: choice must be 0 or 1 (the index in sample_ids of the preferred sample) "
                f"unless tie is true, got {choice!r}{hint}"
            )
        pairs.append((ids[choice], ids[1 - choice]))
    if not pairs and not ties:
        raise DataError(f"{path}: no labels (the file has no lines)")
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), ties


def load_labelled(buffer_dir: str | Path, labels: str | Path, generator) -> Rollout:
    """A buffer written for labelling, with extras `pairs` ((preferred, other) sample ids) and
    `ties` from its labels."""
    ro = load_buffer(Path(buffer_dir), generator)
    if ro.log_probs is None:
        raise DataError(f"{buffer_dir}: the buffer has no step log-probs (sampled with eta=0?)")
    shape, want = tuple(ro.latents.shape[2:]), tuple(generator.latent_shape)
    if shape != want:
        raise DataError(
            f"{buffer_dir}: latents of shape {shape}, but this generator's are {want} (written with another model?)"
        )
    pairs, ties = read_labels(labels, ro.prompts)
    x_T = ro.latents[:, 0]
    for w, l in pairs.tolist():
        if not torch.equal(x_T[w], x_T[l]):
            raise DataError(
                f"{labels}: samples {w} and {l} do not start from one initial noise; D3PO compares "
                f"the two samples of a pair listed in {Path(buffer_dir) / 'pairs.jsonl'}"
            )
    if not len(pairs):
        raise DataError(f"{labels}: all {ties} labelled pairs are ties; nothing to train on")
    ro.extras["pairs"] = pairs.to(ro.latents.device)
    ro.extras["ties"] = float(ties)
    return ro


@register_method("d3po", D3POConfig)
def build_d3po(cfg: D3POConfig) -> D3PO:
    """D3PO: per-step DPO on trajectory pairs from the same initial noise."""
    return D3PO(cfg)
