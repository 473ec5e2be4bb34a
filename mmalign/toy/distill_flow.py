"""Distil the toy flow model (sd3_toy) onto the stock pipeline's zero "T5 tokens".

sd3_toy has no T5 encoder. StableDiffusion3Pipeline then appends `max_sequence_length`
(default 256) zero tokens to the 16 CLIP tokens, but the model was first trained with none
(`train.py flow`), and with them its samples are wrong. This fine-tunes the transformer so that
with the 256 zero tokens it predicts the velocities the original weights predict with none:

    teacher v(x_s, s, [clip])         original weights, frozen
    student v(x_s, s, [clip, 0 x 256]) initialised from the same weights, MSE to the teacher

on the training distribution of `train.py flow` (latents of rendered train scenes through the
VAE, kind-balanced captions with 10% dropped to "" for CFG, logit-normal s). The student runs
the 256 identical zero tokens as one with an attention bias of log(256)
(pipelines/flow.py's RepeatedTokenJointAttnProcessor), so a step costs what a step without them
costs. Text encoders, VAE and scheduler are unchanged; the folder's train_info.json records
the run under "distill" (its history: the student's relative error
mean |v_student - v_teacher|^2 / mean |v_teacher|^2 on a fixed draw of 512).

    python -m mmalign.toy.distill_flow distill --model TEACHER --out /tmp/sd3_toy_d1
    python -m mmalign.toy.distill_flow distill --model TEACHER --init /tmp/sd3_toy_d1 --lr 1e-4 --seed 1 \
        --out mmalign/toy/assets/sd3_toy

TEACHER is the folder `python -m mmalign.toy.train flow` wrote. These two runs of 300 steps
(batch 64, cosine decay from lr 3e-4, then from 1e-4) are the shipped weights: one CPU thread,
about 10 min each.

    python -m mmalign.toy.distill_flow eval --model DIR --sampler {mmalign,pipeline} [--max-sequence-length N]

`eval` is the trainer's evaluation of the toy configs (808 held-out samples: 101 captions x 8
seeds from 1234, 20 Euler steps, guidance 4.0, gold accuracy and the proxy CLIP reward);
`--sampler pipeline` draws the same samples with StableDiffusion3Pipeline.from_pretrained(DIR,
text_encoder_3=None, tokenizer_3=None) called with default arguments besides the prompts, steps,
guidance scale and initial noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.data.generated import load_prompts
from mmalign.evaluation import diversity, evaluate_generator
from mmalign.pipelines.flow import FlowGeneratorConfig, FlowMatchingGenerator, RepeatedTokenJointAttnProcessor
from mmalign.rewards.common import build_reward
from mmalign.types import Samples, per_sample_randn

from .evaluate import gold_report
from .train import HERE, KIND_SHARE, log, scene_pool, seed_all
from .world import caption_kind, train_captions

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def load_pipe(path: Path):
    from diffusers import StableDiffusion3Pipeline

    # a folder without T5 loads with text_encoder_3=None, tokenizer_3=None (not optional in diffusers)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distill(
    model: Path,
    out: Path,
    minutes: float = 60.0,
    max_steps: int | None = 300,
    batch: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    pool_per_caption: int = 16,
    eval_every: int = 100,
    init: Path | None = None,
):
    seed_all(seed)
    pipe = load_pipe(model)
    info = json.loads((model / "train_info.json").read_text())
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    caps, pool = scene_pool(train_captions(), pool_per_caption)
    with torch.no_grad():
        dists = [vae.encode(pool[i : i + 512].float() / 127.5 - 1).latent_dist for i in range(0, len(pool), 512)]
    mu, sd = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    kinds = [caption_kind(c) for c in caps]
    n_kind = {k: kinds.count(k) for k in set(kinds)}
    weights = torch.tensor([KIND_SHARE[k] / n_kind[k] for k in kinds], dtype=torch.float64)
    # text conditioning of every caption (and ""), once: the CLIP tokens and pooled embeddings
    texts = sorted(set(caps)) + [""]
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(
            texts, None, None, do_classifier_free_guidance=False, max_sequence_length=0
        )
    index = {c: i for i, c in enumerate(texts)}
    cap_idx = torch.tensor([index[c] for c in caps])
    zero = torch.zeros(len(texts), 1, emb.shape[-1])
    student_emb = torch.cat([emb, zero], 1)  # the 256 zero tokens as one (+ log 256 attention bias)
    log(f"distill: {len(caps)} train scenes, {len(texts)} captions; {T5_TOKENS} zero tokens")

    teacher = copy.deepcopy(pipe.transformer).eval().requires_grad_(False)
    student = pipe.transformer.train().requires_grad_(True)
    if init is not None:  # continue a distillation: the student starts from `init`'s transformer
        student.load_state_dict(type(student).from_pretrained(init / "transformer").float().state_dict())
    student.set_attn_processor(RepeatedTokenJointAttnProcessor())
    kw = {"last_token_repeats": T5_TOKENS}
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def draw(n: int):
        idx = torch.multinomial(weights, n, replacement=True, generator=g)
        x0 = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g)) * scale
        ci = cap_idx[idx].clone()
        ci[torch.rand(n, generator=g) < 0.1] = index[""]
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(n, generator=g)).view(-1, 1, 1, 1)  # logit-normal(0, 1)
        return (1 - s) * x0 + s * noise, s.flatten() * 1000, ci

    def velocities(x, t, ci):
        with torch.no_grad():
            v_t = teacher(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=emb[ci],
                pooled_projections=pooled[ci],
                return_dict=False,
            )[0]
        v_s = student(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=student_emb[ci],
            pooled_projections=pooled[ci],
            joint_attention_kwargs=dict(kw),
            return_dict=False,
        )[0]
        return v_s, v_t

    val = draw(512)  # a fixed validation draw: relative error of the student

    def rel_err() -> float:
        with torch.no_grad():
            v_s, v_t = velocities(*val)
        return ((v_s - v_t).pow(2).mean() / v_t.pow(2).mean()).item()

    history = [{"step": 0, "rel_mse": rel_err()}]
    log(f"distill: step 0 relative mse {history[0]['rel_mse']:.4f}")
    t0, step, losses = time.time(), 0, []
    total = max_steps or 10**9
    while time.time() - t0 < minutes * 60 and step < total:
        v_s, v_t = velocities(*draw(batch))
        loss = F.mse_loss(v_s, v_t)
        frac = step / total if max_steps else (time.time() - t0) / (minutes * 60)
        for pg in opt.param_groups:  # warm-up, then cosine to 0 over the step cap or the time box
            pg["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % eval_every == 0:
            history.append({"step": step, "minutes": (time.time() - t0) / 60, "rel_mse": rel_err()})
            log(
                f"distill step {step} loss {np.mean(losses[-eval_every:]):.5f} relative mse "
                f"{history[-1]['rel_mse']:.5f} ({(time.time() - t0) / step:.2f}s/step)"
            )
    if history[-1]["step"] != step:
        history.append({"step": step, "minutes": (time.time() - t0) / 60, "rel_mse": rel_err()})
    log(f"distill: {step} steps, relative mse {history[-1]['rel_mse']:.5f}")

    student.eval().requires_grad_(False)
    info.pop("max_sequence_length", None)
    info.pop("load", None)
    info["distill"] = {
        "from": "the weights `train.py flow` wrote (teacher, no zero tokens)",
        "steps": step,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "pool_per_caption": pool_per_caption,
        "t5_zero_tokens": T5_TOKENS,
        "minutes": (time.time() - t0) / 60,
        "threads": torch.get_num_threads(),
        "history": history,
    }
    if init is not None:
        info["distill"] = {
            "continues": json.loads((init / "train_info.json").read_text())["distill"],
            **info["distill"],
        }
    info["load"] = (
        "StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None); "
        "sample with default arguments"
    )
    save(pipe, model, out, info)
    return pipe


def save(pipe, src: Path, out: Path, info: dict):
    """Write the distilled transformer in fp16 (like train.py's save_pipe) next to copies of the
    source folder's other parts, unchanged."""
    import shutil

    if out.resolve() != src.resolve():
        shutil.copytree(src, out, dirs_exist_ok=True)
    tr = copy.deepcopy(pipe.transformer).to(torch.float16)
    shutil.rmtree(out / "transformer")
    tr.save_pretrained(out / "transformer", safe_serialization=True)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    cfg.pop("_name_or_path", None)  # where it was loaded from on this machine
    (out / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    log(f"distill: saved {out}")


# ------------------------------------------------------------------ evaluation


def evaluate(
    model: Path,
    sampler: str,
    max_sequence_length: int | None = None,
    images_per_prompt: int = 8,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 1234,
    batch: int = 64,
) -> dict:
    """Held-out gold accuracy and proxy reward as the trainer's `eval:` block of the toy configs
    computes them, from mmalign's sampler or from the stock pipeline on the same initial noise."""
    prompts = load_prompts("toy:heldout")
    reward = build_reward({"name": "clip", "model": "toy:proxy_clip"})
    if sampler == "mmalign":
        gen = FlowMatchingGenerator(
            FlowGeneratorConfig(pretrained=str(model), finetune="none", max_sequence_length=max_sequence_length)
        )
        out, _ = evaluate_generator(
            gen, reward, prompts, images_per_prompt, seed, num_steps, guidance_scale, gold=True, batch_size=batch
        )
        return out
    pipe = load_pipe(model)
    rep = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(rep))]
    kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    images, rewards = [], []
    with torch.no_grad():
        for i in range(0, len(rep), batch):
            ps, ss = rep[i : i + batch], seeds[i : i + batch]
            x = pipe(
                ps,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                latents=per_sample_randn(ss, (4, 8, 8)),
                output_type="pt",
                **kw,
            ).images.float()
            images.append(x)
            rewards.append(reward(Samples(images=x), ps).float())
    images = torch.cat(images)
    r = gold_report(images, rep)
    groups = [list(images[i * images_per_prompt : (i + 1) * images_per_prompt]) for i in range(len(prompts))]
    return {
        "n_samples": len(rep),
        "reward": float(torch.cat(rewards).mean()),
        "gold_accuracy": r["accuracy"],
        "gold_compositional": r["compositional"],
        "gold_per_kind": r["per_kind"],
        "diversity": diversity(groups),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["distill", "eval"])
    ap.add_argument("--model", type=Path, default=HERE / "assets" / "sd3_toy", help="the folder to distil / evaluate")
    ap.add_argument("--out", type=Path, default=None, help="distill: output folder (default: --model, in place)")
    ap.add_argument("--minutes", type=float, default=60.0, help="distill: time box")
    ap.add_argument("--steps", type=int, default=300, help="distill: steps (the cosine lr schedule spans them)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-per-caption", type=int, default=16)
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="distill: start the student from this folder's transformer (default: the teacher's)",
    )
    ap.add_argument("--sampler", choices=["mmalign", "pipeline"], default="mmalign")
    ap.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="eval: zero T5 tokens (default: the generator's / pipeline's default)",
    )
    ap.add_argument("--images-per-prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "distill":
        distill(
            args.model,
            args.out or args.model,
            args.minutes,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            args.pool_per_caption,
            init=args.init,
        )
    else:
        t = time.time()
        r = evaluate(args.model, args.sampler, args.max_sequence_length, args.images_per_prompt)
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "sampler": args.sampler,
                    "max_sequence_length": args.max_sequence_length,
                    "seconds": round(time.time() - t),
                    **r,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
