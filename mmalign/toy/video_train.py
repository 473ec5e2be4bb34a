"""Train the toy video world's shipped models from scratch (CPU is enough).

    python -m mmalign.toy.video_train {vae,transformer,proxy,all,report} --out mmalign/toy/assets

Stages (the transformer stage reads the VAE stages from --work):
  vae          AutoencoderKLWan (9x32x32 -> 3x8x8 latents, z_dim 8) on 5-frame windows of
               rendered train clips -> <work>/video_vae/
  decoder      its decoder fine-tuned on whole 9-frame clips, encoder frozen
               -> <work>/video_vae_dec/ (what the transformer stage uses when present)
  transformer  WanTransformer3DModel + tiny UMT5EncoderModel (word-level tokenizer over the
               grammar) on cached latents -> <out>/wan_toy/ (WanPipeline layout, fp16 weights)
  proxy        toy_video_proxy reward (video_proxy.py), contrastive with hard negatives
               -> <out>/video_proxy/
  swap-decoder put a further-trained decoder (--vae-dir, a `decoder` stage folder) into the
               saved <out>/wan_toy (same encoder, so the transformer's latents still match)
  report       held-out gold of the shipped wan_toy, sampled with WanPipeline, and the proxy's
               agreement with gold on those samples (--json FILE writes the numbers)

As in `train.py`: a pool of clips is rendered once and encoded once (posterior mean and std;
training draws z = mean + std * eps), captions are dropped (empty prompt) 10% of the time for
classifier-free guidance, and there is no flip augmentation (it would break the directions).
Rectified flow: x_s = (1 - s) x0 + s eps, target eps - x0, s logit-normal, timestep = 1000 s
(what WanPipeline's flow-prediction scheduler feeds the transformer). The text conditioning is
the pipeline's: UMT5 hidden states of the caption's tokens (with </s>), zero-padded to
`max_sequence_length` = 512 positions. The latents are normalised per channel with the pool's
statistics, written to the VAE config as latents_mean / latents_std (the pipeline decodes
z * std + mean).

The transformer stage evaluates held-out gold accuracy with WanPipeline itself every
--eval-every minutes (EMA weights), saves each evaluation's pipeline as a checkpoint under
--work, and stops at the first evaluation inside [--stop-accuracy, --max-accuracy]: the shipped
model must stay imperfect so that alignment has room to show. train_info.json records the steps
and the history.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .train import ema_update_step, log, save_pipe, seed_all
from .video_evaluate import gold_report_video
from .video_gold import VIDEO_CONSTRAINTS
from .video_world import (
    FRAMES,
    heldout_eval_captions,
    parse_video,
    render_video,
    video_train_captions,
    video_vocabulary,
)

HERE = Path(__file__).parent
SIZE = 32
MAX_SEQ = 512  # WanPipeline's default max_sequence_length
TEXT_LEN = 16  # tokens of the longest caption (+ </s>) fit
Z_DIM = 8
VAE_CFG = dict(
    base_dim=16,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    latents_mean=[0.0] * Z_DIM,
    latents_std=[1.0] * Z_DIM,
    scale_factor_temporal=4,
    scale_factor_spatial=4,
)
TRANSFORMER_CFG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=48,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
TEXT_CFG = dict(
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
SCHED_CFG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, num_train_timesteps=1000)
KIND_SHARE = {"moving": 0.25, "still": 0.15, "and": 0.60}
SAMPLE_CFG = 5.0  # guidance scale of the evaluations


# ------------------------------------------------------------------ data


def clip_pool(captions, per_caption: int, seed_offset: int = 0):
    """Rendered clips: (captions list, uint8 tensor N,3,F,H,W) (Wan's B,C,F,H,W layout)."""
    caps, clips = [], []
    for s in range(per_caption):
        for c in captions:
            caps.append(c)
            clips.append(render_video(c, seed_offset + s))
    a = np.stack(clips)  # N,F,H,W,3
    return caps, torch.from_numpy(a).permute(0, 4, 1, 2, 3).contiguous()


def to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def make_tokenizer():
    """Word-level `PreTrainedTokenizerFast` over the grammar (pad 0, </s> 1, unk 2), appending
    </s> like T5's; saved with the pipeline so AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in video_vocabulary():
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_SEQ
    )


# ------------------------------------------------------------------ VAE


def train_vae(
    work: Path, minutes: float, seed: int, max_steps: int | None = None, batch: int = 8, resume: bool = False
):
    from diffusers import AutoencoderKLWan

    from .video_gold import gold_score_video

    seed_all(seed)
    _, pool = clip_pool(video_train_captions(), 2, seed_offset=10_000)
    log(f"vae: pool {tuple(pool.shape)}")
    vae = AutoencoderKLWan(**VAE_CFG)
    prev = 0
    if resume:  # continue the saved VAE stage (another time box)
        vae = AutoencoderKLWan.from_pretrained(work / "video_vae").train()
        prev = json.loads((work / "video_vae" / "train_info.json").read_text())["steps"]
        log(f"vae: resuming after {prev} steps")
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + prev)
    t0, step, mses = time.time(), 0, []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        # 5-frame windows (1 + 4: the causal VAE's first frame and one 4-frame chunk) at a
        # random offset: half the cost of whole clips, and the cached chunked encoder/decoder
        # carries over to 9 frames
        w0 = int(torch.randint(0, FRAMES - 4, (1,), generator=g))
        x = to_model(pool[torch.randint(0, len(pool), (batch,), generator=g), :, w0 : w0 + 5])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-6 * kl
        lr = 2e-3 * min(1.0, (step + 1) / (10 if resume else 50))
        if time.time() - t0 > 0.75 * minutes * 60:
            lr *= 0.25
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        mses.append(mse.item())
        if step % 10 == 0:
            log(
                f"vae step {step} mse {np.mean(mses[-10:]):.4f} kl {kl.item():.1f} "
                f"({(time.time() - t0) / step:.2f}s/step)"
            )
    vae.eval()
    caps = list(heldout_eval_captions())
    _, held = clip_pool(caps, 1, seed_offset=50_000)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_model(held)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # B,F,3,H,W
    ok = float(np.mean([gold_score_video(r, c)["correct"] for r, c in zip(rec, caps)]))
    log(f"vae: {step} steps; held-out reconstructions gold-correct {ok:.3f}")
    d = work / "video_vae"
    vae.save_pretrained(d)
    (d / "train_info.json").write_text(json.dumps({"steps": prev + step, "seed": seed, "recon_gold": ok}))
    return vae


def train_vae_decoder(work: Path, minutes: float, seed: int, max_steps: int | None = None, batch: int = 8):
    """Fine-tune the VAE's decoder (encoder frozen, so latents do not change) on whole 9-frame
    clips: the 5-frame windows of `train_vae` never show the decoder its third latent frame
    (frames 5-8, decoded with the first two in its causal cache). -> <work>/video_vae_dec/"""
    from diffusers import AutoencoderKLWan

    from .video_gold import gold_score_video

    seed_all(seed)
    _, pool = clip_pool(video_train_captions(), 1, seed_offset=20_000)
    vae = AutoencoderKLWan.from_pretrained(work / "video_vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0, step, mses = time.time(), 0, []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        x = to_model(pool[torch.randint(0, len(pool), (batch,), generator=g)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        for pg in opt.param_groups:
            pg["lr"] = 1e-3 * min(1.0, (step + 1) / 10) * (0.3 if time.time() - t0 > 0.75 * minutes * 60 else 1.0)
        opt.zero_grad()
        mse.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        mses.append(mse.item())
        if step % 10 == 0:
            log(f"vae decoder step {step} mse {np.mean(mses[-10:]):.4f} ({(time.time() - t0) / step:.2f}s/step)")
    vae.eval()
    caps = list(heldout_eval_captions())
    _, held = clip_pool(caps, 1, seed_offset=50_000)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_model(held)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)
    ok = float(np.mean([gold_score_video(r, c)["correct"] for r, c in zip(rec, caps)]))
    log(f"vae decoder: {step} steps; held-out reconstructions gold-correct {ok:.3f}")
    d = work / "video_vae_dec"
    vae.save_pretrained(d)
    prev = json.loads((work / "video_vae" / "train_info.json").read_text())
    (d / "train_info.json").write_text(json.dumps({**prev, "decoder_steps": step, "recon_gold": ok}))
    return vae


@torch.no_grad()
def posteriors(vae, pool: torch.Tensor, chunk: int = 128):
    mus, sds = [], []
    for i in range(0, len(pool), chunk):
        d = vae.encode(to_model(pool[i : i + chunk])).latent_dist
        mus.append(d.mean)
        sds.append(d.std)
    return torch.cat(mus), torch.cat(sds)


# ------------------------------------------------------------------ transformer


def build_pipe(vae, text_encoder, tokenizer, transformer):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**SCHED_CFG),
    )


@torch.no_grad()
def sample_videos(pipe, captions, seeds, steps: int = 20, cfg: float = SAMPLE_CFG, batch: int = 32) -> torch.Tensor:
    """B,F,3,H,W in [0,1] sampled with WanPipeline (one generator per sample)."""
    out = []
    for i in range(0, len(captions), batch):
        cs, ss = list(captions[i : i + batch]), seeds[i : i + batch]
        v = pipe(
            cs,
            num_frames=FRAMES,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=[torch.Generator().manual_seed(int(s)) for s in ss],
            output_type="pt",
        ).frames
        out.append(v.float().cpu())
    return torch.cat(out)


def heldout_samples(seeds) -> tuple[list[str], list[int]]:
    caps0 = heldout_eval_captions()
    caps = [c for _ in seeds for c in caps0]
    sd = [s * len(caps0) + i for s in seeds for i in range(len(caps0))]
    return caps, sd


def heldout_eval(pipe, seeds=(0,), steps: int = 20, cfg: float = SAMPLE_CFG) -> dict:
    caps, sd = heldout_samples(seeds)
    return gold_report_video(sample_videos(pipe, caps, sd, steps=steps, cfg=cfg), caps)


def fmt_report(r: dict) -> str:
    kinds = " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items())
    cons = " ".join(f"{k}={v:.2f}" for k, v in r["per_constraint"].items())
    return f"acc={r['accuracy']:.3f} n={r['n']} [{kinds}] [{cons}] frames_found={r['frames_found']:.2f}"


def text_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pipeline's conditioning: hidden states of the real tokens, zero-padded to MAX_SEQ."""
    h = text_encoder(ids, mask).last_hidden_state * mask.unsqueeze(-1)
    return F.pad(h, (0, 0, 0, MAX_SEQ - h.shape[1]))


class PaddedCrossAttention:
    """Training-time cross-attention processor: the pipeline's MAX_SEQ zero-padded text tokens,
    computed over TEXT_LEN positions. Zero embeddings all give the same key and value, so
    attending to the n = MAX_SEQ - L pad positions equals attending to the m = TEXT_LEN - L
    pad positions kept here with log(n / m) added to their logits (exact, ~2.5x cheaper).
    `bias` (B,1,1,TEXT_LEN) is set per batch; None passes everything through unchanged."""

    def __init__(self, inner):
        self.inner, self.bias = inner, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None and self.bias is not None:
            attention_mask = self.bias.to(hidden_states.dtype)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def short_text_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor):
    """(hidden states zero-padded to TEXT_LEN, the PaddedCrossAttention bias)."""
    h = text_encoder(ids, mask).last_hidden_state * mask.unsqueeze(-1)
    n_real = mask.sum(1, keepdim=True).float()
    pad_bias = torch.log((MAX_SEQ - n_real) / (ids.shape[1] - n_real))
    bias = torch.where(mask.bool(), torch.zeros_like(pad_bias), pad_bias)
    return h, bias[:, None, None, :]


def train_transformer(
    out: Path,
    work: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    eval_every: float = 6.0,
    batch: int = 32,
    lr: float = 1e-3,
    single_clips: int = 16,
    pair_clips: int = 2,
    stop_accuracy: float = 0.25,
    max_accuracy: float = 0.6,
    eval_seeds=(0,),
    init_from: Path | None = None,
):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    seed_all(seed)
    vae_dir = work / "video_vae_dec" if (work / "video_vae_dec").is_dir() else work / "video_vae"
    vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    log(f"transformer: VAE {vae_dir}")
    tokenizer = make_tokenizer()
    train = video_train_captions()
    singles = [c for c in train if parse_video(c).kind != "and"]
    pairs = [c for c in train if parse_video(c).kind == "and"]
    c1, p1 = clip_pool(singles, single_clips)
    c2, p2 = clip_pool(pairs, pair_clips)
    caps, pool = c1 + c2, torch.cat([p1, p2])
    del p1, p2
    log(f"transformer: encoding {len(caps)} train clips")
    t = time.time()
    mu, sd = posteriors(vae, pool)
    log(f"transformer: latents {tuple(mu.shape)} ({time.time() - t:.0f}s)")
    lat_mean = mu.mean(dim=(0, 2, 3, 4))
    lat_std = (mu + sd * torch.randn_like(sd)).std(dim=(0, 2, 3, 4))
    if init_from is not None:  # continue a saved pipeline: keep its latent normalisation
        icfg = json.loads((init_from / "vae" / "config.json").read_text())
        lat_mean, lat_std = torch.tensor(icfg["latents_mean"]), torch.tensor(icfg["latents_std"])
    vae.register_to_config(latents_mean=lat_mean.tolist(), latents_std=lat_std.tolist())
    m5, s5 = lat_mean.view(1, -1, 1, 1, 1), lat_std.view(1, -1, 1, 1, 1)
    kinds = [parse_video(c).kind for c in caps]
    n_kind = {k: kinds.count(k) for k in set(kinds)}
    weights = torch.tensor([KIND_SHARE[k] / n_kind[k] for k in kinds], dtype=torch.float64)
    enc = tokenizer(sorted(set(caps)) + [""], padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    index = {c: i for i, c in enumerate(sorted(set(caps)) + [""])}
    cap_idx = torch.tensor([index[c] for c in caps])
    empty = index[""]

    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_CFG))
    transformer = WanTransformer3DModel(**TRANSFORMER_CFG)
    if init_from is not None:
        transformer.load_state_dict(
            WanTransformer3DModel.from_pretrained(init_from / "transformer").float().state_dict()
        )
        text_encoder.load_state_dict(UMT5EncoderModel.from_pretrained(init_from / "text_encoder").float().state_dict())
        log(f"transformer: initialised from {init_from}")
    cross = [PaddedCrossAttention(b.attn2.processor) for b in transformer.blocks]
    for b, proc in zip(transformer.blocks, cross):
        b.attn2.processor = proc
    log(
        f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params; "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M"
    )
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)

    def swap_ema():
        for p, e in zip(params, ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    history, stopped = [], False

    def snapshot(step):
        swap_ema()
        transformer.eval(), text_encoder.eval()
        pipe = build_pipe(vae, text_encoder, tokenizer, transformer)
        pipe.set_progress_bar_config(disable=True)
        t = time.time()
        r = heldout_eval(pipe, seeds=eval_seeds)
        log(f"eval step {step}: held-out {fmt_report(r)} ({time.time() - t:.0f}s)")
        history.append(
            {
                "step": step,
                "minutes": (time.time() - t0) / 60,
                **{k: r[k] for k in ("accuracy", "per_kind", "per_constraint", "frames_found")},
            }
        )
        save_pipe(pipe, work / f"wan_toy_step_{step:06d}", {"step": step, "heldout": r["accuracy"]})
        return pipe, r

    def restore():
        swap_ema()
        transformer.train(), text_encoder.train()

    t0, step, last_eval, losses = time.time(), 0, time.time(), []
    pipe = None
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        x0 = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g) - m5) / s5
        ci = cap_idx[idx].clone()
        ci[torch.rand(batch, generator=g) < 0.1] = empty
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(batch, generator=g)).view(-1, 1, 1, 1, 1)  # logit-normal(0, 1)
        xt = (1 - s) * x0 + s * noise
        cond, bias = short_text_states(text_encoder, enc.input_ids[ci], enc.attention_mask[ci])
        for proc in cross:
            proc.bias = bias
        v = transformer(xt, s.flatten() * 1000, cond, return_dict=False)[0]
        for proc in cross:
            proc.bias = None
        loss = F.mse_loss(v, noise - x0)
        step = ema_update_step(opt, loss, params, ema, step, lr, warmup=100, max_decay=0.995)
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"transformer step {step} loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / step:.2f}s/step)")
        if time.time() - last_eval > eval_every * 60:
            pipe, r = snapshot(step)
            last_eval = time.time()
            if stop_accuracy <= r["accuracy"] <= max_accuracy:
                stopped = True
                break
            restore()
    if not stopped:
        pipe, r = snapshot(step)
    info = {
        "steps": step,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "minutes": (time.time() - t0) / 60,
        "pool": {"clips": len(caps), "single_clips": single_clips, "pair_clips": pair_clips},
        "stop_band": [stop_accuracy, max_accuracy],
        "init_from": str(init_from) if init_from else None,
        "sample": {"num_inference_steps": 20, "guidance_scale": SAMPLE_CFG, "num_frames": FRAMES},
        "heldout_gold": r["accuracy"],
        "history": history,
    }
    save_pipe(pipe, out / "wan_toy", info)
    log(f"transformer: saved {out / 'wan_toy'} after {step} steps")
    return pipe


def swap_decoder(pipe_dir: Path, vae_dir: Path) -> None:
    """Put the decoder of `vae_dir` (a `decoder` stage run: same frozen encoder, so the same
    latents) into the saved pipeline at `pipe_dir`, keeping its latents_mean / latents_std."""
    from diffusers import AutoencoderKLWan

    old = AutoencoderKLWan.from_pretrained(pipe_dir / "vae", torch_dtype=torch.float32)
    new = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=torch.float32)
    for a, b in zip(old.encoder.state_dict().values(), new.encoder.state_dict().values()):
        if not torch.allclose(a, b, atol=1e-2):  # fp16 round trip
            raise ValueError(f"{vae_dir}: its encoder differs from {pipe_dir / 'vae'}'s; the latents would not match")
    new.register_to_config(latents_mean=old.config.latents_mean, latents_std=old.config.latents_std)
    shutil.rmtree(pipe_dir / "vae")
    new.to(torch.float16).save_pretrained(pipe_dir / "vae", safe_serialization=True)
    info_p = pipe_dir / "train_info.json"
    info = json.loads(info_p.read_text())
    info["vae_decoder_from"] = json.loads((vae_dir / "train_info.json").read_text())
    info_p.write_text(json.dumps(info, indent=2))
    log(f"swapped the decoder of {vae_dir} into {pipe_dir}")


def final_report(
    out: Path, seeds=(0, 1, 2), steps: int = 20, cfg: float = SAMPLE_CFG, json_out: Path | None = None
) -> dict:
    """Held-out gold of the shipped wan_toy (WanPipeline samples), and, when the shipped proxy
    exists, its agreement with gold on those samples: the fraction of (gold-correct,
    gold-incorrect) sample pairs the proxy orders the same way (AUC)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(out / "wan_toy", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    caps, sd = heldout_samples(seeds)
    videos = sample_videos(pipe, caps, sd, steps=steps, cfg=cfg)
    r = gold_report_video(videos, caps)
    log(
        f"final wan_toy held-out gold ({len(seeds)} seeds x {len(heldout_eval_captions())} captions, "
        f"{steps} steps, cfg {cfg}): {fmt_report(r)}"
    )
    result = {
        "settings": {
            "captions": len(heldout_eval_captions()),
            "seeds": list(seeds),
            "steps": steps,
            "guidance_scale": cfg,
        },
        "wan_toy": {k: v for k, v in r.items() if k != "scores"},
        "train_info": {
            k: v for k, v in json.loads((out / "wan_toy" / "train_info.json").read_text()).items() if k != "history"
        },
    }
    if (out / "video_proxy").is_dir():
        from .video_proxy import load_video_proxy

        proxy = load_video_proxy(out / "video_proxy")
        with torch.no_grad():
            score = torch.cat([proxy(videos[i : i + 64], caps[i : i + 64]) for i in range(0, len(caps), 64)])
        ok = torch.tensor([s["correct"] for s in r["scores"]])
        pos, neg = score[ok], score[~ok]
        auc = float((pos[:, None] > neg[None]).float().mean()) if len(pos) and len(neg) else float("nan")
        # concordance with the fraction of gold constraints met (defined even when no sample is
        # fully correct): over sample pairs whose fractions differ, how often the proxy agrees
        frac = torch.tensor([np.mean([s[c] for c in VIDEO_CONSTRAINTS]) for s in r["scores"]])
        higher = frac[:, None] > frac[None]
        conc = float((score[:, None] > score[None])[higher].float().mean()) if higher.any() else float("nan")
        cfgp = json.loads((out / "video_proxy" / "video_proxy_config.json").read_text())
        result["proxy"] = {
            "heldout_pairwise_accuracy": cfgp["heldout_pairwise_accuracy"],
            "gold_agreement_auc": auc,
            "gold_fraction_concordance": conc,
            "mean_score_gold_correct": float(pos.mean()) if len(pos) else float("nan"),
            "mean_score_gold_incorrect": float(neg.mean()) if len(neg) else float("nan"),
        }
        log(f"proxy vs gold on these samples: AUC {auc:.3f}, concordance with constraint fraction {conc:.3f}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "decoder", "transformer", "proxy", "all", "report", "swap-decoder"])
    ap.add_argument("--out", type=Path, default=HERE / "assets")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmalign_video_work"))
    ap.add_argument("--minutes", type=float, default=40.0, help="transformer training time box")
    ap.add_argument("--vae-minutes", type=float, default=6.0)
    ap.add_argument("--proxy-minutes", type=float, default=6.0)
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--vae-resume", action="store_true", help="vae stage: continue the VAE saved under --work")
    ap.add_argument("--transformer-steps", type=int, default=None)
    ap.add_argument("--proxy-steps", type=int, default=None)
    ap.add_argument("--eval-every", type=float, default=6.0, help="minutes between held-out evals/checkpoints")
    ap.add_argument("--stop-accuracy", type=float, default=0.25)
    ap.add_argument("--max-accuracy", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-from", type=Path, default=None, help="transformer stage: continue a saved wan_toy folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-dir", type=Path, default=None, help="swap-decoder stage: the decoder stage's VAE folder")
    ap.add_argument("--json", type=Path, default=None, help="report stage: write the numbers here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    t = time.time()
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_minutes, args.seed, args.vae_steps, resume=args.vae_resume)
    if args.stage in ("decoder", "all"):
        train_vae_decoder(args.work, args.vae_minutes, args.seed)
    if args.stage in ("transformer", "all"):
        train_transformer(
            args.out,
            args.work,
            args.minutes,
            args.seed,
            args.transformer_steps,
            args.eval_every,
            batch=args.batch,
            lr=args.lr,
            stop_accuracy=args.stop_accuracy,
            max_accuracy=args.max_accuracy,
            init_from=args.init_from,
        )
    if args.stage == "swap-decoder":
        swap_decoder(args.out / "wan_toy", args.vae_dir or args.work / "video_vae_dec")
    if args.stage in ("proxy", "all"):
        from .video_proxy import train_video_proxy

        train_video_proxy(args.out, args.proxy_minutes, args.seed, args.proxy_steps)
    if args.stage in ("all", "report"):
        final_report(args.out, json_out=args.json)
    log(f"done in {(time.time() - t) / 60:.1f} min")


if __name__ == "__main__":
    main()
