"""Train the toy world's shipped models from scratch (CPU is enough).

    python -m mmalign.toy.train {vae,unet,proxy,all} --out mmalign/toy/assets [--minutes N] [--seed 0]

Stages (the UNet stage reads the VAE stage from --work):
  vae    AutoencoderKL (32x32 -> 8x8x4) on rendered train scenes    -> <work>/vae/
  unet   UNet2DConditionModel + tiny CLIPTextModel on cached latents -> <out>/sd_toy/
         (StableDiffusionPipeline layout, fp16 weights)
  proxy  tiny open_clip model, contrastive with hard negatives       -> <out>/proxy_clip/
  flow   SD3Transformer2DModel (rectified flow) + 2x CLIPTextModelWithProjection on cached
         latents of the shipped sd_toy VAE                             -> <out>/sd3_toy/
         (StableDiffusion3Pipeline layout without T5, fp16 weights; --device cuda recommended).
         It trains without the pipeline's zero "T5 tokens"; the shipped weights are then
         distilled onto its default 256 of them: python -m mmalign.toy.distill_flow distill
  vlm    tiny LLaVA (CLIP vision tower + Llama LM) answering questions about
         rendered scenes, stopped early on purpose (mmalign/toy/vlm_train.py) -> <out>/vlm_toy/

Training is time-boxed (--minutes for the UNet, --vae-minutes, --proxy-minutes) and
step-capped (--unet-steps ...): runs are seeded, and the number of steps done is written
next to the weights (train_info.json), so `--unet-steps N` with a large --minutes repeats
a run step for step. `--caption-noise P` (UNet stage) pairs a fraction P of the training
captions with a scene of a hard negative instead (noisy alt-text, as in web data), so the
model's errors include wrong-but-crisp modes that preference methods can move away from;
`--noise-mode relation` (or color, shape, count, swap) makes that one systematic bias.
The UNet stage saves a checkpoint and prints held-out gold accuracy per caption kind
every --eval-every minutes, so a run can be stopped once the model is in the wanted accuracy
band (docs/toy-world.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import proxy
from .evaluate import gold_report
from .gold import gold_score
from .sampling import sample
from .vlm_train import pretrain_vlm
from .world import SIZE, caption_kind, heldout_captions, perturb_caption, render, train_captions

HERE = Path(__file__).parent
TEXT_CFG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=SIZE,
)
UNET_CFG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(48, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=16,
)
SCHED_CFG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
KIND_SHARE = {"single": 0.15, "count": 0.19, "and": 0.22, "left": 0.22, "above": 0.22}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ data


def to_tensor(images) -> torch.Tensor:
    """list of PIL -> B,3,H,W float in [0,1]."""
    a = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0


def ema_update_step(opt, loss, params, ema, step: int, lr: float, warmup: int, max_decay: float) -> int:
    """One optimizer step of the toy models' training loops: linear learning-rate warmup over
    `warmup` steps, gradient-norm clip 1.0, then the EMA copies `ema` of `params` move towards them
    with decay min(max_decay, (1 + step) / (10 + step)). Returns the new step count."""
    for pg in opt.param_groups:
        pg["lr"] = lr * min(1.0, (step + 1) / warmup)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    step += 1
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p, e in zip(params, ema):
            e.lerp_(p.detach(), 1 - decay)
    return step


def scene_pool(captions, per_caption: int, seed_offset: int = 0):
    """Rendered scenes: (captions list, uint8 tensor N,3,32,32)."""
    caps, imgs = [], []
    for s in range(per_caption):
        for c in captions:
            caps.append(c)
            imgs.append(render(c, seed_offset + s))
    a = np.stack([np.asarray(im) for im in imgs])
    return caps, torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def write_clip_tokenizer(path: Path):
    """A transformers CLIPTokenizer whose ids equal open_clip's (from open_clip's BPE vocab)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    sp = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in sp.encoder.items()}
    merges = sorted(sp.bpe_ranks.items(), key=lambda kv: kv[1])
    tmp = path / "_src"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n", encoding="utf-8"
    )
    tok = CLIPTokenizer(
        str(tmp / "vocab.json"),
        str(tmp / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    ref = __import__("open_clip").tokenize(["a red circle to the left of a blue square"])[0]
    ids = tok("a red circle to the left of a blue square")["input_ids"]
    assert ids == ref[: len(ids)].tolist(), (ids, ref)
    shutil.rmtree(tmp)
    return tok


# ------------------------------------------------------------------ VAE


def train_vae(work: Path, minutes: float, seed: int, max_steps: int | None = None):
    from diffusers import AutoencoderKL

    seed_all(seed)
    _, pool = scene_pool(train_captions(), 32, seed_offset=10_000)
    log(f"vae: pool {tuple(pool.shape)}")
    vae = AutoencoderKL(**VAE_CFG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.randint(0, len(pool), (32,), generator=g)
        x = pool[idx].float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        lr = 2e-3 * min(1.0, (step + 1) / 100)
        if time.time() - t0 > 0.7 * minutes * 60:
            lr *= 0.25
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"vae step {step} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.1f}")
    vae.eval()
    # reconstruction check on held-out scenes
    caps, held = scene_pool(heldout_captions(), 2, seed_offset=50_000)
    with torch.no_grad():
        rec = vae.decode(vae.encode(held.float() / 127.5 - 1).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte()
    ok = np.mean([gold_score(r, c)["correct"] for r, c in zip(rec.float() / 255, caps)])
    log(f"vae: {step} steps; held-out reconstructions gold-correct {ok:.3f}")
    d = work / "vae"
    vae.save_pretrained(d)
    (d / "train_info.json").write_text(json.dumps({"steps": step, "seed": seed, "recon_gold": ok}))
    return vae


# ------------------------------------------------------------------ UNet


def build_pipe(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHED_CFG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipe(pipe, path: Path, info: dict):
    """save_pretrained with fp16 weights (the folder stays small); loads fine in float32."""
    if path.exists():
        shutil.rmtree(path)
    p16 = copy.deepcopy(pipe)
    p16.to(torch.float16)
    p16.save_pretrained(path, safe_serialization=True)
    # Loaders read these back as float32 unless told otherwise (see tests).
    for sub in ("text_encoder", "text_encoder_2"):
        cfgp = path / sub / "config.json"
        if not cfgp.is_file():
            continue
        cfg = json.loads(cfgp.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfgp.write_text(json.dumps(cfg, indent=2))
    for tok in ("tokenizer", "tokenizer_2"):  # written indented; compact is half the size
        tj = path / tok / "tokenizer.json"
        if tj.exists():
            tj.write_text(json.dumps(json.loads(tj.read_text()), separators=(",", ":"), ensure_ascii=False))
    (path / "train_info.json").write_text(json.dumps(info, indent=2))


def heldout_samples(seeds) -> tuple[list[str], list[int]]:
    """Held-out captions x seed sets, each sample with its own noise seed. One seed shared by
    all 101 captions makes their samples correlated: the figure then swings with that one
    noise draw (0.540 for 4 shared seeds vs. 0.415 over 808 distinct ones, same model)."""
    caps0 = heldout_captions()
    caps = [c for _ in seeds for c in caps0]
    sd = [s * len(caps0) + i for s in seeds for i in range(len(caps0))]
    return caps, sd


def heldout_eval(pipe, seeds=(0,), steps=20, cfg=4.0):
    caps, sd = heldout_samples(seeds)
    imgs = sample(pipe, caps, sd, steps=steps, cfg=cfg)
    return gold_report(imgs, caps)


def fmt_report(r: dict) -> str:
    kinds = " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items())
    return f"acc={r['accuracy']:.3f} comp={r.get('compositional', float('nan')):.3f} n={r['n']} [{kinds}]"


def noisy_captions(caps, seed: int, mode: str | None = None) -> list[str]:
    """A hard negative of each caption (wrong colour, shape, count, binding or relation:
    `perturb_caption`; only `mode` if given), or the caption itself where none applies."""
    rng = random.Random(seed)
    return [perturb_caption(c, rng, mode) or c for c in caps]


def noisy_latents(vae, caps, seed: int, mode: str | None = None):
    """VAE posteriors of scenes drawn for `noisy_captions(caps)`, with `scene_pool`'s layout seeds."""
    per, imgs = {}, []
    for c, wrong in zip(caps, noisy_captions(caps, seed, mode)):
        k = per[c] = per.get(c, -1) + 1
        imgs.append(render(wrong, k))
    return posteriors(vae, torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2))


@torch.no_grad()
def posteriors(vae, pool: torch.Tensor, chunk: int = 512):
    """(mean, std) of the VAE posterior of each uint8 scene in `pool` (N,3,H,W)."""
    parts = [vae.encode(pool[i : i + chunk].float() / 127.5 - 1).latent_dist for i in range(0, len(pool), chunk)]
    return torch.cat([d.mean for d in parts]), torch.cat([d.std for d in parts])


def train_unet(
    out: Path,
    work: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    eval_every: float = 5.0,
    batch: int = 64,
    lr: float = 1e-3,
    init_from: Path | None = None,
    balance_kinds: bool = True,
    caption_noise: float = 0.0,
    noise_mode: str | None = None,
):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed_all(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    tok_dir = work / "_tokenizer"
    tokenizer = write_clip_tokenizer(tok_dir)

    # pool of train scenes -> latents once
    caps, pool = scene_pool(train_captions(), 96)
    log(f"unet: encoding {len(caps)} train scenes")
    mu, sd = posteriors(vae, pool)
    g = torch.Generator().manual_seed(seed)
    if caption_noise:  # noisy alt-text: the same captions paired with scenes of hard negatives
        noisy_mu, noisy_sd = noisy_latents(vae, caps, seed, noise_mode)
        log(f"unet: caption noise {caption_noise:.2f} (scenes of perturbed captions, {noise_mode or 'any'} mode)")
    # Kind-balanced sampling: the grammar has far more two-object captions than single /
    # count ones; uniform sampling gives a model that draws two objects for "a red circle".
    kinds = [caption_kind(c) for c in caps]
    n_kind = {k: kinds.count(k) for k in set(kinds)}
    weights = torch.tensor([KIND_SHARE[k] / n_kind[k] if balance_kinds else 1.0 for k in kinds], dtype=torch.float64)
    scale = 1.0 / (mu + sd * torch.randn(mu.shape, generator=g)).std().item()
    if init_from is not None:  # keep the latent scale the continued model was trained with
        scale = json.loads((init_from / "vae" / "config.json").read_text())["scaling_factor"]
    vae.register_to_config(scaling_factor=scale)
    log(f"unet: latents {tuple(mu.shape)}, scaling_factor {scale:.4f}")
    ids = {
        c: tokenizer(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        for c in set(caps) | {""}
    }
    cap_ids = torch.stack([ids[c] for c in caps])
    empty = ids[""]

    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    unet = UNet2DConditionModel(**UNET_CFG)
    if init_from is not None:  # continue from a saved pipeline (e.g. a <work> checkpoint)
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(init_from / "text_encoder").float().state_dict())
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from / "unet").float().state_dict())
        log(f"unet: initialised from {init_from}")
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    log(f"unet: {n_params:.2f}M params; text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHED_CFG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    acp = noise_sched.alphas_cumprod

    def swap_ema():
        for p, e in zip(params, ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    history = []

    def evaluate_and_save(step):
        swap_ema()
        unet.eval(), text_encoder.eval()
        pipe = build_pipe(vae, text_encoder, tokenizer, unet)
        pipe.set_progress_bar_config(disable=True)
        t = time.time()
        r = heldout_eval(pipe)
        log(f"eval step {step}: held-out {fmt_report(r)} ({time.time() - t:.0f}s)")
        history.append(
            {
                "step": step,
                "minutes": (time.time() - t0) / 60,
                **{k: r[k] for k in ("accuracy", "per_kind", "compositional")},
            }
        )
        save_pipe(pipe, work / f"sd_toy_step_{step:06d}", {"step": step, "heldout": r["per_kind"]})
        swap_ema()
        unet.train(), text_encoder.train()

    t0, step, last_eval = time.time(), 0, time.time()
    losses = []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        m, v = mu[idx], sd[idx]
        if caption_noise:
            wrong = (torch.rand(batch, generator=g) < caption_noise).view(-1, 1, 1, 1)
            m, v = torch.where(wrong, noisy_mu[idx], m), torch.where(wrong, noisy_sd[idx], v)
        x0 = (m + v * torch.randn(m.shape, generator=g)) * scale
        tok = cap_ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        enc = text_encoder(tok)[0]
        pred = unet(xt, t, enc).sample
        loss = F.mse_loss(pred, noise)
        step = ema_update_step(opt, loss, params, ema, step, lr, warmup=200, max_decay=0.999)
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"unet step {step} loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / step:.2f}s/step)")
        if time.time() - last_eval > eval_every * 60:
            evaluate_and_save(step)
            last_eval = time.time()
    # final: EMA weights
    swap_ema()
    unet.eval(), text_encoder.eval()
    pipe = build_pipe(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    info = {
        "steps": step,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "minutes": (time.time() - t0) / 60,
        "init_from": str(init_from) if init_from else None,
        "balance_kinds": balance_kinds,
        "caption_noise": caption_noise,
        "noise_mode": noise_mode,
        "history": history,
    }
    save_pipe(pipe, out / "sd_toy", info)
    shutil.rmtree(tok_dir, ignore_errors=True)
    log(f"unet: saved {out / 'sd_toy'} after {step} steps")
    return pipe


# ------------------------------------------------------------------ flow (SD3 layout)

FLOW_TEXT_LEN = 16  # CLIP tokens (the longest toy caption is 12); the tokenizer's model_max_length
FLOW_T5_LEN = 0  # no T5 and none of the pipeline's zero "T5 tokens" here (distill_flow.py adds them)
FLOW_CFG = dict(
    sample_size=8,
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    pos_embed_max_size=8,
)


def build_sd3_pipe(vae, text_encoder, tokenizer, transformer):
    """StableDiffusion3Pipeline with one CLIP text encoder in both CLIP slots and no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def sample_sd3(pipe, captions, seeds, steps=20, cfg=4.0, batch=64):
    images = []
    for i in range(0, len(captions), batch):
        cs, ss = captions[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        out = pipe(
            list(cs),
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=gens,
            height=SIZE,
            width=SIZE,
            max_sequence_length=FLOW_T5_LEN,
            output_type="pil",
        )
        images += out.images
    return images


def heldout_eval_sd3(pipe, seeds=(0,), steps=20, cfg=4.0, batch=64):
    caps, sd = heldout_samples(seeds)
    return gold_report(sample_sd3(pipe, caps, sd, steps=steps, cfg=cfg, batch=batch), caps)


def train_flow(
    out: Path,
    work: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    eval_every: int = 500,
    batch: int = 64,
    lr: float = 1e-3,
    device: str = "cpu",
    stop_accuracy: float | None = None,
    pool_per_caption: int = 96,
):
    """Rectified flow (x_s = (1 - s) x0 + s eps, target eps - x0, logit-normal s) on cached latents.

    The VAE is the shipped sd_toy one (frozen); the CLIP text encoder starts from sd_toy's and
    trains jointly (10% caption dropout for CFG). Evaluates held-out gold accuracy every
    `eval_every` steps with EMA weights and, with `stop_accuracy`, stops at the first
    evaluation at or above it (the toy model must stay imperfect).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    seed_all(seed)
    dev = torch.device(device)
    sd_toy = HERE / "assets" / "sd_toy"
    vae = AutoencoderKL.from_pretrained(sd_toy / "vae", torch_dtype=torch.float32).to(dev).eval()
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes z / scale + shift
    scale = vae.config.scaling_factor
    tok_dir = work / "_tokenizer_flow"
    tokenizer = write_clip_tokenizer(tok_dir)
    tokenizer.model_max_length = FLOW_TEXT_LEN

    caps, pool = scene_pool(train_captions(), pool_per_caption)
    log(f"flow: encoding {len(caps)} train scenes on {dev}")
    mus, sds = [], []
    with torch.no_grad():
        for i in range(0, len(pool), 1024):
            d = vae.encode((pool[i : i + 1024].float() / 127.5 - 1).to(dev)).latent_dist
            mus.append(d.mean)
            sds.append(d.std)
    mu, sd = torch.cat(mus), torch.cat(sds)
    kinds = [caption_kind(c) for c in caps]
    n_kind = {k: kinds.count(k) for k in set(kinds)}
    weights = torch.tensor([KIND_SHARE[k] / n_kind[k] for k in kinds], dtype=torch.float64)
    ids = {
        c: tokenizer(c, padding="max_length", max_length=FLOW_TEXT_LEN, truncation=True, return_tensors="pt").input_ids[
            0
        ]
        for c in set(caps) | {""}
    }
    cap_ids = torch.stack([ids[c] for c in caps]).to(dev)
    empty = ids[""].to(dev)

    # text encoder: sd_toy's trained CLIPTextModel (positions cut to FLOW_TEXT_LEN) + a projection
    tcfg = CLIPTextConfig(**{**TEXT_CFG, "max_position_embeddings": FLOW_TEXT_LEN, "projection_dim": 32})
    text_encoder = CLIPTextModelWithProjection(tcfg)
    src = CLIPTextModel.from_pretrained(sd_toy / "text_encoder", torch_dtype=torch.float32).state_dict()
    src = {"text_model." + k.removeprefix("text_model."): v for k, v in src.items() if "position_ids" not in k}
    pos = "text_model.embeddings.position_embedding.weight"
    src[pos] = src[pos][:FLOW_TEXT_LEN]
    missing = text_encoder.load_state_dict(src, strict=False)
    assert set(missing.missing_keys) <= {"text_projection.weight", "text_model.embeddings.position_ids"}, missing
    transformer = SD3Transformer2DModel(**FLOW_CFG)
    text_encoder.to(dev).train()
    transformer.to(dev).train()
    log(f"flow: transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params")
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)

    def encode(tok):
        out = text_encoder(tok, output_hidden_states=True)
        h = out.hidden_states[-2]  # the pipeline's clip_skip=None layer
        return torch.cat([h, h], -1), torch.cat([out.text_embeds, out.text_embeds], -1)

    def swap_ema():
        for p, e in zip(params, ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    def snapshot(step):
        swap_ema()
        transformer.eval(), text_encoder.eval()
        pipe = build_sd3_pipe(vae, text_encoder, tokenizer, transformer)
        pipe.set_progress_bar_config(disable=True)
        r = heldout_eval_sd3(pipe, batch=256 if dev.type == "cuda" else 64)
        return pipe, r

    def restore():
        swap_ema()
        transformer.train(), text_encoder.train()

    history, t0, step, losses = [], time.time(), 0, []
    pipe, stopped = None, False
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        x0 = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g).to(dev)) * scale
        tok = cap_ids[idx].clone()
        tok[(torch.rand(batch, generator=g) < 0.1).to(dev)] = empty
        noise = torch.randn(x0.shape, generator=g).to(dev)
        s = torch.sigmoid(torch.randn(batch, generator=g)).to(dev).view(-1, 1, 1, 1)  # logit-normal(0, 1)
        xt = (1 - s) * x0 + s * noise
        emb, pooled = encode(tok)
        v = transformer(
            hidden_states=xt,
            timestep=s.flatten() * 1000,
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, noise - x0)
        step = ema_update_step(opt, loss, params, ema, step, lr, warmup=200, max_decay=0.999)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"flow step {step} loss {np.mean(losses[-100:]):.4f} ({(time.time() - t0) / step:.3f}s/step)")
        if eval_every and step % eval_every == 0:
            pipe, r = snapshot(step)
            log(f"eval step {step}: held-out {fmt_report(r)}")
            history.append(
                {
                    "step": step,
                    "minutes": (time.time() - t0) / 60,
                    **{k: r[k] for k in ("accuracy", "per_kind", "compositional")},
                }
            )
            if stop_accuracy is not None and r["accuracy"] >= stop_accuracy:
                stopped = True
                break
            restore()
    if not stopped:
        pipe, r = snapshot(step)
        log(f"final step {step}: held-out {fmt_report(r)}")
        history.append(
            {
                "step": step,
                "minutes": (time.time() - t0) / 60,
                **{k: r[k] for k in ("accuracy", "per_kind", "compositional")},
            }
        )
    pipe.to("cpu")
    info = {
        "steps": step,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "device": str(dev),
        "minutes": (time.time() - t0) / 60,
        "stop_accuracy": stop_accuracy,
        "eval_every": eval_every,
        "max_sequence_length": FLOW_T5_LEN,
        "history": history,
        "load": "StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None); "
        "sample with max_sequence_length=0",
    }
    save_pipe(pipe, out / "sd3_toy", info)
    shutil.rmtree(tok_dir, ignore_errors=True)
    log(f"flow: saved {out / 'sd3_toy'} after {step} steps")
    return pipe


def final_report_flow(out: Path, seeds=(0, 1), steps=20, cfg=4.0, device: str = "cpu"):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        out / "sd3_toy", text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    r = heldout_eval_sd3(pipe, seeds=seeds, steps=steps, cfg=cfg)
    log(
        f"final sd3_toy held-out gold ({len(seeds)} seeds x {len(heldout_captions())} captions, "
        f"{steps} Euler steps, cfg {cfg}): {fmt_report(r)}"
    )
    return r


# ------------------------------------------------------------------ proxy (open_clip)


def train_proxy(out: Path, minutes: float, seed: int, max_steps: int | None = None, extra_negatives: float = 0.0):
    return proxy.train_proxy(out, minutes, seed, max_steps, extra_negatives=extra_negatives)


# ------------------------------------------------------------------ report


def final_report(out: Path, seeds=(0, 1, 2, 3), steps=20, cfg=4.0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "sd_toy")
    pipe.set_progress_bar_config(disable=True)
    r = heldout_eval(pipe, seeds=seeds, steps=steps, cfg=cfg)
    log(
        f"final held-out gold ({len(seeds)} seeds x {len(heldout_captions())} captions, "
        f"{steps} DDIM steps, cfg {cfg}): {fmt_report(r)}"
    )
    log("per constraint: " + " ".join(f"{k}={v:.2f}" for k, v in r["per_constraint"].items()))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "proxy", "all", "report", "flow", "vlm"])
    ap.add_argument("--out", type=Path, default=HERE / "assets")
    ap.add_argument("--minutes", type=float, default=30.0, help="UNet training time box")
    ap.add_argument("--vae-minutes", type=float, default=5.0)
    ap.add_argument("--proxy-minutes", type=float, default=8.0)
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--proxy-steps", type=int, default=None)
    ap.add_argument(
        "--proxy-extra-negatives",
        type=float,
        default=0.5,
        help="proxy stage: fraction of captions that also bring their scene with one extra "
        "object as a negative image (see mmalign.toy.world.extra_object_scene)",
    )
    ap.add_argument("--eval-every", type=float, default=5.0, help="minutes between UNet evals/checkpoints")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/mmalign_toy_work"),
        help="intermediate outputs: the VAE stage, UNet checkpoints",
    )
    ap.add_argument("--init-from", type=Path, default=None, help="continue UNet training from a saved pipeline folder")
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder learning rate")
    ap.add_argument(
        "--caption-noise",
        type=float,
        default=0.0,
        help="UNet stage: fraction of examples whose scene shows a hard negative of the caption",
    )
    ap.add_argument(
        "--noise-mode",
        choices=["color", "shape", "count", "relation", "swap"],
        default=None,
        help="UNet stage: only this kind of hard negative (a systematic bias, e.g. relation: "
        "'A left of B' shown as B left of A); default: a random applicable kind",
    )
    ap.add_argument(
        "--no-balance-kinds", action="store_true", help="sample train scenes uniformly instead of by KIND_SHARE"
    )
    ap.add_argument("--device", default="cpu", help="flow stage: cpu | cuda")
    ap.add_argument("--flow-steps", type=int, default=None, help="flow stage: step cap")
    ap.add_argument("--flow-batch", type=int, default=64)
    ap.add_argument("--flow-eval-every", type=int, default=500, help="flow stage: steps between held-out evals")
    ap.add_argument(
        "--stop-accuracy",
        type=float,
        default=None,
        help="flow stage: stop at the first eval with held-out gold accuracy >= this",
    )
    ap.add_argument("--pool-per-caption", type=int, default=96, help="flow stage: rendered scenes per caption")
    ap.add_argument("--vlm-steps", type=int, default=None, help="vlm stage: step cap")
    ap.add_argument(
        "--vlm-stop",
        type=float,
        default=0.35,
        help="vlm stage: stop at the first held-out eval with overall hallucination <= this",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_minutes, args.seed, args.vae_steps)
    if args.stage in ("unet", "all"):
        train_unet(
            args.out,
            args.work,
            args.minutes,
            args.seed,
            args.unet_steps,
            args.eval_every,
            lr=args.lr,
            init_from=args.init_from,
            balance_kinds=not args.no_balance_kinds,
            caption_noise=args.caption_noise,
            noise_mode=args.noise_mode,
        )
    if args.stage in ("unet", "all", "report"):
        final_report(args.out)
    if args.stage in ("proxy", "all"):
        train_proxy(args.out, args.proxy_minutes, args.seed, args.proxy_steps, args.proxy_extra_negatives)
    if args.stage == "flow":
        train_flow(
            args.out,
            args.work,
            args.minutes,
            args.seed,
            args.flow_steps,
            args.flow_eval_every,
            batch=args.flow_batch,
            lr=args.lr,
            device=args.device,
            stop_accuracy=args.stop_accuracy,
            pool_per_caption=args.pool_per_caption,
        )
        final_report_flow(args.out, device=args.device)
    if args.stage == "vlm":
        pretrain_vlm(args.out, args.minutes, args.seed, args.vlm_steps, args.vlm_stop, log=log)
    log(f"done in {(time.time() - t) / 60:.1f} min")


if __name__ == "__main__":
    main()
